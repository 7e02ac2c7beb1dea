"""Score SDE (Song et al. 2021, arXiv 2011.13456) training configs: continuous-time VP, sub-VP, VE.

Usage: train.py --config=configs/sde.py:PRESET[,OPTION...] --workdir=DIR [--config.a.b=value]

Presets:
  cifar10  32×32 CIFAR-10, unconditional, score_sde's continuous-time configs
           (configs/{vp,subvp}/cifar10_ddpmpp_continuous.py, configs/ve/cifar10_ncsnpp_continuous.py):
           batch 128, Adam lr 2e-4 with 5k warm-up steps, gradient clipping at 1, 1.3M steps, EMA
           0.9999 (VP, sub-VP) / 0.999 (VE), dropout 0.1, random x-flips, 128 channels (1, 2, 2, 2),
           4 blocks per level, attention at 16²; PC sampling with 1000 steps.
  digits   the built-in 8×8 scikit-learn digits, class-conditional: a CPU-scale run (minutes).
Options:
  vp (default) / subvp   DDPM++ (positional embedding of 999·t, ε-prediction, reduce_mean loss),
                         PC: Euler–Maruyama predictor, no corrector, ε = 1e-3
  ve                     NCSN++ (Fourier embedding of ln σ, residual input path, FIR resampling,
                         σ·score output, ½·sum loss), PC: reverse diffusion + Langevin (snr 0.16),
                         ε = 1e-5; σ ∈ [0.02, 100] (score_sde's [0.01, 50] on [0, 1] data)
  likelihood             likelihood weighting λ(t) = g(t)² instead of σ_t² (Song et al. 2021b)
  deep                   cifar10: the "deep" networks (8 blocks per level, 950k steps) of the best
                         published results (VE FID 2.20, sub-VP 2.99 bits/dim)
  cond / uncond          class-conditional or not (cifar10 is unconditional, digits conditional)

Units: EMA and warm-up are given in images (EDM's convention): score_sde's per-step EMA rate r at
batch B is a half-life of B·ln 2/(−ln r) images (0.9999 at 128 → 887k images, 0.999 → 88.7k), and its
5k-step warm-up is 640k images.
"""

from __future__ import annotations

import math

from configs import common

PRESETS = ('cifar10', 'digits')
OPTIONS = ('vp', 'subvp', 've', 'likelihood', 'deep', 'cond', 'uncond')

# score_sde's constants (configs/default_cifar10_configs.py), in diffjax's [−1, 1] data units.
SDE_KWARGS = {
    'vp': {'beta_min': 0.1, 'beta_max': 20.0},
    'subvp': {'beta_min': 0.1, 'beta_max': 20.0},
    've': {'sigma_min': 0.02, 'sigma_max': 100.0},
}
TRAIN_EPSILON = 1e-5
SAMPLING = {
    # configs/{vp,subvp}/cifar10_ddpmpp_continuous.py and run_lib.py's sampling_eps.
    'vp': {'predictor': 'euler_maruyama', 'corrector': 'none', 'snr': 0.16, 'epsilon': 1e-3},
    'subvp': {'predictor': 'euler_maruyama', 'corrector': 'none', 'snr': 0.16, 'epsilon': 1e-3},
    # configs/ve/cifar10_ncsnpp_continuous.py.
    've': {'predictor': 'reverse_diffusion', 'corrector': 'langevin', 'snr': 0.16, 'epsilon': 1e-5},
}


def ema_halflife_images(rate: float, batch_size: int) -> float:
  """The EMA half-life in images of a per-step EMA rate at a batch size."""
  return batch_size * math.log(2.0) / -math.log(rate)


def get_config(arg: str | None = None):
  preset, options = common.parse_arg(arg, PRESETS, OPTIONS, default='digits')
  kinds = [o for o in options if o in SDE_KWARGS]
  if len(kinds) > 1:
    raise ValueError(f'Pick one SDE of vp, subvp, ve; got {", ".join(kinds)}.')
  kind = kinds[0] if kinds else 'vp'
  c = common.base_config()
  c.augment.p = 0.0  # score_sde uses random x-flips only

  if preset == 'cifar10':
    c.data.name = 'cifar10'
    c.data.conditional = False
    c.data.x_flip = True
    resolution, channels = 32, 3
    c.model.preset = 'ncsnpp_cifar10' if kind == 've' else 'ddpmpp_cifar10'
    c.model.kwargs = {'dropout': 0.1, 'label_dropout': 0.0, 'dtype': 'float32',
                      'channel_mult': (1, 2, 2, 2), 'num_blocks': 4, 'attn_resolutions': (16,)}
    c.optim.lr = 2e-4
    c.optim.lr_rampup_images = 5000 * 128
    c.optim.grad_clip = 1.0
    c.train.batch_size = 128
    c.train.total_images = 1_300_001 * 128
    if 'deep' in options:   # configs/*/cifar10_*_deep_continuous.py
      c.model.kwargs.num_blocks = 8
      c.train.total_images = 950_001 * 128
    c.train.ema_halflife_images = ema_halflife_images(0.999 if kind == 've' else 0.9999, 128)
    c.train.ema_rampup_ratio = 0.0  # score_sde's EMA has no ramp-up
    c.train.log_every = 50
    c.train.checkpoint_every = 50_000
    c.train.sample_every = 50_000
    c.sample.num_steps = 1000
  else:  # digits
    c.data.name = 'digits'
    c.data.conditional = True
    resolution, channels = 8, 1
    c.model.preset = 'digits'
    c.model.kwargs = {'dropout': 0.05, 'label_dropout': 0.0, 'dtype': 'float32'}
    if kind == 've':  # NCSN++-style conditioning: Fourier features of ln(½σ)
      c.model.kwargs.embedding_type = 'fourier'
      c.model.kwargs.channel_mult_noise = 2
    c.optim.lr = 2e-3
    c.optim.lr_rampup_images = 20e3
    c.optim.grad_clip = 1.0
    c.train.batch_size = 128
    c.train.total_images = 128 * 1500
    c.train.ema_halflife_images = 50e3
    c.train.log_every = 50
    c.train.checkpoint_every = 250
    c.train.sample_every = 0
    c.train.num_preview = 100
    c.sample.num_steps = 500

  sde_kwargs = dict(SDE_KWARGS[kind])
  c.precond.name = f'sde_{kind}'
  c.precond.kwargs = {**sde_kwargs, 'epsilon': TRAIN_EPSILON}
  c.loss.name = f'sde_{kind}'
  # VP / sub-VP configs average the loss over pixels (reduce_mean=True); VE sums it (½·sum).
  reduce_mean = kind != 've'
  c.loss.kwargs = {**sde_kwargs, 'epsilon': TRAIN_EPSILON, 'reduce_mean': reduce_mean,
                   'num_dims': resolution * resolution * channels,
                   'likelihood_weighting': 'likelihood' in options}
  c.sample.sampler = 'pc'
  c.sample.kwargs = {**SAMPLING[kind], 'n_corrector_steps': 1, 'denoise': True}

  if 'uncond' in options:
    c.data.conditional = False
  if 'cond' in options:
    c.data.conditional = True
  return c
