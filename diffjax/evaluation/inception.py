"""The Inception-v3 network used for FID, IS and KID, in Flax.

This is the TensorFlow "inception-2015-12-05" graph that the original FID and IS code ran, in the form of
its PyTorch ports (pytorch-fid's `FIDInceptionA/C/E`, torch-fidelity's `FeatureExtractorInceptionV3`), which
share one weight file. To give the numbers papers report, it keeps that graph's quirks:

* batch norm with eps = 1e-3 (folded into a BN layer with running statistics);
* the average pools inside the mixed blocks ignore the zero padding when averaging (TF's `SAME` pooling);
* the last mixed block (`Mixed_7c`) uses a *max* pool in its pool branch;
* 1008 output classes;
* uint8 input of any size is resized to 299x299 with TF1's bilinear resize (`align_corners=False` and no
  half-pixel centres: source coordinate = destination index * in/out), then mapped by (x - 128) / 128.

Outputs are the 2048-d pool3 features (for FID, KID) and the logits without the output bias (for IS, as
torch-fidelity's `logits_unbiased`).

The weights, and `make_inception_fn` (a ready, sharded feature function), are in `inception_weights`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INCEPTION_SIZE = 299
NUM_FEATURES = 2048
NUM_CLASSES = 1008

# torch-fidelity's copy of the converted TF weights; pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
# (https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth)
# holds the same tensors under the same names. The 8 hex digits in both names are the prefix of the file's
# SHA-256 that torch.hub checks.
INCEPTION_URL = (
  'https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/'
  'weights-inception-2015-12-05-6726825d.pth'
)
INCEPTION_FILENAME = 'weights-inception-2015-12-05-6726825d.pth'
INCEPTION_SHA256 = '6726825d'  # a prefix; download_inception accepts a prefix or the full digest
_OTHER_FILENAMES = ('pt_inception-2015-12-05-6726825d.pth',)
ENV_VAR = 'DIFFJAX_INCEPTION_WEIGHTS'


# --------------------------------------------------------------------------------------------------------
# Input pipeline: TF1 bilinear resize and scaling.


def _tf1_source_grid(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of TF1 `resize_bilinear(align_corners=False)` along one axis.

  TF1 maps destination index d to source coordinate s = d * (in / out), computed in float32 (no half-pixel
  offset, unlike TF2 and torch), takes lo = floor(s), hi = min(lo + 1, in - 1) and weight s - lo.

  Returns:
    (lo [out] int32, hi [out] int32, frac [out] float32).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = np.floor(src).astype(np.int32)
  hi = np.minimum(lo + 1, in_size - 1).astype(np.int32)
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  return lo, hi, frac


def resize_bilinear_tf1(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """TF1's bilinear resize (`align_corners=False`, no half-pixel centres), as the FID graph used it.

  Interpolates first along width, then along height, with TF1's `a + (b - a) * t` lerps, so float32 results
  agree with TF1 and torch-fidelity's port to rounding.

  Args:
    images: [B, H, W, C] float.
    size: (out_h, out_w).

  Returns:
    [B, out_h, out_w, C] in the dtype of `images`.
  """
  _, h, w, _ = images.shape
  out_h, out_w = size
  if (h, w) == (out_h, out_w):
    return images  # TF1 with scale 1 samples every pixel exactly
  y_lo, y_hi, y_t = _tf1_source_grid(h, out_h)
  x_lo, x_hi, x_t = _tf1_source_grid(w, out_w)
  dtype = images.dtype
  x_t = jnp.asarray(x_t, dtype)[None, None, :, None]
  y_t = jnp.asarray(y_t, dtype)[None, :, None, None]
  rows_lo, rows_hi = images[:, y_lo], images[:, y_hi]
  top = rows_lo[:, :, x_lo] + (rows_lo[:, :, x_hi] - rows_lo[:, :, x_lo]) * x_t
  bottom = rows_hi[:, :, x_lo] + (rows_hi[:, :, x_hi] - rows_hi[:, :, x_lo]) * x_t
  return top + (bottom - top) * y_t


def preprocess(images_uint8: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Maps uint8 images of any size to the network's input: TF1 resize to 299x299, then (x - 128) / 128.

  Args:
    images_uint8: [B, H, W, C] uint8 (or integer-valued float) with C = 3, or C = 1 (grey, repeated to RGB).
    dtype: compute dtype.

  Returns:
    [B, 299, 299, 3] in `dtype`, roughly in [-1, 1].
  """
  if images_uint8.ndim != 4 or images_uint8.shape[-1] not in (1, 3):
    raise ValueError(
      f'Inception expects [B, H, W, 3] (or 1-channel) images, got shape {images_uint8.shape}.'
    )
  x = images_uint8.astype(dtype)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = resize_bilinear_tf1(x, (INCEPTION_SIZE, INCEPTION_SIZE))
  return (x - 128.0) / 128.0


