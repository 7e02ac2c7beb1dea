"""The U-Net family of DDPM, Improved DDPM and ADM (Ho et al. 2020; Nichol & Dhariwal 2021;
Dhariwal & Nichol 2021), NHWC.

One module covers the three published variants; they differ only in a few typed fields:

| variant | resample | scale_shift | attention | embedding | init_style |
|---|---|---|---|---|---|
| DDPM (Ho et al.; diffusers `UNet2DModel`) | 'conv' (pad 0,1) | False | 1 head | 'ddpm' [sin, cos] | 'ddpm' |
| iDDPM (improved-diffusion `UNetModel`)     | 'conv' (pad 1)   | True  | 4 heads | 'adm' [cos, sin] | 'adm' |
| ADM (guided-diffusion, EDM's DhariwalUNet) | 'resblock'       | True  | 64 ch/head | 'adm' | 'adm' |

Layout (as EDM's DhariwalUNet, names like `enc_32x32_block0` so the tree reads like the figure):
  embedding: c_noise → sinusoid(model_channels) → Linear → SiLU → Linear (+ class embedding) → SiLU
  encoder:   conv3×3; per level: [downsample, except the first], num_blocks residual blocks (with
             attention at attn_resolutions); every output is a skip
  decoder:   at the lowest level two blocks (the first with attention) — the "middle block"; per level:
             [upsample, except the lowest], num_blocks + 1 blocks, each fed one skip by concatenation
  output:    GroupNorm → SiLU → conv3×3 (zero-initialized) to out_channels

`resample='resblock'` (ADM's resblock_updown) resamples inside a residual block with average pooling /
nearest upsampling; `'conv'` uses a separate stride-2 conv3×3 for downsampling and nearest + conv3×3
for upsampling (`downsample_padding` 1 pads symmetrically as improved-diffusion, 0 pads right/bottom
only as Ho et al.'s TensorFlow code and diffusers). A residual block is GroupNorm → SiLU → conv3×3, the
embedding added (or, with scale_shift, GroupNorm(h)·(1 + scale) + shift), → GroupNorm → SiLU → dropout
→ conv3×3, plus a 1×1 projection of the skip path when the width changes (`layers.UNetBlock`).

For learned variance (iDDPM) set out_channels = 2·in_channels: the preconditioning uses the first C
channels as ε̂ and passes the rest on as v (`precond.Denoiser.raw`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.embeddings import conditioning_labels, positional_embedding
from diffjax.models.layers import (
  Conv2d,
  GroupNorm,
  Init,
  Linear,
  UNetBlock,
  check_remat,
  conv2d,
  remat_block,
  weight_init,
)

Array = jax.Array

RESAMPLES = ('resblock', 'conv')
EMBEDDINGS = ('adm', 'ddpm')
INITS = ('adm', 'ddpm')


def _inits(style: str) -> tuple[Init, Init]:
  """(init, init_zero) of a style.

  'adm': PyTorch's default U(±1/sqrt(fan_in)) for weights and biases (= kaiming_uniform·sqrt(1/3)),
  zero for the output-side layers (conv1 of a block, attention proj, out conv), as improved-diffusion
  and EDM's DhariwalUNet. 'ddpm': Ho et al.'s variance_scaling(fan_avg, uniform) = xavier_uniform,
  zero biases, scale 1e-10 on the output-side layers.
  """
  if style == 'adm':
    s = math.sqrt(1.0 / 3.0)
    return Init('kaiming_uniform', weight=s, bias=s), Init('kaiming_uniform', weight=0.0, bias=0.0)
  return Init('xavier_uniform'), Init('xavier_uniform', weight=1e-10)


def timestep_embedding(t: Array, num_channels: int, style: str = 'adm') -> Array:
  """The sinusoidal timestep embedding [B] -> [B, num_channels] float32 of a style.

  'adm' (improved/guided-diffusion): [cos(t·ω_i), sin(t·ω_i)], ω_i = 10000^(−i/half).
  'ddpm' (Ho et al.'s get_timestep_embedding; diffusers with flip_sin_to_cos=False, freq_shift=1):
  [sin(t·ω_i), cos(t·ω_i)], ω_i = 10000^(−i/(half − 1)).
  """
  if style == 'adm':
    return positional_embedding(t, num_channels, endpoint=False)
  emb = positional_embedding(t, num_channels, endpoint=True)
  return jnp.concatenate(jnp.split(emb, 2, axis=-1)[::-1], axis=-1)


class ResampleConv(nn.Module):
  """conv3×3 with 2× down- (stride 2) or upsampling (nearest, then the conv); NHWC.

  Attributes:
    features: output channels.
    up: nearest-neighbour upsampling before the conv; otherwise a stride-2 conv.
    padding: for the stride-2 conv: 1 pads (1, 1) on each axis, 0 pads (0, 1) (Ho et al.).
    init_spec: weight/bias distribution (fans in·9, out·9).
    dtype: compute dtype; parameters stay float32.
  """
  features: int
  up: bool = False
  padding: int = 1
  init_spec: Init = Init()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, 2H, 2W, features] (up) or [B, H/2, W/2, features]."""
    cin = x.shape[-1]
    fan_in, fan_out = cin * 9, self.features * 9
    kernel = self.param('kernel', weight_init(self.init_spec.mode, fan_in, fan_out,
                                              self.init_spec.weight),
                        (3, 3, cin, self.features), jnp.float32).astype(self.dtype)
    bias = self.param('bias', weight_init(self.init_spec.mode, fan_in, fan_out, self.init_spec.bias),
                      (self.features,), jnp.float32).astype(self.dtype)
    x = jnp.asarray(x, self.dtype)
    if self.up:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      return conv2d(x, kernel, padding=1) + bias
    pad = (1, 1) if self.padding else (0, 1)
    x = jax.lax.conv_general_dilated(x, kernel, window_strides=(2, 2), padding=(pad, pad),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return x + bias


class ADMUNet(nn.Module):
  """DDPM / iDDPM / ADM U-Net (see the module docstring for the variants).

  Attributes:
    img_resolution: input and output height = width.
    in_channels: channels of x.
    out_channels: channels of the output (2·in_channels for a learned variance).
    label_dim: number of classes; 0 = unconditional.
    augment_dim: width of EDM's augmentation label; 0 = none.
    model_channels: base width.
    channel_mult: width multiplier per level (level i runs at img_resolution / 2^i).
    channel_mult_emb: embedding width = model_channels · channel_mult_emb.
    num_blocks: residual blocks per level in the encoder (the decoder has one more).
    attn_resolutions: resolutions (pixels) whose blocks get self-attention.
    num_heads: attention heads; 0 means channels // channels_per_head.
    channels_per_head: used when num_heads is 0 (ADM: 64).
    dropout: dropout probability inside the blocks.
    label_dropout: probability of the null (zero) label in training, for classifier-free guidance.
    scale_shift: the embedding modulates the second norm as (1 + scale, shift) (ADM, iDDPM).
    resample: 'resblock' (ADM) or 'conv' (DDPM, iDDPM).
    downsample_padding: 1 or 0 (see `ResampleConv`); only for resample='conv'.
    embedding: 'adm' ([cos, sin], frequencies 10000^(−i/half)) or 'ddpm' ([sin, cos],
      10000^(−i/(half − 1))).
    init_style: 'adm' or 'ddpm' (see `_inits`).
    eps: GroupNorm epsilon (1e-5 ADM/iDDPM, 1e-6 DDPM).
    min_channels_per_group: the GroupNorm group rule min(32, C // this). 4 is EDM's DhariwalUNet;
      openai's and diffusers' U-Nets always use 32 groups, which is 1 here (the two agree from 128
      channels on, so only narrow converted networks need it).
    dtype: compute dtype; parameters and the output stay float32.
    remat: rematerialization of the residual blocks: 'none', 'blocks' or 'full' (see
      `layers.REMAT_POLICIES`); the parameter tree is the same in every mode.
  """
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_emb: int = 4
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (32, 16, 8)
  num_heads: int = 0
  channels_per_head: int = 64
  dropout: float = 0.10
  label_dropout: float = 0.0
  scale_shift: bool = True
  resample: str = 'resblock'
  downsample_padding: int = 1
  embedding: str = 'adm'
  init_style: str = 'adm'
  eps: float = 1e-5
  min_channels_per_group: int = 4
  dtype: Any = jnp.float32
  remat: str = 'none'

  def _check(self, x: Array) -> None:
    for field, value, allowed in (('resample', self.resample, RESAMPLES),
                                  ('embedding', self.embedding, EMBEDDINGS),
                                  ('init_style', self.init_style, INITS)):
      if value not in allowed:
        raise ValueError(f'Unknown ADMUNet {field} {value!r}; known: {", ".join(allowed)}.')
    check_remat(self.remat)
    levels = len(self.channel_mult)
    if levels < 1 or self.img_resolution % (2**(levels - 1)):
      raise ValueError(f'img_resolution {self.img_resolution} must be divisible by 2^{levels - 1} '
                       f'for channel_mult {tuple(self.channel_mult)}; use fewer levels.')
    expected = (self.img_resolution, self.img_resolution, self.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(f'ADMUNet expects x of shape [B, {expected[0]}, {expected[1]}, '
                       f'{expected[2]}] (NHWC), got {tuple(x.shape)}.')

  def _embed(self, noise_labels, class_labels, augment_labels, batch: int, train: bool) -> Array:
    """The conditioning vector [B, model_channels · channel_mult_emb], after its final SiLU."""
    init, init_zero = _inits(self.init_style)
    dt = self.dtype
    emb_ch = self.model_channels * self.channel_mult_emb
    noise_labels = jnp.broadcast_to(jnp.asarray(noise_labels, jnp.float32).reshape(-1), (batch,))
    emb = timestep_embedding(noise_labels, self.model_channels, self.embedding).astype(dt)
    if self.augment_dim:
      if augment_labels is None:
        augment_labels = jnp.zeros((batch, self.augment_dim), jnp.float32)
      emb = emb + Linear(self.model_channels, use_bias=False, init_spec=init_zero, dtype=dt,
                         name='map_augment')(augment_labels)
    emb = nn.silu(Linear(emb_ch, init_spec=init, dtype=dt, name='map_layer0')(emb))
    emb = Linear(emb_ch, init_spec=init, dtype=dt, name='map_layer1')(emb)
    if self.label_dim:
      labels = conditioning_labels(class_labels, self.label_dim, batch,
                                   label_dropout=self.label_dropout,
                                   dropout_key=self.make_rng('dropout') if train and self.label_dropout else None)
      # A bias-free Linear on one-hot labels is ADM's nn.Embedding(num_classes, emb_ch), N(0, 1).
      emb = emb + Linear(emb_ch, use_bias=False, dtype=dt, name='map_label',
                         init_spec=Init('kaiming_normal', weight=math.sqrt(self.label_dim)))(labels)
    return nn.silu(emb)

  @nn.compact
  def __call__(self, x: Array, noise_labels: Array, class_labels: Optional[Array] = None,
               augment_labels: Optional[Array] = None, train: bool = False) -> Array:
    """Applies the network.

    Args:
      x: [B, H, W, in_channels] (already scaled by c_in: DDPM's x_t).
      noise_labels: [B] c_noise (the timestep index of a discrete model).
      class_labels: [B, label_dim] one-hot labels, None for the null label; ignored if label_dim = 0.
      augment_labels: [B, augment_dim], None for no augmentation; ignored if augment_dim = 0.
      train: enables dropout and label dropout (the 'dropout' rng).

    Returns:
      [B, H, W, out_channels] float32.
    """
    self._check(x)
    dt = self.dtype
    init, init_zero = _inits(self.init_style)
    batch = x.shape[0]
    emb = self._embed(noise_labels, class_labels, augment_labels, batch, train)

    block_cls = remat_block(UNetBlock, self.remat)

    def block(features, name, **kw):
      return block_cls(features, num_heads=self.num_heads or None,
                       channels_per_head=self.channels_per_head, dropout=self.dropout,
                       skip_scale=1.0, eps=self.eps, resample_filter=(1, 1), resample_proj=False,
                       min_channels_per_group=self.min_channels_per_group,
                       adaptive_scale=self.scale_shift, init_spec=init, init_zero=init_zero,
                       init_attn=init, dtype=dt, name=name, **kw)

    def down(features, name):
      if self.resample == 'resblock':
        return lambda h: block(features, name, down=True)(h, emb, train)
      return ResampleConv(features, padding=self.downsample_padding, init_spec=init, dtype=dt,
                          name=name)

    def up(features, name):
      if self.resample == 'resblock':
        return lambda h: block(features, name, up=True)(h, emb, train)
      return ResampleConv(features, up=True, init_spec=init, dtype=dt, name=name)

    # Encoder.
    h = jnp.asarray(x, dt)
    skips = []
    cout = self.model_channels * self.channel_mult[0]
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      tag = f'{res}x{res}'
      if level == 0:
        h = Conv2d(cout, 3, init_spec=init, dtype=dt, name=f'enc_{tag}_conv')(h)
      else:
        h = down(cout, f'enc_{tag}_down')(h)
      skips.append(h)
      for idx in range(self.num_blocks):
        cout = self.model_channels * mult
        h = block(cout, f'enc_{tag}_block{idx}', attention=res in self.attn_resolutions)(
            h, emb, train)
        skips.append(h)

    # Decoder.
    last = len(self.channel_mult) - 1
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      tag = f'{res}x{res}'
      if level == last:
        h = block(cout, f'dec_{tag}_in0', attention=True)(h, emb, train)
        h = block(cout, f'dec_{tag}_in1')(h, emb, train)
      else:
        h = up(cout, f'dec_{tag}_up')(h)
      for idx in range(self.num_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        cout = self.model_channels * mult
        h = block(cout, f'dec_{tag}_block{idx}', attention=res in self.attn_resolutions)(
            h, emb, train)
    h = nn.silu(GroupNorm(min_channels_per_group=self.min_channels_per_group, eps=self.eps,
                          dtype=dt, name='out_norm')(h))
    h = Conv2d(self.out_channels, 3, init_spec=init_zero, dtype=dt, name='out_conv')(h)
    return h.astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Presets (registered in diffjax.models). out_channels is set by build from the dataset and
# config.model.out_channel_mult; the values here are those of the published models.

_DDPM = dict(network='adm_unet', num_heads=1, scale_shift=False, resample='conv',
             downsample_padding=0, embedding='ddpm', init_style='ddpm', eps=1e-6)
_IDDPM = dict(network='adm_unet', num_heads=4, scale_shift=True, resample='conv',
              downsample_padding=1, embedding='adm', init_style='adm', eps=1e-5)

ADM_PRESETS = {
    # Ho et al. 2020 CIFAR-10 (35.7M; the network of diffusers' google/ddpm-cifar10-32).
    'ddpm_cifar10': dict(_DDPM, img_resolution=32, in_channels=3, out_channels=3,
                         model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2,
                         attn_resolutions=(16,), dropout=0.1),
    # Nichol & Dhariwal 2021 CIFAR-10 (improved-diffusion flags: --num_channels 128
    # --num_res_blocks 3 --learn_sigma True --dropout 0.3; defaults: 4 heads, attention 16,8).
    'iddpm_cifar10': dict(_IDDPM, img_resolution=32, in_channels=3, out_channels=6,
                          model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=3,
                          attn_resolutions=(16, 8), dropout=0.3),
    # Nichol & Dhariwal 2021 unconditional ImageNet-64 (L_hybrid / L_vlb runs: 128 channels).
    'iddpm_imagenet64': dict(_IDDPM, img_resolution=64, in_channels=3, out_channels=6,
                             model_channels=128, channel_mult=(1, 2, 3, 4), num_blocks=3,
                             attn_resolutions=(16, 8), dropout=0.0),
    # Dhariwal & Nichol 2021 class-conditional ImageNet-64 (EDM's ADM baseline, 295.9M params).
    'adm_imagenet64': dict(network='adm_unet', img_resolution=64, in_channels=3, out_channels=6,
                           label_dim=1000, model_channels=192, channel_mult=(1, 2, 3, 4),
                           num_blocks=3, attn_resolutions=(32, 16, 8), channels_per_head=64,
                           dropout=0.1, resample='resblock'),
    # The 8×8 digits with learned variance: a CPU-scale ADM.
    'adm_digits': dict(network='adm_unet', img_resolution=8, in_channels=1, out_channels=2,
                       label_dim=10, model_channels=32, channel_mult=(1, 2), num_blocks=2,
                       attn_resolutions=(4,), channels_per_head=32, dropout=0.1),
    # For tests.
    'adm_tiny': dict(network='adm_unet', img_resolution=8, in_channels=1, out_channels=2,
                     model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                     channels_per_head=16, dropout=0.0),
}
