"""Progressive distillation (Salimans & Ho 2022) and guided distillation (Meng et al. 2022) configs.

Usage:
  distill.py --config=configs/distill.py:PRESET[,OPTION...] --workdir=DIR [--teacher=TEACHER_DIR]
  train.py   --config=configs/distill.py:PRESET_teacher --workdir=TEACHER_DIR   (an α-σ CFG teacher)

Presets (distillation runs):
  cifar10     PD 8192 → 1 of a CIFAR-10 teacher (lr 5e−5, batch 128, no EMA, no dropout, clip 1,
              50k steps per halving; Salimans & Ho §5). ',guided': Meng et al. — stage 1 with
              w ~ U[0, 4], then PD 1024 → 1 with w threaded through.
  imagenet64  PD 1024 → 1 of a class-conditional ImageNet 64×64 teacher (',guided' as above).
  digits      the whole guided pipeline on the built-in 8×8 digits, CPU-sized: an α-σ v-prediction
              CFG teacher (trained in WORKDIR/teacher) → stage 1 → stage 2 rounds 16 → 1 steps.
  tiny        a seconds-long PD 8 → 1 of a tiny network, for tests.
Teacher presets (train.py runs in the α-σ form: cosine log-SNR, v-prediction, truncated-SNR
weighting, label dropout 0.1 for classifier-free guidance):
  cifar10_teacher, imagenet64_teacher, digits_teacher, tiny_teacher.
Options:
  guided / pd    guided distillation (stage 1 + w-conditioned rounds) or plain PD
  encoder        also distill the DDIM encoder (style transfer)

Values marked (verify) were not read in the papers: check them before a published-scale run.
"""

from __future__ import annotations

import ml_collections

from configs import common

PRESETS = ('cifar10', 'imagenet64', 'digits', 'tiny', 'cifar10_teacher', 'imagenet64_teacher',
           'digits_teacher', 'tiny_teacher')
OPTIONS = ('guided', 'pd', 'encoder')


def teacher_config(dataset: str) -> ml_collections.ConfigDict:
  """An α-σ teacher for train.py: v-prediction on the cosine log-SNR schedule, CFG label dropout."""
  c = common.base_config()
  c.precond = ml_collections.ConfigDict({'name': 'alpha_sigma_v', 'kwargs': {}})
  c.loss = ml_collections.ConfigDict({'name': 'alpha_sigma', 'kwargs': {'weighting': 'snr_trunc'}})
  c.augment.p = 0.0
  c.model.kwargs.label_dropout = 0.1          # Ho & Salimans: p_uncond = 0.1
  c.sample = ml_collections.ConfigDict({'sampler': 'distill_ddim', 'num_steps': 256, 'kwargs': {},
                                        'guidance': 0.3})
  if dataset == 'cifar10':
    c.data.name = 'cifar10'
    c.model.preset = 'ddpmpp_cifar10'
    c.model.kwargs.dropout = 0.2              # (verify) PD's CIFAR-10 teacher
    c.optim.lr = 2e-4                         # (verify)
    c.optim.lr_rampup_images = 5000 * 128
    c.train.batch_size = 128
    c.train.total_images = 800e3 * 128        # (verify) 800k steps
    c.sample.num_steps = 1024
  elif dataset == 'imagenet64':
    c.data.name = 'downsampled_imagenet64'
    c.model.preset = 'ddpmpp_64'
    c.model.kwargs.dropout = 0.1              # (verify)
    c.optim.lr = 3e-4                         # (verify)
    c.train.batch_size = 2048                 # (verify)
    c.train.total_images = 400e3 * 2048       # (verify)
    c.sample.num_steps = 1024
  elif dataset == 'digits':
    # Sized for a loaded 2-core CPU: the digits network with one block per level and no
    # attention, batch 64.
    c.data.name = 'digits'
    c.model.preset = 'digits'
    c.model.kwargs.dropout = 0.05
    c.model.kwargs.num_blocks = 1
    c.model.kwargs.attn_resolutions = ()
    c.optim.lr = 2e-3
    c.optim.lr_rampup_images = 10e3
    c.train.batch_size = 64
    c.train.total_images = 64 * 1000
    c.train.ema_halflife_images = 15e3
    c.train.log_every = 50
    c.train.checkpoint_every = 250
    c.train.sample_every = 0
    c.train.num_preview = 0
    c.sample.num_steps = 64
    c.sample.guidance = 0.5
  elif dataset == 'tiny':
    c.data.name = 'digits'
    c.model.preset = 'tiny'
    c.model.kwargs.dropout = 0.0
    c.model.kwargs.label_dropout = 0.1
    c.optim.lr = 2e-3
    c.optim.lr_rampup_images = 0.0
    c.train.batch_size = 8
    c.train.total_images = 8 * 2
    c.train.ema_halflife_images = 500.0
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.sample_every = 0
    c.train.num_preview = 0
    c.sample.num_steps = 8
  else:
    raise ValueError(f'No teacher config for {dataset!r}.')
  return c


