"""openai/improved-diffusion and guided-diffusion `.pt` state dicts → diffjax runs.

These files (`torch.save(model.state_dict())`, read here by `diffjax.pth` without torch) hold only
tensors: the architecture and the diffusion come from the flags the model was trained with, named
and defaulted exactly as in the projects' `script_util.py` (`model_and_diffusion_defaults`). The
two projects differ in two defaults: improved-diffusion rescales timesteps (rescale_timesteps=True,
the network sees t·1000/T) and guided-diffusion does not; `project=` picks the defaults.

The U-Net is diffjax's `ADMUNet`: 'conv' resampling (a stride-2 / nearest-then conv3×3, padding 1)
or, with resblock_updown, 'resblock'; scale-shift norm when use_scale_shift_norm; 32 GroupNorm
groups at any width (min_channels_per_group=1). Tensors are placed by walking the module list the
projects' `UNetModel.__init__` builds (input_blocks, middle_block, output_blocks) alongside
diffjax's names; the fused qkv projection is reordered from openai's layout (heads then q/k/v,
or with use_new_attention_order q/k/v then heads) to diffjax's (heads, channels, q/k/v).

The model is an ε-prediction network on the discrete process: diffjax's 'ddpm' preconditioning,
D(x; σ) = x − σ·ε(x/sqrt(1 + σ²), t) at σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), with learned variances
(learn_sigma) kept as the network's extra channels for the 'ddpm' sampler. With predict_xstart the
network's (first C) output channels are x̂_0 itself and D is that output ('ddpm' with
predict_xstart: c_skip = 0, c_out = 1), as openai's `p_mean_variance` takes pred_xstart = the
output (ModelMeanType.START_X) and the posterior mean q(x_{t−1} | x_t, x̂_0) from it.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from diffjax import pth
from diffjax.convert import workdir
from diffjax.processes import discrete

PROJECTS = ('improved-diffusion', 'guided-diffusion')

# model_and_diffusion_defaults() of each project (script_util.py). Flags of the other project are
# accepted too, with values that leave the architecture as the project builds it.
_IMPROVED = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    attention_resolutions='16,8', dropout=0.0, learn_sigma=False, sigma_small=False,
    class_cond=False, diffusion_steps=1000, noise_schedule='linear', timestep_respacing='',
    use_kl=False, predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True,
    use_checkpoint=False, use_scale_shift_norm=True)
_GUIDED = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=-1, attention_resolutions='16,8', channel_mult='', dropout=0.0,
    class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
    use_fp16=False, use_new_attention_order=False, learn_sigma=False, diffusion_steps=1000,
    noise_schedule='linear', timestep_respacing='', use_kl=False, predict_xstart=False,
    rescale_timesteps=False, rescale_learned_sigmas=False)
DEFAULTS = {
    'improved-diffusion': {**{k: v for k, v in _GUIDED.items() if k not in _IMPROVED},
                           **_IMPROVED},
    'guided-diffusion': {**_GUIDED, 'sigma_small': False},
}
# channel_mult by image_size when the flag is empty (improved-diffusion: 32, 64, 256;
# guided-diffusion: 64, 128, 256; the two agree where both have one).
_CHANNEL_MULT = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4),
                 256: (1, 1, 2, 2, 4, 4)}


def _parse(name: str, value: Any, default: Any) -> Any:
  """A flag value (e.g. a CLI string) as the type of its default."""
  if isinstance(default, bool):
    if isinstance(value, str):
      low = value.strip().lower()
      if low not in ('true', 'false', '1', '0', 'yes', 'no'):
        raise workdir.ConversionError(f'Flag {name} is a boolean; pass True or False, not {value!r}.')
      return low in ('true', '1', 'yes')
    return bool(value)
  if isinstance(default, int):
    try:
      return int(value)
    except (TypeError, ValueError):
      raise workdir.ConversionError(f'Flag {name} is an integer; got {value!r}.') from None
  if isinstance(default, float):
    return float(value)
  if isinstance(value, (list, tuple)):
    return ','.join(str(v) for v in value)
  return str(value)


def resolve_flags(project: str, flags: Dict[str, Any]) -> Dict[str, Any]:
  """The project's defaults with `flags` over them, each parsed to its default's type."""
  if project not in DEFAULTS:
    raise workdir.ConversionError(f'Unknown project {project!r}; use {" or ".join(PROJECTS)}.')
  defaults = DEFAULTS[project]
  unknown = sorted(set(flags) - set(defaults))
  if unknown:
    raise workdir.ConversionError(
        f'Unknown flag {unknown[0]} for {project}; its flags are {", ".join(sorted(defaults))}.')
  return {k: _parse(k, flags.get(k, v), v) for k, v in defaults.items()}


def _channel_mult(f: Dict[str, Any]) -> Tuple[int, ...]:
  if f['channel_mult']:
    try:
      mult = tuple(float(m) for m in f['channel_mult'].split(','))
    except ValueError:
      raise workdir.ConversionError(
          f'Cannot read channel_mult {f["channel_mult"]!r}; write it like 1,2,3,4.') from None
  elif f['image_size'] in _CHANNEL_MULT:
    mult = _CHANNEL_MULT[f['image_size']]
  else:
    raise workdir.ConversionError(
        f'No default channel_mult for image_size {f["image_size"]}; pass channel_mult=1,2,...')
  if any(m != int(m) or m < 1 for m in mult):
    raise workdir.ConversionError(
        f'channel_mult {f["channel_mult"]} has a fractional width (guided-diffusion\'s 512² model), '
        'which diffjax\'s ADMUNet does not have.')
  return tuple(int(m) for m in mult)


# ------------------------------------------------------------------------------------------------
# The module list of openai's UNetModel, alongside diffjax's names.


def _layout(f: Dict[str, Any], mult: Tuple[int, ...],
            attention_ds: Tuple[int, ...]) -> Iterator[Tuple[str, str, str, int]]:
  """(openai prefix, kind, diffjax path, heads) in the order UNetModel.__init__ builds them."""
  size = f['image_size']
  tag = lambda level: f'{size >> level}x{size >> level}'
  last = len(mult) - 1
  yield 'time_embed.0', 'linear', 'map_layer0', 0
  yield 'time_embed.2', 'linear', 'map_layer1', 0
  if f['class_cond']:
    yield 'label_emb', 'embedding', 'map_label', 0

  def heads(width: int, upsample: bool = False) -> int:
    if f['num_head_channels'] != -1:
      return width // f['num_head_channels']
    return f['num_heads_upsample'] if upsample and f['num_heads_upsample'] != -1 else f['num_heads']

  yield 'input_blocks.0.0', 'conv', f'enc_{tag(0)}_conv', 0
  k = 1
  for level, m in enumerate(mult):
    width = m * f['num_channels']
    for i in range(f['num_res_blocks']):
      yield f'input_blocks.{k}.0', 'resblock', f'enc_{tag(level)}_block{i}', 0
      if 2**level in attention_ds:
        yield f'input_blocks.{k}.1', 'attention', f'enc_{tag(level)}_block{i}', heads(width)
      k += 1
    if level != last:
      if f['resblock_updown']:
        yield f'input_blocks.{k}.0', 'resblock', f'enc_{tag(level + 1)}_down', 0
      else:
        yield f'input_blocks.{k}.0.op', 'conv', f'enc_{tag(level + 1)}_down', 0
      k += 1
  width = mult[-1] * f['num_channels']
  yield 'middle_block.0', 'resblock', f'dec_{tag(last)}_in0', 0
  yield 'middle_block.1', 'attention', f'dec_{tag(last)}_in0', heads(width)
  yield 'middle_block.2', 'resblock', f'dec_{tag(last)}_in1', 0
  k = 0
  for level in reversed(range(len(mult))):
    width = mult[level] * f['num_channels']
    for i in range(f['num_res_blocks'] + 1):
      yield f'output_blocks.{k}.0', 'resblock', f'dec_{tag(level)}_block{i}', 0
      j = 1
      if 2**level in attention_ds:
        yield f'output_blocks.{k}.1', 'attention', f'dec_{tag(level)}_block{i}', heads(width, True)
        j = 2
      if level and i == f['num_res_blocks']:
        if f['resblock_updown']:
          yield f'output_blocks.{k}.{j}', 'resblock', f'dec_{tag(level - 1)}_up', 0
        else:
          yield f'output_blocks.{k}.{j}.conv', 'conv', f'dec_{tag(level - 1)}_up', 0
      k += 1
  yield 'out.0', 'norm', 'out_norm', 0
  yield 'out.2', 'conv', 'out_conv', 0


def qkv_permutation(width: int, heads: int, new_order: bool) -> np.ndarray:
  """Indices p with diffjax_channel[o'] = openai_channel[p[o']] for the fused qkv output.

  diffjax orders the 3·C outputs as (head, channel, q/k/v); openai's legacy QKVAttention as
  (head, q/k/v, channel) and guided-diffusion's use_new_attention_order as (q/k/v, head, channel).
  """
  ch = width // heads
  h, c, p = np.meshgrid(np.arange(heads), np.arange(ch), np.arange(3), indexing='ij')
  source = p * width + h * ch + c if new_order else h * 3 * ch + p * ch + c
  return source.reshape(-1)


def _tensors(state: Dict[str, np.ndarray], f, mult, attention_ds):
  """(flat diffjax params, sources) of an openai state dict; fails on the first key it lacks."""
  flat: Dict[str, np.ndarray] = {}
  sources: Dict[str, str] = {}
  used: set = set()

  def take(name: str) -> Optional[np.ndarray]:
    if name not in state:
      return None
    used.add(name)
    return np.asarray(state[name], np.float32)

  def need(name: str) -> np.ndarray:
    value = take(name)
    if value is None:
      raise workdir.ConversionError(
          f'The checkpoint has no tensor {name}, which these flags imply{_flag_hint(name)}.')
    return value

  def put(path: str, value: np.ndarray, source: str) -> None:
    flat[path] = value
    sources[path] = source

  def linear(prefix: str, path: str) -> None:
    put(f'{path}/kernel', need(f'{prefix}.weight').T, f'{prefix}.weight')
    put(f'{path}/bias', need(f'{prefix}.bias'), f'{prefix}.bias')

  def conv(prefix: str, path: str) -> None:
    w = need(f'{prefix}.weight')
    if w.ndim == 3:  # conv1d of the attention block: [out, in, 1]
      w = w[..., None]
    put(f'{path}/kernel', w.transpose(2, 3, 1, 0), f'{prefix}.weight')
    put(f'{path}/bias', need(f'{prefix}.bias'), f'{prefix}.bias')

  def norm(prefix: str, path: str) -> None:
    put(f'{path}/scale', need(f'{prefix}.weight'), f'{prefix}.weight')
    put(f'{path}/bias', need(f'{prefix}.bias'), f'{prefix}.bias')

  for prefix, kind, path, heads in _layout(f, mult, attention_ds):
    if kind == 'linear':
      linear(prefix, path)
    elif kind == 'embedding':
      put(f'{path}/kernel', need(f'{prefix}.weight'), f'{prefix}.weight')
    elif kind == 'conv':
      conv(prefix, path)
    elif kind == 'norm':
      norm(prefix, path)
    elif kind == 'resblock':
      norm(f'{prefix}.in_layers.0', f'{path}/norm0')
      conv(f'{prefix}.in_layers.2', f'{path}/conv0')
      linear(f'{prefix}.emb_layers.1', f'{path}/affine')
      norm(f'{prefix}.out_layers.0', f'{path}/norm1')
      conv(f'{prefix}.out_layers.3', f'{path}/conv1')
      if f'{prefix}.skip_connection.weight' in state:
        conv(f'{prefix}.skip_connection', f'{path}/skip')
    else:  # attention
      norm(f'{prefix}.norm', f'{path}/norm2')
      w, b = need(f'{prefix}.qkv.weight'), need(f'{prefix}.qkv.bias')
      width = w.shape[1]
      if heads < 1 or width % heads:
        raise workdir.ConversionError(
            f'{prefix} has {width} channels, which {heads} attention heads do not divide; check '
            'num_heads / num_head_channels.')
      perm = qkv_permutation(width, heads, f['use_new_attention_order'])
      if w.shape[0] != 3 * width:
        raise workdir.ConversionError(f'{prefix}.qkv.weight has shape {w.shape}, not an attention '
                                      'projection; check attention_resolutions.')
      put(f'{path}/qkv/kernel', w[perm, :, 0].T[None, None], f'{prefix}.qkv.weight')
      put(f'{path}/qkv/bias', b[perm], f'{prefix}.qkv.bias')
      conv(f'{prefix}.proj_out', f'{path}/proj')
  extra = [k for k in state if k not in used]
  if extra:
    raise workdir.ConversionError(
        f'The checkpoint has a tensor {extra[0]} these flags leave no place for'
        f'{_flag_hint(extra[0])} ({len(extra)} such tensors).')
  return flat, sources


def _flag_hint(name: str) -> str:
  """', which <flag> sets' for a tensor name whose presence or shape a flag decides."""
  rules = (('label_emb', 'class_cond'), ('out.2', 'learn_sigma'), ('emb_layers', 'use_scale_shift_norm'),
           ('.qkv', 'attention_resolutions'), ('.norm.', 'attention_resolutions'),
           ('proj_out', 'attention_resolutions'), ('.op.', 'resblock_updown'),
           ('.conv.', 'resblock_updown'), ('in_layers', 'num_res_blocks / channel_mult / resblock_updown'),
           ('skip_connection', 'channel_mult'), ('time_embed', 'num_channels'),
           ('input_blocks.0', 'num_channels'))
  for key, flag in rules:
    if key in name:
      return f' (check {flag})'
  return ' (check num_channels / channel_mult / num_res_blocks)'


# ------------------------------------------------------------------------------------------------


def read_improved_diffusion(path: str | os.PathLike, *, project: str = 'improved-diffusion',
                            dataset: Optional[str] = None, **flags: Any) -> workdir.Conversion:
  """Reads an openai improved-diffusion / guided-diffusion state dict and maps it onto diffjax.

  Args:
    path: the `.pt` file (use the released `ema_*.pt`, not `model*.pt`: samples come from the EMA).
    project: 'improved-diffusion' or 'guided-diffusion': whose flag defaults apply.
    dataset: the registered dataset the run names; by default the one with the model's shape and
      classes.
    **flags: the model and diffusion flags it was trained with, named as in the projects'
      scripts (image_size, num_channels, num_res_blocks, num_heads, num_head_channels,
      num_heads_upsample, attention_resolutions, channel_mult, learn_sigma, sigma_small,
      class_cond, use_scale_shift_norm, resblock_updown, use_new_attention_order, use_fp16,
      dropout, diffusion_steps, noise_schedule, rescale_timesteps, timestep_respacing, use_kl,
      predict_xstart, ...); values may be strings as on a command line.

  Returns:
    The `workdir.Conversion`; `.write(dir)` makes the run.

  Raises:
    FileNotFoundError: no such file.
    ValueError: unreadable file, unknown flag, or flags that do not describe the checkpoint (the
      message names the first tensor that differs and the flag that likely sets it).
  """
  path = os.fspath(path)
  f = resolve_flags(project, flags)
  if f['noise_schedule'] not in ('linear', 'cosine'):
    raise workdir.ConversionError(
        f'Unknown noise_schedule {f["noise_schedule"]!r}; openai\'s models use linear or cosine.')
  if (f['num_head_channels'] == -1 and f['num_heads_upsample'] not in (-1, f['num_heads'])):
    raise workdir.ConversionError(
        'num_heads_upsample differs from num_heads, which diffjax\'s ADMUNet does not support.')
  state = pth.load_pth(path)
  if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
    raise workdir.ConversionError(f'{os.path.basename(path)} is not a state dict of tensors; save '
                                  'one with torch.save(model.state_dict(), path).')
  if 'input_blocks.0.0.weight' not in state:
    raise workdir.ConversionError(f'{os.path.basename(path)} is not an openai UNetModel state '
                                  'dict (no input_blocks.0.0.weight).')
  has_labels = 'label_emb.weight' in state
  if has_labels != f['class_cond']:
    raise workdir.ConversionError(
        'The checkpoint has a class embedding (label_emb): pass class_cond=True.' if has_labels
        else 'The checkpoint has no class embedding (label_emb): it is unconditional, so drop '
        'class_cond.')
  in_channels = int(state['input_blocks.0.0.weight'].shape[1])
  num_classes = int(state['label_emb.weight'].shape[0]) if has_labels else 0
  mult = _channel_mult(f)
  attention_ds = tuple(f['image_size'] // int(r) for r in
                       str(f['attention_resolutions']).split(',') if r.strip())
  flat, sources = _tensors(state, f, mult, attention_ds)

  size = f['image_size']
  heads_fixed = f['num_head_channels'] == -1
  c = workdir.base_config()
  c.data.name = workdir.choose_dataset(size, in_channels, num_classes, dataset=dataset,
                                       hints=[os.path.basename(path)])
  c.data.conditional = num_classes > 0
  c.model.preset = 'adm_imagenet64'
  c.model.kwargs = dict(
      model_channels=f['num_channels'], channel_mult=list(mult), channel_mult_emb=4,
      num_blocks=f['num_res_blocks'],
      attn_resolutions=[size >> level for level in range(len(mult)) if 2**level in attention_ds],
      num_heads=f['num_heads'] if heads_fixed else 0,
      channels_per_head=64 if heads_fixed else f['num_head_channels'], dropout=f['dropout'],
      label_dropout=0.0, scale_shift=f['use_scale_shift_norm'],
      resample='resblock' if f['resblock_updown'] else 'conv', downsample_padding=1,
      embedding='adm', init_style='adm', eps=1e-5, min_channels_per_group=1, dtype='float32')
  variance = ('learned' if f['learn_sigma'] else 'fixed_small' if f['sigma_small']
              else 'fixed_large')
  steps = f['diffusion_steps']
  respacing = f['timestep_respacing']
  sample_steps = len(discrete.space_timesteps(steps, respacing)) if respacing else steps
  workdir.discrete_parts(
      c, beta_schedule=f['noise_schedule'], num_timesteps=steps,
      rescale_timesteps=f['rescale_timesteps'], variance=variance,
      loss_type='vlb' if f['use_kl'] else 'hybrid' if f['learn_sigma'] else 'simple',
      clip_denoised=True, sample_steps=sample_steps, predict_xstart=f['predict_xstart'])
  if respacing:
    c.sample.kwargs.respacing = respacing
  provenance = {'format': project, 'source': os.path.abspath(path),
                'sha256': workdir.file_sha256(path), 'flags': f}
  return workdir.Conversion(c, flat, sources, 'diffjax\'s ADMUNet', provenance,
                            hint=_flag_hint)


def from_improved_diffusion(path: str | os.PathLike, workdir_: str | os.PathLike, *,
                            project: str = 'improved-diffusion', dataset: Optional[str] = None,
                            **flags: Any) -> str:
  """Converts an improved-diffusion / guided-diffusion `.pt` into a diffjax run.

  `read_improved_diffusion(path, project=..., dataset=..., **flags).write(workdir_)`; see there
  for the arguments. Returns the run's directory.
  """
  return read_improved_diffusion(path, project=project, dataset=dataset,
                                 **flags).write(os.fspath(workdir_))


def from_guided_diffusion(path: str | os.PathLike, workdir_: str | os.PathLike, *,
                          dataset: Optional[str] = None, **flags: Any) -> str:
  """`from_improved_diffusion` with guided-diffusion's defaults (rescale_timesteps=False, ...)."""
  return from_improved_diffusion(path, workdir_, project='guided-diffusion', dataset=dataset,
                                 **flags)


def flag_names(project: str = 'improved-diffusion') -> List[str]:
  """The flags `read_improved_diffusion` accepts for a project, sorted."""
  return sorted(DEFAULTS[project])
