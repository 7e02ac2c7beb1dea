"""Makes the fixtures of `tests/convert/`: small random networks saved by the reference code itself,
in each project's published format, with the reference denoiser's outputs on fixed inputs.

diffjax's converters (`diffjax.convert`) read NVlabs/edm pickles, openai's `.pt` state dicts and
diffusers pipeline folders without torch. Their tests need files written by the real code, so this
script runs that code (it needs PyTorch; diffjax never imports it):

  python3 -m venv /tmp/cv && /tmp/cv/bin/pip install torch==2.13.0 numpy diffusers safetensors
  /tmp/cv/bin/python scripts/make_convert_golden.py --edm=PATH/edm --edm2=PATH/edm2 \\
      --improved_diffusion=PATH/improved-diffusion --guided_diffusion=PATH/guided-diffusion

(PATH/… are checkouts of NVlabs/edm, NVlabs/edm2 (at 4bf8162), openai/improved-diffusion and
openai/guided-diffusion.) `--only=edm2` (or any comma list of edm, edm2, openai, diffusers) remakes
just those fixtures and keeps the others' arrays in convert_golden.npz/.json as they are.

For each fixture it builds the reference network with tiny settings, sets *every* parameter to a
seeded random value (the references' zero inits of output layers would hide mapping errors): norm
scales 1 ± 0.25, biases ±0.25, weights ±1/sqrt(fan_in), signs at random. Two values per tensor
keep the files compressible: each is stored xz-compressed (the tests decompress it byte for byte),
so the fixtures stay a few hundred KB while the networks keep the widths the reference code needs
(32 channels for openai's and diffusers' 32-group norms, 64 for EDM's ADM attention). It then saves
the network the way its project does:

* EDM: the snapshot dict {ema, loss_fn, augment_pipe, dataset_kwargs} with copies of the modules
  in eval mode on the CPU, `pickle.dump`ed, as EDM's training loop writes network-snapshot-*.pkl.
  One deviation: the `module_src` each persistent class pickles (NVlabs's source files, licensed
  CC BY-NC-SA, which this repository must not carry) is replaced by a one-line stub that raises if
  it is ever executed; diffjax never reads it.
* EDM2: the snapshot EasyDict {encoder, dataset_kwargs, loss_fn, ema} with the EMA network as
  EDM2's training loop saves it, `.to(torch.float16)` (its Fourier buffers too), with the same
  module_src stub. reconstruct_phema.py writes its pickles in the same layout (a copy of an input
  snapshot with `ema` replaced, float16), so this one fixture stands for both. EDM2's weights are
  drawn at scale 3 (far from unit norm, as a trained EMA's are) and its gains N(0.5, 1) (its zero
  inits would hide the output and embedding layers); its Fourier buffers stay torch's own draws,
  which differ from diffjax's NumPy ones, so a converter that ignored them would fail the test.
* improved-diffusion / guided-diffusion: `torch.save(model.state_dict(), path)`.
* diffusers: `DDPMPipeline(unet, scheduler).save_pretrained(folder)` (safetensors weights).

and records D(x; σ) of the reference on a fixed batch: EDM's preconditioned network called as
`net(x, sigma, class_labels)`; for the ε-models x_t = x/sqrt(1 + σ²) at σ_t = sqrt((1 − ᾱ_t)/ᾱ_t)
(ᾱ from the reference diffusion), the model called through the reference's own timestep scaling,
and D = x − σ·ε; for openai's learned variance also the reference `p_mean_variance` mean and log
variance. Outputs: tests/golden/convert_golden.npz and .json, and the files named there.
"""

import argparse
import copy
import json
import lzma
import os
import pickle
import shutil
import sys
import types

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_GOLDEN = os.path.join(os.path.dirname(_HERE), 'tests', 'golden')

# What replaces NVlabs's module source inside the pickles (see the module docstring).
MODULE_SRC_STUB = ("raise RuntimeError('diffjax test fixture: the module_src of this pickle is a "
                   "stub and must never be executed')\n")


