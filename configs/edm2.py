"""EDM2 (Karras et al. 2024) training configs: magnitude-preserving U-Net, learned uncertainty, Adam
β2 0.99, inverse-square-root learning-rate decay.

Usage: train.py --config=configs/edm2.py:PRESET[,OPTION...] --workdir=DIR [--config.a.b=value]

Presets (train_edm2.py's values; the batch is 2048 and t_ref is counted in images, 2048·35k):
  img64-xs .. img64-xl  class-conditional ImageNet 64×64 (imagenet64), model channels
                        128/192/256/320/384, ref lr 0.0120/0.0100/0.0090/0.0080/0.0070, dropout
                        0/0/0.1/0.1/0.1, P_mean −0.8, P_std 1.6, 1024/1024/2048/1024/640 Mi images
  digits                the built-in 8×8 scikit-learn digits: the CPU quickstart (800 steps)
  tiny                  a seconds-scale digits run with a tiny network, for tests
Options:
  cond / uncond         class-conditional (the default) or not

Every preset tracks the post-hoc EMA profiles σ_rel 0.05 and 0.10 (train.phema_stds) and keeps
every checkpoint (each is a snapshot of them): `python -m diffjax.phema --workdir=W --std=0.07
--out=W2` then writes a run with any other EMA length. The traditional EMA (train.ema_*) is kept
too; it is what the run itself samples with.
"""

from __future__ import annotations

from configs import common

PRESETS = ('img64-xs', 'img64-s', 'img64-m', 'img64-l', 'img64-xl', 'digits', 'tiny')
OPTIONS = ('cond', 'uncond')

# train_edm2.py, edm2-img64-*: (ref lr, training images); channels and dropout are the network
# preset's (diffjax.models.edm2).
_IMG64 = {'xs': (0.0120, 1024 << 20), 's': (0.0100, 1024 << 20), 'm': (0.0090, 2048 << 20),
          'l': (0.0080, 1024 << 20), 'xl': (0.0070, 640 << 20)}
_IMG64_DROPOUT = {'xs': 0.0, 's': 0.0, 'm': 0.1, 'l': 0.1, 'xl': 0.1}


def get_config(arg: str | None = None):
  preset, options = common.parse_arg(arg, PRESETS, OPTIONS, default='digits')
  c = common.base_config()
  c.precond.name = 'edm'           # EDM2's Precond is EDM's: σ_d = 0.5, c_noise = ln(σ)/4
  c.precond.kwargs = {'sigma_data': 0.5}
  c.loss.name = 'edm2'
  c.loss.kwargs = {'p_mean': -0.8, 'p_std': 1.6, 'sigma_data': 0.5}
  c.augment.p = 0.0                # EDM2 trains without augmentation
  c.model.kwargs.label_dropout = 0.0
  c.optim.b2 = 0.99
  c.train.ema_rampup_ratio = 0.05
  c.train.phema_stds = (0.050, 0.100)  # PowerFunctionEMA's default profiles
  c.train.keep_checkpoints = 1_000_000  # All of them: they are the post-hoc EMA snapshots.

  if preset.startswith('img64-'):
    size = preset.split('-')[1]
    lr, images = _IMG64[size]
    c.data.name = 'imagenet64'
    c.model.preset = f'edm2-{preset}'
    c.model.kwargs.dropout = _IMG64_DROPOUT[size]
    c.optim.lr = lr
    c.optim.lr_rampup_images = 10e6            # learning_rate_schedule's rampup_Mimg = 10
    c.optim.lr_decay_images = 35000 * 2048     # t_ref = 35k batches of 2048
    c.train.batch_size = 2048
    c.train.total_images = float(images)
    c.train.ema_halflife_images = 10e6
    c.train.checkpoint_every = 4096            # 8 Mi images: EDM2's snapshot interval
    c.sample.num_steps = 32                    # EDM2's ImageNet-64 sampler: Heun, 63 NFE
  elif preset in ('digits', 'tiny'):
    c.data.name = 'digits'
    c.model.preset = 'edm2-digits' if preset == 'digits' else 'edm2-tiny'
    c.model.kwargs.dropout = 0.0
    # Measured with the digits evaluator (1000 samples, Heun 18) at step 800, on 2 busy CPU cores
    # (~15 min): lr 0.02 FD 1.55 / accuracy 0.974 (post-hoc σ_rel 0.05: 1.59 / 0.974); lr 0.01
    # FD 3.08 / 0.975 (σ_rel 0.05: 3.07, 0.07: 3.09, 0.10: 3.19, 0.15: 3.57). configs/edm.py:digits
    # scored FD 1.62 / 0.981 at the same step.
    c.optim.lr = 2e-2
    c.optim.lr_decay_images = 128 * 200      # t_ref = 200 steps: lr halves by step 800
    common.digits_schedule(c, preset)
    c.train.checkpoint_every = 100 if preset == 'digits' else 5  # 8 and 4 snapshots

  if 'uncond' in options:
    c.data.conditional = False
  if 'cond' in options:
    c.data.conditional = True
  return c
