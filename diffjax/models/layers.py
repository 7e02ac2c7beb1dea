"""Building blocks of the EDM-family U-Nets (DDPM++, NCSN++, ADM), NHWC throughout.

Written afresh from Song et al. 2021 (DDPM++/NCSN++), Dhariwal & Nichol 2021 (ADM) and the
architecture description of Karras et al. 2022 (EDM, App. F). The initializers, group-norm rule and
resampling arithmetic follow EDM's reimplementation so that parameter counts and init statistics match
the published networks.

Parameters are always float32; every layer has a `dtype` field for the compute dtype (bf16 on TPU).
`remat_block` wraps a block class in `flax.linen.remat` (rematerialization, "gradient checkpointing")
without changing its parameter names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

_NHWC = ('NHWC', 'HWIO', 'NHWC')

# ---------------------------------------------------------------------------------------------------
# Initializers.


@dataclasses.dataclass(frozen=True)
class Init:
  """How a layer's weight and bias are drawn (EDM's `init_mode`, `init_weight`, `init_bias`).

  Both weight and bias are drawn from the distribution `mode` (with the fans of the *weight*) and then
  multiplied by `weight` and `bias` respectively, so `bias=0` (the default) gives zero biases.

  Attributes:
    mode: 'xavier_uniform', 'xavier_normal', 'kaiming_uniform' or 'kaiming_normal'.
    weight: multiplier on the drawn weight (e.g. 1e-5 for the near-zero output layers of DDPM++).
    bias: multiplier on the drawn bias.
  """

  mode: str = 'kaiming_normal'
  weight: float = 1.0
  bias: float = 0.0


def weight_init(mode: str, fan_in: int, fan_out: int, gain: float = 1.0) -> Initializer:
  """Returns an initializer `init(key, shape, dtype)` for one of EDM's four weight distributions.

  xavier_uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out));  xavier_normal: N(0, 2 / (fan_in + fan_out));
  kaiming_uniform: U(-a, a), a = sqrt(3 / fan_in);            kaiming_normal: N(0, 1 / fan_in).
  The fans are passed explicitly (not read from `shape`) so that a bias gets the weight's fans.

  Args:
    mode: one of the four names above.
    fan_in: inputs per output unit (in_channels · k · k for a conv).
    fan_out: outputs per input unit (out_channels · k · k for a conv).
    gain: multiplier on the draw.
  """
  if mode == 'xavier_uniform':
    bound, uniform = math.sqrt(6 / (fan_in + fan_out)), True
  elif mode == 'xavier_normal':
    bound, uniform = math.sqrt(2 / (fan_in + fan_out)), False
  elif mode == 'kaiming_uniform':
    bound, uniform = math.sqrt(3 / fan_in), True
  elif mode == 'kaiming_normal':
    bound, uniform = math.sqrt(1 / fan_in), False
  else:
    raise ValueError(
      f'Unknown init mode {mode!r}; use xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal.'
    )

  def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
    if uniform:
      draw = jax.random.uniform(key, shape, dtype, minval=-1.0, maxval=1.0)
    else:
      draw = jax.random.normal(key, shape, dtype)
    return draw * jnp.asarray(bound * gain, dtype)

  return init


# ---------------------------------------------------------------------------------------------------
# Resampling (pure functions).


def resample_filter_2d(taps: Sequence[float]) -> np.ndarray:
  """The separable 2-D resampling filter `outer(f, f) / sum(f)²`, shape [k, k], float32.

  [1, 1] is the box filter of DDPM++; [1, 3, 3, 1] is the FIR (binomial) filter of NCSN++/StyleGAN.
  The normalization makes the filter's DC gain 1, so downsampling keeps a constant image constant.
  """
  f = np.asarray(taps, dtype=np.float64)
  if f.ndim != 1 or f.size == 0 or f.sum() == 0:
    raise ValueError(
      f'resample_filter must be a non-empty 1-D list of taps with a non-zero sum, got {taps}.'
    )
  return (np.outer(f, f) / f.sum() ** 2).astype(np.float32)


def _depthwise_kernel(f2d: np.ndarray, channels: int, dtype: Dtype) -> Array:
  """Tiles a [k, k] filter into a depthwise HWIO kernel [k, k, 1, channels]."""
  return jnp.tile(jnp.asarray(f2d, dtype)[:, :, None, None], (1, 1, 1, channels))


def depthwise_downsample(x: Array, f2d: np.ndarray, padding: int) -> Array:
  """Filters every channel with `f2d` and keeps every second pixel (a stride-2 depthwise conv).

  Args:
    x: [B, H, W, C].
    f2d: [k, k] filter.
    padding: zero padding on each side of H and W.

  Returns:
    [B, (H + 2p - k) // 2 + 1, (W + 2p - k) // 2 + 1, C].
  """
  c = x.shape[-1]
  return jax.lax.conv_general_dilated(
    x,
    _depthwise_kernel(f2d, c, x.dtype),
    window_strides=(2, 2),
    padding=((padding, padding), (padding, padding)),
    dimension_numbers=_NHWC,
    feature_group_count=c,
  )


def depthwise_upsample(x: Array, f2d: np.ndarray, padding: int) -> Array:
  """Stride-2 depthwise *transposed* conv with filter `4·f2d` (zero-insertion then filtering).

  The factor 4 restores the mean lost by inserting three zeros per pixel. Matches a stride-2 transposed
  convolution with padding `padding`: it is a conv over the 2×-dilated input with the flipped kernel
  and padding `k - 1 - padding`.

  Args:
    x: [B, H, W, C].
    f2d: [k, k] filter.
    padding: the transposed conv's padding.

  Returns:
    [B, 2(H - 1) + k - 2p, 2(W - 1) + k - 2p, C].
  """
  c = x.shape[-1]
  k = f2d.shape[0]
  flipped = np.ascontiguousarray(f2d[::-1, ::-1]) * 4
  pad = k - 1 - padding
  return jax.lax.conv_general_dilated(
    x,
    _depthwise_kernel(flipped, c, x.dtype),
    window_strides=(1, 1),
    padding=((pad, pad), (pad, pad)),
    lhs_dilation=(2, 2),
    dimension_numbers=_NHWC,
    feature_group_count=c,
  )


def downsample_2d(x: Array, taps: Sequence[float] = (1, 1)) -> Array:
  """Halves H and W with the normalized filter built from `taps`: [B, H, W, C] -> [B, H/2, W/2, C]."""
  f2d = resample_filter_2d(taps)
  return depthwise_downsample(x, f2d, padding=(f2d.shape[0] - 1) // 2)


def upsample_2d(x: Array, taps: Sequence[float] = (1, 1)) -> Array:
  """Doubles H and W with the normalized filter built from `taps`: [B, H, W, C] -> [B, 2H, 2W, C]."""
  f2d = resample_filter_2d(taps)
  return depthwise_upsample(x, f2d, padding=(f2d.shape[0] - 1) // 2)


def conv2d(x: Array, kernel: Array, padding: int) -> Array:
  """Plain stride-1 convolution (cross-correlation) of NHWC `x` with an HWIO `kernel`."""
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(1, 1),
    padding=((padding, padding), (padding, padding)),
    dimension_numbers=_NHWC,
  )


# ---------------------------------------------------------------------------------------------------
# Layers.


class Linear(nn.Module):
  """Fully connected layer `y = x @ W + b` with EDM's initialization.

  Attributes:
    features: output width.
    use_bias: whether to add a bias.
    init_spec: weight/bias distribution (fans: in_features, features).
    dtype: compute dtype; parameters stay float32.
  """

  features: int
  use_bias: bool = True
  init_spec: Init = Init()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [..., in_features] to [..., features]."""
    fan_in, fan_out = x.shape[-1], self.features
    kernel = self.param(
      'kernel',
      weight_init(self.init_spec.mode, fan_in, fan_out, self.init_spec.weight),
      (fan_in, fan_out),
      jnp.float32,
    )
    y = jnp.asarray(x, self.dtype) @ kernel.astype(self.dtype)
    if self.use_bias:
      bias = self.param(
        'bias',
        weight_init(self.init_spec.mode, fan_in, fan_out, self.init_spec.bias),
        (fan_out,),
        jnp.float32,
      )
      y = y + bias.astype(self.dtype)
    return y


class Conv2d(nn.Module):
  """2-D convolution with optional 2× up- or downsampling by a fixed separable filter.

  Unfused (the default): upsample → conv, or downsample → conv, where the resampling is a depthwise
  (transposed) conv with `resample_filter_2d(resample_filter)`. `kernel_size=0` gives a parameter-free
  resampler (the output then has the input's channels). Fused (used by the NCSN++ residual encoder):
  the conv and the resampling share their padding, which changes the image border slightly, exactly
  as in EDM; it only applies when there is a weight.

  Attributes:
    features: output channels (ignored when kernel_size == 0).
    kernel_size: odd square kernel size, or 0 for no convolution.
    use_bias: whether to add a bias (only when kernel_size > 0).
    up: upsample 2× before the conv.
    down: downsample 2× (before the conv, or after it when fused).
    resample_filter: 1-D taps of the separable resampling filter.
    fused_resample: share the padding of conv and resampling (see above).
    init_spec: weight/bias distribution (fans: in·k·k, out·k·k).
    dtype: compute dtype; parameters stay float32.
  """

  features: int
  kernel_size: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[int] = (1, 1)
  fused_resample: bool = False
  init_spec: Init = Init()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [B, H, W, C] to [B, H', W', features] with H' = 2H (up), H/2 (down) or H."""
    if self.up and self.down:
      raise ValueError('Conv2d cannot both upsample and downsample; set at most one of up/down.')
    x = jnp.asarray(x, self.dtype)
    cin, k = x.shape[-1], self.kernel_size
    kernel = bias = None
    if k:
      fan_in, fan_out = cin * k * k, self.features * k * k
      kernel = self.param(
        'kernel',
        weight_init(self.init_spec.mode, fan_in, fan_out, self.init_spec.weight),
        (k, k, cin, self.features),
        jnp.float32,
      ).astype(self.dtype)
      if self.use_bias:
        bias = self.param(
          'bias',
          weight_init(self.init_spec.mode, fan_in, fan_out, self.init_spec.bias),
          (self.features,),
          jnp.float32,
        ).astype(self.dtype)
    f2d = resample_filter_2d(self.resample_filter) if (self.up or self.down) else None
    w_pad = k // 2
    f_pad = (f2d.shape[0] - 1) // 2 if f2d is not None else 0

    if self.fused_resample and self.up and kernel is not None:
      x = depthwise_upsample(x, f2d, padding=max(f_pad - w_pad, 0))
      x = conv2d(x, kernel, padding=max(w_pad - f_pad, 0))
    elif self.fused_resample and self.down and kernel is not None:
      # Convolving with the combined padding first evaluates the conv slightly beyond the border.
      x = conv2d(x, kernel, padding=w_pad + f_pad)
      x = depthwise_downsample(x, f2d, padding=0)
    else:
      if self.up:
        x = depthwise_upsample(x, f2d, padding=f_pad)
      if self.down:
        x = depthwise_downsample(x, f2d, padding=f_pad)
      if kernel is not None:
        x = conv2d(x, kernel, padding=w_pad)
    if bias is not None:
      x = x + bias
    return x


class GroupNorm(nn.Module):
  """Group normalization with EDM's group rule `min(num_groups, C // min_channels_per_group)`.

  Statistics are computed in float32 whatever the compute dtype (bf16 variance is too coarse).

  Attributes:
    num_groups: the most groups to use (32).
    min_channels_per_group: the fewest channels a group may have (4), so narrow layers get fewer groups.
    eps: added to the variance (1e-6 in DDPM++/NCSN++, 1e-5 in ADM).
    dtype: output dtype; the scale and bias parameters stay float32.
  """

  num_groups: int = 32
  min_channels_per_group: int = 4
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Normalizes [B, H, W, C] over (H, W, channels of a group); returns [B, H, W, C]."""
    c = x.shape[-1]
    groups = group_count(c, self.num_groups, self.min_channels_per_group)
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    h = jnp.asarray(x, jnp.float32).reshape(*x.shape[:-1], groups, c // groups)
    axes = tuple(range(1, h.ndim - 2)) + (h.ndim - 1,)
    # One pass over h for both moments (var = E[h²] − E[h]²) and the normalization folded into one
    # per-channel affine h·a + b: XLA:CPU then reads the activation twice instead of four times.
    # Measured on the DDPM CIFAR-10 U-Net (benchmarks/NOTES.md): forward about +9%, train step
    # about +15–30%. Shifting h by one of its values first (exact in theory, better conditioned)
    # cost that gain back, so the cancellation is accepted: it grows like (mean/std)²; the largest
    # output error measured is 5e-5 for a group mean 5 standard deviations from 0 and 6e-4 at 20
    # (tests/test_models.py), against ~1e-6 at 0. The clip guards the sign of var.
    mean = h.mean(axis=axes, keepdims=True)
    var = jnp.maximum(jnp.square(h).mean(axis=axes, keepdims=True) - jnp.square(mean), 0.0)
    a = jax.lax.rsqrt(var + self.eps) * scale.reshape(groups, c // groups)
    b = bias.reshape(groups, c // groups) - mean * a
    return (h * a + b).reshape(x.shape).astype(self.dtype)


def group_count(channels: int, num_groups: int = 32, min_channels_per_group: int = 4) -> int:
  """EDM's number of groups for `channels` channels; fails clearly if it does not divide them."""
  groups = max(min(num_groups, channels // min_channels_per_group), 1)
  if channels % groups:
    raise ValueError(
      f'GroupNorm over {channels} channels would use {groups} groups, which do not divide them; '
      'choose model_channels so that every layer width is a multiple of its group count '
      '(e.g. a multiple of 32).'
    )
  return groups


def attention(q: Array, k: Array, v: Array) -> Array:
  """Softmax attention over pixels; logits and softmax in float32 for stability (as EDM).

  Args:
    q, k, v: [B, N, heads, c] queries, keys, values (N = H·W).

  Returns:
    [B, N, heads, c] in v's dtype.
  """
  scale = 1 / math.sqrt(k.shape[-1])
  logits = jnp.einsum('bqhc,bkhc->bhqk', q.astype(jnp.float32), k.astype(jnp.float32) * scale)
  w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhc->bqhc', w, v)


# Rematerialization modes of the U-Nets' blocks (config.model.remat), as jax.checkpoint policies:
# which values computed inside a block the backward pass may keep instead of recomputing.
#   'blocks': convolution and matmul outputs are kept; the elementwise work between them (GroupNorm,
#             SiLU, dropout, residual sums) is recomputed. Cheap to recompute, and those are most of
#             a block's activations (every conv's input is a norm→SiLU chain of its own).
#   'full':   nothing inside a block is kept but its inputs; the whole block's forward is recomputed
#             in the backward pass (about one extra forward in all).
REMAT_POLICIES = {
  'none': None,
  'blocks': jax.checkpoint_policies.dots_saveable,
  'full': jax.checkpoint_policies.nothing_saveable,
}


def check_remat(remat: str) -> None:
  """Fails with one sentence on an unknown rematerialization mode."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f'Unknown remat mode {remat!r}; known: {", ".join(REMAT_POLICIES)} '
                     '(--config.model.remat).')


def remat_block(cls: type, remat: str) -> type:
  """`cls` (a block whose __call__ is (x, emb, train)), rematerialized as `remat` says.

  `nn.remat` of the class keeps the submodule names, so the parameter tree is the same with and
  without rematerialization (the instance is still named by its `name=`); `train` is static (it
  switches dropout on, a Python branch).
  """
  check_remat(remat)
  if remat == 'none':
    return cls
  # static_argnums counts `self` as argument 0: (self, x, emb, train).
  return nn.remat(cls, policy=REMAT_POLICIES[remat], static_argnums=(3,))


class UNetBlock(nn.Module):
  """Residual U-Net block with optional 2× resampling and self-attention (union of DDPM++/NCSN++/ADM).

  x → GroupNorm → SiLU → conv3×3 (resampling) → + embedding (added, or scale-shift when adaptive)
    → GroupNorm → SiLU → dropout → conv3×3 (near-zero init), plus the skip path (1×1 conv when the
  channels or the resolution change), all times `skip_scale`. With attention, a pre-norm
  self-attention residual follows, again times `skip_scale`.

  Attributes:
    features: output channels.
    up: upsample 2×.
    down: downsample 2×.
    attention: add self-attention after the residual part.
    num_heads: attention heads; None means features // channels_per_head.
    channels_per_head: used when num_heads is None (ADM: 64).
    dropout: dropout probability before the second conv.
    skip_scale: multiplier on each residual sum (sqrt(1/2) in DDPM++/NCSN++).
    eps: GroupNorm epsilon.
    resample_filter: taps of the resampling filter.
    resample_proj: give the skip path a 1×1 conv whenever it resamples (not only when channels change).
    min_channels_per_group: of every GroupNorm here (4, EDM's rule); 1 gives 32 groups at any width
      of at least 32 channels, as openai's and diffusers' U-Nets have.
    adaptive_scale: embedding gives (scale, shift), h = SiLU(norm(h)·(1+scale) + shift), as ADM;
      otherwise it is added before the norm, h = SiLU(norm(h + emb)), as DDPM++.
    init_spec: distribution of conv0, affine and skip layers.
    init_zero: distribution of conv1 and the attention projection (near-zero or zero).
    init_attn: distribution of the qkv conv; None means `init_spec`.
    dtype: compute dtype; parameters stay float32.
  """

  features: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: Optional[int] = None
  channels_per_head: int = 64
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  resample_filter: Sequence[int] = (1, 1)
  resample_proj: bool = False
  min_channels_per_group: int = 4
  adaptive_scale: bool = True
  init_spec: Init = Init()
  init_zero: Init = Init(weight=0.0)
  init_attn: Optional[Init] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    """Applies the block.

    Args:
      x: [B, H, W, C_in].
      emb: [B, E] conditioning embedding.
      train: enables dropout (draws from the 'dropout' rng).

    Returns:
      [B, H', W', features], H' = 2H (up), H/2 (down) or H.
    """
    cin, cout = x.shape[-1], self.features
    dt = self.dtype
    conv = lambda feats, k, spec, **kw: Conv2d(
      feats, k, resample_filter=tuple(self.resample_filter), init_spec=spec, dtype=dt, **kw
    )

    orig = x
    norm = lambda name: GroupNorm(min_channels_per_group=self.min_channels_per_group, eps=self.eps,
                                  dtype=dt, name=name)
    h = nn.silu(norm('norm0')(x))
    h = conv(cout, 3, self.init_spec, up=self.up, down=self.down, name='conv0')(h)

    params = Linear(
      cout * (2 if self.adaptive_scale else 1), init_spec=self.init_spec, dtype=dt, name='affine'
    )(emb)[:, None, None, :]
    norm1 = norm('norm1')
    if self.adaptive_scale:
      scale, shift = jnp.split(params, 2, axis=-1)
      h = nn.silu(shift + norm1(h) * (scale + 1))
    else:
      h = nn.silu(norm1(h + params))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(cout, 3, self.init_zero, name='conv1')(h)

    if cout != cin or self.up or self.down:
      # A 1×1 projection when the width changes (or always, with resample_proj); else pure resampling.
      k = 1 if (self.resample_proj or cout != cin) else 0
      orig = conv(cout, k, self.init_spec, up=self.up, down=self.down, name='skip')(orig)
    h = (h + jnp.asarray(orig, dt)) * jnp.asarray(self.skip_scale, dt)

    if self.attention:
      heads = self.num_heads if self.num_heads is not None else cout // self.channels_per_head
      if heads < 1 or cout % heads:
        raise ValueError(
          f'Attention over {cout} channels cannot use {heads} heads; they must divide it.'
        )
      b, hh, ww, _ = h.shape
      qkv = conv(3 * cout, 1, self.init_attn or self.init_spec, name='qkv')(
        norm('norm2')(h)
      )
      # Channel layout (head, channel, q/k/v), the one EDM's checkpoints use.
      qkv = qkv.reshape(b, hh * ww, heads, cout // heads, 3)
      a = attention(qkv[..., 0], qkv[..., 1], qkv[..., 2]).reshape(b, hh, ww, cout)
      h = (conv(cout, 1, self.init_zero, name='proj')(a) + h) * jnp.asarray(self.skip_scale, dt)
    return h