def randomize(model: torch.nn.Module, seed: int) -> None:
  """Sets every floating parameter to ±scale with random signs (see the module docstring)."""
  gen = torch.Generator().manual_seed(seed)
  norm_params = set()
  for module in model.modules():  # torch's GroupNorm (openai, diffusers) and EDM's own
    if isinstance(module, torch.nn.GroupNorm) or type(module).__name__ == 'GroupNorm':
      norm_params.update(id(p) for p in module.parameters(recurse=False) if p.ndim == 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not p.is_floating_point():
        continue
      sign = torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1
      if id(p) in norm_params and name.endswith('weight'):
        p.copy_(1 + 0.25 * sign)
      elif p.ndim == 1:
        p.copy_(0.25 * sign)
      elif name.endswith('label_emb.weight'):
        p.copy_(sign)  # an embedding table: entries of unit size
      else:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(sign / np.sqrt(fan_in))


def xz(path: str) -> str:
  """Compresses `path` to `path.xz` (and removes `path`); returns the new path."""
  with open(path, 'rb') as f:
    data = f.read()
  with open(path + '.xz', 'wb') as f:
    f.write(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
  os.remove(path)
  return path + '.xz'


def batch(seed: int, channels: int, resolution: int, sigmas):
  """x = 0.5·n + σ·n' for each σ: a noisy image of about the right scale, float32 NCHW."""
  g = np.random.default_rng(seed)
  sigmas = np.asarray(sigmas, np.float32)
  shape = (len(sigmas), channels, resolution, resolution)
  x = 0.5 * g.standard_normal(shape) + sigmas[:, None, None, None] * g.standard_normal(shape)
  return x.astype(np.float32), sigmas


def nhwc(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


# ------------------------------------------------------------------------------------------------
# NVlabs/edm.


def edm_fixtures(edm_root: str, out: dict, meta: dict) -> None:
  sys.path.insert(0, edm_root)
  from torch_utils import persistence
  from training import augment, loss, networks

  labels10 = np.eye(10, dtype=np.float32)[[3, 7, 0]]
  labels10[2] = 0  # the null label (what EDM feeds when class_labels is None)
  fixtures = {
      # DDPM++ conditional with the augmentation label, EDM's config F.
      'edm_ddpmpp': dict(cls=networks.EDMPrecond, loss=loss.EDMLoss(), augment=True,
                         sigmas=[0.02, 0.9, 40.0], labels=labels10, kwargs=dict(
                             label_dim=10, model_type='SongUNet', embedding_type='positional',
                             encoder_type='standard', decoder_type='standard',
                             channel_mult_noise=1, resample_filter=[1, 1], model_channels=16,
                             channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                             augment_dim=9, dropout=0.13, use_fp16=False)),
      # NCSN++ (Fourier embedding, residual encoder, FIR filter) under VE, with the skip decoder of
      # score_sde's NCSN++ that EDM's re-packed baselines use.
      'edm_ncsnpp': dict(cls=networks.VEPrecond, loss=loss.VELoss(), augment=False,
                         sigmas=[0.05, 2.0, 60.0], labels=None, kwargs=dict(
                             label_dim=0, model_type='SongUNet', embedding_type='fourier',
                             encoder_type='residual', decoder_type='skip', channel_mult_noise=2,
                             resample_filter=[1, 3, 3, 1], model_channels=16, channel_mult=[1, 2],
                             num_blocks=1, attn_resolutions=[4], dropout=0.1, use_fp16=False)),
      # DDPM++ under VP, unconditional.
      'edm_vp': dict(cls=networks.VPPrecond, loss=loss.VPLoss(), augment=False,
                     sigmas=[0.01, 1.5, 100.0], labels=None, kwargs=dict(
                         label_dim=0, model_type='SongUNet', model_channels=16,
                         channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.1,
                         use_fp16=False)),
      # ADM (DhariwalUNet) under iDDPM, class-conditional: EDM's baseline-imagenet-64x64-cond-adm
      # layout at one level of 64 channels (EDM's ADM attention has 64 channels per head).
      'edm_adm': dict(cls=networks.iDDPMPrecond, loss=None, augment=False,
                      sigmas=None, labels=np.eye(10, dtype=np.float32)[[1, 9, 4]], kwargs=dict(
                          label_dim=10, model_type='DhariwalUNet', model_channels=64,
                          channel_mult=[1], channel_mult_emb=2, num_blocks=1,
                          attn_resolutions=[8], dropout=0.1, use_fp16=False)),
  }
  for i, (name, f) in enumerate(fixtures.items()):
    torch.manual_seed(i)
    net = f['cls'](img_resolution=8, img_channels=1, **f['kwargs'])
    randomize(net, seed=100 + i)
    sigmas = f['sigmas']
    if sigmas is None:  # iDDPM: levels of its own grid (c_noise is the nearest level's index)
      sigmas = net.u[[5, 300, 990]].numpy()
    x, sigmas = batch(200 + i, 1, 8, sigmas)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    augment_pipe = augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1,
                                       aniso=1, translate_frac=1) if f['augment'] else None
    data = dict(ema=ema, loss_fn=f['loss'], augment_pipe=augment_pipe,
                dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset',
                                    path='datasets/digits-8x8.zip', use_labels=bool(f['labels']
                                                                                    is not None),
                                    xflip=False, cache=True, resolution=8, max_size=1797))
    for key, value in data.items():  # as EDM's training loop prepares a snapshot
      if isinstance(value, torch.nn.Module):
        data[key] = copy.deepcopy(value).eval().requires_grad_(False).cpu()
    path = os.path.join(_GOLDEN, f'convert_{name}.pkl')
    # The stub instead of NVlabs's source (see the module docstring), only while pickling: copying
    # a persistent object (as above) re-imports its module from module_src.
    sources = {cls: cls._orig_module_src for cls in persistence._decorators}
    for cls in sources:
      cls._orig_module_src = MODULE_SRC_STUB
    with open(path, 'wb') as fp:
      pickle.dump(data, fp)
    for cls, src in sources.items():
      cls._orig_module_src = src
    labels = None if f['labels'] is None else torch.from_numpy(f['labels'])
    with torch.no_grad():
      d = ema(torch.from_numpy(x), torch.from_numpy(sigmas), labels)
    out[f'{name}/x'] = nhwc(x)
    out[f'{name}/sigma'] = sigmas
    if labels is not None:
      out[f'{name}/labels'] = f['labels']
    out[f'{name}/D'] = nhwc(d.numpy())
    meta[name] = dict(converter='edm', file=os.path.basename(xz(path)))
  sys.path.remove(edm_root)


def _forget_modules(*packages: str) -> None:
  """Drops imported packages of one checkout (NVlabs/edm and edm2 share the names training, ...)."""
  for name in list(sys.modules):
    if name.split('.')[0] in packages:
      del sys.modules[name]


def edm2_fixture(edm2_root: str, out: dict, meta: dict) -> None:
  """A small class-conditional EDM2 Precond, saved as EDM2's training loop saves a snapshot."""
  _forget_modules('torch_utils', 'training', 'dnnlib')
  # dnnlib.util and training_loop import these at the top; nothing pickled here uses them.
  for name in ('requests', 'psutil'):
    sys.modules.setdefault(name, types.ModuleType(name))
  sys.path.insert(0, edm2_root)
  import dnnlib
  from torch_utils import persistence
  from training import encoders, networks_edm2, training_loop

  torch.manual_seed(600)
  # Two levels, attention with 2 and 4 heads, the uncertainty head: every kind of layer EDM2 has.
  kwargs = dict(img_resolution=8, img_channels=1, label_dim=10, model_channels=8,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8, 4], channels_per_head=4,
                logvar_channels=8, dropout=0.1, use_fp16=True)
  net = networks_edm2.Precond(**kwargs)
  rng = np.random.default_rng(601)
  with torch.no_grad():
    for p in net.parameters():  # see the module docstring
      p.copy_(torch.from_numpy(rng.normal(0.5, 1.0, p.shape) if p.ndim == 0 else
                               3.0 * rng.standard_normal(p.shape)))
  labels = np.eye(10, dtype=np.float32)[[4, 0, 8, 2]]
  labels[3] = 0  # the null label
  x, sigmas = batch(602, 1, 8, [0.002, 0.3, 2.5, 80.0])
  data = dnnlib.EasyDict(encoder=encoders.StandardRGBEncoder(),
                         dataset_kwargs=dnnlib.EasyDict(
                             class_name='training.dataset.ImageFolderDataset',
                             path='datasets/digits-8x8.zip', use_labels=True),
                         loss_fn=training_loop.EDM2Loss(P_mean=-0.8, P_std=1.6))
  data.ema = copy.deepcopy(net).cpu().eval().requires_grad_(False).to(torch.float16)
  path = os.path.join(_GOLDEN, 'convert_edm2.pkl')
  sources = {cls: cls._orig_module_src for cls in persistence._decorators}
  for cls in sources:
    cls._orig_module_src = MODULE_SRC_STUB
  with open(path, 'wb') as fp:
    pickle.dump(data, fp)
  for cls, src in sources.items():
    cls._orig_module_src = src
  # D of the stored float16 values widened to float32, as reconstruct_phema.py loads a snapshot
  # (`.to(torch.float32)`). Run as stored, torch's type promotion would also round each layer's
  # scale gain/sqrt(fan_in) to float16 (a 0-d float16 tensor), a 5e-4 relative change of D.
  ema32 = copy.deepcopy(data.ema).to(torch.float32)
  with torch.no_grad():
    d, logvar = ema32(torch.from_numpy(x), torch.from_numpy(sigmas), torch.from_numpy(labels),
                         force_fp32=True, return_logvar=True)
  out['edm2/x'] = nhwc(x)
  out['edm2/sigma'] = sigmas
  out['edm2/labels'] = labels
  out['edm2/D'] = nhwc(d.numpy())
  out['edm2/logvar'] = logvar.numpy().reshape(-1)
  meta['edm2'] = dict(converter='edm', file=os.path.basename(xz(path)))
  sys.path.remove(edm2_root)
  _forget_modules('torch_utils', 'training', 'dnnlib')


