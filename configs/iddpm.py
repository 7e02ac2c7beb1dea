"""Improved DDPM (Nichol & Dhariwal 2021) training configs.

Usage: train.py --config=configs/iddpm.py:PRESET[,OPTION...] --workdir=DIR [--config.a.b=value]

Presets (the paper's hyperparameters, from improved-diffusion's README flags):
  cifar10     32×32 CIFAR-10, unconditional, 128 channels, 3 blocks, dropout 0.3, attention at 16 and
              8 with 4 heads, scale-shift norm, learned variance; T = 4000 cosine; Adam lr 1e-4,
              batch 128, 500K steps, EMA 0.9999
  imagenet64  64×64 downsampled ImageNet, unconditional, 128 channels, mult (1,2,3,4), 3 blocks;
              T = 4000 cosine; lr 1e-4, batch 128, 1.5M steps, EMA 0.9999
  digits      the built-in 8×8 digits, class-conditional, a 1.2M-parameter ADM, T = 1000 cosine,
              L_hybrid, sampled with 50 respaced ancestral steps: the CPU quickstart (minutes)
  tiny        a seconds-scale digits run for tests
Options:
  hybrid (default) / vlb   L_hybrid = L_simple + 0.001·L_vlb, or L_vlb with importance sampling of t
  cond / uncond            class-conditional or not
  linear / cosine          the β schedule (the paper's default is cosine)
"""

from __future__ import annotations

import math

from configs import common

PRESETS = ('cifar10', 'imagenet64', 'digits', 'tiny')
OPTIONS = ('hybrid', 'vlb', 'cond', 'uncond', 'linear', 'cosine')


def ema_halflife_images(decay: float, batch_size: int) -> float:
  """The EMA half-life in images of a per-step decay (diffjax counts the EMA in images, EDM)."""
  return batch_size * math.log(0.5) / math.log(decay)


def discrete_run(c, *, beta_schedule: str, num_timesteps: int, rescale_timesteps: bool,
                 loss_type: str, variance: str, sampler_variance: str) -> None:
  """Sets the parts every DDPM/iDDPM run shares: discrete precond, 'ddpm' loss, ancestral sampler."""
  c.precond.name = 'ddpm'
  c.precond.kwargs = {'beta_schedule': beta_schedule, 'num_timesteps': num_timesteps,
                      'rescale_timesteps': rescale_timesteps}
  c.loss.name = 'ddpm'
  c.loss.kwargs = {'loss_type': loss_type, 'variance': variance, 'vlb_weight': 0.001,
                   'schedule_sampler': 'uniform'}
  c.model.out_channel_mult = 2 if variance == 'learned' else 1
  c.augment.p = 0.0
  c.sample.sampler = 'ddpm'
  c.sample.num_steps = num_timesteps
  c.sample.kwargs = {'variance': sampler_variance, 'clip_denoised': True}


def get_config(arg: str | None = None):
  preset, options = common.parse_arg(arg, PRESETS, OPTIONS, default='digits')
  c = common.base_config()
  c.optim.lr_rampup_images = 0.0   # improved-diffusion has no warm-up
  c.train.ema_rampup_ratio = 0.0   # …and a plain EMA of 0.9999 per step
  c.data.conditional = False
  num_timesteps, rescale = 4000, True

  if preset == 'cifar10':
    c.data.name = 'cifar10'
    c.model.preset = 'iddpm_cifar10'
    c.model.kwargs.dropout = 0.3
    c.optim.lr = 1e-4
    c.train.batch_size = 128
    c.train.total_images = 500e3 * 128
  elif preset == 'imagenet64':
    c.data.name = 'downsampled_imagenet64'
    c.model.preset = 'iddpm_imagenet64'
    c.model.kwargs.dropout = 0.0
    c.optim.lr = 1e-4
    c.train.batch_size = 128
    c.train.total_images = 1.5e6 * 128
  else:  # digits / tiny
    c.data.name = 'digits'
    c.data.conditional = True
    c.model.preset = 'adm_digits' if preset == 'digits' else 'adm_tiny'
    c.model.kwargs.dropout = 0.1 if preset == 'digits' else 0.0
    num_timesteps, rescale = (1000, False) if preset == 'digits' else (100, False)
    c.optim.lr = 2e-3 if preset == 'digits' else 1e-3
    c.optim.lr_rampup_images = 20e3 if preset == 'digits' else 0.0
    c.train.batch_size = 128 if preset == 'digits' else 8
    c.train.total_images = 128 * 600 if preset == 'digits' else 8 * 6
    c.train.log_every = 50 if preset == 'digits' else 1
    c.train.checkpoint_every = 200 if preset == 'digits' else 3
    c.train.sample_every = 0
    c.train.num_preview = 100 if preset == 'digits' else 4
    c.train.ema_rampup_ratio = 0.05
    c.train.ema_halflife_images = 10e3 if preset == 'digits' else 100.0

  loss_type = 'vlb' if 'vlb' in options else 'hybrid'
  discrete_run(c, beta_schedule='linear' if 'linear' in options else 'cosine',
               num_timesteps=num_timesteps, rescale_timesteps=rescale, loss_type=loss_type,
               variance='learned', sampler_variance='learned')
  if loss_type == 'vlb':
    c.loss.kwargs.schedule_sampler = 'loss_second_moment'
  if preset in ('cifar10', 'imagenet64'):
    c.train.ema_halflife_images = ema_halflife_images(0.9999, c.train.batch_size)
  if preset == 'digits':
    c.sample.num_steps = 50   # respaced ("50" of 1000), learned variance
  elif preset == 'tiny':
    c.sample.num_steps = 4
  if 'uncond' in options:
    c.data.conditional = False
  if 'cond' in options:
    c.data.conditional = True
  return c
