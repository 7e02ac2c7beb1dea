"""Saved diffusers DDPM pipelines (UNet2DModel + DDPMScheduler) → diffjax runs.

A pipeline folder (`DDPMPipeline.save_pretrained`, or a downloaded google/ddpm-cifar10-32) holds
`model_index.json`, `unet/config.json` with `unet/diffusion_pytorch_model.safetensors` (read with
numpy) or `.bin` (a torch.save state dict, read by `diffjax.pth`), and
`scheduler/scheduler_config.json`. No torch and no diffusers are needed.

The UNet2DModel of DDPM-style pipelines is diffjax's `ADMUNet` in its DDPM variant: `DownBlock2D` /
`AttnDownBlock2D` levels with a conv3×3 stride-2 downsampler (`downsample_padding` 0 pads right and
bottom only, as Ho et al.'s code), `UpBlock2D` / `AttnUpBlock2D` with nearest-then-conv3×3, a
`UNetMidBlock2D` (resnet, attention, resnet), the sinusoidal embedding of `Timesteps`
(flip_sin_to_cos=False with freq_shift=1 is Ho et al.'s [sin, cos] with frequencies
10000^(−i/(half − 1)); flip_sin_to_cos=True with freq_shift=0 is ADM's), and 32-group GroupNorm.
Attention layers saved under diffusers' old names (query/key/value/proj_attn) are read too.

The scheduler gives the discrete process ('ddpm' preconditioning: linear β from 1e-4 to 0.02 over
1000 steps, or squaredcos_cap_v2 = iDDPM's cosine), the variance of the ancestral sampler and
clip_sample.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from diffjax import pth
from diffjax.convert import openai, workdir
from diffjax.convert.safetensors import load_safetensors

# UNet2DModel's constructor defaults (diffusers 0.42), used where a config leaves a key out.
UNET_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type='positional', time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
    mid_block_type='UNetMidBlock2D',
    up_block_types=('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type='conv', upsample_type='conv', dropout=0.0, act_fn='silu',
    attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5,
    resnet_time_scale_shift='default', add_attention=True, class_embed_type=None,
    num_class_embeds=None)
SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                          beta_schedule='linear', trained_betas=None, variance_type='fixed_small',
                          clip_sample=True, prediction_type='epsilon')
_VARIANCES = {'fixed_small': 'fixed_small', 'fixed_small_log': 'fixed_small',
              'fixed_large': 'fixed_large', 'fixed_large_log': 'fixed_large',
              'learned_range': 'learned'}
_OLD_ATTENTION_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def _read_json(path: str) -> Dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing; pass a saved diffusers pipeline folder '
                            '(model_index.json, unet/, scheduler/).')
  with open(path) as f:
    return json.load(f)


def _unet_weights(folder: str) -> Dict[str, np.ndarray]:
  unet = os.path.join(folder, 'unet')
  for name, reader in (('diffusion_pytorch_model.safetensors', load_safetensors),
                       ('diffusion_pytorch_model.bin', pth.load_pth)):
    if os.path.isfile(os.path.join(unet, name)):
      state = reader(os.path.join(unet, name))
      break
  else:
    raise FileNotFoundError(f'{unet} has no diffusion_pytorch_model.safetensors or .bin; pass a '
                            'complete pipeline folder.')
  renamed = {}
  for key, value in state.items():  # diffusers < 0.15 saved attention under other names
    parts = key.split('.')
    if len(parts) >= 2 and parts[-2] in _OLD_ATTENTION_NAMES:
      key = '.'.join(parts[:-2] + [_OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
    renamed[key] = value
  return renamed


def _check_unet(u: Dict[str, Any]) -> Tuple[int, Tuple[int, ...], Tuple[int, ...], str]:
  """(model_channels, channel_mult, attention levels, embedding style) or one sentence why not."""
  def refuse(what: str):
    raise workdir.ConversionError(f'This UNet2DModel has {what}, which diffjax\'s DDPM U-Net does '
                                  'not have; only DDPM-style pipelines convert.')

  for key, want in (('center_input_sample', False), ('time_embedding_type', 'positional'),
                    ('act_fn', 'silu'), ('norm_num_groups', 32), ('add_attention', True),
                    ('mid_block_type', 'UNetMidBlock2D'), ('downsample_type', 'conv'),
                    ('upsample_type', 'conv'), ('class_embed_type', None),
                    ('attn_norm_num_groups', None)):
    if u[key] != want:
      refuse(f'{key}={u[key]!r}')
  if float(u['mid_block_scale_factor']) != 1:
    refuse(f'mid_block_scale_factor={u["mid_block_scale_factor"]}')
  if u['resnet_time_scale_shift'] not in ('default', 'scale_shift'):
    refuse(f'resnet_time_scale_shift={u["resnet_time_scale_shift"]!r}')
  style = {(False, 1): 'ddpm', (True, 0): 'adm'}.get((bool(u['flip_sin_to_cos']),
                                                      int(u['freq_shift'])))
  if style is None:
    refuse(f'flip_sin_to_cos={u["flip_sin_to_cos"]} with freq_shift={u["freq_shift"]}')
  channels = tuple(int(c) for c in u['block_out_channels'])
  if any(c % channels[0] for c in channels):
    refuse(f'block_out_channels {channels} that are not multiples of the first')
  if not isinstance(u['layers_per_block'], int):
    refuse(f'layers_per_block={u["layers_per_block"]!r} (one count per level)')
  down, up = list(u['down_block_types']), list(u['up_block_types'])
  if len(down) != len(channels) or len(up) != len(channels):
    refuse('block type lists whose lengths differ from block_out_channels')
  attention = []
  for level, (d, v) in enumerate(zip(down, reversed(up))):
    if d not in ('DownBlock2D', 'AttnDownBlock2D') or v not in ('UpBlock2D', 'AttnUpBlock2D'):
      refuse(f'blocks {d} / {v}')
    if (d == 'AttnDownBlock2D') != (v == 'AttnUpBlock2D'):
      refuse(f'attention in only one of {d} / {v} at level {level}')
    if d == 'AttnDownBlock2D':
      attention.append(level)
  return channels[0], tuple(c // channels[0] for c in channels), tuple(attention), style


def _params(state: Dict[str, np.ndarray], u: Dict[str, Any], levels: int, attention, size: int,
            num_heads: int, channels_per_head: int):
  """(flat diffjax params, sources) of a UNet2DModel state dict; fails on a tensor it lacks."""
  flat: Dict[str, np.ndarray] = {}
  sources: Dict[str, str] = {}
  used: set = set()
  tag = lambda level: f'{size >> level}x{size >> level}'

  def need(name: str) -> np.ndarray:
    if name not in state:
      raise workdir.ConversionError(
          f'The UNet weights have no tensor {name}, which unet/config.json implies; the config and '
          'the weights do not belong together.')
    used.add(name)
    return np.asarray(state[name], np.float32)

  def put(path, value, source):
    flat[path], sources[path] = value, source

  def linear(prefix, path):
    put(f'{path}/kernel', need(f'{prefix}.weight').T, f'{prefix}.weight')
    put(f'{path}/bias', need(f'{prefix}.bias'), f'{prefix}.bias')

  def conv(prefix, path):
    put(f'{path}/kernel', need(f'{prefix}.weight').transpose(2, 3, 1, 0), f'{prefix}.weight')
    put(f'{path}/bias', need(f'{prefix}.bias'), f'{prefix}.bias')

  def norm(prefix, path):
    put(f'{path}/scale', need(f'{prefix}.weight'), f'{prefix}.weight')
    put(f'{path}/bias', need(f'{prefix}.bias'), f'{prefix}.bias')

  def resnet(prefix, path):
    norm(f'{prefix}.norm1', f'{path}/norm0')
    conv(f'{prefix}.conv1', f'{path}/conv0')
    linear(f'{prefix}.time_emb_proj', f'{path}/affine')
    norm(f'{prefix}.norm2', f'{path}/norm1')
    conv(f'{prefix}.conv2', f'{path}/conv1')
    if f'{prefix}.conv_shortcut.weight' in state:
      conv(f'{prefix}.conv_shortcut', f'{path}/skip')

  def attn(prefix, path):
    norm(f'{prefix}.group_norm', f'{path}/norm2')
    q, k, v = (need(f'{prefix}.to_{n}.weight') for n in 'qkv')
    width = q.shape[0]
    heads = num_heads or width // channels_per_head
    w = np.concatenate([q, k, v], axis=0)  # diffusers: (q/k/v, head, channel), new attention order
    b = np.concatenate([need(f'{prefix}.to_{n}.bias') for n in 'qkv'])
    perm = openai.qkv_permutation(width, heads, new_order=True)
    put(f'{path}/qkv/kernel', w[perm].T[None, None], f'{prefix}.to_q.weight')
    put(f'{path}/qkv/bias', b[perm], f'{prefix}.to_q.bias')
    put(f'{path}/proj/kernel', need(f'{prefix}.to_out.0.weight').T[None, None],
        f'{prefix}.to_out.0.weight')
    put(f'{path}/proj/bias', need(f'{prefix}.to_out.0.bias'), f'{prefix}.to_out.0.bias')

  n = int(u['layers_per_block'])
  linear('time_embedding.linear_1', 'map_layer0')
  linear('time_embedding.linear_2', 'map_layer1')
  if u['num_class_embeds']:
    put('map_label/kernel', need('class_embedding.weight'), 'class_embedding.weight')
  conv('conv_in', f'enc_{tag(0)}_conv')
  for level in range(levels):
    for j in range(n):
      resnet(f'down_blocks.{level}.resnets.{j}', f'enc_{tag(level)}_block{j}')
      if level in attention:
        attn(f'down_blocks.{level}.attentions.{j}', f'enc_{tag(level)}_block{j}')
    if level < levels - 1:
      conv(f'down_blocks.{level}.downsamplers.0.conv', f'enc_{tag(level + 1)}_down')
  low = tag(levels - 1)
  resnet('mid_block.resnets.0', f'dec_{low}_in0')
  attn('mid_block.attentions.0', f'dec_{low}_in0')
  resnet('mid_block.resnets.1', f'dec_{low}_in1')
  for i in range(levels):
    level = levels - 1 - i
    for j in range(n + 1):
      resnet(f'up_blocks.{i}.resnets.{j}', f'dec_{tag(level)}_block{j}')
      if level in attention:
        attn(f'up_blocks.{i}.attentions.{j}', f'dec_{tag(level)}_block{j}')
    if level > 0:
      conv(f'up_blocks.{i}.upsamplers.0.conv', f'dec_{tag(level - 1)}_up')
  norm('conv_norm_out', 'out_norm')
  conv('conv_out', 'out_conv')
  extra = [k for k in state if k not in used]
  if extra:
    raise workdir.ConversionError(
        f'The UNet weights have a tensor {extra[0]} unet/config.json leaves no place for '
        f'({len(extra)} such tensors); the config and the weights do not belong together.')
  return flat, sources


def _betas_name(s: Dict[str, Any]) -> str:
  """The diffjax β schedule equal to the scheduler's, or one sentence why there is none."""
  t = int(s['num_train_timesteps'])
  if s['trained_betas'] is not None:
    raise workdir.ConversionError('The scheduler has trained_betas, which diffjax\'s discrete '
                                  'process does not take; only linear and cosine schedules convert.')
  if s['beta_schedule'] == 'squaredcos_cap_v2':
    return 'cosine'
  # diffjax's linear β is Ho et al.'s, scaled by 1000/T as improved-diffusion does.
  if (s['beta_schedule'] == 'linear' and math.isclose(float(s['beta_start']), 1e-4 * 1000 / t)
      and math.isclose(float(s['beta_end']), 0.02 * 1000 / t)):
    return 'linear'
  raise workdir.ConversionError(
      f'The scheduler\'s {s["beta_schedule"]} β from {s["beta_start"]} to {s["beta_end"]} over {t} '
      'steps is not one diffjax has (linear 1e-4…0.02 for T = 1000, or squaredcos_cap_v2).')


