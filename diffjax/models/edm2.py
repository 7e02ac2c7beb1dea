"""The magnitude-preserving U-Net of EDM2 (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", §2 and Fig. 21), NHWC.

Written afresh from the paper. Every layer keeps the expected magnitude (RMS) of its activations at
1, so that nothing in the network drifts as training goes on:

* `MPConv`: convolution or fully connected layer without bias whose weight is normalized per output
  channel at use, w ← w / (ε + ‖w‖/sqrt(fan_in)), and scaled by gain/sqrt(fan_in) (Eq. 47).
* forced weight normalization (Eq. 66): the *stored* weights are also kept at unit magnitude. In
  the pure train step this happens inside `tx.update`: `build.build_optimizer` ends the optimizer
  chain with `state.project_updates(EDM2UNet.project_params)` for every network class that has a
  `project_params`, which turns Adam's update u into normalize(w + u) − w, so `apply_updates`
  stores normalize(w + u) (`training.step.make_train_step` needs no change). The stored weights,
  the checkpoints and the EMA's inputs are unit-magnitude at every step, and the next gradient is
  taken at unit-magnitude weights, as in EDM2's code, which projects in place before each forward
  (the same weights are used by the forward either way; see `project_params`). Weights are drawn
  unit-magnitude at init for the same reason. Normalizing again at use keeps averaged (EMA) and
  imported weights correct, whose magnitude is not 1.
* `mp_silu` (Eq. 81), `mp_sum` (Eq. 88), `mp_cat` (Eq. 103), `MPFourier` (Eq. 75), pixel norm
  instead of group norm, no biases, learned scalar gains initialized to 0 (on the output conv and
  on every block's embedding map), skip connections concatenated, cosine attention (q and k
  pixel-normalized per head), and a constant-one input channel in place of biases.

The learned uncertainty u(σ) of the EDM2 loss (Eq. 21) is a small head on c_noise (`MPFourier` +
`MPConv`, EDM2's `logvar_*`). It is appended to the output as one extra channel, u broadcast over
the pixels: `precond.Denoiser.raw` already returns a network's channels beyond the image as `extra`
(as for iDDPM's learned variance), so the loss gets u from the same `apply` as D with the same
params tree (EMA, checkpoints and post-hoc EMA carry the head along), and samplers, which use only
the image channels, are unchanged. `logvar_channels=0` leaves the channel out.

Submodule and parameter names follow EDM2's (`enc_64x64_block0/conv_res0/weight`, `out_gain`, ...)
so the tree reads like Fig. 21 and an EDM2 snapshot maps onto it one to one (PyTorch's [out, in,
kh, kw] kernels transposed to [kh, kw, in, out]); the Fourier features' frozen frequencies are
constants drawn from a fixed NumPy seed, not variables (as in `embeddings.FourierEmbedding`).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models.embeddings import conditioning_labels
from diffjax.models.layers import check_remat, remat_block

Array = jax.Array

WEIGHT_EPS = 1e-4        # ε of normalize() (EDM2 Eq. 47 and 66)
SILU_SCALE = 0.596       # E[silu(x)²]^½ for x ~ N(0, 1): mp_silu divides by it (Eq. 81)


def normalize(x: Array, axis: Sequence[int] | int, eps: float = WEIGHT_EPS) -> Array:
  """x / (ε + ‖x‖/sqrt(n)) over `axis` (n elements): unit RMS over those axes (EDM2 Eq. 47).

  The norm is taken in float32 whatever x's dtype (bf16 squares lose too much), as EDM2 does.
  """
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  n = math.prod(x.shape[a] for a in axis)
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
  return x / (eps + norm / math.sqrt(n)).astype(x.dtype)


def normalize_weight(w: Array) -> Array:
  """A [.., in, out] kernel normalized per output channel (over every axis but the last)."""
  return normalize(w, tuple(range(w.ndim - 1)))


def mp_silu(x: Array) -> Array:
  """silu(x)/0.596: unit magnitude for unit-magnitude x (EDM2 Eq. 81)."""
  return nn.silu(x) / SILU_SCALE


def mp_sum(a: Array, b: Array, t: float = 0.5) -> Array:
  """((1 − t)·a + t·b)/sqrt((1 − t)² + t²): a blend that keeps unit magnitude (EDM2 Eq. 88)."""
  return (a + t * (b - a)) / math.sqrt((1 - t)**2 + t**2)


def mp_cat(a: Array, b: Array, t: float = 0.5) -> Array:
  """Concatenation on the channel axis with unit overall magnitude and a balance t (EDM2 Eq. 103).

  Each part is scaled so that a contributes the share (1 − t)² and b the share t² of the total
  energy, independently of their channel counts N_a, N_b.
  """
  na, nb = a.shape[-1], b.shape[-1]
  c = math.sqrt((na + nb) / ((1 - t)**2 + t**2))
  return jnp.concatenate([a * (c / math.sqrt(na) * (1 - t)), b * (c / math.sqrt(nb) * t)], axis=-1)


def fourier_buffers(num_channels: int, bandwidth: float = 1.0, seed: int = 0):
  """The frozen frequencies 2π·N(0, bandwidth²) and phases 2π·U(0, 1) of `MPFourier`.

  Returns:
    (freqs, phases), float32 [num_channels] each: N(0, 1) draws then U(0, 1) draws of
    `np.random.default_rng(seed)`.
  """
  rng = np.random.default_rng(seed)
  freqs = 2 * np.pi * rng.standard_normal(num_channels) * bandwidth
  phases = 2 * np.pi * rng.uniform(size=num_channels)
  return freqs.astype(np.float32), phases.astype(np.float32)


class MPFourier(nn.Module):
  """Magnitude-preserving Fourier features sqrt(2)·cos(f·x + φ) of a batch of scalars (EDM2 Eq. 75).

  f and φ are fixed (a buffer in EDM2), constants of the module's seed: not parameters.

  Attributes:
    num_channels: output width.
    bandwidth: standard deviation of f/2π.
    seed: NumPy seed of f and φ; part of the architecture, keep it fixed.
    table: f then φ (2·num_channels floats) read from an imported checkpoint, whose buffers
      torch drew (diffjax.convert); None = the seed's.
  """
  num_channels: int
  bandwidth: float = 1.0
  seed: int = 0
  table: Optional[Sequence[float]] = None

  def __call__(self, x: Array) -> Array:
    """Maps [B] to [B, num_channels] float32 (computed in float32: c_noise needs the phase)."""
    if self.table is None:
      freqs, phases = fourier_buffers(self.num_channels, self.bandwidth, self.seed)
    else:
      freqs, phases = np.split(np.asarray(self.table, np.float32), 2)
    y = jnp.asarray(x, jnp.float32)[:, None] * freqs[None, :] + phases[None, :]
    return jnp.cos(y) * math.sqrt(2.0)


def _unit_normal(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
  """N(0, 1) draws normalized per output channel: stored weights start at unit magnitude."""
  return normalize_weight(jax.random.normal(key, shape, dtype))


class MPConv(nn.Module):
  """Magnitude-preserving convolution (kernel_size ≥ 1) or fully connected layer (0), no bias.

  y = x ⊛ (gain · normalize(w)/sqrt(fan_in)) (EDM2 Eq. 47); `weight` is [k, k, in, out] (conv) or
  [in, out] (dense).

  Attributes:
    features: output channels.
    kernel_size: odd k of a k×k 'same' convolution, or 0 for a fully connected layer.
    dtype: compute dtype (the weight is stored and normalized in float32).
  """
  features: int
  kernel_size: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, gain: Any = 1.0) -> Array:
    """Applies the layer to x [..., in] (dense) or [B, H, W, in] (conv); gain is a scalar."""
    cin = x.shape[-1]
    k = self.kernel_size
    shape = (cin, self.features) if k == 0 else (k, k, cin, self.features)
    w = self.param('weight', _unit_normal, shape, jnp.float32)
    fan_in = math.prod(shape[:-1])
    w = (normalize_weight(w) * (gain / math.sqrt(fan_in))).astype(self.dtype)
    x = x.astype(self.dtype)
    if k == 0:
      return x @ w
    return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def project_params(params: Any) -> Any:
  """Forced weight normalization (EDM2 Eq. 66): every MPConv `weight` replaced by normalize(w).

  Gains and anything else are left alone. Applied to the stored params after each optimizer
  update (`state.project_updates`); the forward normalizes again, and normalize(normalize(w))
  differs from normalize(w) only by the ε of the second division (relative 1e-4, which EDM2's
  in-place projection before each forward has as well).

  Args:
    params: an EDM2UNet params tree (or any tree; leaves named 'weight' are projected).

  Returns:
    The tree with the same structure.
  """
  def one(path, leaf):
    name = getattr(path[-1], 'key', None) if path else None
    return normalize_weight(leaf) if name == 'weight' else leaf
  return jax.tree_util.tree_map_with_path(one, params)


def _down(x: Array) -> Array:
  """2× downsampling with EDM2's box filter [1, 1]: the mean of each 2×2 patch."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _up(x: Array) -> Array:
  """2× upsampling with EDM2's box filter [1, 1] (transposed, gain 4): nearest neighbour."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Block(nn.Module):
  """An EDM2 encoder or decoder block with optional cosine self-attention (EDM2 Fig. 21).

  Attributes:
    out_channels: output channels.
    flavor: 'enc' (1×1 skip projection and pixel norm on the main path before the residual
      branch) or 'dec' (the residual branch sees the concatenated input; the skip projection
      comes after it).
    resample: 'keep', 'down' or 'up'.
    attention: add self-attention (when out_channels ≥ channels_per_head).
    channels_per_head: attention heads = out_channels // channels_per_head.
    dropout: dropout probability inside the residual branch (training only).
    res_balance: mp_sum balance of the main path (0) and the residual branch (1).
    attn_balance: mp_sum balance of the main path (0) and the attention (1).
    clip_act: clip the block's output to ±clip_act (None: no clipping); guards float16 runs.
    dtype: compute dtype.
  """
  out_channels: int
  flavor: str = 'enc'
  resample: str = 'keep'
  attention: bool = False
  channels_per_head: int = 64
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = 256.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    """x [B, H, W, C_in], emb [B, C_emb] → [B, H', W', out_channels]."""
    cout, dt = self.out_channels, self.dtype
    needs_skip = x.shape[-1] != cout
    # Main path.
    if self.resample == 'down':
      x = _down(x)
    elif self.resample == 'up':
      x = _up(x)
    if self.flavor == 'enc':
      if needs_skip:
        x = MPConv(cout, 1, dtype=dt, name='conv_skip')(x)
      x = normalize(x, -1)  # Pixel norm: the encoder's main path is renormalized at every block.

    # Residual branch: the embedding modulates the features multiplicatively, around 1.
    y = MPConv(cout, 3, dtype=dt, name='conv_res0')(mp_silu(x))
    emb_gain = self.param('emb_gain', nn.initializers.zeros, (), jnp.float32)
    c = MPConv(cout, 0, dtype=dt, name='emb_linear')(emb, gain=emb_gain) + 1
    y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
    if train and self.dropout > 0:
      y = nn.Dropout(self.dropout, deterministic=False)(y)
    y = MPConv(cout, 3, dtype=dt, name='conv_res1')(y)

    if self.flavor == 'dec' and needs_skip:
      x = MPConv(cout, 1, dtype=dt, name='conv_skip')(x)
    x = mp_sum(x, y, self.res_balance)

    heads = cout // self.channels_per_head if self.attention else 0
    if heads:
      b, h, w, _ = x.shape
      ch = cout // heads
      # Channels are laid out (head, channel, q/k/v), as EDM2's reshape of its qkv conv.
      qkv = MPConv(3 * cout, 1, dtype=dt, name='attn_qkv')(x).reshape(b, h * w, heads, ch, 3)
      qkv = normalize(qkv, 3)  # Cosine attention: q, k, v at unit RMS per head and pixel.
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
      logits = jnp.einsum('bqhc,bkhc->bhqk', q, k / jnp.asarray(math.sqrt(ch), k.dtype))
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
      y = jnp.einsum('bhqk,bkhc->bqhc', weights, v).reshape(b, h, w, cout)
      x = mp_sum(x, MPConv(cout, 1, dtype=dt, name='attn_proj')(y), self.attn_balance)

    if self.clip_act is not None:
      x = jnp.clip(x, -self.clip_act, self.clip_act)
    return x


class EDM2UNet(nn.Module):
  """The EDM2 magnitude-preserving U-Net F(x, c_noise, class) with its uncertainty head (NHWC).

  Attributes:
    img_resolution: input and output height = width.
    in_channels: channels of x (a constant-one channel is appended inside).
    out_channels: channels of the prediction F.
    label_dim: number of classes; 0 = unconditional.
    augment_dim: must be 0: EDM2 trains without augmentation conditioning (kept for the common
      network signature; build.build_network passes the config's).
    model_channels: base width.
    channel_mult: width multiplier per resolution level (level i runs at img_resolution / 2^i).
    channel_mult_noise: noise Fourier width = model_channels · this; None = the first level's width.
    channel_mult_emb: embedding width = model_channels · this; None = the widest level's width.
    num_blocks: blocks per level in the encoder (the decoder has one more).
    attn_resolutions: resolutions whose blocks get self-attention (the decoder's first block at
      the lowest resolution always has it).
    label_balance: mp_sum balance of the noise (0) and class (1) embeddings.
    concat_balance: mp_cat balance of the main path (0) and the skip (1).
    channels_per_head: attention width per head.
    dropout: dropout probability in the blocks' residual branches.
    res_balance, attn_balance: see `Block`.
    clip_act: see `Block`.
    logvar_channels: Fourier width of the uncertainty head u(c_noise); 0 = no head (and no extra
      output channel).
    label_dropout: probability of replacing the class label by the null (all-zero) label in
      training (classifier-free guidance; EDM2 itself guides with a smaller model instead).
    dtype: compute dtype; parameters stay float32 and the output is float32.
    remat: rematerialization of the blocks: 'none', 'blocks' or 'full' (see
      `layers.REMAT_POLICIES`); the parameter tree is the same in every mode.
  """
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_noise: Optional[int] = None
  channel_mult_emb: Optional[int] = None
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (16, 8)
  label_balance: float = 0.5
  concat_balance: float = 0.5
  channels_per_head: int = 64
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = 256.0
  logvar_channels: int = 128
  label_dropout: float = 0.0
  # MPFourier.table of the noise embedding and of the uncertainty head: an imported EDM2
  # snapshot's buffers (diffjax.convert); None = diffjax's own draws.
  noise_fourier_table: Optional[Sequence[float]] = None
  logvar_fourier_table: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  remat: str = 'none'

  # Forced weight normalization of a params tree; build.build_optimizer looks for this name.
  project_params = staticmethod(project_params)

  def _check(self, x: Array) -> None:
    """Fails with one sentence on a bad configuration or input shape."""
    if self.augment_dim:
      raise ValueError(f'The EDM2 U-Net takes no augmentation labels (augment_dim '
                       f'{self.augment_dim}); set --config.augment.p=0 and model.augment_dim=0.')
    levels = len(self.channel_mult)
    if levels < 1 or self.img_resolution % (2**(levels - 1)):
      raise ValueError(f'img_resolution {self.img_resolution} must be divisible by 2^{levels - 1} '
                       f'for channel_mult {tuple(self.channel_mult)}; use fewer levels or a larger '
                       'image.')
    expected = (self.img_resolution, self.img_resolution, self.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(f'EDM2UNet expects x of shape [B, {expected[0]}, {expected[1]}, '
                       f'{expected[2]}] (NHWC), got {tuple(x.shape)}.')

  def _embed(self, noise_labels: Array, class_labels: Optional[Array], batch: int,
             train: bool) -> Array:
    """The conditioning vector [B, C_emb] every block's embedding map reads."""
    cblock = [self.model_channels * m for m in self.channel_mult]
    cnoise = (cblock[0] if self.channel_mult_noise is None
              else self.model_channels * self.channel_mult_noise)
    cemb = (max(cblock) if self.channel_mult_emb is None
            else self.model_channels * self.channel_mult_emb)
    emb = MPFourier(cnoise, table=self.noise_fourier_table, name='emb_fourier')(noise_labels)
    emb = emb.astype(self.dtype)
    emb = MPConv(cemb, 0, dtype=self.dtype, name='emb_noise')(emb)
    if self.label_dim:
      labels = conditioning_labels(class_labels, self.label_dim, batch,
                                   label_dropout=self.label_dropout,
                                   dropout_key=self.make_rng('dropout') if train and self.label_dropout else None)
      # sqrt(label_dim) gives a one-hot vector unit magnitude, like the noise embedding.
      label_emb = MPConv(cemb, 0, dtype=self.dtype, name='emb_label')(
          labels * math.sqrt(self.label_dim))
      emb = mp_sum(emb, label_emb, self.label_balance)
    return mp_silu(emb)

  @nn.compact
  def __call__(self, x: Array, noise_labels: Array, class_labels: Optional[Array] = None,
               augment_labels: Optional[Array] = None, train: bool = False) -> Array:
    """Applies the network.

    Args:
      x: [B, H, W, in_channels] input (already scaled by c_in).
      noise_labels: [B] noise conditioning c_noise (EDM2: ln(σ)/4; a scalar is broadcast).
      class_labels: [B, label_dim] one-hot float labels; None gives the null (all-zero) label.
        Ignored when label_dim == 0.
      augment_labels: must be None (the network has no augmentation conditioning).
      train: enables dropout and label dropout (both draw from the 'dropout' rng).

    Returns:
      [B, H, W, out_channels + 1] float32: F, then u(c_noise) broadcast over the pixels (the
      log-variance of the EDM2 loss, Eq. 21); [B, H, W, out_channels] when logvar_channels == 0.
    """
    self._check(x)
    check_remat(self.remat)
    if augment_labels is not None:
      raise ValueError('The EDM2 U-Net takes no augmentation labels; train it with augment.p=0.')
    dt = self.dtype
    batch = x.shape[0]
    noise_labels = jnp.broadcast_to(jnp.asarray(noise_labels, jnp.float32).reshape(-1), (batch,))
    emb = self._embed(noise_labels, class_labels, batch, train)
    block_cls = remat_block(Block, self.remat)
    block = lambda cout, name, **kw: block_cls(
        cout, channels_per_head=self.channels_per_head, dropout=self.dropout,
        res_balance=self.res_balance, attn_balance=self.attn_balance, clip_act=self.clip_act,
        dtype=dt, name=name, **kw)

    # Encoder. The constant-one channel lets the bias-free first conv produce offsets.
    x = jnp.asarray(x, dt)
    x = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
    skips = []
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      tag = f'{res}x{res}'
      cout = self.model_channels * mult
      if level == 0:
        x = MPConv(cout, 3, dtype=dt, name=f'enc_{tag}_conv')(x)
      else:
        x = block(x.shape[-1], f'enc_{tag}_down', flavor='enc', resample='down')(x, emb, train)
      skips.append(x)
      for idx in range(self.num_blocks):
        x = block(cout, f'enc_{tag}_block{idx}', flavor='enc',
                  attention=res in self.attn_resolutions)(x, emb, train)
        skips.append(x)

    # Decoder: two blocks at the lowest level (the first with attention), an upsampling block at
    # every other level, then num_blocks + 1 blocks per level, each fed one skip.
    last = len(self.channel_mult) - 1
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      tag = f'{res}x{res}'
      if level == last:
        x = block(x.shape[-1], f'dec_{tag}_in0', flavor='dec', attention=True)(x, emb, train)
        x = block(x.shape[-1], f'dec_{tag}_in1', flavor='dec')(x, emb, train)
      else:
        x = block(x.shape[-1], f'dec_{tag}_up', flavor='dec', resample='up')(x, emb, train)
      for idx in range(self.num_blocks + 1):
        x = mp_cat(x, skips.pop(), self.concat_balance)
        x = block(self.model_channels * mult, f'dec_{tag}_block{idx}', flavor='dec',
                  attention=res in self.attn_resolutions)(x, emb, train)
    out_gain = self.param('out_gain', nn.initializers.zeros, (), jnp.float32)
    out = MPConv(self.out_channels, 3, dtype=dt, name='out_conv')(x, gain=out_gain)
    out = out.astype(jnp.float32)
    if not self.logvar_channels:
      return out
    logvar = MPConv(1, 0, name='logvar_linear')(
        MPFourier(self.logvar_channels, seed=1, table=self.logvar_fourier_table,
                  name='logvar_fourier')(noise_labels))
    return jnp.concatenate([out, jnp.broadcast_to(logvar[:, None, None, :], out.shape[:3] + (1,))],
                           axis=-1)


# EDM2's ImageNet-64 presets (train_edm2.py, edm2-img64-*): the UNet defaults above, model channels
# 128/192/256/320/384 and dropout 0/0/0.1/0.1/0.1. label_dim is left to the dataset.
_IMG64 = dict(network='edm2_unet', img_resolution=64, in_channels=3, out_channels=3)
PRESETS = {
    f'edm2-img64-{size}': dict(_IMG64, model_channels=channels, dropout=dropout)
    for size, channels, dropout in (('xs', 128, 0.0), ('s', 192, 0.0), ('m', 256, 0.1),
                                    ('l', 320, 0.1), ('xl', 384, 0.1))
}
# 8×8×1 class-conditional digits: two levels, attention (2 heads of 32) at 4×4; trains on CPU in
# minutes.
PRESETS['edm2-digits'] = dict(
    network='edm2_unet', img_resolution=8, in_channels=1, out_channels=1, label_dim=10,
    model_channels=32, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(4,),
    channels_per_head=32, logvar_channels=32, dropout=0.0)
# For tests: the same shape, narrower.
PRESETS['edm2-tiny'] = dict(
    network='edm2_unet', img_resolution=8, in_channels=1, out_channels=1, model_channels=16,
    channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=16,
    logvar_channels=16, dropout=0.0)
