"""EDM (Karras et al. 2022) training configs.

Usage: train.py --config=configs/edm.py:PRESET[,OPTION...] --workdir=DIR [--config.a.b=value]

Presets (EDM config F unless an option changes it):
  cifar10    32×32 CIFAR-10, DDPM++ (55.7M params), batch 512, 200 Mimg, aug p = 0.12
  ffhq64     64×64 FFHQ from an image folder, DDPM++ 64², batch 256, 200 Mimg, aug p = 0.15
  afhqv2_64  64×64 AFHQv2 from an image folder, DDPM++ 64², batch 256, 200 Mimg, aug p = 0.15
  digits     the built-in 8×8 scikit-learn digits: the CPU quickstart (800 steps, ~7 min)
  tiny       a minute-scale digits run with a tiny network, for tests
Options:
  cond / uncond   class-conditional (default for cifar10, digits) or not
  ddpmpp / ncsnpp the network (EDM's "VP" and "VE" architectures)
  vp / ve / edm   the preconditioning + loss formulation (EDM Table 1); edm is config F
"""

from __future__ import annotations

from configs import common

PRESETS = ('cifar10', 'ffhq64', 'afhqv2_64', 'digits', 'tiny')
OPTIONS = ('cond', 'uncond', 'ddpmpp', 'ncsnpp', 'vp', 've', 'edm')

# Preconditioning and loss of each formulation (EDM Table 1; config F uses edm for both nets).
FORMULATIONS = {
    'edm': ({'name': 'edm', 'kwargs': {'sigma_data': 0.5}},
            {'name': 'edm', 'kwargs': {'p_mean': -1.2, 'p_std': 1.2, 'sigma_data': 0.5}}),
    'vp': ({'name': 'vp', 'kwargs': {}}, {'name': 'vp', 'kwargs': {}}),
    've': ({'name': 've', 'kwargs': {}}, {'name': 've', 'kwargs': {}}),
}


def get_config(arg: str | None = None):
  preset, options = common.parse_arg(arg, PRESETS, OPTIONS, default='digits')
  c = common.base_config()
  net = 'ncsnpp' if 'ncsnpp' in options else 'ddpmpp'

  if preset == 'cifar10':
    c.data.name = 'cifar10'
    c.model.preset = f'{net}_cifar10'
  elif preset in ('ffhq64', 'afhqv2_64'):
    # EDM: FFHQ/AFHQv2 at 64², unconditional, batch 256, lr 2e-4, aug 0.15, dropout 0.05/0.25.
    c.data.name = preset
    c.data.conditional = False
    c.model.preset = f'{net}_64'
    c.model.kwargs.dropout = 0.05 if preset == 'ffhq64' else 0.25
    c.augment.p = 0.15
    c.optim.lr = 2e-4
    c.train.batch_size = 256
    c.sample.num_steps = 40
  elif preset in ('digits', 'tiny'):
    c.data.name = 'digits'
    c.model.preset = 'digits' if preset == 'digits' else 'tiny'
    c.model.kwargs.dropout = 0.0 if preset == 'tiny' else 0.05
    c.augment.p = 0.0          # 1.8k images: augmentation would only slow the quickstart down
    c.optim.lr = 2e-3
    # 800 steps: ~7 min on 2 idle CPU cores. Measured with the digits evaluator (1000 samples,
    # Heun 18; the real test split scores FD 2.21): step 500 FD 2.72 / accuracy 0.970, step 1000
    # FD 1.58 / 0.982, step 1200 FD 1.34 / 0.979.
    common.digits_schedule(c, preset)
    c.train.checkpoint_every = 400 if preset == 'digits' else 10

  if 'uncond' in options:
    c.data.conditional = False
  if 'cond' in options:
    c.data.conditional = True
  for name in ('vp', 've', 'edm'):
    if name in options:
      precond, loss = FORMULATIONS[name]
      c.precond.name, c.loss.name = precond['name'], loss['name']
      c.precond.kwargs = precond['kwargs']
      c.loss.kwargs = loss['kwargs']
  return c
