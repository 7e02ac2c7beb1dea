"""NVlabs/edm2 network pickles → diffjax runs (Karras et al. 2024's snapshots and released models).

EDM2's training loop saves `network-snapshot-<kimg>-<σ_rel>.pkl`, an EasyDict {encoder,
dataset_kwargs, loss_fn, ema}, and `reconstruct_phema.py` writes its post-hoc EMA reconstructions
(the released `edm2-img64-s-1073741-0.075.pkl`, ...) in the same layout, a copy of an input snapshot
with `ema` replaced. Both hold the EMA network in **float16**, buffers included. The pickle is read
by `torch_pickle` (no torch, nothing executed); `edm.read_edm` hands every `Precond` network here.

| EDM2 | diffjax |
|---|---|
| Precond(sigma_data) | precond 'edm' (c_noise = ln(σ)/4), sigma_data as pickled |
| UNet + Block over MPConv / MPFourier | models.EDM2UNet, names one to one (`unet.enc.8x8_block0.*` → `enc_8x8_block0/*`) |
| logvar_fourier, logvar_linear | the uncertainty head, EDM2UNet's extra output channel |
| MPFourier freqs, phases (torch's draws, float16) | `noise_fourier_table`, `logvar_fourier_table` |
| EDM2Loss(P_mean, P_std) | loss 'edm2' |
| StandardRGBEncoder (pixels in [−1, 1]) | diffjax's image range; StabilityVAEEncoder (latent models) is refused |

The architecture comes from the constructor arguments persistence recorded (`_init_kwargs`) over
EDM2's defaults (training/networks_edm2.py); kernels go from torch's [out, in, kh, kw] to HWIO and
fully connected weights from [out, in] to [in, out]; float16 values are widened to float32 exactly.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

import numpy as np

from diffjax.convert import torch_pickle, workdir
from diffjax.convert.torch_pickle import PersistentObject, TorchModule

# EDM2's constructor defaults (networks_edm2.py: Precond, UNet, Block), where `_init_kwargs` leaves
# one out. They are also diffjax's EDM2UNet defaults; written here so a change there cannot
# silently change what an old pickle means.
_DEFAULTS = dict(
    logvar_channels=128, sigma_data=0.5, use_fp16=True,                      # Precond
    model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_noise=None,  # UNet
    channel_mult_emb=None, num_blocks=3, attn_resolutions=[16, 8], label_balance=0.5,
    concat_balance=0.5,
    resample_filter=[1, 1], channels_per_head=64, dropout=0.0, res_balance=0.3,  # Block
    attn_balance=0.3, clip_act=256)
_REQUIRED = ('img_resolution', 'img_channels', 'label_dim')
_CLASSES = ('Precond', 'UNet', 'Block', 'MPConv', 'MPFourier')

# train_edm2.py's reference learning rates by model width (img64 and img512 presets), for
# fine-tuning a converted run; EDM2's pickles do not record the optimizer.
_REF_LR = {64: 0.0170, 128: 0.0120, 192: 0.0100, 256: 0.0090, 320: 0.0080, 384: 0.0070,
           448: 0.0065}


def _tensors(module: Any, prefix: str, source: str, out: Dict[str, np.ndarray]) -> None:
  """The module's parameters by their torch state_dict names (buffers are read separately)."""
  if isinstance(module, PersistentObject) and module.class_name not in _CLASSES:
    raise workdir.ConversionError(
        f'{source} has a {module.class_name} at {prefix.rstrip(".") or "the top"}, a layer '
        f'EDM2\'s network does not have; diffjax converts EDM2\'s {", ".join(_CLASSES)}.')
  if not isinstance(module, (PersistentObject, TorchModule)):
    raise workdir.ConversionError(f'{source} has a {type(module).__name__} where EDM2 has a layer.')
  for name, value in torch_pickle.parameters(module).items():
    out[prefix + name] = np.asarray(value)
  for name, child in torch_pickle.children(module).items():
    _tensors(child, f'{prefix}{name}.', source, out)


