"""Reading NVlabs/edm network pickles without PyTorch and without running anything they contain.

An EDM snapshot (`network-snapshot-*.pkl`, the released `edm-*.pkl` and `baseline-*.pkl`) is a plain
`pickle` of a dict {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}. Its networks are instances
of NVlabs's *persistent classes*: each pickles as a call `_reconstruct_persistent_obj(meta)` whose
`meta` holds the whole source file of its module (`module_src`), the class name and the object's
`__dict__` (`state`). Unpickling it with `pickle.load` executes `module_src`, so opening a pickle
from the internet runs whatever code it carries.

This reader never does. Its unpickler resolves only an explicit allow-list of globals, each mapped to
a stand-in written here (REFERENCE-2 §1 lists what EDM's own training loop emits):

| global | stand-in |
|---|---|
| `torch_utils.persistence._reconstruct_persistent_obj` | `PersistentObject(class_name, state)`; `module_src` is dropped unread |
| `torch.nn.modules.container.ModuleDict` (and `ModuleList`, `Sequential`) | `TorchModule`, which keeps its `state` |
| `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter` | a numpy array |
| `torch.storage._load_from_bytes` | the storage's bytes (a legacy or zip `torch.save`) read as a flat numpy array |
| `collections.OrderedDict`, `dnnlib.util.EasyDict` | `OrderedDict`, `dict` |
| `numpy.dtype`, `numpy(._)core.multiarray.scalar` | numeric numpy dtypes and scalars only |

Any other global (`os.system`, `builtins.eval`, a torch class this reader does not know, ...) stops the
load with one sentence naming it, before anything is called. Module objects keep torch's layout:
`state['_parameters']`, `state['_buffers']` and `state['_modules']` are ordered dicts, and the
constructor's arguments are in `state['_init_kwargs']` (persistence records them).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Dict, Optional

import numpy as np

__all__ = ['PersistentObject', 'TorchModule', 'load_network_pickle', 'parameters', 'buffers',
           'children']

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch's typed storages as pickles name them, and their element types.
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': 'bfloat16', 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class UnsafePickleError(ValueError):
  """A pickle asks for a global outside the allow-list (and so is not loaded)."""


class PersistentObject:
  """An instance of one of NVlabs's persistent classes, rebuilt from its pickled state alone.

  Attributes:
    class_name: the class's name in its module, e.g. 'EDMPrecond', 'SongUNet', 'Conv2d'.
    state: the object's `__dict__` as pickled (for a torch module: `_parameters`, `_buffers`,
      `_modules`, `_init_kwargs`, and plain attributes such as `sigma_data`).
  """

  def __init__(self, class_name: str, state: dict):
    self.class_name = class_name
    self.state = state

  def __repr__(self):
    return f'PersistentObject({self.class_name})'


class TorchModule:
  """A torch container module (ModuleDict, ...) pickled by class; only its `state` is kept."""

  class_name = 'Module'

  def __setstate__(self, state):
    self.state = state if isinstance(state, dict) else {}

  def __repr__(self):
    return f'TorchModule({self.class_name})'


def _container(name: str) -> type:
  return type(name, (TorchModule,), {'class_name': name})


class _EasyDict(dict):
  """dnnlib's EasyDict is a dict with attribute access; a plain dict holds the same data."""

  def __setstate__(self, state):
    if isinstance(state, dict):
      self.update(state)


def _bfloat16() -> np.dtype:
  import ml_dtypes  # ships with jax; only bfloat16 storages need it

  return np.dtype(ml_dtypes.bfloat16)


def _storage_dtype(name: str) -> np.dtype:
  dtype = _STORAGE_DTYPES[name]
  return _bfloat16() if dtype == 'bfloat16' else np.dtype(dtype)


