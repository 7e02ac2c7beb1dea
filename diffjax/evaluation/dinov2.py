"""The DINOv2 ViT-L/14 feature network of FD_DINOv2 (EDM2's second metric), in Flax.

FD_DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"; EDM2, Karras et al.
2024) is the Fréchet distance of the 1024-d features of DINOv2's ViT-L/14 (Oquab et al. 2023), the
register-free `dinov2_vitl14` of facebookresearch/dinov2. This is that network:

* patch embedding: a 14x14 convolution with stride 14 (with bias) → [B, (H/14)(W/14), D];
* a learned class token prepended, plus a learned positional embedding stored for a 37x37 grid (the 518 px
  training size) and resized to the input's grid with bicubic interpolation as the reference does
  (`interpolate_pos_encoding`: torch `interpolate(mode='bicubic', antialias=False)` with the scale factor
  (grid + 0.1) / 37, a historical offset that shifts the sampling positions slightly);
* `depth` pre-norm blocks x + γ₁·Attn(LN(x)), x + γ₂·MLP(LN(x)) with LayerScale γ, LayerNorm eps 1e-6,
  multi-head attention with a qkv bias and scale 1/sqrt(head_dim), and an MLP D → 4D → D with exact GELU;
* a final LayerNorm; the feature is the normed class token (`x_norm_clstoken`, what the hub model returns).

ViT-L/14 is D = 1024, depth 24, 16 heads; smaller configurations (`DINOv2Config`) serve the tests.

Preprocessing is EDM2's (`calculate_metrics.py`, `DINOv2Detector.__call__` with its default
`resize_mode='torch'`, NVlabs/edm2): uint8 RGB images [B, 3, H, W] are cast to float32 and resized to
224x224 by `torch.nn.functional.interpolate(mode='bicubic', antialias=True)` — without rounding or
clipping — then x/255 is normalised with the ImageNet mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.225). torch's antialiased bicubic is *not* its plain bicubic: it is PIL's resampling
(Keys cubic with a = −0.5, the kernel stretched by in/out when downsampling, the taps that fall outside
the image dropped and the rest renormalised), whereas the plain one (used for the positional embedding)
has a = −0.75 and clamps indices at the borders. Both are written here as [out, in] matrices, computed in
float32 as torch computes them, so a resize is two small matmuls; against torch's own matrices (golden)
they agree to 8e-7 (28, 64, 512 → 224; 37 → 16). `jax.image.resize(method='bicubic', antialias=True)`
turns out to be the same PIL filter (it differs from torch by up to 2.6e-6 at 64 → 224, from float32
rounding); it cannot express the positional embedding's a = −0.75 and offset scale.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DINOV2_SIZE = 224  # EDM2 resizes every image to 224x224 before the network
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINOV2_URL = 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth'
DINOV2_FILENAME = 'dinov2_vitl14_pretrain.pth'
ENV_VAR = 'DIFFJAX_DINOV2_WEIGHTS'
_POS_OFFSET = 0.1  # dinov2's `interpolate_offset`


@dataclasses.dataclass(frozen=True)
class DINOv2Config:
  """The shape of a DINOv2 ViT (the defaults are ViT-L/14, `dinov2_vitl14`).

  Attributes:
    embed_dim: D, the token and feature width.
    depth: the number of transformer blocks.
    num_heads: attention heads (D / num_heads is 64 in every published DINOv2 backbone).
    patch_size: p, the patch side in pixels; inputs must be multiples of it.
    pos_grid: M, the side of the stored positional-embedding grid (518 / 14 = 37).
    mlp_ratio: hidden width of the MLP over D.
  """

  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  patch_size: int = 14
  pos_grid: int = 37
  mlp_ratio: float = 4.0

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f'embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}.')


VITL14 = DINOv2Config()
NUM_FEATURES = VITL14.embed_dim


# --------------------------------------------------------------------------------------------------------
# Interpolation matrices (numpy, float64: they are constants of the input shape).


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel W(x) with parameter a (−0.5: PIL / antialias; −0.75: torch bicubic)."""
  x = np.abs(x)
  inner = ((a + 2) * x - (a + 3)) * x * x + 1
  outer = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, inner, np.where(x < 2, outer, 0.0))


