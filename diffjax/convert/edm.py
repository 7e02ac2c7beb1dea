"""NVlabs/edm network pickles → diffjax runs (Karras et al. 2022's released models and snapshots).

The pickle is read by `torch_pickle` (no torch, nothing executed). Its `ema` network is one of EDM's
four preconditionings over one of its two U-Nets, and each maps onto a diffjax part of the same name:

| EDM class | diffjax | c_noise |
|---|---|---|
| EDMPrecond(sigma_min, sigma_max, sigma_data) | precond 'edm' | ln(σ)/4 |
| VPPrecond(beta_d, beta_min, M, epsilon_t) | precond 'vp' | (M − 1)·σ⁻¹(σ) |
| VEPrecond(sigma_min, sigma_max) | precond 've' | ln(σ/2) |
| iDDPMPrecond(C_1, C_2, M) | precond 'iddpm' (its u-grid is checked against the pickled buffer) | M − 1 − j |
| SongUNet (DDPM++ / NCSN++) | models.SongUNet, names one to one; NCSN++'s Fourier buffer → `fourier_freqs` | |
| DhariwalUNet (ADM) | models.ADMUNet with resample='resblock', 64 channels per head | |

The architecture comes from the constructor arguments persistence recorded (`_init_kwargs`) over
EDM's defaults; every tensor is then placed by name (torch [out, in, kh, kw] → HWIO, Linear
[out, in] → [in, out], GroupNorm weight → scale) and the whole tree is checked against the network
the config builds before anything is written. NVlabs/edm2 pickles (a `Precond` over EDM2's
magnitude-preserving UNet) take the same entry point and are mapped by `convert.edm2`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from diffjax.convert import edm2, torch_pickle, workdir
from diffjax.convert.torch_pickle import PersistentObject, TorchModule
from diffjax.processes import schedules

PRECONDS = ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond')
EDM2_PRECOND = 'Precond'  # NVlabs/edm2's, over its magnitude-preserving UNet (convert.edm2)
NETWORKS = ('SongUNet', 'DhariwalUNet')

# EDM's constructor defaults (training/networks.py), used where `_init_kwargs` leaves one out.
_SONG_DEFAULTS = dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2],
                      channel_mult_emb=4, num_blocks=4, attn_resolutions=[16], dropout=0.10,
                      label_dropout=0, embedding_type='positional', channel_mult_noise=1,
                      encoder_type='standard', decoder_type='standard', resample_filter=[1, 1])
_DHARIWAL_DEFAULTS = dict(label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4],
                          channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8],
                          dropout=0.10, label_dropout=0)
_PRECOND_DEFAULTS = {
    'EDMPrecond': dict(sigma_min=0.0, sigma_max=float('inf'), sigma_data=0.5),
    'VPPrecond': dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5),
    'VEPrecond': dict(sigma_min=0.02, sigma_max=100.0),
    'iDDPMPrecond': dict(C_1=0.001, C_2=0.008, M=1000),
}


def _network_of(obj: Any, source: str) -> PersistentObject:
  """The network in a loaded pickle: a snapshot's 'ema', or a bare pickled network."""
  net = obj.get('ema') if isinstance(obj, dict) else obj
  if isinstance(obj, dict) and 'ema' not in obj:
    keys = ', '.join(sorted(map(str, obj)))
    raise workdir.ConversionError(
        f'{source} holds a dict without "ema" (keys: {keys}); pass an EDM network snapshot.')
  if not isinstance(net, PersistentObject) or net.class_name not in PRECONDS + (EDM2_PRECOND,):
    name = getattr(net, 'class_name', type(net).__name__)
    raise workdir.ConversionError(
        f'{source} holds a {name} network; diffjax converts EDM\'s '
        f'{", ".join(PRECONDS)} over {" or ".join(NETWORKS)}, and EDM2\'s {EDM2_PRECOND}.')
  return net


def _number(value) -> float:
  return float(np.asarray(value))


# ------------------------------------------------------------------------------------------------
# The module tree → flat flax parameters.


def _leaf_params(module: PersistentObject, path: str, source: str,
                 flat: Dict[str, np.ndarray], sources: Dict[str, str]) -> None:
  """Places the tensors of one of EDM's Linear / Conv2d / GroupNorm layers."""
  p = torch_pickle.parameters(module)

  def put(name: str, array: np.ndarray, torch_name: str) -> None:
    flat[f'{path}/{name}'] = np.asarray(array, np.float32)
    sources[f'{path}/{name}'] = f'{source}.{torch_name}'

  kind = module.class_name
  if kind == 'Linear':
    put('kernel', p['weight'].T, 'weight')
  elif kind == 'Conv2d':
    if 'weight' in p:
      put('kernel', p['weight'].transpose(2, 3, 1, 0), 'weight')
  elif kind == 'GroupNorm':
    put('scale', p['weight'], 'weight')
  if 'bias' in p and ('weight' in p or kind == 'GroupNorm'):
    put('bias', p['bias'], 'bias')


