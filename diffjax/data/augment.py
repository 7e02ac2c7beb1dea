"""EDM's non-leaking geometric augmentation (Karras et al. 2022, App. F.2), as a pure JAX function.

Each training image is transformed at random and the network is told *how* through a 9-d label; at
sampling time the label is zero, so the generator produces un-augmented images ("non-leaking"). The ops
and their parameter laws follow EDM's configuration (multipliers xflip = 1e8, yflip = scale =
rotate_frac = aniso = translate_frac = 1) of the ADA pipeline (Karras et al. 2020):

| label index | op | law (each op fires with probability min(1, multiplier·p) per image) |
|---|---|---|
| 0 | x-flip | bit b ~ U{0, 1}; label b. With multiplier 1e8 the gate is open whenever p > 0, so the image is mirrored with probability 1/2 (never when p = 0). |
| 1 | y-flip | bit b ~ U{0, 1}, gated by p (so mirrored with probability p/2); label b. |
| 2 | isotropic scale | w ~ N(0, 1), s = 2^(0.2·w); label w. |
| 3, 4 | rotation | θ ~ U(−π, π); labels cos θ − 1, sin θ. |
| 5, 6 | anisotropic scale | w ~ N(0, 1), s = 2^(0.2·w) along an axis at angle r, 1/s across it, where r ~ U(−π, π) with probability 1/2 (independently of p) and 0 otherwise; labels w·cos r, w·sin r. |
| 7, 8 | translation | (wx, wy) ~ N(0, I), shift by (0.125·W·wx, 0.125·H·wy) pixels (one gate for both); labels wx, wy. |

An op that does not fire contributes label zeros, so p = 0 gives the identity and an all-zero label.

Geometry. In pixel coordinates centred on the image (x to the right = columns, y down = rows), the ops
compose into one inverse matrix that maps an output position to where it reads the input:
  G⁻¹ = S(1/s)·R(θ)·[R(−r)·diag(1/s_a, s_a)·R(r)]·T(−t),   R(φ) = [[cos φ, −sin φ], [sin φ, cos φ]],
so the image is scaled by s, rotated by −θ, stretched, then moved by +t (a positive t_x moves content to
the right). Flips are applied to the pixels first.

Resampling (one pass for all geometric ops, as in EDM): reflect-pad by (H−1, W−1), upsample 2× with the
orthogonal Daubechies symlet-6 low-pass filter, sample bilinearly at the transformed positions on the
2× grid (zero beyond the padded image, which only very large zoom-outs reach), filter with the same
symlet and decimate 2×. The 2× grid is placed at the filter's centroid, so a rotated smooth image
matches the analytically rotated one to ~1–2% of its peak (bilinear resampling at 1×: 4–10%).
Because the upsampling and downsampling filters are adjoint and the filter is orthogonal, the identity and integer translations reproduce the (reflect-padded) input up to float
round-off; images whose geometric ops all failed to fire are passed through untouched. The sub-pixel
conventions are this module's own (derived from the formulas above, not copied from EDM's code), so
results match EDM's pipeline in law, not bit for bit.

Randomness: image i of the batch uses `fold_in(key, i)`, so its augmentation does not depend on the
batch size or on the other images; pass a batch of keys [B] to choose the per-image keys yourself (e.g.
from global example indices under data parallelism).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

LABEL_DIM = 9
LABEL_NAMES = (
  'xflip',
  'yflip',
  'scale',
  'rotate_cos_minus_1',
  'rotate_sin',
  'aniso_w_cos',
  'aniso_w_sin',
  'translate_x',
  'translate_y',
)

# Daubechies symlet-6 scaling (low-pass) filter, 12 taps; sum = √2 and Σ_k h[k]·h[k+2l] = δ_l
# (orthogonality), which makes 2× upsampling followed by 2× downsampling an exact identity.
_SYM6 = np.array(
  [
    0.015404109327027373,
    0.0034907120842174702,
    -0.11799011114819057,
    -0.048311742585633,
    0.4910559419267466,
    0.787641141030194,
    0.3379294217276218,
    -0.07263752278646252,
    -0.021060292512300564,
    0.04472490177066578,
    0.0017677118642428036,
    -0.007800708325034148,
  ]
)
# Where the 2× grid sits. Upsampling is up[m] = Σ_k x[k]·h[m − 2k + 5]; both polyphase halves of sym6
# (even and odd taps) have their centroid at tap 5 + δ with δ ≈ 0.098, so for smooth signals up[m]
# lies at pixel coordinate (m − δ)/2 and the adjoint downsampling reads output pixel n at 2n + δ.
# Using δ on both sides keeps the identity exact and removes a ~0.1 px skew that a nominal 1/2 would
# leave under rotations (measured: 3–10× less error when rotating smooth test images).
_OFFSET = 5
_DELTA = float((np.arange(12) * _SYM6).sum() / _SYM6.sum() - _OFFSET)


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=[
    'xflip',
    'yflip',
    'scale',
    'rotate_frac',
    'aniso',
    'translate_frac',
    'scale_std',
    'rotate_frac_max',
    'aniso_std',
    'aniso_rotate_prob',
    'translate_frac_std',
  ],
  meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probability multipliers and parameter ranges (defaults: EDM's configuration).

  A multiplier of 0 disables an op (its label entries stay 0; the label is always 9-d). The config is
  a pytree of scalars, traced under `jit`: changing it does not recompile.
  """

  xflip: float = 1e8
  yflip: float = 1.0
  scale: float = 1.0
  rotate_frac: float = 1.0
  aniso: float = 1.0
  translate_frac: float = 1.0
  scale_std: float = 0.2  # log2 standard deviation of the isotropic scale.
  rotate_frac_max: float = 1.0  # rotation range as a fraction of ±π.
  aniso_std: float = 0.2  # log2 standard deviation of the anisotropic scale.
  aniso_rotate_prob: float = 0.5  # probability that the stretch axis is rotated by r.
  translate_frac_std: float = 0.125  # translation std as a fraction of the image size.