# --------------------------------------------------------------------------------------------------------
# The network.


def _pad(padding) -> Any:
  if padding == 0:
    return 'VALID'
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""

  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: Any = 0
  precision: Any = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=(self.strides, self.strides),
      padding=_pad(self.padding),
      use_bias=False,
      precision=self.precision,
      dtype=self.dtype,
      name='conv',
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name='bn')(x)
    return nn.relu(x)


def _avg_pool_same(x):
  # TF's SAME average pooling averages over the valid window only (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
  pool_features: int
  precision: Any = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision, dtype=self.dtype)
    b1 = conv(64, (1, 1), name='branch1x1')(x)
    b5 = conv(48, (1, 1), name='branch5x5_1')(x)
    b5 = conv(64, (5, 5), padding=2, name='branch5x5_2')(b5)
    b3 = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = conv(96, (3, 3), padding=1, name='branch3x3dbl_2')(b3)
    b3 = conv(96, (3, 3), padding=1, name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  precision: Any = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision, dtype=self.dtype)
    b3 = conv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = conv(96, (3, 3), padding=1, name='branch3x3dbl_2')(bd)
    bd = conv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  precision: Any = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision, dtype=self.dtype)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name='branch1x1')(x)
    b7 = conv(c7, (1, 1), name='branch7x7_1')(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = conv(c7, (1, 1), name='branch7x7dbl_1')(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = conv(192, (1, 1), name='branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  precision: Any = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision, dtype=self.dtype)
    b3 = conv(192, (1, 1), name='branch3x3_1')(x)
    b3 = conv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = conv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(nn.Module):
  """The 8x8 blocks. `max_pool=True` reproduces the graph's max pool in the last block's pool branch."""

  max_pool: bool = False
  precision: Any = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv, precision=self.precision, dtype=self.dtype)
    b1 = conv(320, (1, 1), name='branch1x1')(x)
    b3 = conv(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate(
      [
        conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
      ],
      axis=-1,
    )
    bd = conv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = conv(384, (3, 3), padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate(
      [
        conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
      ],
      axis=-1,
    )
    if self.max_pool:
      # max_pool pads with -inf, i.e. the padding never wins, as in TF's SAME max pooling.
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_same(x)
    bp = conv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class _Logits(nn.Module):
  """The 2048 -> 1008 output layer; returns the logits with and without its bias."""

  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], NUM_CLASSES))
    bias = self.param('bias', nn.initializers.zeros, (NUM_CLASSES,))
    unbiased = jnp.dot(x, kernel.astype(x.dtype), precision=self.precision)
    return unbiased, unbiased + bias.astype(x.dtype)


class InceptionV3(nn.Module):
  """The FID Inception-v3 on preprocessed input (see `preprocess`).

  Attributes:
    precision: matmul/conv precision. HIGHEST by default: on TPU the default would round conv inputs to
      bfloat16, which moves FID by more than papers' reported digits.
    dtype: compute dtype.
  """

  precision: Any = jax.lax.Precision.HIGHEST
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    """Runs the network.

    Args:
      x: [B, 299, 299, 3] from `preprocess`.

    Returns:
      {'pool3': [B, 2048], 'logits_unbiased': [B, 1008], 'logits': [B, 1008]}, float32.
    """
    kw = dict(precision=self.precision, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3', **kw)(x)  # 149x149
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3', **kw)(x)  # 147x147
    x = BasicConv(64, (3, 3), padding=1, name='Conv2d_2b_3x3', **kw)(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))  # 73x73
    x = BasicConv(80, (1, 1), name='Conv2d_3b_1x1', **kw)(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3', **kw)(x)  # 71x71
    x = nn.max_pool(x, (3, 3), strides=(2, 2))  # 35x35
    x = InceptionA(32, name='Mixed_5b', **kw)(x)
    x = InceptionA(64, name='Mixed_5c', **kw)(x)
    x = InceptionA(64, name='Mixed_5d', **kw)(x)
    x = InceptionB(name='Mixed_6a', **kw)(x)  # 17x17
    x = InceptionC(128, name='Mixed_6b', **kw)(x)
    x = InceptionC(160, name='Mixed_6c', **kw)(x)
    x = InceptionC(160, name='Mixed_6d', **kw)(x)
    x = InceptionC(192, name='Mixed_6e', **kw)(x)
    x = InceptionD(name='Mixed_7a', **kw)(x)  # 8x8
    x = InceptionE(name='Mixed_7b', **kw)(x)
    x = InceptionE(max_pool=True, name='Mixed_7c', **kw)(x)
    pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    unbiased, logits = _Logits(precision=self.precision, name='fc')(pool3)
    return {'pool3': pool3, 'logits_unbiased': unbiased, 'logits': logits}