# ------------------------------------------------------------------------------------------------
# openai/improved-diffusion and guided-diffusion.


def openai_fixture(name: str, package, flags: dict, seed: int, out: dict, meta: dict,
                   steps_to_test, in_channels: int = 1, num_classes=None) -> None:
  """One openai U-Net built from script-style flags with the package's own constructors."""
  unet, script_util = package.unet, package.script_util
  image_size = flags['image_size']
  mult = tuple(int(m) for m in flags['channel_mult'].split(','))
  attention_ds = tuple(image_size // int(r) for r in flags['attention_resolutions'].split(','))
  common = dict(in_channels=in_channels, model_channels=flags['num_channels'],
                out_channels=in_channels * (2 if flags['learn_sigma'] else 1),
                num_res_blocks=flags['num_res_blocks'], attention_resolutions=attention_ds,
                dropout=flags['dropout'], channel_mult=mult, num_classes=num_classes,
                num_heads=flags['num_heads'], use_scale_shift_norm=flags['use_scale_shift_norm'])
  if 'resblock_updown' in flags:  # guided-diffusion's UNetModel
    common.update(image_size=image_size, num_head_channels=flags['num_head_channels'],
                  resblock_updown=flags['resblock_updown'],
                  use_new_attention_order=flags['use_new_attention_order'])
  torch.manual_seed(seed)
  model = unet.UNetModel(**common)
  randomize(model, seed)
  model.eval()
  diffusion = script_util.create_gaussian_diffusion(
      steps=flags['diffusion_steps'], learn_sigma=flags['learn_sigma'],
      noise_schedule=flags['noise_schedule'], rescale_timesteps=flags['rescale_timesteps'],
      timestep_respacing='')
  t = np.asarray(steps_to_test, np.int64)
  abar = diffusion.alphas_cumprod[t]
  sigmas = np.sqrt((1 - abar) / abar)
  x, sigmas = batch(seed + 1, in_channels, image_size, sigmas)
  x_t = (x / np.sqrt(1 + sigmas.astype(np.float64) ** 2)[:, None, None, None]).astype(np.float32)
  kwargs = {}
  if num_classes:
    y = np.asarray([2, 5, 9][:len(t)], np.int64)
    kwargs['y'] = torch.from_numpy(y)
    out[f'{name}/labels'] = y.astype(np.int32)
  wrapped = diffusion._wrap_model(model)  # the reference's own timestep scaling
  with torch.no_grad():
    output = wrapped(torch.from_numpy(x_t), torch.from_numpy(t), **kwargs).numpy()
    pmv = diffusion.p_mean_variance(model, torch.from_numpy(x_t), torch.from_numpy(t),
                                    clip_denoised=False, model_kwargs=kwargs)
  eps = output[:, :in_channels]
  d = x - sigmas[:, None, None, None] * eps
  path = os.path.join(_GOLDEN, f'convert_{name}.pt')
  torch.save(model.state_dict(), path)
  out[f'{name}/x'] = nhwc(x)
  out[f'{name}/sigma'] = sigmas
  out[f'{name}/t'] = t.astype(np.int32)
  out[f'{name}/D'] = nhwc(d)
  if flags['learn_sigma']:
    out[f'{name}/v'] = nhwc(output[:, in_channels:])
    out[f'{name}/x_t'] = nhwc(x_t)
    out[f'{name}/mean'] = nhwc(pmv['mean'].numpy())
    out[f'{name}/log_variance'] = nhwc(pmv['log_variance'].numpy())
  meta[name] = dict(converter='improved-diffusion', file=os.path.basename(xz(path)),
                    flags={k: v for k, v in flags.items()})


def openai_fixtures(improved_root: str, guided_root: str, out: dict, meta: dict) -> None:
  import importlib
  sys.path.insert(0, improved_root)
  sys.path.insert(0, guided_root)
  improved = importlib.import_module('improved_diffusion')
  for sub in ('unet', 'script_util'):
    importlib.import_module(f'improved_diffusion.{sub}')
  guided = importlib.import_module('guided_diffusion')
  for sub in ('unet', 'script_util'):
    importlib.import_module(f'guided_diffusion.{sub}')
  # improved-diffusion's CIFAR-10 recipe in miniature: learned Σ, cosine, T = 4000, rescaled t,
  # attention with 2 heads (its legacy qkv order). channel_mult stands in for the image_size rule.
  openai_fixture('iddpm', improved, dict(
      image_size=8, num_channels=32, num_res_blocks=1, num_heads=2, attention_resolutions='4',
      channel_mult='1,1', dropout=0.3, learn_sigma=True, use_scale_shift_norm=True,
      diffusion_steps=4000, noise_schedule='cosine', rescale_timesteps=True),
      seed=300, out=out, meta=meta, steps_to_test=[3, 1800, 3990])
  # guided-diffusion class-conditional: channels per head, resblock up/down, the new qkv order.
  openai_fixture('guided', guided, dict(
      image_size=8, num_channels=32, num_res_blocks=1, num_heads=4, num_head_channels=16,
      attention_resolutions='8,4', channel_mult='1,1', dropout=0.1, learn_sigma=True,
      use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=True,
      class_cond=True, diffusion_steps=1000, noise_schedule='linear', rescale_timesteps=False),
      seed=400, out=out, meta=meta, steps_to_test=[0, 450, 999], num_classes=10)
  sys.path.remove(improved_root)
  sys.path.remove(guided_root)


# ------------------------------------------------------------------------------------------------
# diffusers.


def diffusers_fixture(out: dict, meta: dict) -> None:
  from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

  torch.manual_seed(500)
  # ddpm-cifar10-32's UNet2DModel settings (DDPM embedding, padding-0 downsampling, eps 1e-6) at
  # two levels of 32 channels, attention at 4×4 with 16 channels per head.
  unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32),
                     layers_per_block=1, down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
                     up_block_types=('AttnUpBlock2D', 'UpBlock2D'), attention_head_dim=16,
                     norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                     dropout=0.1)
  randomize(unet, 500)
  unet.eval()
  scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule='linear', beta_start=1e-4,
                            beta_end=0.02, variance_type='fixed_large', clip_sample=True)
  folder = os.path.join(_GOLDEN, 'convert_diffusers')
  shutil.rmtree(folder, ignore_errors=True)
  DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
  t = np.asarray([0, 500, 999], np.int64)
  abar = scheduler.alphas_cumprod.double().numpy()[t]
  sigmas = np.sqrt((1 - abar) / abar)
  x, sigmas = batch(501, 1, 8, sigmas)
  x_t = (x / np.sqrt(1 + sigmas.astype(np.float64) ** 2)[:, None, None, None]).astype(np.float32)
  with torch.no_grad():
    eps = unet(torch.from_numpy(x_t), torch.from_numpy(t)).sample.numpy()
  out['diffusers/x'] = nhwc(x)
  out['diffusers/sigma'] = sigmas
  out['diffusers/t'] = t.astype(np.int32)
  out['diffusers/D'] = nhwc(x - sigmas[:, None, None, None] * eps)
  xz(os.path.join(folder, 'unet', 'diffusion_pytorch_model.safetensors'))
  meta['diffusers'] = dict(converter='diffusers', file='convert_diffusers')