_LEAVES = ('Linear', 'Conv2d', 'GroupNorm')
_PARAMETER_FREE = ('PositionalEmbedding', 'FourierEmbedding')


def _collect(module, path: str, source: str, flat, sources) -> None:
  """Walks a module: leaves become parameters, ModuleDict entries become `<name>_<key>` modules."""
  if isinstance(module, PersistentObject) and module.class_name in _LEAVES:
    _leaf_params(module, path, source, flat, sources)
    return
  if isinstance(module, PersistentObject) and module.class_name in _PARAMETER_FREE:
    return
  if isinstance(module, PersistentObject) and module.class_name != 'UNetBlock' and path:
    raise workdir.ConversionError(
        f'{source} is a {module.class_name}, a layer diffjax\'s EDM networks do not have; this '
        'pickle is not one of the published EDM architectures.')
  own = torch_pickle.parameters(module)
  if own:
    raise workdir.ConversionError(f'{source} has parameters ({", ".join(own)}) diffjax cannot place.')
  for name, child in torch_pickle.children(module).items():
    if isinstance(child, TorchModule):  # EDM's enc / dec ModuleDicts: flatten to enc_32x32_conv
      for key, block in torch_pickle.children(child).items():
        _collect(block, f'{name}_{key}', f'{source}.{name}.{key}', flat, sources)
    else:
      _collect(child, f'{path}/{name}' if path else name, f'{source}.{name}', flat, sources)


def network_params(model: PersistentObject) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
  """(flax path -> float32 array, flax path -> EDM tensor name) of a SongUNet / DhariwalUNet."""
  flat: Dict[str, np.ndarray] = {}
  sources: Dict[str, str] = {}
  _collect(model, '', 'model', flat, sources)
  return flat, sources


# ------------------------------------------------------------------------------------------------
# Config.


def _model_config(model: PersistentObject) -> Tuple[str, Dict[str, Any], int, int]:
  """(preset, model kwargs, label_dim, augment_dim) of the diffjax network matching EDM's."""
  recorded = model.state.get('_init_kwargs')
  if not isinstance(recorded, Mapping):
    raise workdir.ConversionError(
        f'The {model.class_name} in this pickle has no recorded constructor arguments '
        '(_init_kwargs), so its architecture is unknown; pass a pickle saved by EDM\'s training.')
  if model.class_name == 'SongUNet':
    k = {**_SONG_DEFAULTS, **recorded}
    kwargs = dict(
        model_channels=int(k['model_channels']), channel_mult=workdir.as_list(k['channel_mult']),
        channel_mult_emb=int(k['channel_mult_emb']), num_blocks=int(k['num_blocks']),
        attn_resolutions=workdir.as_list(k['attn_resolutions']), dropout=_number(k['dropout']),
        label_dropout=_number(k['label_dropout']), embedding_type=str(k['embedding_type']),
        channel_mult_noise=int(k['channel_mult_noise']), encoder_type=str(k['encoder_type']),
        decoder_type=str(k['decoder_type']), resample_filter=workdir.as_list(k['resample_filter']),
        dtype='float32')
    if kwargs['embedding_type'] == 'fourier':
      noise = torch_pickle.children(model).get('map_noise')
      freqs = torch_pickle.buffers(noise).get('freqs') if noise is not None else None
      if freqs is None:
        raise workdir.ConversionError(
            'This NCSN++ network has no stored Fourier frequencies (map_noise.freqs).')
      kwargs['fourier_freqs'] = [float(f) for f in np.asarray(freqs, np.float32)]
    preset = 'ddpmpp_cifar10'
  else:
    k = {**_DHARIWAL_DEFAULTS, **recorded}
    kwargs = dict(
        model_channels=int(k['model_channels']), channel_mult=workdir.as_list(k['channel_mult']),
        channel_mult_emb=int(k['channel_mult_emb']), num_blocks=int(k['num_blocks']),
        attn_resolutions=workdir.as_list(k['attn_resolutions']), dropout=_number(k['dropout']),
        label_dropout=_number(k['label_dropout']), num_heads=0, channels_per_head=64,
        scale_shift=True, resample='resblock', embedding='adm', init_style='adm', eps=1e-5,
        min_channels_per_group=4, dtype='float32')
    # EDM's UNetBlock silently drops attention narrower than 64 channels (0 heads), where diffjax
    # would raise: say so plainly. The lowest level always has attention (the middle block).
    resolution = int(recorded.get('img_resolution', 0))
    widths = [kwargs['model_channels'] * m for level, m in enumerate(kwargs['channel_mult'])
              if (resolution >> level) in kwargs['attn_resolutions']]
    if min(widths + [kwargs['model_channels'] * kwargs['channel_mult'][-1]]) < 64:
      raise workdir.ConversionError(
          'This DhariwalUNet has attention layers narrower than 64 channels, which EDM runs '
          'without attention; diffjax does not convert such networks.')
    preset = 'adm_imagenet64'
  return preset, kwargs, int(k['label_dim']), int(k['augment_dim'])


