"""The Inception-v3 weights: the published PyTorch file <-> Flax variables, finding, downloading and
verifying it, and a ready, sharded feature function (`make_inception_fn`).

Parameter names mirror the PyTorch module tree (`Mixed_5b/branch1x1/conv/kernel` <->
`Mixed_5b.branch1x1.conv.weight`), so the conversion is a rename plus a transpose; the file is read
without PyTorch (`diffjax.pth`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.evaluation.inception import (
  _OTHER_FILENAMES,
  ENV_VAR,
  INCEPTION_FILENAME,
  INCEPTION_SHA256,
  INCEPTION_SIZE,
  INCEPTION_URL,
  InceptionV3,
  preprocess,
)
from diffjax.pth import load_pth

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
