"""The DINOv2 weights: the published PyTorch file <-> Flax variables, finding, downloading and verifying
it, and a ready, sharded feature function (`make_dinov2_fn`).

The file is facebookresearch/dinov2's `dinov2_vitl14_pretrain.pth` (what `torch.hub.load('facebookresearch/
dinov2', 'dinov2_vitl14')` downloads, EDM2's FD_DINOv2 network), a plain state dict read without PyTorch
(`diffjax.pth`). Parameter paths mirror its names (`blocks_3/attn/qkv/kernel` <-> `blocks.3.attn.qkv.weight`),
so the conversion is a rename plus a transpose. The same functions read smaller DINOv2 ViTs given their
`DINOv2Config` (the tests use a tiny one).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.evaluation.dinov2 import (
  DINOV2_FILENAME,
  DINOV2_SIZE,
  DINOV2_URL,
  ENV_VAR,
  VITL14,
  DINOv2,
  DINOv2Config,
  preprocess,
)
from diffjax.evaluation.inception_weights import verify_sha256
from diffjax.pth import load_pth

# --------------------------------------------------------------------------------------------------------
# Weights: PyTorch state dict <-> Flax variables.


@functools.lru_cache(maxsize=8)
def _variable_shapes(config: DINOv2Config) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax variable paths ('params', module..., leaf) -> shapes, from an abstract init (no compute)."""
  size = config.pos_grid * config.patch_size
  shapes = jax.eval_shape(DINOv2(config).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return {tuple(p.key for p in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}


_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}


def _torch_name(path: tuple[str, ...]) -> str:
  _, *modules, leaf = path
  modules = [re.sub(r'^blocks_(\d+)$', r'blocks.\1', m) for m in modules]
  return '.'.join(modules + [_LEAF_TO_TORCH.get(leaf, leaf) if modules else leaf])


def _to_torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if path[-1] == 'kernel' and len(shape) == 4:  # conv: Flax [kh, kw, in, out] <- torch [out, in, kh, kw]
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == 'kernel' and len(shape) == 2:  # linear: Flax [in, out] <- torch [out, in]
    return (shape[1], shape[0])
  return shape


def dinov2_state_dict_layout(config: DINOv2Config = VITL14) -> dict[str, tuple[int, ...]]:
  """Names and shapes of the tensors of a DINOv2 state dict (PyTorch layout), without allocating them.

  Returns:
    For ViT-L/14: {'cls_token': (1, 1, 1024), 'pos_embed': (1, 1370, 1024), 'mask_token': (1, 1024),
    'patch_embed.proj.weight': (1024, 3, 14, 14), ..., 'blocks.23.ls2.gamma': (1024,),
    'norm.weight': (1024,), 'norm.bias': (1024,)}.
  """
  return {_torch_name(p): _to_torch_shape(p, s) for p, s in _variable_shapes(config).items()}


def config_from_state_dict(state_dict: Mapping[str, Any], head_dim: int = 64) -> DINOv2Config:
  """The `DINOv2Config` of a register-free DINOv2 state dict, read from its tensor shapes.

  The number of heads is not in the shapes; every published backbone (S, B, L, g) has 64-d heads.

  Raises:
    ValueError: the tensors of a DINOv2 ViT are not there.
  """
  try:
    d = int(state_dict['cls_token'].shape[-1])
    patch = int(state_dict['patch_embed.proj.weight'].shape[-1])
    grid = int(round(np.sqrt(state_dict['pos_embed'].shape[1] - 1)))
    hidden = int(state_dict['blocks.0.mlp.fc1.weight'].shape[0])
  except (KeyError, AttributeError, IndexError) as e:
    raise ValueError(f'Not a DINOv2 ViT state dict (no {e}); use {DINOV2_FILENAME} from {DINOV2_URL}.'
                     ) from e
  depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r'blocks\.(\d+)\.', k)))
  return DINOv2Config(embed_dim=d, depth=depth, num_heads=max(d // head_dim, 1), patch_size=patch,
                      pos_grid=grid, mlp_ratio=hidden / d)


def config_from_variables(variables: Mapping[str, Any], head_dim: int = 64) -> DINOv2Config:
  """The `DINOv2Config` of Flax DINOv2 variables (as `config_from_state_dict`, 64-d heads)."""
  params = variables['params']
  d = int(params['cls_token'].shape[-1])
  return DINOv2Config(
    embed_dim=d, depth=sum(1 for k in params if k.startswith('blocks_')),
    num_heads=max(d // head_dim, 1), patch_size=int(params['patch_embed']['proj']['kernel'].shape[0]),
    pos_grid=int(round(np.sqrt(params['pos_embed'].shape[1] - 1))),
    mlp_ratio=params['blocks_0']['mlp']['fc1']['kernel'].shape[1] / d)


def dinov2_params_from_state_dict(state_dict: Mapping[str, Any],
                                  config: DINOv2Config = VITL14) -> dict[str, Any]:
  """Converts a PyTorch-layout DINOv2 state dict (numpy arrays, any float dtype) into Flax variables.

  Args:
    state_dict: name -> array, as read by `load_pth` (a `module.` prefix is stripped).
    config: the architecture the file must have (`VITL14` for FD_DINOv2).

  Returns:
    {'params': ...} for `DINOv2(config).apply`, float32 numpy arrays.

  Raises:
    ValueError: a tensor is missing, unexpected (e.g. register tokens) or of the wrong shape (names which).
  """
  sd = {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in state_dict.items()}
  layout = _variable_shapes(config)
  expected = {_torch_name(p) for p in layout}
  variables: dict[str, Any] = {}
  missing, wrong = [], []
  for path, shape in layout.items():
    name = _torch_name(path)
    if name not in sd:
      missing.append(name)
      continue
    value = np.asarray(sd[name], dtype=np.float32)
    if value.shape != _to_torch_shape(path, shape):
      wrong.append(f'{name}: {value.shape} != {_to_torch_shape(path, shape)}')
      continue
    if path[-1] == 'kernel':
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    node = variables
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(value)
  extra = sorted(set(sd) - expected)
  if missing or wrong or extra:
    problems = ([f'{len(missing)} missing (e.g. {", ".join(missing[:3])})'] if missing else []) + wrong[:3]
    problems += [f'{len(extra)} unexpected (e.g. {", ".join(extra[:3])})'] if extra else []
    raise ValueError(f'This is not the DINOv2 ViT state dict expected (embed_dim {config.embed_dim}, '
                     f'depth {config.depth}): ' + '; '.join(problems) +
                     f'. For FD_DINOv2 use {DINOV2_FILENAME} (from {DINOV2_URL}).')
  return variables


def _cache_dir() -> str:
  return os.path.join(os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'diffjax')


def _default_search_paths() -> list[str]:
  paths = [os.environ[ENV_VAR]] if os.environ.get(ENV_VAR) else []
  torch_hub = os.path.join(
    os.environ.get('TORCH_HOME', os.path.join(os.path.expanduser('~/.cache'), 'torch')), 'hub',
    'checkpoints')
  return paths + [os.path.join(directory, DINOV2_FILENAME) for directory in (_cache_dir(), torch_hub)]


def find_dinov2_weights(path: str | os.PathLike | None = None) -> str:
  """Locates the DINOv2 ViT-L/14 weight file, or says exactly where to put it.

  Looks at `path` if given, else `$DIFFJAX_DINOV2_WEIGHTS`, `~/.cache/diffjax/` and torch.hub's checkpoint
  cache (where `torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')` and EDM2 put it).

  Raises:
    FileNotFoundError: with the download URL and the places searched.
  """
  candidates = [os.fspath(path)] if path is not None else _default_search_paths()
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  default = os.path.join(_cache_dir(), DINOV2_FILENAME)
  raise FileNotFoundError(
    'The DINOv2 ViT-L/14 weights were not found (looked at: ' + ', '.join(candidates) + f'). Download '
    f'{DINOV2_URL} and put it at {default}, or set ${ENV_VAR} / pass --dinov2=PATH; with network access '
    'diffjax.evaluation.dinov2_weights.download_dinov2() does this.')


def load_dinov2_params(path: str | os.PathLike | None = None,
                       config: DINOv2Config = VITL14) -> dict[str, Any]:
  """Reads the published DINOv2 weights (no PyTorch needed) into Flax variables.

  Args:
    path: the `.pth` file; None searches the default places (see `find_dinov2_weights`).
    config: the architecture (`VITL14`).

  Returns:
    {'params'} for `DINOv2(config)`, float32.
  """
  path = find_dinov2_weights(path)
  try:
    return dinov2_params_from_state_dict(load_pth(path), config)
  except (ValueError, KeyError) as e:  # A damaged or foreign file: say what the right one is.
    reason = str(e.args[0] if isinstance(e, KeyError) and e.args else e).rstrip('.')
    if DINOV2_URL in reason:  # the layout check already says which file to use
      raise ValueError(f'{path}: {reason}.') from e
    raise ValueError(f'{reason}; {path} is not the DINOv2 ViT-L/14 weights: pass --dinov2=PATH of '
                     f'{DINOV2_FILENAME} (from {DINOV2_URL}).') from e


def download_dinov2(path: str | os.PathLike | None = None, url: str = DINOV2_URL,
                    sha256: str | None = None) -> str:
  """Downloads the DINOv2 ViT-L/14 weights (where the network allows), checking them before use.

  The file is written to a temporary name and moved into place only after it reads as the expected
  state dict (and matches `sha256` if given: Meta publishes no digest), so an interrupted or corrupted
  download never leaves a file that `load_dinov2_params` would pick up.

  Args:
    path: destination; default `~/.cache/diffjax/dinov2_vitl14_pretrain.pth`.
    url: where to fetch it from.
    sha256: expected SHA-256 (full hex digest or a prefix); None checks the tensor layout only.

  Returns:
    The destination path (an existing file is not downloaded again).
  """
  path = os.fspath(path or os.path.join(_cache_dir(), DINOV2_FILENAME))
  if os.path.isfile(path):
    if sha256:
      verify_sha256(path, sha256)
    return path
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix='.part')
  try:
    with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url) as response:  # noqa: S310 - a fixed https URL
      shutil.copyfileobj(response, out)
    if sha256:
      verify_sha256(tmp, sha256)
    dinov2_params_from_state_dict(load_pth(tmp))  # a truncated file fails here, not at evaluation
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
      raise OSError(f'Could not download {url} ({e}). Download it by hand and put it at {path}.') from e
    raise
  return path


