"""Soft Diffusion (Daras et al. 2022, arXiv 2209.05442) training configs: blur + noise, Soft Score
Matching, Momentum Sampler.

Usage: train.py --config=configs/soft.py:PRESET[,OPTION...] --workdir=DIR [--config.a.b=value]

The forward process x_t = C_t x_0 + σ_t η lives in config.precond (name 'soft'; kwargs = the
`corruptions.SoftSchedule` lists: corruption, knots t, levels ℓ, noise σ, the p_1 fit), so training
(loss 'soft') and sampling ('momentum' / 'soft_naive') read the same process. Its levels come from the
Wasserstein level-selection tool:

    python scripts/soft_levels.py --config=configs/soft.py:PRESET   # writes configs/soft_levels/…json

which reads config.soft (the tool's settings below) and the dataset, and writes the file this config
inlines (so a run's config.json is self-contained). Without the file the config falls back to
`corruptions.interpolated_schedule` (geometric levels, no p_1 fit: the sampler then starts from
N(0, σ_1² I), which misses the data's mean colour — run the tool before training a real model).

Presets:
  celeba64  CelebA 64×64, unconditional. Paper: blur + noise, FID 1.85. Levels (REFERENCE §5, from a
            secondary source): 256 candidate blur levels σ_B ∈ [0.01, 23] px, ε tuned to 32 levels,
            noise 0.01 → 0.1 (verify). Network and optimization are *our choices* (the paper's were not
            retrieved): EDM's 64² DDPM++ with EDM's FFHQ-64 settings (batch 256, lr 2e-4, 200 Mimg,
            dropout 0.05), x-flips, no augmentation.
  cifar10   CIFAR-10 32×32, unconditional. Paper: FID 4.64. Blur range scaled from CelebA by
            resolution (σ_B ≤ 11.5 px, our choice); network/optimization: EDM config F (DDPM++,
            batch 512, lr 1e-3, 200 Mimg, dropout 0.13, augmentation p = 0.12).
  digits    the built-in 8×8 digits, class-conditional, 1800 steps of batch 128. σ_B ≤ 8 px (= the
            image size: at t = 1 every non-constant DCT mode keeps < 1% of its amplitude, so the
            Gaussian p_1 fit only describes the mean intensity, which suits a class-conditional
            model), 32 levels, noise 0.01 → 0.5. The larger top noise is chosen with the tool's
            audit (`samplers.momentum.gaussian_variance_ratio`): with σ_1 = 0.1 the first step out
            of σ_B = 8 px makes the lowest DCT modes from a single prediction, and even the exact
            model of the data's Gaussian fit then returns 17–20% of their variance (31 Momentum
            steps); with 0.5 it returns 88–102% (the naive sampler 39–48%). Evaluator figures
            (1000 samples, 31 steps, FD to the train split / class accuracy; real test split: FD
            2.2): at 600 steps momentum 21.6 / 0.88 against naive 11.9 / 0.99 (the Momentum
            Sampler follows the model's score and needs a better model than the naive one, which
            only re-blurs x̂_0); at 1200 steps 7.9 / 0.96 against 15.6 / 0.998; at 1800 steps
            4.5 / 0.975 against 16.0 / 0.997 — naive samples are near copies of one digit per
            class (it loses half the variance of every mode, as the audit predicts).
Options:
  cond / uncond             class-conditional or not
  blur / mask / identity    the corruption (identity = VE diffusion with the soft samplers)
  eps_weighted              Soft Score Matching with w(t) = 1/σ_t² instead of 1 (objectives.soft)
"""

from __future__ import annotations

import os

import ml_collections

from configs import common

PRESETS = ('celeba64', 'cifar10', 'digits')
OPTIONS = ('cond', 'uncond', 'blur', 'mask', 'identity', 'eps_weighted')
LEVELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'soft_levels')