EDM_CONFIG = AugmentConfig()


# ------------------------------------------------------------------------------------------------
# Parameters.
# ------------------------------------------------------------------------------------------------


def _rotation(phi: jax.Array) -> jax.Array:
  c, s = jnp.cos(phi), jnp.sin(phi)
  return jnp.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _scaling(sx: jax.Array, sy: jax.Array) -> jax.Array:
  return jnp.array([[sx, 0.0, 0.0], [0.0, sy, 0.0], [0.0, 0.0, 1.0]])


def _translation(tx: jax.Array, ty: jax.Array) -> jax.Array:
  return jnp.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def _sample_params(key: jax.Array, p: jax.Array, cfg: AugmentConfig, height: int, width: int):
  """One image's ops: (xflip bool, yflip bool, geometric bool, G⁻¹ [3, 3], label [9])."""
  # Two draws per image (11 uniforms, 4 normals) rather than one per parameter: each random call
  # unrolls a Threefry block in the compiled program, and fewer calls compile several times faster.
  key_u, key_n = jax.random.split(key)
  u = jax.random.uniform(key_u, (11,))
  z = jax.random.normal(key_n, (4,))
  eye = jnp.eye(3)

  def fires(i, multiplier):
    return u[i] < multiplier * p

  xflip = (u[0] < 0.5) & fires(1, cfg.xflip)
  yflip = (u[2] < 0.5) & fires(3, cfg.yflip)

  scale_on = fires(4, cfg.scale)
  w_scale = jnp.where(scale_on, z[0], 0.0)
  s = jnp.exp2(w_scale * cfg.scale_std)
  g_inv = _scaling(1.0 / s, 1.0 / s)

  rotate_on = fires(5, cfg.rotate_frac)
  theta = jnp.where(rotate_on, (2.0 * u[6] - 1.0) * (np.pi * cfg.rotate_frac_max), 0.0)
  g_inv = g_inv @ _rotation(theta)

  aniso_on = fires(7, cfg.aniso)
  w_aniso = jnp.where(aniso_on, z[1], 0.0)
  r = jnp.where(u[8] < cfg.aniso_rotate_prob, (2.0 * u[9] - 1.0) * np.pi, 0.0)
  s_a = jnp.exp2(w_aniso * cfg.aniso_std)
  stretch = _rotation(-r) @ _scaling(1.0 / s_a, s_a) @ _rotation(r)
  # Where it does not fire, use I exactly rather than R(−r)·I·R(r), which is I only up to round-off.
  g_inv = g_inv @ jnp.where(aniso_on, stretch, eye)

  translate_on = fires(10, cfg.translate_frac)
  w_t = jnp.where(translate_on, z[2:4], 0.0)
  g_inv = g_inv @ _translation(
    -w_t[0] * width * cfg.translate_frac_std, -w_t[1] * height * cfg.translate_frac_std
  )

  label = jnp.stack(
    [
      xflip.astype(jnp.float32),
      yflip.astype(jnp.float32),
      w_scale,
      jnp.cos(theta) - 1.0,
      jnp.sin(theta),
      w_aniso * jnp.cos(r),
      w_aniso * jnp.sin(r),
      w_t[0],
      w_t[1],
    ]
  ).astype(jnp.float32)
  geometric = scale_on | rotate_on | aniso_on | translate_on
  return xflip, yflip, geometric, g_inv.astype(jnp.float32), label