def _precond_config(net: PersistentObject) -> Tuple[str, Dict[str, Any]]:
  s = {**_PRECOND_DEFAULTS[net.class_name], **{k: v for k, v in net.state.items()
                                                 if k in _PRECOND_DEFAULTS[net.class_name]}}
  if net.class_name == 'EDMPrecond':
    kwargs = {'sigma_data': _number(s['sigma_data'])}
    # EDM's defaults (0, ∞) are diffjax's; only a narrower range is worth writing down.
    if _number(s['sigma_min']) > 0:
      kwargs['sigma_min'] = _number(s['sigma_min'])
    if math.isfinite(_number(s['sigma_max'])):
      kwargs['sigma_max'] = _number(s['sigma_max'])
    return 'edm', kwargs
  if net.class_name == 'VPPrecond':
    return 'vp', {'beta_d': _number(s['beta_d']), 'beta_min': _number(s['beta_min']),
                  'M': int(s['M']), 'epsilon_t': _number(s['epsilon_t'])}
  if net.class_name == 'VEPrecond':
    return 've', {'sigma_min': _number(s['sigma_min']), 'sigma_max': _number(s['sigma_max'])}
  m, c1, c2 = int(s['M']), _number(s['C_1']), _number(s['C_2'])
  u = torch_pickle.buffers(net).get('u')
  if u is not None:
    ours = schedules.iddpm_u(m, c1, c2)
    # EDM builds u in float32 (5e-4 relative error at the low end); adjacent levels are >= 0.3%
    # apart, so anything beyond 2e-3 is another grid, where nearest-level indices would differ.
    if u.shape != ours.shape or not np.allclose(u, ours, rtol=2e-3, atol=0):
      raise workdir.ConversionError(
          'The pickled iDDPM grid u differs from the one its M, C_1, C_2 give; the pickle was '
          'not made by EDM\'s iDDPMPrecond.')
  return 'iddpm', {'M': m, 'C1': c1, 'C2': c2}


def _loss_config(loss_fn: Any, precond: str) -> Tuple[str, Dict[str, Any]]:
  """EDM's loss object (if any) as a diffjax loss, for fine-tuning the converted run."""
  state = loss_fn.state if isinstance(loss_fn, PersistentObject) else {}
  name = getattr(loss_fn, 'class_name', None)
  if name == 'EDMLoss' or (name is None and precond == 'edm'):
    return 'edm', {'p_mean': _number(state.get('P_mean', -1.2)),
                   'p_std': _number(state.get('P_std', 1.2)),
                   'sigma_data': _number(state.get('sigma_data', 0.5))}
  if name == 'VPLoss' or (name is None and precond == 'vp'):
    return 'vp', {'beta_d': _number(state.get('beta_d', 19.9)),
                  'beta_min': _number(state.get('beta_min', 0.1)),
                  'epsilon_t': _number(state.get('epsilon_t', 1e-5))}
  if name == 'VELoss' or (name is None and precond == 've'):
    return 've', {'sigma_min': _number(state.get('sigma_min', 0.02)),
                  'sigma_max': _number(state.get('sigma_max', 100.0))}
  # iDDPMPrecond was never trained by EDM (its baselines are re-packed ADM models): EDM's loss.
  return 'edm', {'p_mean': -1.2, 'p_std': 1.2, 'sigma_data': 0.5}


def _sample_config(c, resolution: int, label_dim: int, dataset: str) -> None:
  """EDM's published sampler settings (Table 2 / README): Heun 18 steps at 32², 40 at 64²,
  and for ImageNet-64 the stochastic sampler with 256 steps."""
  c.sample.sampler = 'heun'
  c.sample.num_steps = 18 if resolution <= 32 else 40
  if dataset == 'imagenet64' and label_dim:
    c.sample.num_steps = 256
    c.sample.kwargs = {'s_churn': 40.0, 's_tmin': 0.05, 's_tmax': 50.0, 's_noise': 1.003}