class _Storage:
  """A typed flat buffer whose bytes come after the pickle that refers to it."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel = dtype, numel
    self.array: Optional[np.ndarray] = None


def _strided(flat: np.ndarray, offset, size, stride) -> np.ndarray:
  """The tensor view (element offset, shape, element strides) of a flat storage, as a copy."""
  offset, size, stride = int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if not size:
    return flat[offset].copy()
  if min(size) == 0:
    return np.zeros(size, flat.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or min(stride) < 0 or last >= flat.size:
    raise ValueError('A tensor in this pickle runs past the end of its storage; is the file corrupt?')
  view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                         strides=tuple(s * flat.itemsize for s in stride),
                                         writeable=False)
  return np.ascontiguousarray(view)


def _rebuild_tensor(storage, offset, size, stride, *unused) -> np.ndarray:
  if not isinstance(storage, np.ndarray):
    raise ValueError('A tensor in this pickle has no storage diffjax can read.')
  return _strided(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data  # nn.Parameter only wraps its tensor


def _numpy_dtype(name, align=False, copy=False) -> np.dtype:
  dtype = np.dtype(name)
  if dtype.kind not in 'biufc':
    raise UnsafePickleError(f'This pickle holds a numpy {dtype} value; diffjax reads only numbers.')
  return dtype


def _numpy_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype) or dtype.kind not in 'biufc' or not isinstance(data, bytes):
    raise UnsafePickleError('This pickle holds a numpy scalar that is not a plain number.')
  return np.frombuffer(data, dtype, count=1)[0]


def _reconstruct_persistent_obj(meta) -> PersistentObject:
  # module_src is deliberately never looked at: executing it is what this reader exists to avoid.
  if not isinstance(meta, dict) or meta.get('type') != 'class' or not isinstance(
      meta.get('state'), dict):
    raise ValueError('A persistent object in this pickle is not a pickled class instance.')
  return PersistentObject(str(meta.get('class_name')), dict(meta['state']))


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals in `allowed`; refuses persistent ids unless `persistent_load` set."""

  def __init__(self, file, allowed: Dict[tuple, Any], source: str,
               persistent_load: Optional[Callable] = None):
    super().__init__(file, encoding='latin1')
    self._allowed = allowed
    self._source = source
    self._persistent = persistent_load

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f'{self._source} asks for the global {module}.{name}, which diffjax refuses to load: it '
          'reads only network pickles of tensors and plain data, and runs nothing from the file.'
      ) from None

  def persistent_load(self, pid):
    if self._persistent is None:
      raise UnsafePickleError(f'{self._source} refers to an external object diffjax cannot read.')
    return self._persistent(pid)


def _storage_globals() -> Dict[tuple, Any]:
  table = {('torch', name): ('storage_type', _storage_dtype(name)) for name in _STORAGE_DTYPES}
  table[('collections', 'OrderedDict')] = collections.OrderedDict
  return table


def _storage_pid(storages: Dict[str, _Storage], source: str):
  """persistent_load of a torch.save: ('storage', type, key, location, numel[, view])."""

  def load(pid):
    kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
    storage_type = pid[1] if len(pid) > 1 else None
    if kind != 'storage' or not (isinstance(storage_type, tuple) and storage_type[0] == 'storage_type'):
      raise UnsafePickleError(f'{source} holds a tensor storage of a kind diffjax cannot read.')
    key, numel = str(pid[2]), int(pid[4])
    if key not in storages:
      storages[key] = _Storage(storage_type[1], numel)
    view = pid[5] if len(pid) > 5 else None
    if view is not None:
      raise ValueError(f'{source} holds a storage view, which diffjax does not read.')
    return storages[key]

  return load


def _read_storage_bytes(data: bytes, source: str) -> np.ndarray:
  """The flat array of a `torch.save`d storage (what `torch.storage._load_from_bytes` receives)."""
  storages: Dict[str, _Storage] = {}
  pid = _storage_pid(storages, source)
  if data[:2] == b'PK':  # zip format
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
      names = archive.namelist()
      pkl = next((n for n in names if n.endswith('data.pkl')), None)
      if pkl is None:
        raise ValueError(f'{source} holds a storage archive without data.pkl; is it corrupt?')
      root = pkl[:-len('data.pkl')]
      obj = _RestrictedUnpickler(io.BytesIO(archive.read(pkl)), _storage_globals(), source,
                                 pid).load()
      for key, storage in storages.items():
        raw = archive.read(f'{root}data/{key}')
        storage.array = np.frombuffer(raw, storage.dtype.newbyteorder('<'), count=storage.numel)
  else:
    f = io.BytesIO(data)
    load = lambda: _RestrictedUnpickler(f, _storage_globals(), source, pid).load()
    if load() != _LEGACY_MAGIC or load() != _LEGACY_PROTOCOL:
      raise ValueError(f'{source} holds a tensor storage that is not a torch.save; is it corrupt?')
    sys_info = load()
    little = sys_info.get('little_endian', True) if isinstance(sys_info, dict) else True
    obj = load()
    for key in load():
      storage = storages[str(key)]
      (numel,) = struct.unpack('<q' if little else '>q', f.read(8))
      raw = f.read(numel * storage.dtype.itemsize)
      if numel != storage.numel or len(raw) != numel * storage.dtype.itemsize:
        raise ValueError(f'{source} is truncated (a tensor storage ends early).')
      storage.array = np.frombuffer(raw, storage.dtype.newbyteorder('<' if little else '>'))
  if not isinstance(obj, _Storage) or obj.array is None:
    raise ValueError(f'{source} holds a tensor storage without data; is the file corrupt?')
  return obj.array.astype(obj.dtype, copy=False)


