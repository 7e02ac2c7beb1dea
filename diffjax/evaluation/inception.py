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

The weights are read from the published PyTorch file without PyTorch (see `pth.py`). Parameter names mirror
the PyTorch module tree (`Mixed_5b/branch1x1/conv/kernel` <-> `Mixed_5b.branch1x1.conv.weight`), so the
conversion is a rename plus a transpose.
"""

import functools
import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.pth import load_pth

__all__ = [
  'INCEPTION_FILENAME',
  'INCEPTION_SHA256',
  'INCEPTION_URL',
  'InceptionV3',
  'download_inception',
  'find_inception_weights',
  'inception_params_from_state_dict',
  'inception_state_dict_layout',
  'load_inception_params',
  'make_inception_fn',
  'preprocess',
  'resize_bilinear_tf1',
]

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


# --------------------------------------------------------------------------------------------------------
# Weights: PyTorch state dict <-> Flax variables.


@functools.cache
def _variable_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax variable paths (collection, module..., leaf) -> shapes, from an abstract init (no compute)."""
  shapes = jax.eval_shape(
    InceptionV3().init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32),
  )
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    flat[tuple(p.key for p in path)] = tuple(leaf.shape)
  return flat


_LEAF_TO_TORCH = {
  ('params', 'kernel'): 'weight',
  ('params', 'scale'): 'weight',
  ('params', 'bias'): 'bias',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}


def _torch_name(path: tuple[str, ...]) -> str:
  collection, *modules, leaf = path
  return '.'.join(modules + [_LEAF_TO_TORCH[(collection, leaf)]])


def _to_torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if (
    path[-1] == 'kernel' and len(shape) == 4
  ):  # conv: Flax [kh, kw, in, out] <- torch [out, in, kh, kw]
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == 'kernel' and len(shape) == 2:  # linear: Flax [in, out] <- torch [out, in]
    return (shape[1], shape[0])
  return shape


def inception_state_dict_layout() -> dict[str, tuple[int, ...]]:
  """Names and shapes of the tensors the published weight file must contain (in PyTorch layout).

  `num_batches_tracked` buffers, which torch adds to every BN, are not needed and not listed.

  Returns:
    {'Conv2d_1a_3x3.conv.weight': (32, 3, 3, 3), ..., 'fc.weight': (1008, 2048), 'fc.bias': (1008,)}.
  """
  return {_torch_name(p): _to_torch_shape(p, s) for p, s in _variable_shapes().items()}