def _per_image_keys(key: jax.Array, batch: int) -> jax.Array:
  """Per-image keys: `fold_in(key, i)`, or `key` itself when it already is a batch of B keys."""
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  if key.ndim == (1 if typed else 2):
    if key.shape[0] != batch:
      raise ValueError(f'Got {key.shape[0]} per-image keys for a batch of {batch} images.')
    return key
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def augment_params(
  key: jax.Array, batch: int, height: int, width: int, p=0.12, config: AugmentConfig = EDM_CONFIG
):
  """Draws the augmentation of each image without applying it.

  Args:
    key: a PRNG key, or a batch of B keys (one per image).
    batch: B.
    height: H of the images (translations are relative to it).
    width: W of the images.
    p: the augmentation probability (scalar, may be traced).
    config: multipliers and ranges.

  Returns:
    xflip: bool [B]; yflip: bool [B]; geometric: bool [B] (some geometric op fired);
    g_inv: float32 [B, 3, 3], output → input in centred pixel coordinates; labels: float32 [B, 9].
  """
  # The config always goes in as an argument so that it is traced: a default would be baked in as
  # constants, and every other config would then compile anew.
  return _augment_params(key, batch, height, width, p, config)


@functools.partial(jax.jit, static_argnames=('batch', 'height', 'width'))
def _augment_params(key, batch, height, width, p, config):
  keys = _per_image_keys(key, batch)
  p = jnp.asarray(p, jnp.float32)
  return jax.vmap(lambda k: _sample_params(k, p, config, height, width))(keys)


# ------------------------------------------------------------------------------------------------
# Resampling.
# ------------------------------------------------------------------------------------------------


def _conv_axis(
  x: jax.Array,
  taps: np.ndarray,
  axis: int,
  *,
  dilation: int = 1,
  stride: int = 1,
  padding: Tuple[int, int] = (0, 0),
) -> jax.Array:
  """1-D correlation of x [N, H, W, 1] along `axis` (1 = H, 2 = W), with input dilation and stride."""
  k = len(taps)
  shape = (k, 1, 1, 1) if axis == 1 else (1, k, 1, 1)
  kernel = jnp.asarray(taps, x.dtype).reshape(shape)
  pads = [padding, (0, 0)] if axis == 1 else [(0, 0), padding]
  ones = (1, 1)
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(stride, 1) if axis == 1 else (1, stride),
    padding=pads,
    lhs_dilation=(dilation, 1) if axis == 1 else (1, dilation),
    rhs_dilation=ones,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    precision=jax.lax.Precision.HIGHEST,
  )


def _upsample2(x: jax.Array) -> jax.Array:
  """[N, H, W, 1] → [N, 2H, 2W, 1]: up[m] = Σ_k x[k]·h[m − 2k + 5] along each axis."""
  k = len(_SYM6)
  # Zero insertion is input dilation; correlating with the reversed filter and padding (k−1−5, 6)
  # places tap h[m − 2k + 5] on x[k] and yields exactly 2H outputs.
  pad = (k - 1 - _OFFSET, k - 1 - _OFFSET)
  for axis in (1, 2):
    x = _conv_axis(x, _SYM6[::-1], axis, dilation=2, padding=pad)
  return x


def _downsample2(z: jax.Array) -> jax.Array:
  """[N, 2H+10, 2W+10, 1] (2×-grid positions m = −5 … 2H+4) → [N, H, W, 1], the adjoint of
  `_upsample2`: out[n] = Σ_m z[m]·h[m − 2n + 5]."""
  for axis in (1, 2):
    z = _conv_axis(z, _SYM6, axis, stride=2)
  return z


def _bilinear(image: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
  """Samples image [Hu, Wu, C] at float positions y, x [Ho, Wo] (pixel indices); 0 outside."""
  hu, wu = image.shape[:2]
  y0, x0 = jnp.floor(y), jnp.floor(x)
  fy, fx = (y - y0)[..., None], (x - x0)[..., None]
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)

  def tap(yi, xi):
    inside = (yi >= 0) & (yi < hu) & (xi >= 0) & (xi < wu)
    value = image[jnp.clip(yi, 0, hu - 1), jnp.clip(xi, 0, wu - 1)]
    return jnp.where(inside[..., None], value, 0.0)

  return (
    (1 - fy) * (1 - fx) * tap(y0, x0)
    + (1 - fy) * fx * tap(y0, x0 + 1)
    + fy * (1 - fx) * tap(y0 + 1, x0)
    + fy * fx * tap(y0 + 1, x0 + 1)
  )


