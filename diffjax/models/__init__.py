"""Flax Linen networks F(x, c_noise, labels) that know nothing of σ-space, and their presets.

Networks are registered under kind 'network' (their constructors) and presets under kind
'network_preset' (plain dicts of constructor keyword arguments). A preset may name its constructor
with the key 'network'; without it the preset is for 'song_unet'. Build one with `create_network`:

    >>> from diffjax.models import create_network
    >>> net = create_network('ddpmpp_cifar10', label_dim=10)   # EDM's conditional CIFAR-10 DDPM++
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import flax.linen as nn

from diffjax import registry
from diffjax.models.adm_unet import ADM_PRESETS, ADMUNet
from diffjax.models.edm2 import PRESETS as EDM2_PRESETS
from diffjax.models.edm2 import EDM2UNet
from diffjax.models.embeddings import FourierEmbedding, PositionalEmbedding
from diffjax.models.layers import Conv2d, GroupNorm, Init, Linear, UNetBlock
from diffjax.models.song_unet import SongUNet

__all__ = [
  'ADMUNet',
  'Conv2d',
  'EDM2UNet',
  'FourierEmbedding',
  'GroupNorm',
  'Init',
  'Linear',
  'PositionalEmbedding',
  'PRESETS',
  'SongUNet',
  'UNetBlock',
  'create_network',
  'network_class',
]

registry.add('network', 'song_unet', SongUNet)
registry.add('network', 'adm_unet', ADMUNet)
registry.add('network', 'edm2_unet', EDM2UNet)

# EDM's two CIFAR-10 architectures (train.py --arch=ddpmpp / ncsnpp). EDM turns on the 9-d
# augmentation label whenever augmentation is on, which it is for every published run; label_dim is
# left to the dataset (pass label_dim=10 for the conditional model).
_DDPMPP_CIFAR10 = dict(
  img_resolution=32,
  in_channels=3,
  out_channels=3,
  augment_dim=9,
  model_channels=128,
  channel_mult=(2, 2, 2),
  channel_mult_emb=4,
  num_blocks=4,
  attn_resolutions=(16,),
  dropout=0.13,
  embedding_type='positional',
  channel_mult_noise=1,
  encoder_type='standard',
  decoder_type='standard',
  resample_filter=(1, 1),
)
_NCSNPP = dict(
  embedding_type='fourier',
  channel_mult_noise=2,
  encoder_type='residual',
  decoder_type='standard',
  resample_filter=(1, 3, 3, 1),
)
# FFHQ / AFHQv2 64×64 (--cres=1,2,2,2 --dropout=0.05 --augment=0.15; AFHQv2 uses dropout 0.25).
_AT_64 = dict(img_resolution=64, channel_mult=(1, 2, 2, 2), dropout=0.05)

PRESETS: Dict[str, Dict[str, Any]] = {
  'ddpmpp_cifar10': _DDPMPP_CIFAR10,
  'ncsnpp_cifar10': {**_DDPMPP_CIFAR10, **_NCSNPP},
  'ddpmpp_64': {**_DDPMPP_CIFAR10, **_AT_64},
  'ncsnpp_64': {**_DDPMPP_CIFAR10, **_NCSNPP, **_AT_64},
  # For tests: two levels at 8×8, attention at 4×4. No dropout by default: on CPU each dropout mask
  # adds a PRNG computation to the compiled train step (about 40% of its compile time here); tests of
  # the 'dropout' rng plumbing should pass dropout=0.1.
  'tiny': dict(
    img_resolution=8,
    in_channels=1,
    out_channels=1,
    model_channels=16,
    channel_mult=(1, 2),
    num_blocks=1,
    attn_resolutions=(4,),
    dropout=0.0,
  ),
  # 8×8×1 class-conditional digits (scikit-learn's bundled set): about 1.0M parameters, trains in
  # minutes on a couple of CPU cores.
  'digits': dict(
    img_resolution=8,
    in_channels=1,
    out_channels=1,
    label_dim=10,
    model_channels=32,
    channel_mult=(1, 2),
    channel_mult_emb=4,
    num_blocks=2,
    attn_resolutions=(4,),
    dropout=0.1,
  ),
}

PRESETS.update(ADM_PRESETS)  # DDPM, iDDPM and ADM (diffjax.models.adm_unet)
PRESETS.update(EDM2_PRESETS)  # EDM2's magnitude-preserving U-Net (diffjax.models.edm2)

for _name, _preset in PRESETS.items():
  registry.add('network_preset', _name, _preset)


def _hashable(value: Any) -> Any:
  """Lists (as config files give them) become tuples, so module fields stay hashable."""
  return tuple(value) if isinstance(value, list) else value


def network_class(name: str) -> type:
  """The registered network class preset `name` builds (e.g. EDM2UNet for 'edm2-img64-s')."""
  return registry.get('network', registry.get('network_preset', name).get('network', 'song_unet'))


def create_network(name: str, **overrides: Any) -> nn.Module:
  """Builds the network of preset `name` with some fields replaced.

  Args:
    name: a registered 'network_preset' (e.g. 'ddpmpp_cifar10', 'ncsnpp_64', 'tiny', 'digits').
    **overrides: constructor fields to replace, e.g. img_resolution, in_channels, out_channels,
      label_dim, augment_dim, dropout, label_dropout, dtype.

  Returns:
    The (unbound) Flax module.

  Raises:
    registry.UnknownNameError: if `name` is not a known preset (the message lists the known ones).
    ValueError: if an override names a field the network does not have.
  """
  kwargs = dict(registry.get('network_preset', name))
  constructor = network_class(name)
  kwargs.pop('network', None)
  kwargs.update(overrides)
  fields = {f.name for f in dataclasses.fields(constructor) if f.init} - {'parent', 'name'}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(
      f'Network preset {name!r} ({constructor.__name__}) has no field(s) '
      f'{", ".join(unknown)}; known fields: {", ".join(sorted(fields))}.'
    )
  return constructor(**{k: _hashable(v) for k, v in kwargs.items()})