@functools.lru_cache(maxsize=32)
def bicubic_matrix(in_size: int, out_size: int, scale: float | None = None) -> np.ndarray:
  """torch's `interpolate(mode='bicubic', align_corners=False, antialias=False)` along one axis.

  Output index i samples the source at s = (i + 0.5) / scale − 0.5 (scale = out/in unless given, as when
  torch is passed a `scale_factor`); the four taps floor(s) − 1 … floor(s) + 2 get Keys weights with
  a = −0.75 and indices clamped to [0, in − 1] (edge replication). Positions and weights are computed in
  float32 as torch's CPU kernel does, which moves weights by up to ~1e-6 against exact arithmetic.

  Returns:
    [out_size, in_size] float64 (holding float32 values); row i holds the weights of output i.
  """
  f32 = np.float32
  inv_scale = f32(in_size / out_size if scale is None else 1.0 / scale)
  src = (np.arange(out_size, dtype=f32) + f32(0.5)) * inv_scale - f32(0.5)
  base = np.floor(src)
  t = src - base
  matrix = np.zeros((out_size, in_size))
  for k in range(-1, 3):
    index = np.clip(base + k, 0, in_size - 1).astype(np.int64)
    np.add.at(matrix, (np.arange(out_size), index), _keys_cubic(t - f32(k), f32(-0.75)))
  return matrix


@functools.lru_cache(maxsize=32)
def bicubic_antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
  """torch's `interpolate(mode='bicubic', align_corners=False, antialias=True)` (PIL's BICUBIC) along one axis.

  With scale r = in/out, output i is centred at c = r·(i + 0.5) in source pixel units; the kernel is Keys'
  cubic with a = −0.5 stretched by max(r, 1) (so downsampling low-passes), evaluated at the centres
  j + 0.5 of the source pixels j within its support, and normalised to sum to 1 over the pixels that
  lie inside the image. Computed in float32 as torch's CPU kernel does (exact arithmetic differs from
  it by up to 1e-5 at 512 → 224, from rounding c).

  Returns:
    [out_size, in_size] float64 (holding float32 values).
  """
  f32 = np.float32
  ratio = f32(in_size) / f32(out_size)
  stretch = max(ratio, f32(1.0))
  support = f32(2.0) * stretch
  inv_stretch = f32(1.0) / stretch
  matrix = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = ratio * f32(i + 0.5)
    lo = max(int(center - support + f32(0.5)), 0)
    hi = min(int(center + support + f32(0.5)), in_size)
    j = np.arange(lo, hi, dtype=f32)
    w = _keys_cubic((j - center + f32(0.5)) * inv_stretch, f32(-0.5)).astype(f32)
    matrix[i, lo:hi] = w / w.sum(dtype=f32)
  return matrix


def _resize(x: jax.Array, rows: np.ndarray, cols: np.ndarray, precision) -> jax.Array:
  """Separable resize of [B, H, W, C] by [H', H] and [W', W] matrices (width first, as torch does)."""
  x = jnp.einsum('pw,bhwc->bhpc', jnp.asarray(cols, x.dtype), x, precision=precision)
  return jnp.einsum('oh,bhpc->bopc', jnp.asarray(rows, x.dtype), x, precision=precision)


def preprocess(images_uint8: jax.Array, size: int = DINOV2_SIZE,
               precision: Any = jax.lax.Precision.HIGHEST) -> jax.Array:
  """EDM2's DINOv2 input: antialiased bicubic resize to 224x224, then ImageNet normalisation.

  Args:
    images_uint8: [B, H, W, 3] uint8 (or integer-valued float), or [B, H, W, 1] (grey, repeated to RGB).
    size: the output side (224 for FD_DINOv2).
    precision: matmul precision of the resize.

  Returns:
    [B, size, size, 3] float32, (resize(x)/255 − mean)/std, not clipped (as the reference).
  """
  if images_uint8.ndim != 4 or images_uint8.shape[-1] not in (1, 3):
    raise ValueError(f'DINOv2 expects [B, H, W, 3] (or 1-channel) images, got shape '
                     f'{images_uint8.shape}.')
  x = images_uint8.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  _, h, w, _ = x.shape
  if (h, w) != (size, size):  # at scale 1 the kernel samples every pixel exactly
    x = _resize(x, bicubic_antialias_matrix(h, size), bicubic_antialias_matrix(w, size), precision)
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (x / 255.0 - mean) / std


# --------------------------------------------------------------------------------------------------------
# The network. Module and parameter names mirror the PyTorch state dict (see dinov2_weights).