def read_diffusers(folder: str | os.PathLike, *, dataset: Optional[str] = None
                   ) -> workdir.Conversion:
  """Reads a saved diffusers DDPM pipeline folder and maps it onto diffjax.

  Args:
    folder: the pipeline folder (model_index.json, unet/, scheduler/).
    dataset: the registered dataset the run names; by default the one with the model's shape.

  Returns:
    The `workdir.Conversion`; `.write(dir)` makes the run.

  Raises:
    FileNotFoundError: a file of the pipeline is missing.
    ValueError: the pipeline is not one diffjax can convert (the message says what differs).
  """
  folder = os.fspath(folder)
  index = _read_json(os.path.join(folder, 'model_index.json'))
  unet_cfg = _read_json(os.path.join(folder, 'unet', 'config.json'))
  if unet_cfg.get('_class_name', 'UNet2DModel') != 'UNet2DModel':
    raise workdir.ConversionError(f'The pipeline\'s unet is a {unet_cfg["_class_name"]}; diffjax '
                                  'converts UNet2DModel (DDPM pipelines).')
  u = {**UNET_DEFAULTS, **{k: v for k, v in unet_cfg.items() if not k.startswith('_')}}
  sched_cfg = _read_json(os.path.join(folder, 'scheduler', 'scheduler_config.json'))
  s = {**SCHEDULER_DEFAULTS, **{k: v for k, v in sched_cfg.items() if not k.startswith('_')}}
  if s['prediction_type'] != 'epsilon':
    raise workdir.ConversionError(f'The scheduler predicts {s["prediction_type"]!r}; diffjax '
                                  'converts ε-prediction pipelines only.')
  variance = _VARIANCES.get(s['variance_type'])
  if variance is None:
    raise workdir.ConversionError(
        f'The scheduler\'s variance_type {s["variance_type"]!r} is not one diffjax samples with '
        f'({", ".join(_VARIANCES)}).')
  model_channels, mult, attention, style = _check_unet(u)
  in_channels, out_channels = int(u['in_channels']), int(u['out_channels'])
  if out_channels != in_channels * (2 if variance == 'learned' else 1):
    raise workdir.ConversionError(
        f'The unet has {out_channels} output channels but variance_type {s["variance_type"]!r} '
        f'needs {in_channels * (2 if variance == "learned" else 1)}.')
  size = u['sample_size']
  size = int(size[0] if isinstance(size, (list, tuple)) else size or 0)
  if size < 1:
    raise workdir.ConversionError('unet/config.json has no sample_size; diffjax needs the image '
                                  'size of the model.')
  head_dim = u['attention_head_dim']
  # UNet2DModel: heads = width // attention_head_dim, one head of full width when it is None.
  num_heads, channels_per_head = (1, 64) if head_dim is None else (0, int(head_dim))
  state = _unet_weights(folder)
  flat, sources = _params(state, u, len(mult), attention, size, num_heads, channels_per_head)
  emb_dim = u['time_embedding_dim'] or model_channels * 4
  if emb_dim % model_channels:
    raise workdir.ConversionError(f'time_embedding_dim {emb_dim} is not a multiple of '
                                  f'{model_channels}, which diffjax\'s U-Net needs.')
  num_classes = int(u['num_class_embeds'] or 0)

  c = workdir.base_config()
  c.data.name = workdir.choose_dataset(size, in_channels, num_classes, dataset=dataset,
                                       hints=[os.path.basename(os.path.abspath(folder))])
  c.data.conditional = num_classes > 0
  c.model.preset = 'ddpm_cifar10'
  c.model.kwargs = dict(
      model_channels=model_channels, channel_mult=list(mult),
      channel_mult_emb=emb_dim // model_channels, num_blocks=int(u['layers_per_block']),
      attn_resolutions=[size >> level for level in attention], num_heads=num_heads,
      channels_per_head=channels_per_head, dropout=float(u['dropout']), label_dropout=0.0,
      scale_shift=u['resnet_time_scale_shift'] == 'scale_shift', resample='conv',
      downsample_padding=int(u['downsample_padding']), embedding=style,
      init_style='ddpm' if style == 'ddpm' else 'adm', eps=float(u['norm_eps']),
      min_channels_per_group=1, dtype='float32')
  t = int(s['num_train_timesteps'])
  workdir.discrete_parts(
      c, beta_schedule=_betas_name(s), num_timesteps=t, rescale_timesteps=False,
      variance=variance, loss_type='hybrid' if variance == 'learned' else 'simple',
      clip_denoised=bool(s['clip_sample']), sample_steps=t)
  provenance = {'format': 'diffusers', 'source': os.path.abspath(folder),
                'pipeline': index.get('_class_name'), 'unet': unet_cfg, 'scheduler': sched_cfg}
  return workdir.Conversion(c, flat, sources, 'diffjax\'s ADMUNet (DDPM variant)', provenance)


def from_diffusers(folder: str | os.PathLike, workdir_: str | os.PathLike, *,
                   dataset: Optional[str] = None) -> str:
  """Converts a saved diffusers DDPM pipeline into a diffjax run (`read_diffusers(...).write`).

  Returns:
    The run's directory.
  """
  return read_diffusers(folder, dataset=dataset).write(os.fspath(workdir_))