def from_edm(path: str | os.PathLike, workdir_: str | os.PathLike, *,
             dataset: Optional[str] = None) -> str:
  """Converts an NVlabs/edm network pickle into a diffjax run (`read_edm(...).write(workdir_)`).

  Args:
    path: an EDM snapshot or released pickle (network-snapshot-*.pkl, edm-*.pkl, baseline-*.pkl).
    workdir_: the new run's directory.
    dataset: see `read_edm`.

  Returns:
    The run's directory, ready for `diffjax.load` and sample.py.

  Raises:
    See `read_edm`; also ConversionError when workdir_ already holds a run.
  """
  return read_edm(path, dataset=dataset).write(os.fspath(workdir_))


def read_edm(path: str | os.PathLike, *, dataset: Optional[str] = None) -> workdir.Conversion:
  """Reads an NVlabs/edm network pickle and maps it onto diffjax, in memory.

  Args:
    path: an EDM snapshot or released pickle (network-snapshot-*.pkl, edm-*.pkl, baseline-*.pkl),
      or an EDM2 snapshot or post-hoc EMA reconstruction (network-snapshot-*-0.100.pkl,
      edm2-img64-s-1073741-0.075.pkl; see `convert.edm2`).
    dataset: the registered dataset the run names; by default the one whose shape and classes
      match, preferring the one the snapshot's dataset path names.

  Returns:
    The `workdir.Conversion` (config, parameters); `.write(dir)` makes the run.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a readable EDM pickle, needs a global outside the allow-list
      (torch_pickle.UnsafePickleError), or holds a network diffjax cannot convert.
  """
  path = os.fspath(path)
  source = os.path.basename(path)
  obj = torch_pickle.load_network_pickle(path)
  net = _network_of(obj, source)
  if net.class_name == EDM2_PRECOND:
    return edm2.read_edm2(obj, net, path, dataset=dataset)
  model = torch_pickle.children(net).get('model') if isinstance(net.state.get('_modules'),
                                                                  Mapping) else None
  if model is None:
    raise workdir.ConversionError(
        f'{source}\'s {net.class_name} has no wrapped network (model); it was not pickled by EDM.')
  if not isinstance(model, PersistentObject) or model.class_name not in NETWORKS:
    name = getattr(model, 'class_name', type(model).__name__)
    raise workdir.ConversionError(
        f'{source}\'s {net.class_name} wraps a {name}; diffjax converts {" and ".join(NETWORKS)}.')
  try:
    resolution, channels = int(net.state['img_resolution']), int(net.state['img_channels'])
  except (KeyError, TypeError, ValueError):
    raise workdir.ConversionError(
        f'{source}\'s {net.class_name} has no img_resolution / img_channels; it was not pickled '
        'by EDM.') from None
  preset, kwargs, label_dim, augment_dim = _model_config(model)
  precond, precond_kwargs = _precond_config(net)
  flat, sources = network_params(model)

  hints = []
  if isinstance(obj, dict) and isinstance(obj.get('dataset_kwargs'), Mapping):
    hints.append(str(obj['dataset_kwargs'].get('path', '')))
  hints.append(source)
  c = workdir.base_config()
  c.data.name = workdir.choose_dataset(resolution, channels, label_dim, dataset=dataset,
                                       hints=hints)
  c.data.conditional = label_dim > 0
  c.model.preset = preset
  c.model.kwargs = kwargs
  c.model.augment_dim = augment_dim
  c.model.out_channel_mult = 2 if precond == 'iddpm' else 1  # iDDPMPrecond keeps ADM's variance
  c.precond.name, c.precond.kwargs = precond, precond_kwargs
  c.loss.name, c.loss.kwargs = _loss_config(obj.get('loss_fn') if isinstance(obj, dict) else None,
                                            precond)
  _sample_config(c, resolution, label_dim, c.data.name)
  provenance = {'format': 'edm', 'source': os.path.abspath(path),
                'sha256': workdir.file_sha256(path), 'precond': net.class_name,
                'network': model.class_name, 'use_fp16': bool(net.state.get('use_fp16', False))}
  network_name = 'diffjax\'s ' + ('SongUNet' if model.class_name == 'SongUNet' else 'ADMUNet')
  return workdir.Conversion(c, flat, sources, network_name, provenance)