def flax_path(name: str) -> str:
  """EDM2 state_dict name → EDM2UNet parameter path.

  `unet.enc.8x8_block0.conv_res0.weight` → `enc_8x8_block0/conv_res0/weight`, `unet.out_gain` →
  `out_gain`, `logvar_linear.weight` → `logvar_linear/weight`.
  """
  parts = name.split('.')
  if parts[0] == 'unet':
    parts = parts[1:]
    if parts[0] in ('enc', 'dec'):  # EDM2's ModuleDicts: one flat module name per block
      parts = [f'{parts[0]}_{parts[1]}'] + parts[2:]
  return '/'.join(parts)


def flax_value(value) -> np.ndarray:
  """A torch tensor's values in EDM2UNet's layout, float32: [out, in, kh, kw] → [kh, kw, in, out],
  [out, in] → [in, out], scalars (gains) as they are."""
  value = np.asarray(value, np.float32)
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return value.T
  return value


def params_from_state_dict(tensors: Mapping[str, Any]) -> Dict[str, Any]:
  """An EDM2 `Precond` state_dict (name → tensor values) as EDM2UNet's nested params tree."""
  return workdir.unflatten({flax_path(k): flax_value(v) for k, v in tensors.items()})


def _fourier_table(module: Any, what: str, source: str) -> list:
  """f then φ of one of EDM2's MPFourier buffers, float32 values as Python floats (exact)."""
  b = torch_pickle.buffers(module) if isinstance(module, PersistentObject) else {}
  if 'freqs' not in b or 'phases' not in b:
    raise workdir.ConversionError(
        f'{source}\'s {what} has no Fourier buffers (freqs, phases); it was not pickled by EDM2.')
  table = np.concatenate([np.asarray(b['freqs'], np.float32).reshape(-1),
                          np.asarray(b['phases'], np.float32).reshape(-1)])
  return [float(v) for v in table]


def _arguments(net: PersistentObject, source: str) -> Dict[str, Any]:
  recorded = net.state.get('_init_kwargs')
  if not isinstance(recorded, Mapping):
    raise workdir.ConversionError(
        f'{source}\'s Precond has no recorded constructor arguments (_init_kwargs), so its '
        'architecture is unknown; pass a pickle saved by EDM2\'s training or reconstruct_phema.py.')
  unknown = sorted(set(recorded) - set(_DEFAULTS) - set(_REQUIRED))
  if unknown:
    raise workdir.ConversionError(
        f'{source}\'s Precond was built with {", ".join(unknown)}, which diffjax\'s EDM2UNet does '
        f'not have; it converts {", ".join(sorted(set(_DEFAULTS) | set(_REQUIRED)))}.')
  missing = [k for k in _REQUIRED if k not in recorded]
  if missing:
    raise workdir.ConversionError(f'{source}\'s Precond has no {missing[0]}; it was not pickled '
                                  'by EDM2.')
  k = {**_DEFAULTS, **recorded}
  if workdir.as_list(k['resample_filter']) != [1, 1]:
    raise workdir.ConversionError(
        f'{source}\'s network resamples with the filter {k["resample_filter"]}; diffjax\'s '
        'EDM2UNet has EDM2\'s box filter [1, 1] only.')
  return k


def _model_kwargs(k: Mapping[str, Any], unet: Any, net: PersistentObject,
                  source: str) -> Dict[str, Any]:
  optional_int = lambda v: None if v is None else int(v)
  return dict(
      model_channels=int(k['model_channels']), channel_mult=workdir.as_list(k['channel_mult']),
      channel_mult_noise=optional_int(k['channel_mult_noise']),
      channel_mult_emb=optional_int(k['channel_mult_emb']), num_blocks=int(k['num_blocks']),
      attn_resolutions=workdir.as_list(k['attn_resolutions']),
      label_balance=float(k['label_balance']), concat_balance=float(k['concat_balance']),
      channels_per_head=int(k['channels_per_head']), dropout=float(k['dropout']),
      res_balance=float(k['res_balance']), attn_balance=float(k['attn_balance']),
      clip_act=None if k['clip_act'] is None else float(k['clip_act']),
      logvar_channels=int(k['logvar_channels']), label_dropout=0.0, dtype='float32',
      noise_fourier_table=_fourier_table(torch_pickle.children(unet).get('emb_fourier'),
                                         'noise embedding', source),
      logvar_fourier_table=_fourier_table(torch_pickle.children(net).get('logvar_fourier'),
                                          'uncertainty head', source))


