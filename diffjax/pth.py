"""Reading PyTorch `.pth` state dicts into numpy, without PyTorch.

The published FID Inception weights (pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth`) are `torch.save`d state dicts. Installing PyTorch only to read
95 MB of float32 would be a heavy price, and `torch.load` unpickles arbitrary code. Both on-disk formats are
simple enough to read directly:

* the zip format (torch >= 1.6): `<root>/data.pkl` is a pickle whose tensors refer, through pickle
  "persistent ids", to raw little-endian storages stored as `<root>/data/<key>`;
* the legacy format (torch < 1.6): a stream of pickles — magic number, protocol version, system info, the
  object, the list of storage keys — followed by each storage as an int64 element count and its raw bytes.

The unpickler below resolves only the handful of globals a state dict needs (an allow-list), so loading a
file cannot run code from it. Tensors come back as numpy arrays; sparse/quantized tensors and pickled
modules are refused with a clear message.
"""

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

__all__ = ['load_pth']

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _bfloat16():
  import ml_dtypes  # ships with jax; imported lazily since only bf16 checkpoints need it

  return np.dtype(ml_dtypes.bfloat16)


# torch's legacy typed storage classes, as they appear in pickles, and their element types.
_STORAGE_DTYPES = {
  'FloatStorage': np.float32,
  'DoubleStorage': np.float64,
  'HalfStorage': np.float16,
  'BFloat16Storage': 'bfloat16',
  'LongStorage': np.int64,
  'IntStorage': np.int32,
  'ShortStorage': np.int16,
  'CharStorage': np.int8,
  'ByteStorage': np.uint8,
  'BoolStorage': np.bool_,
  'UntypedStorage': np.uint8,
}


class _StorageType:
  """Stands in for `torch.FloatStorage` etc.: only its element type matters."""

  def __init__(self, name: str):
    dtype = _STORAGE_DTYPES[name]
    self.name = name
    self.dtype = _bfloat16() if dtype == 'bfloat16' else np.dtype(dtype)


class _Storage:
  """A flat, typed buffer; filled lazily because legacy files store the bytes after the pickle."""

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype = dtype
    self.numel = numel
    self.array: np.ndarray | None = None


def _rebuild_tensor(storage: _Storage, offset, size, stride, *unused) -> '_PendingTensor':
  return _PendingTensor(
    storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
  )


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  # `nn.Parameter` wraps a tensor; the wrapper carries nothing we need.
  return data


class _PendingTensor:
  """A tensor view (offset, shape, strides in elements) into a storage that may not be read yet."""

  def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
    self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

  def materialize(self) -> np.ndarray:
    flat = self.storage.array
    if flat is None:
      raise ValueError('Corrupt .pth file: a tensor refers to a storage with no data.')
    itemsize = flat.dtype.itemsize
    if not self.shape:
      return flat[self.offset].copy()
    # The last element reached must lie inside the storage, or as_strided would read garbage.
    last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride) if n > 0)
    if min(self.shape) > 0 and last >= flat.size:
      raise ValueError('Corrupt .pth file: a tensor view runs past the end of its storage.')
    view = np.lib.stride_tricks.as_strided(
      flat[self.offset :] if min(self.shape) > 0 else flat[:0],
      shape=self.shape,
      strides=tuple(s * itemsize for s in self.stride),
      writeable=False,
    )
    return np.ascontiguousarray(view)


def _refuse(what: str):
  def fail(*args, **kwargs):
    raise ValueError(f'This .pth file holds a {what}, which diffjax cannot read without PyTorch.')

  return fail


_ALLOWED_GLOBALS = {
  ('collections', 'OrderedDict'): collections.OrderedDict,
  ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
  ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
  ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
  ('torch._utils', '_rebuild_sparse_tensor'): _refuse('sparse tensor'),
  ('torch._utils', '_rebuild_qtensor'): _refuse('quantized tensor'),
  ('torch', 'Size'): tuple,
  ('builtins', 'set'): set,
  ('builtins', 'frozenset'): frozenset,
  ('builtins', 'slice'): slice,
  ('__builtin__', 'set'): set,
}