# --------------------------------------------------------------------------------------------------------
# A ready feature function.


def make_dinov2_fn(variables: Mapping[str, Any] | None = None, *, config: DINOv2Config | None = None,
                   precision: Any = jax.lax.Precision.HIGHEST, mesh: jax.sharding.Mesh | None = None,
                   size: int = DINOV2_SIZE) -> Callable[[jax.Array], jax.Array]:
  """A jitted `images_uint8 -> [B, D]` DINOv2 feature function (EDM2's FD_DINOv2 detector).

  Data parallel like `make_inception_fn`: a batch sharded over a mesh's data axis is computed shard by
  shard and the features keep that sharding.

  Args:
    variables: from `load_dinov2_params`; None loads the published ViT-L/14 from the default places.
    config: the architecture; None reads it from the variables' shapes (64-d heads).
    precision: matmul precision (see `DINOv2`).
    mesh: if given, the weights are replicated over it once here.
    size: the side images are resized to (224).

  Returns:
    fn(images [B, H, W, 3 or 1] uint8) -> [B, D] float32.
  """
  if variables is None:
    variables = load_dinov2_params()
  config = config or config_from_variables(variables)
  model = DINOv2(config, precision=precision)
  if mesh is not None:
    variables = jax.device_put(dict(variables), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  else:
    variables = jax.tree_util.tree_map(jnp.asarray, dict(variables))

  # Two jits, as for Inception: the resize compiles per input size, the network once per batch size.
  network = jax.jit(model.apply)
  pre = jax.jit(functools.partial(preprocess, size=size, precision=precision))

  def fn(images: jax.Array) -> jax.Array:
    return network(variables, pre(images))

  return fn