class _LayerScale(nn.Module):
  dim: int

  @nn.compact
  def __call__(self, x):
    return x * self.param('gamma', nn.initializers.ones, (self.dim,))


class _Attention(nn.Module):
  dim: int
  num_heads: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, precision=self.precision, name='qkv')(x)
    # torch's layout of the qkv output: [3, heads, head_dim] along the last axis.
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, head_dim]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision=self.precision) * head_dim ** -0.5
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v, precision=self.precision).reshape(b, n, d)
    return nn.Dense(d, precision=self.precision, name='proj')(out)


class _Mlp(nn.Module):
  dim: int
  hidden: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.hidden, precision=self.precision, name='fc1')(x)
    x = jax.nn.gelu(x, approximate=False)  # torch nn.GELU() is the exact, erf form
    return nn.Dense(self.dim, precision=self.precision, name='fc2')(x)


class _Block(nn.Module):
  dim: int
  num_heads: int
  mlp_ratio: float
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(epsilon=1e-6, name='norm1')(x)
    x = x + _LayerScale(self.dim, name='ls1')(
      _Attention(self.dim, self.num_heads, self.precision, name='attn')(h))
    h = nn.LayerNorm(epsilon=1e-6, name='norm2')(x)
    hidden = int(self.dim * self.mlp_ratio)
    return x + _LayerScale(self.dim, name='ls2')(_Mlp(self.dim, hidden, self.precision, name='mlp')(h))


class _PatchEmbed(nn.Module):
  dim: int
  patch_size: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    x = nn.Conv(self.dim, (p, p), strides=(p, p), padding='VALID', precision=self.precision,
                name='proj')(x)
    return x.reshape(x.shape[0], -1, self.dim)  # row-major over the grid, as torch's flatten(2)


class DINOv2(nn.Module):
  """DINOv2 ViT (register-free): normalised images → the normed class token.

  Attributes:
    config: the architecture (`VITL14` for FD_DINOv2).
    precision: matmul/conv precision; HIGHEST keeps float32 agreement with the reference on TPUs.

  Call:
    x: [B, H, W, 3] float32 from `preprocess` (H, W multiples of the patch size).
    Returns [B, D] float32 features (`x_norm_clstoken`).
  """

  config: DINOv2Config = VITL14
  precision: Any = jax.lax.Precision.HIGHEST

  def _pos_embed(self, pos: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
    """The stored [1, 1 + M², D] embedding resized to an input grid: [1, 1 + h·w, D]."""
    m = self.config.pos_grid
    if grid_h * grid_w == m * m and grid_h == grid_w:
      return pos  # the reference skips interpolation only in this case
    cls_pos, patch_pos = pos[:, :1], pos[0, 1:].reshape(m, m, -1)
    rows = bicubic_matrix(m, grid_h, (grid_h + _POS_OFFSET) / m)
    cols = bicubic_matrix(m, grid_w, (grid_w + _POS_OFFSET) / m)
    patch_pos = _resize(patch_pos[None], rows, cols, self.precision)
    return jnp.concatenate([cls_pos, patch_pos.reshape(1, grid_h * grid_w, -1)], axis=1)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    d, p, m = cfg.embed_dim, cfg.patch_size, cfg.pos_grid
    b, h, w, _ = x.shape
    if h % p or w % p:
      raise ValueError(f'DINOv2 needs image sides that are multiples of {p}, got {h}x{w}; pass images '
                       'through dinov2.preprocess (224x224).')
    cls_token = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, d))
    pos_embed = self.param('pos_embed', nn.initializers.normal(0.02), (1, 1 + m * m, d))
    # iBOT's mask token: in the published state dict, unused at inference; declared so the weights
    # load strictly, name for name.
    self.param('mask_token', nn.initializers.zeros, (1, d))
    tokens = _PatchEmbed(d, p, self.precision, name='patch_embed')(x)
    tokens = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, d)), tokens], axis=1)
    tokens = tokens + self._pos_embed(pos_embed, h // p, w // p)
    for i in range(cfg.depth):
      tokens = _Block(d, cfg.num_heads, cfg.mlp_ratio, self.precision, name=f'blocks_{i}')(tokens)
    tokens = nn.LayerNorm(epsilon=1e-6, name='norm')(tokens)
    return tokens[:, 0]