class _Unpickler(pickle.Unpickler):
  """Unpickles a state dict, mapping torch globals onto the numpy stand-ins above."""

  def __init__(self, file, storages: dict, read_storage):
    super().__init__(file, encoding='latin1')
    self._storages = storages
    self._read_storage = read_storage

  def find_class(self, module: str, name: str) -> Any:
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == 'torch' and name in (
      'float32',
      'float64',
      'float16',
      'bfloat16',
      'int64',
      'uint8',
    ):
      return name  # dtype objects appear in some newer pickles next to storages
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise ValueError(
        f'Refusing to load {module}.{name} from a .pth file: diffjax reads plain state dicts of '
        'tensors only (save one with torch.save(model.state_dict(), path)).'
      ) from None

  def persistent_load(self, pid):
    kind = pid[0].decode('ascii') if isinstance(pid[0], bytes) else pid[0]
    if kind != 'storage':
      raise ValueError(
        f'Unsupported object {kind!r} in a .pth file (a pickled module?); save a state dict instead.'
      )
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    view_metadata = pid[5] if len(pid) > 5 else None
    dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else np.dtype(np.uint8)
    if key not in self._storages:
      self._storages[key] = _Storage(dtype, numel)
      self._read_storage(key, self._storages[key])
    storage = self._storages[key]
    if view_metadata is not None:
      # Legacy files could save a view of a storage: (view key, element offset, element count).
      _view_key, offset, size = view_metadata
      return _StorageView(storage, int(offset), int(size))
    return storage


class _StorageView(_Storage):
  """A legacy storage view; resolves to a slice of its root once the root's bytes are read."""

  def __init__(self, root: _Storage, offset: int, numel: int):
    super().__init__(root.dtype, numel)
    self._root, self._offset = root, offset

  @property
  def array(self):
    if self._root.array is None:
      return None
    return self._root.array[self._offset : self._offset + self.numel]

  @array.setter
  def array(self, value):
    pass


def _materialize(obj):
  """Replaces every pending tensor in a nested container by its numpy array."""
  if isinstance(obj, _PendingTensor):
    return obj.materialize()
  if isinstance(obj, collections.OrderedDict):
    return collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
  if isinstance(obj, dict):
    return {k: _materialize(v) for k, v in obj.items()}
  if isinstance(obj, list | tuple):
    return type(obj)(_materialize(v) for v in obj)
  return obj


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if not pkl:
      raise ValueError(f'{path} is a zip file but not a torch.save archive (no data.pkl inside).')
    root = pkl[0][: -len('data.pkl')]
    byteorder = 'little'
    if root + 'byteorder' in names:
      byteorder = archive.read(root + 'byteorder').decode('ascii').strip()

    def read_storage(key: str, storage: _Storage):
      raw = archive.read(f'{root}data/{key}')
      dtype = storage.dtype.newbyteorder('<' if byteorder == 'little' else '>')
      storage.array = np.frombuffer(raw, dtype=dtype).astype(storage.dtype, copy=False)

    obj = _Unpickler(io.BytesIO(archive.read(pkl[0])), {}, read_storage).load()
    return _materialize(obj)


def _load_legacy(path: str) -> Any:
  storages: dict[str, _Storage] = {}

  def load(f):
    # Every pickle in the stream goes through the restricted unpickler: even the header must not be
    # able to run code from a hostile file.
    return _Unpickler(f, storages, lambda key, storage: None).load()

  with open(path, 'rb') as f:
    try:
      magic = load(f)
    except ValueError:
      raise
    except Exception as e:  # noqa: BLE001 - any other failure here means "not this format"
      raise ValueError(f'{path} is neither a zip nor a legacy torch.save file.') from e
    if magic != _LEGACY_MAGIC:
      raise ValueError(f'{path} is not a torch.save file (bad magic number); is it corrupt?')
    if load(f) != _LEGACY_PROTOCOL:
      raise ValueError(f'{path}: unsupported legacy torch.save protocol version.')
    sys_info = load(f)
    little = sys_info.get('little_endian', True) if isinstance(sys_info, dict) else True
    obj = load(f)
    keys = load(f)
    # Storages follow in the order of `keys`, each as an int64 element count and its raw bytes.
    for key in keys:
      storage = storages[str(key)]
      (numel,) = struct.unpack('<q' if little else '>q', f.read(8))
      nbytes = numel * storage.dtype.itemsize
      raw = f.read(nbytes)
      if len(raw) != nbytes:
        raise ValueError(f'{path} is truncated (a tensor storage ends early).')
      dtype = storage.dtype.newbyteorder('<' if little else '>')
      storage.array = np.frombuffer(raw, dtype=dtype).astype(storage.dtype, copy=False)
    return _materialize(obj)


def load_pth(path: str | os.PathLike) -> Any:
  """Loads a `torch.save`d object of tensors (typically a state dict) without PyTorch.

  Reads both the zip format (torch >= 1.6) and the legacy format. Only plain containers (dicts,
  OrderedDicts, lists, tuples), numbers, strings and tensors are accepted; nothing in the file is executed.

  Args:
    path: the `.pth` / `.pt` file.

  Returns:
    The saved object with every tensor replaced by a C-contiguous numpy array of the same shape and dtype
    (bfloat16 via `ml_dtypes`).

  Raises:
    FileNotFoundError: the file is missing.
    ValueError: the file is not a readable `torch.save` of tensors.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'No such file: {path}')
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  return _load_legacy(path)