def _allowed_globals(source: str) -> Dict[tuple, Any]:
  table: Dict[tuple, Any] = {
      ('torch_utils.persistence', '_reconstruct_persistent_obj'): _reconstruct_persistent_obj,
      ('collections', 'OrderedDict'): collections.OrderedDict,
      ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
      ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
      ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
      ('torch.storage', '_load_from_bytes'): lambda data: _read_storage_bytes(data, source),
      ('numpy', 'dtype'): _numpy_dtype,
      ('numpy.core.multiarray', 'scalar'): _numpy_scalar,
      ('numpy._core.multiarray', 'scalar'): _numpy_scalar,
      ('dnnlib.util', 'EasyDict'): _EasyDict,
      ('builtins', 'set'): set,
      ('builtins', 'frozenset'): frozenset,
  }
  for name in ('ModuleDict', 'ModuleList', 'Sequential'):
    table[('torch.nn.modules.container', name)] = _container(name)
  return table


def load_network_pickle(path: str | os.PathLike) -> Any:
  """Loads an NVlabs/edm pickle (e.g. a network snapshot) into stand-ins, running none of it.

  Args:
    path: the `.pkl` file.

  Returns:
    The pickled object (for a snapshot, a dict with 'ema', 'loss_fn', 'augment_pipe',
    'dataset_kwargs'), with persistent objects as `PersistentObject`, torch containers as
    `TorchModule` and tensors as numpy arrays.

  Raises:
    FileNotFoundError: the file is missing.
    UnsafePickleError: the pickle needs a global outside the allow-list (the message names it).
    ValueError: the file is not a readable pickle (truncated, a zip archive, ...).
  """
  path = os.fspath(path)
  source = os.path.basename(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No such file: {path}')
  if zipfile.is_zipfile(path):
    raise ValueError(f'{source} is a torch.save zip archive (a state dict?), not an EDM network '
                     'pickle; convert openai .pt files with the improved-diffusion converter.')
  with open(path, 'rb') as f:
    try:
      return _RestrictedUnpickler(f, _allowed_globals(source), source).load()
    except (UnsafePickleError, ValueError):
      raise
    except Exception as e:  # noqa: BLE001 - EOFError, UnpicklingError, ...: all mean unreadable
      raise ValueError(f'{source} is truncated or not a pickle file ({type(e).__name__}: {e}); '
                       'download it again.') from e


# ------------------------------------------------------------------------------------------------
# Reading a rebuilt module tree.


def _module_state(module) -> dict:
  state = getattr(module, 'state', None)
  if not isinstance(state, dict):
    raise ValueError(f'Expected a torch module in the pickle, found {type(module).__name__}.')
  return state


def parameters(module) -> Dict[str, np.ndarray]:
  """A module's own parameters (not its children's), name -> array; None entries left out."""
  return {k: v for k, v in (_module_state(module).get('_parameters') or {}).items()
          if v is not None}


def buffers(module) -> Dict[str, np.ndarray]:
  """A module's own buffers, name -> array; None entries left out."""
  return {k: v for k, v in (_module_state(module).get('_buffers') or {}).items() if v is not None}


def children(module) -> Dict[str, Any]:
  """A module's direct submodules in order, name -> module; None entries left out."""
  return collections.OrderedDict(
      (k, v) for k, v in (_module_state(module).get('_modules') or {}).items() if v is not None)