def _family(fixture: str) -> str:
  """The --only family a fixture belongs to ('' for the _made_with record)."""
  if fixture.startswith('edm_'):
    return 'edm'
  return {'edm2': 'edm2', 'iddpm': 'openai', 'guided': 'openai',
          'diffusers': 'diffusers'}.get(fixture, '')


def _commit(root: str) -> str:
  import subprocess
  try:
    return subprocess.run(['git', '-C', root, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--edm', help='checkout of NVlabs/edm')
  parser.add_argument('--edm2', help='checkout of NVlabs/edm2')
  parser.add_argument('--improved_diffusion', help='checkout of openai/improved-diffusion')
  parser.add_argument('--guided_diffusion', help='checkout of openai/guided-diffusion')
  parser.add_argument('--only', default='edm,edm2,openai,diffusers',
                      help='comma list of the fixture families to remake; the rest are kept')
  args = parser.parse_args()
  only = set(args.only.split(','))
  needs = {'edm': ['edm'], 'edm2': ['edm2'], 'openai': ['improved_diffusion', 'guided_diffusion']}
  for family in only:
    for arg in needs.get(family, []):
      if not getattr(args, arg):
        parser.error(f'--only={family} needs --{arg}=PATH (a checkout).')
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  npz, json_path = (os.path.join(_GOLDEN, f'convert_golden.{e}') for e in ('npz', 'json'))
  out, meta = {}, {}
  if os.path.exists(npz):  # the families not remade keep their arrays and records as they are
    with np.load(npz) as kept:
      out = {k: kept[k] for k in kept.files if _family(k.split('/')[0]) not in only}
    with open(json_path) as f:
      meta = {k: v for k, v in json.load(f).items() if _family(k) not in only}
  if 'edm' in only:
    edm_fixtures(args.edm, out, meta)
  if 'edm2' in only:
    edm2_fixture(args.edm2, out, meta)
  if 'openai' in only:
    openai_fixtures(args.improved_diffusion, args.guided_diffusion, out, meta)
  if 'diffusers' in only:
    diffusers_fixture(out, meta)
  np.savez_compressed(npz, **out)
  made = meta.get('_made_with', {})
  made.update({'torch': torch.__version__, 'numpy': np.__version__})
  if 'edm2' in only:
    made['edm2_commit'] = _commit(args.edm2)
  meta['_made_with'] = made
  if 'diffusers' in only:
    import diffusers
    meta['_made_with']['diffusers'] = diffusers.__version__
  with open(json_path, 'w') as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  total = 0
  for root, _, files in os.walk(_GOLDEN):
    for name in files:
      if 'convert_' in os.path.join(root, name):
        total += os.path.getsize(os.path.join(root, name))
  print(f'Wrote {len(meta) - 1} fixtures under {_GOLDEN}: {total / 1024:.0f} KB in all.')


if __name__ == '__main__':
  main()