@jax.jit
def affine_resample(images: jax.Array, g_inv: jax.Array) -> jax.Array:
  """Applies one affine map per image with reflect padding and symlet-6 2× supersampling.

  Args:
    images: float [B, H, W, C].
    g_inv: float [B, 3, 3]: output position → input position, homogeneous, in pixel coordinates
      centred on the image (x = column − (W−1)/2, y = row − (H−1)/2).

  Returns:
    float [B, H, W, C], the transformed images.
  """
  b, h, w, c = images.shape
  dtype = images.dtype
  my, mx = max(h - 1, 3), max(w - 1, 3)  # EDM's largest margin; ≥ 3 keeps the 2× support inside.
  padded = jnp.pad(images, ((0, 0), (my, my), (mx, mx), (0, 0)), mode='reflect')
  hp, wp = h + 2 * my, w + 2 * mx
  # Channels ride along the batch for the separable filters: [B·C, Hp, Wp, 1].
  planes = padded.transpose(0, 3, 1, 2).reshape(b * c, hp, wp, 1).astype(jnp.float32)
  up = _upsample2(planes).reshape(b, c, 2 * hp, 2 * wp).transpose(0, 2, 3, 1)

  # Output positions on the 2× grid, m = −5 … 2N+4, i.e. pixel coordinate (m − δ)/2, centred.
  ys = (jnp.arange(-_OFFSET, 2 * h + _OFFSET) - _DELTA) / 2 - (h - 1) / 2
  xs = (jnp.arange(-_OFFSET, 2 * w + _OFFSET) - _DELTA) / 2 - (w - 1) / 2
  yy, xx = jnp.meshgrid(ys, xs, indexing='ij')
  points = jnp.stack([xx, yy, jnp.ones_like(xx)], axis=-1)  # [Ho, Wo, 3]

  def sample(up_one, g_one):
    src = points @ g_one.astype(jnp.float32).T  # [Ho, Wo, 3]: input positions, centred.
    # Centred → padded pixel index → 2× grid index (pixel k sits at m = 2k + δ).
    col = 2 * (src[..., 0] + (w - 1) / 2 + mx) + _DELTA
    row = 2 * (src[..., 1] + (h - 1) / 2 + my) + _DELTA
    return _bilinear(up_one, row, col)

  warped = jax.vmap(sample)(up, g_inv)  # [B, 2H+10, 2W+10, C]
  ho, wo = warped.shape[1:3]
  planes = warped.transpose(0, 3, 1, 2).reshape(b * c, ho, wo, 1)
  out = _downsample2(planes).reshape(b, c, h, w).transpose(0, 2, 3, 1)
  return out.astype(dtype)


# ------------------------------------------------------------------------------------------------
# The augmentation.
# ------------------------------------------------------------------------------------------------


def augment(
  key: jax.Array, images: jax.Array, p=0.12, config: AugmentConfig = EDM_CONFIG
) -> Tuple[jax.Array, jax.Array]:
  """EDM's non-leaking augmentation of a batch.

  Args:
    key: a PRNG key (image i uses `fold_in(key, i)`), or a batch of B per-image keys.
    images: float [B, H, W, C], data in [-1, 1].
    p: augmentation probability (EDM CIFAR-10: 0.12); a scalar, may be traced.
    config: multipliers and ranges (traced); default EDM's.

  Returns:
    images_aug: [B, H, W, C], same dtype.
    aug_labels: float32 [B, 9] laid out as `LABEL_NAMES` (see the module docstring); zero for an
      image none of whose ops fired.
  """
  return _augment(key, images, p, config)  # Config passed explicitly: traced, one compilation.


@jax.jit
def _augment(key, images, p, config):
  b, h, w, _ = images.shape
  xflip, yflip, geometric, g_inv, labels = _augment_params(key, b, h, w, p, config)
  images = jnp.where(xflip[:, None, None, None], images[:, :, ::-1], images)
  images = jnp.where(yflip[:, None, None, None], images[:, ::-1], images)
  # Skip the resampling for the whole batch when nothing geometric fired (p = 0, small batches).
  warped = jax.lax.cond(jnp.any(geometric), affine_resample, lambda x, _: x, images, g_inv)
  images = jnp.where(geometric[:, None, None, None], warped, images)
  return images, labels