def inception_params_from_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Converts a PyTorch-layout Inception state dict (numpy arrays) into Flax variables.

  Args:
    state_dict: name -> array, as read by `load_pth` from the published file (extra entries such as
      `num_batches_tracked` are ignored; a `module.` prefix from DataParallel is stripped).

  Returns:
    {'params': ..., 'batch_stats': ...} for `InceptionV3.apply`, float32 numpy arrays.

  Raises:
    ValueError: a tensor is missing or has the wrong shape (names which), e.g. a different network's file.
  """
  sd = {(k[len('module.') :] if k.startswith('module.') else k): v for k, v in state_dict.items()}
  variables: dict[str, Any] = {}
  missing, wrong = [], []
  for path, shape in _variable_shapes().items():
    name = _torch_name(path)
    if name not in sd:
      missing.append(name)
      continue
    value = np.asarray(sd[name], dtype=np.float32)
    if value.shape != _to_torch_shape(path, shape):
      wrong.append(f'{name}: {value.shape} != {_to_torch_shape(path, shape)}')
      continue
    if path[-1] == 'kernel' and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif path[-1] == 'kernel' and value.ndim == 2:
      value = value.T
    node = variables
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(value)
  if missing or wrong:
    problems = (
      [f'{len(missing)} missing (e.g. {", ".join(missing[:3])})'] if missing else []
    ) + wrong[:3]
    raise ValueError(
      'This is not the FID Inception-v3 state dict (inception-2015-12-05): '
      + '; '.join(problems)
      + '. Use '
      f'{INCEPTION_FILENAME} (torch-fidelity) or pt_inception-2015-12-05-6726825d.pth (pytorch-fid).'
    )
  return variables


def _cache_dir() -> str:
  return os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'diffjax')


def _default_search_paths() -> list[str]:
  paths = []
  if os.environ.get(ENV_VAR):
    paths.append(os.environ[ENV_VAR])
  cache = _cache_dir()
  torch_hub = os.path.join(
    os.environ.get('TORCH_HOME', os.path.join(os.path.expanduser('~/.cache'), 'torch')),
    'hub',
    'checkpoints',
  )
  for directory in (cache, torch_hub):
    for name in (INCEPTION_FILENAME, *_OTHER_FILENAMES):
      paths.append(os.path.join(directory, name))
  return paths


def find_inception_weights(path: str | os.PathLike | None = None) -> str:
  """Locates the Inception weight file, or says exactly where to put it.

  Looks at `path` if given, else `$DIFFJAX_INCEPTION_WEIGHTS`, `~/.cache/diffjax/` and torch.hub's
  checkpoint cache (where pytorch-fid / torch-fidelity downloads land), under either published name.

  Raises:
    FileNotFoundError: with the download URL and the places searched.
  """
  candidates = [os.fspath(path)] if path is not None else _default_search_paths()
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  default = os.path.join(_cache_dir(), INCEPTION_FILENAME)
  raise FileNotFoundError(
    'The FID Inception weights were not found (looked at: ' + ', '.join(candidates) + '). Download '
    f"{INCEPTION_URL} (or pytorch-fid's pt_inception-2015-12-05-6726825d.pth) and put it at {default}, or "
    f'set ${ENV_VAR} / pass its path; with network access diffjax.evaluation.download_inception() does this.'
  )


def load_inception_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
  """Reads the published Inception weights (no PyTorch needed) into Flax variables.

  Args:
    path: the `.pth` file; None searches the default places (see `find_inception_weights`).

  Returns:
    {'params', 'batch_stats'} for `InceptionV3`.
  """
  path = find_inception_weights(path)
  try:
    return inception_params_from_state_dict(load_pth(path))
  except (ValueError, KeyError) as e:  # A damaged or foreign file: say what the right one is.
    reason = str(e.args[0] if isinstance(e, KeyError) and e.args else e).rstrip('.')
    raise ValueError(f'{reason}; it is not the FID Inception weights: pass --inception=PATH of '
                     f'{INCEPTION_FILENAME} (from {INCEPTION_URL}).') from e


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, sha256: str) -> None:
  """Checks a file's SHA-256 against a full hex digest or a prefix of one (as in torch.hub file names).

  Raises:
    ValueError: on mismatch, naming both digests.
  """
  actual = _sha256(os.fspath(path))
  expected = sha256.lower()
  if not expected or not actual.startswith(expected):
    raise ValueError(
      f'Checksum mismatch for {os.fspath(path)}: sha256 {actual}, expected {expected}...'
    )


def download_inception(
  path: str | os.PathLike | None = None,
  url: str = INCEPTION_URL,
  sha256: str | None = INCEPTION_SHA256,
) -> str:
  """Downloads the Inception weights (where the network allows) and verifies their checksum.

  The file is written to a temporary name and moved into place only after the checksum passes, so an
  interrupted or corrupted download never leaves a file that `load_inception_params` would pick up.

  Args:
    path: destination; default `~/.cache/diffjax/weights-inception-2015-12-05-6726825d.pth`.
    url: where to fetch it from.
    sha256: expected SHA-256 (full hex digest or a prefix); None skips the check.

  Returns:
    The destination path. An existing file that passes the checksum is not downloaded again.
  """
  if path is None:
    path = os.path.join(_cache_dir(), INCEPTION_FILENAME)
  path = os.fspath(path)
  if os.path.isfile(path):
    if sha256:
      verify_sha256(path, sha256)
    return path
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url) as response:  # noqa: S310 - a fixed https URL
      shutil.copyfileobj(response, out)
    if sha256:
      verify_sha256(tmp, sha256)
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
      raise OSError(
        f'Could not download {url} ({e}). Download it by hand and put it at {path}.'
      ) from e
    raise
  return path


# --------------------------------------------------------------------------------------------------------
# A ready feature function.


def make_inception_fn(
  variables: Mapping[str, Any] | None = None,
  *,
  outputs: Sequence[str] = ('pool3', 'logits_unbiased'),
  precision: Any = jax.lax.Precision.HIGHEST,
  mesh: jax.sharding.Mesh | None = None,
) -> Callable[[jax.Array], dict[str, jax.Array]]:
  """A jitted `images_uint8 -> {'pool3': [B, 2048], 'logits_unbiased': [B, 1008]}`.

  The function is data parallel: give it a batch sharded over a mesh's data axis and every device computes
  its shard; the outputs keep that batch sharding (so `fid.StreamingStats.update` reduces them in place).

  Args:
    variables: from `load_inception_params`; None loads the weights from the default places.
    outputs: which of 'pool3', 'logits_unbiased', 'logits' to return.
    precision: conv/matmul precision (see `InceptionV3`).
    mesh: if given, the weights are replicated over it once here, rather than moved on every call.

  Returns:
    fn(images [B, H, W, 3 or 1] uint8) -> dict of float32 arrays.
  """
  if variables is None:
    variables = load_inception_params()
  model = InceptionV3(precision=precision)
  unknown = set(outputs) - {'pool3', 'logits_unbiased', 'logits'}
  if unknown:
    raise ValueError(
      f"Unknown Inception outputs {sorted(unknown)}; known: 'pool3', 'logits_unbiased', 'logits'."
    )
  if mesh is not None:
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    variables = jax.device_put(dict(variables), replicated)
  else:
    variables = jax.tree_util.tree_map(jnp.asarray, dict(variables))
  outputs = tuple(outputs)

  # Two jits: the resize compiles once per input size, the (much larger) network once per batch size, so
  # evaluating several resolutions reuses the network's compilation.
  @jax.jit
  def network(variables, x):
    out = model.apply(variables, x)
    return {k: out[k] for k in outputs}

  pre = jax.jit(preprocess)

  def fn(images: jax.Array) -> dict[str, jax.Array]:
    return network(variables, pre(images))

  return fn