def distill_config(dataset: str, guided: bool, encoder: bool) -> ml_collections.ConfigDict:
  """A distillation run: config.distill (the stages), the students' optimizer and training length."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict({'data_dir': ''})   # '' = the teacher's data directory
  c.teacher = teacher_config(dataset)

  d = c.distill = ml_collections.ConfigDict()
  d.teacher_workdir = ''        # '' = train config.teacher in WORKDIR/teacher first
  d.guided = guided             # Meng et al.: stage 1 (w-conditioned student), then PD with w
  d.w_min = 0.0
  d.w_max = 4.0                 # Meng et al.: [w_min, w_max] = [0, 4]
  d.start_steps = 8192          # the teacher's DDIM steps the first student halves
  d.end_steps = 1
  d.stage1_images = 50e3 * 128  # (verify) stage-1 training length
  d.round_images = 50e3 * 128   # Salimans & Ho: 50k steps of batch 128 per halving (CIFAR-10)
  d.weighting = 'snr_trunc'     # max(SNR, 1), all released PD configs
  d.init_from = 'ema'           # student ← teacher's EMA weights (then raw = EMA: no EMA below)
  d.dropout = 0.0               # PD: no dropout while distilling
  d.stochastic_grid = guided    # train the start times of the stochastic sampler too
  d.encoder = encoder
  d.encoder_start_steps = 1024
  d.encoder_end_steps = 4
  d.sample_guidance = 0.3       # default w of the students' sample.py / evaluation

  c.optim = ml_collections.ConfigDict({'lr': 5e-5, 'b1': 0.9, 'b2': 0.999, 'eps': 1e-8,
                                       'lr_rampup_images': 0.0, 'grad_clip': 1.0})
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.ema_halflife_images = 0.0   # PD: no EMA (β = 0, so ema_params = params)
  c.train.ema_rampup_ratio = 0.05
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.train.keep_checkpoints = 2
  c.train.sample_every = 0
  c.train.num_preview = 64
  c.train.skip_nonfinite = False

  if dataset == 'cifar10':
    if guided:
      d.start_steps = 1024      # Meng et al.: the teacher baseline is 1024-step DDIM
  elif dataset == 'imagenet64':
    d.start_steps = 1024
    c.optim.lr = 1e-4           # (verify)
    c.train.batch_size = 2048   # (verify)
    d.round_images = 50e3 * 2048  # (verify)
    d.stage1_images = 50e3 * 2048  # (verify)
  elif dataset == 'digits':
    d.start_steps = 16          # stage-1 model sampled with 16 steps is the first teacher
    d.end_steps = 1
    d.stage1_images = 32 * 300
    d.round_images = 32 * 150
    d.encoder_start_steps = 16
    d.encoder_end_steps = 4
    d.sample_guidance = 0.5
    c.optim.lr = 3e-4
    c.train.batch_size = 32
    c.train.log_every = 50
    c.train.checkpoint_every = 100
    c.train.num_preview = 0
  elif dataset == 'tiny':
    d.start_steps = 8
    d.stage1_images = 8 * 2
    d.round_images = 8 * 4
    d.encoder_start_steps = 4
    d.encoder_end_steps = 2
    c.optim.lr = 1e-4
    c.train.batch_size = 8
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.num_preview = 0
  return c


def get_config(arg: str | None = None):
  preset, options = common.parse_arg(arg, PRESETS, OPTIONS, default='digits')
  if preset.endswith('_teacher'):
    return teacher_config(preset[:-len('_teacher')])
  guided = preset == 'digits'
  if 'guided' in options:
    guided = True
  if 'pd' in options:
    guided = False
  return distill_config(preset, guided, 'encoder' in options)
