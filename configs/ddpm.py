"""DDPM (Ho et al. 2020) training configs.

Usage: train.py --config=configs/ddpm.py:cifar10 --workdir=DIR [--config.a.b=value]

Presets:
  cifar10  32×32 CIFAR-10, unconditional, the 35.7M U-Net (ch 128, mult (1,2,2,2), 2 res blocks,
           attention at 16², dropout 0.1), linear β from 1e-4 to 0.02 over T = 1000, ε-prediction
           with L_simple and a fixed variance; Adam lr 2e-4 with a 5000-step warm-up, gradient
           clipping at 1, batch 128, 800K steps, EMA 0.9999, random horizontal flips; sampled by the
           1000-step ancestral sampler with σ_t² = β_t ("fixed_large", the released CIFAR-10 model).
"""

from __future__ import annotations

from configs import common
from configs.iddpm import discrete_run, ema_halflife_images

PRESETS = ('cifar10',)
OPTIONS = ('cond', 'uncond')


def get_config(arg: str | None = None):
  preset, options = common.parse_arg(arg, PRESETS, OPTIONS, default='cifar10')
  del preset  # one preset
  c = common.base_config()
  c.data.name = 'cifar10'
  c.data.conditional = 'cond' in options
  c.data.x_flip = True
  c.model.preset = 'ddpm_cifar10'
  c.model.kwargs.dropout = 0.1
  discrete_run(c, beta_schedule='linear', num_timesteps=1000, rescale_timesteps=False,
               loss_type='simple', variance='fixed_large', sampler_variance='fixed_large')
  c.optim.lr = 2e-4
  c.optim.lr_rampup_images = 5000 * 128
  c.optim.grad_clip = 1.0
  c.train.batch_size = 128
  c.train.total_images = 800e3 * 128
  c.train.ema_rampup_ratio = 0.0
  c.train.ema_halflife_images = ema_halflife_images(0.9999, 128)
  return c