def _check_encoder(obj: Any, source: str) -> None:
  encoder = obj.get('encoder') if isinstance(obj, Mapping) else None
  name = getattr(encoder, 'class_name', None)
  if name is not None and name != 'StandardRGBEncoder':
    raise workdir.ConversionError(
        f'{source} is a latent-space EDM2 model ({name}: images are decoded by Stability AI\'s '
        'VAE), which diffjax does not have; convert EDM2\'s pixel-space img64 models.')


def read_edm2(obj: Any, net: PersistentObject, path: str, *,
              dataset: Optional[str] = None) -> workdir.Conversion:
  """Maps a loaded EDM2 pickle (its `ema` Precond is `net`) onto diffjax, in memory.

  Called by `edm.read_edm`, which loads the pickle; see there for the arguments.

  Returns:
    The `workdir.Conversion`: EDM2UNet under the 'edm' preconditioning with the 'edm2' loss and
    Heun with 32 steps (EDM2's generate_images.py: 63 NFE).
  """
  source = os.path.basename(path)
  _check_encoder(obj, source)
  k = _arguments(net, source)
  unet = torch_pickle.children(net).get('unet')
  if not isinstance(unet, PersistentObject) or unet.class_name != 'UNet':
    raise workdir.ConversionError(f'{source}\'s Precond has no EDM2 UNet (unet); it was not '
                                  'pickled by EDM2.')
  tensors: Dict[str, np.ndarray] = {}
  _tensors(net, '', source, tensors)
  flat = {flax_path(n): flax_value(v) for n, v in tensors.items()}
  sources = {flax_path(n): n for n in tensors}
  dtypes = sorted({str(v.dtype) for v in tensors.values()})

  resolution, channels, label_dim = (int(k[n]) for n in _REQUIRED)
  hints = [source]
  if isinstance(obj, Mapping) and isinstance(obj.get('dataset_kwargs'), Mapping):
    hints.insert(0, str(obj['dataset_kwargs'].get('path', '')))
  c = workdir.base_config()
  c.data.name = workdir.choose_dataset(resolution, channels, label_dim, dataset=dataset,
                                       hints=hints)
  c.data.conditional = label_dim > 0
  c.model.preset = 'edm2-img64-s'  # the EDM2UNet preset; every field is overridden below
  c.model.kwargs = _model_kwargs(k, unet, net, source)
  c.model.augment_dim = 0
  c.precond.name, c.precond.kwargs = 'edm', {'sigma_data': float(np.asarray(
      net.state.get('sigma_data', k['sigma_data'])))}
  loss = obj.get('loss_fn') if isinstance(obj, Mapping) else None
  state = loss.state if isinstance(loss, PersistentObject) else {}
  c.loss.name = 'edm2'
  c.loss.kwargs = {'p_mean': float(state.get('P_mean', -0.8)),
                   'p_std': float(state.get('P_std', 1.6)),
                   'sigma_data': float(state.get('sigma_data', c.precond.kwargs.sigma_data))}
  # EDM2's optimizer (configs/edm2.py), for fine-tuning: Adam β2 0.99, the width's reference lr,
  # decay after t_ref = 35k batches of 2048 (img64).
  c.optim.b2 = 0.99
  c.optim.lr = _REF_LR.get(c.model.kwargs.model_channels, 0.0100)
  c.optim.lr_decay_images = 35000 * 2048
  c.sample.sampler, c.sample.num_steps = 'heun', 32
  provenance = {'format': 'edm2', 'source': os.path.abspath(path),
                'sha256': workdir.file_sha256(path), 'precond': net.class_name,
                'network': unet.class_name, 'use_fp16': bool(k['use_fp16']),
                'stored_dtypes': dtypes}
  return workdir.Conversion(c, flat, sources, 'diffjax\'s EDM2UNet', provenance)

