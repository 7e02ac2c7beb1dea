"""Defaults every experiment config starts from, and the parsing of `--config=file.py:ARG`."""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """The fields every run has; experiment files override them (EDM CIFAR-10 config F values)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = 'cifar10'
  c.data.data_dir = ''          # '' = TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)
  c.data.conditional = True     # feed class labels to the network
  c.data.x_flip = False         # dataset x-flips (EDM uses augmentation instead)
  c.data.skip_bad_images = False  # image folders: skip files that are not images or do not decode

  c.model = ml_collections.ConfigDict()
  c.model.preset = 'ddpmpp_cifar10'
  c.model.kwargs = ml_collections.ConfigDict({'dropout': 0.13, 'label_dropout': 0.0,
                                              'dtype': 'float32'})
  c.model.remat = 'none'        # 'blocks' | 'full': rematerialize the U-Net blocks (less memory)

  c.precond = ml_collections.ConfigDict({'name': 'edm', 'kwargs': {'sigma_data': 0.5}})
  c.loss = ml_collections.ConfigDict({'name': 'edm', 'kwargs': {'p_mean': -1.2, 'p_std': 1.2,
                                                                'sigma_data': 0.5}})
  c.augment = ml_collections.ConfigDict({'p': 0.12})

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.lr_rampup_images = 10e6
  c.optim.grad_clip = 0.0       # 0 = no clipping

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 512
  c.train.total_images = 200e6
  c.train.ema_halflife_images = 0.5e6
  c.train.ema_rampup_ratio = 0.05
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 3
  c.train.sample_every = 10000  # 0 = previews only at the end
  c.train.num_preview = 64
  c.train.skip_nonfinite = False
  # Activations and matmuls in float32 | bfloat16 | float16; params, optimizer and EMA stay float32.
  c.train.compute_dtype = 'float32'
  c.train.loss_scale_init = 2.0**15  # float16 only: dynamic loss scale S at step 0,
  c.train.loss_scale_period = 2000   # doubled after this many finite steps, halved on overflow.

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = 'heun'
  c.sample.num_steps = 18
  c.sample.kwargs = ml_collections.ConfigDict({'s_churn': 0.0, 's_tmin': 0.0,
                                               's_tmax': float('inf'), 's_noise': 1.0})
  c.sample.guidance = 0.0
  return c


def digits_schedule(c: ml_collections.ConfigDict, preset: str) -> None:
  """The CPU-sized run length, logging and previews of the `digits` (800 steps of 128) and `tiny`
  (20 steps, test-sized) presets that the EDM-family configs share; lr and checkpointing
  stay each config's own."""
  digits = preset == 'digits'
  c.optim.lr_rampup_images = 20e3
  c.train.batch_size = 128
  c.train.total_images = 128 * (800 if digits else 20)
  c.train.ema_halflife_images = 50e3 if digits else 500.0
  c.train.log_every = 50 if digits else 5
  c.train.sample_every = 400 if digits else 0
  c.train.num_preview = 100 if digits else 8
  c.sample.num_steps = 18 if digits else 4


def parse_arg(arg: str | None, presets: dict, options: dict, default: str):
  """Splits `preset[,option...]` into the preset name and its options.

  Args:
    arg: the text after ':' in --config=file.py:ARG (None or '' → default).
    presets: known preset names.
    options: known option names.
    default: preset used when arg is empty.

  Raises:
    ValueError: naming the known presets/options when a word is unknown.
  """
  words = [w.strip() for w in (arg or default).split(',') if w.strip()]
  preset, chosen = words[0], words[1:]
  if preset not in presets:
    raise ValueError(f'Unknown preset {preset!r}; known presets: {", ".join(sorted(presets))}.')
  for w in chosen:
    if w not in options:
      raise ValueError(f'Unknown option {w!r} for preset {preset!r}; known options: '
                       f'{", ".join(sorted(options))}.')
  return preset, chosen