# Level-selection settings (config.soft) per preset for blur; level = σ_B in pixels.
_BLUR = {
    'celeba64': dict(level_min=0.01, level_max=23.0),
    'cifar10': dict(level_min=0.01, level_max=11.5),
    'digits': dict(level_min=0.01, level_max=8.0, sigma_max=0.5),
}
# Other corruptions: masking hides a fraction ℓ ∈ (0, 1] of the pixels; identity is VE diffusion,
# whose noise has to grow to EDM's σ_max = 80 to reach a data-independent start.
_MASK = dict(level_min=1e-3, level_max=1.0)
_IDENTITY = dict(level_min=0.0, level_max=0.0, sigma_min=0.01, sigma_max=80.0)


def levels_path(preset: str, corruption: str = 'blur') -> str:
  """Where scripts/soft_levels.py writes (and this config reads) the levels of a preset."""
  suffix = '' if corruption == 'blur' else f'_{corruption}'
  return os.path.join(LEVELS_DIR, f'{preset}{suffix}.json')


def get_config(arg: str | None = None):
  preset, options = common.parse_arg(arg, PRESETS, OPTIONS, default='digits')
  c = common.base_config()
  corruption = next((o for o in ('mask', 'identity', 'blur') if o in options), 'blur')

  if preset == 'celeba64':
    c.data.name = 'celeb_a'
    c.data.conditional = False
    c.data.x_flip = True
    c.model.preset = 'ddpmpp_64'
    c.model.kwargs.dropout = 0.05
    c.augment.p = 0.0
    c.optim.lr = 2e-4
    c.train.batch_size = 256
  elif preset == 'cifar10':
    c.data.name = 'cifar10'
    c.data.conditional = False
    c.model.preset = 'ddpmpp_cifar10'
  elif preset == 'digits':
    # EDM's digits quickstart settings. 1800 steps: ~15 min on 2 idle CPU cores, about 30 on a loaded
    # machine; the Momentum Sampler overtakes the naive one between 600 and 1200 steps.
    c.data.name = 'digits'
    c.model.preset = 'digits'
    c.model.kwargs.dropout = 0.05
    c.augment.p = 0.0
    c.optim.lr = 2e-3
    c.optim.lr_rampup_images = 20e3
    c.train.batch_size = 128
    c.train.total_images = 128 * 1800
    c.train.ema_halflife_images = 50e3
    c.train.log_every = 50
    c.train.checkpoint_every = 600
    c.train.sample_every = 0
    c.train.num_preview = 100

  # The level-selection tool's settings (scripts/soft_levels.py).
  c.soft = ml_collections.ConfigDict()
  c.soft.corruption = corruption
  c.soft.num_levels = 32
  c.soft.num_candidates = 256
  c.soft.sigma_min = 0.01
  c.soft.sigma_max = 0.1
  c.soft.p1_tol = 0.1
  c.soft.max_images = 20000        # the data sample the Gaussian fit is estimated from
  c.soft.update({'blur': _BLUR[preset], 'mask': _MASK, 'identity': _IDENTITY}[corruption])
  c.soft.levels_file = levels_path(preset, corruption)

  from diffjax.processes import corruptions, soft_levels
  if os.path.exists(c.soft.levels_file):
    schedule = soft_levels.load_schedule(c.soft.levels_file)
    schedule.pop('info', None)
  else:
    schedule = corruptions.interpolated_schedule(
        corruption, c.soft.level_max, c.soft.sigma_min, c.soft.sigma_max, c.soft.num_levels,
        level_min=c.soft.level_min or None).to_dict()
  c.precond = ml_collections.ConfigDict({'name': 'soft', 'kwargs': {
      **schedule, 'noise_label_scale': 1000.0}})
  c.loss = ml_collections.ConfigDict({'name': 'soft', 'kwargs': {
      'weighting': 'eps' if 'eps_weighted' in options else 'none', 't_min': 0.0}})

  c.sample.sampler = 'momentum'
  c.sample.num_steps = len(schedule['t']) - 1  # one step per level: the sampler lands on the knots
  c.sample.kwargs = ml_collections.ConfigDict({'final_denoise': False})

  if 'uncond' in options:
    c.data.conditional = False
  if 'cond' in options:
    c.data.conditional = True
  return c
