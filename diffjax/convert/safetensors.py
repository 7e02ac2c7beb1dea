"""Reading `.safetensors` files with numpy (no torch, no safetensors package).

The format (huggingface/safetensors): an unsigned little-endian 64-bit header length N, N bytes of
UTF-8 JSON mapping each tensor name to {dtype, shape, data_offsets: [begin, end]} (offsets into the
byte buffer that follows the header) plus an optional "__metadata__" entry, then the buffer. Tensors
are little-endian and C-contiguous. Nothing in the file is code, so reading it is safe as long as
the offsets are checked, which is done here.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict

import numpy as np

_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': 'bfloat16',
           'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
           'BOOL': np.bool_}
_MAX_HEADER = 100 << 20  # the format's own limit


def _dtype(name: str) -> np.dtype:
  kind = _DTYPES.get(name)
  if kind is None:
    raise ValueError(f'safetensors dtype {name} is not one diffjax reads ({", ".join(_DTYPES)}).')
  if kind == 'bfloat16':
    import ml_dtypes  # ships with jax

    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(kind).newbyteorder('<')


def load_safetensors(path: str | os.PathLike) -> Dict[str, np.ndarray]:
  """Loads every tensor of a `.safetensors` file.

  Args:
    path: the file.

  Returns:
    name -> numpy array (native byte order), in the file's order.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a well-formed safetensors file (truncated, bad header, ...).
  """
  path = os.fspath(path)
  name = os.path.basename(path)
  with open(path, 'rb') as f:
    raw = f.read()
  if len(raw) < 8:
    raise ValueError(f'{name} is too short to be a safetensors file; download it again.')
  (n,) = struct.unpack('<Q', raw[:8])
  if n > min(_MAX_HEADER, len(raw) - 8):
    raise ValueError(f'{name} is truncated or not a safetensors file (bad header length).')
  try:
    header = json.loads(raw[8:8 + n].decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise ValueError(f'{name} is not a safetensors file (its header is not JSON).') from None
  buffer = memoryview(raw)[8 + n:]
  out: Dict[str, np.ndarray] = {}
  for key, info in header.items():
    if key == '__metadata__':
      continue
    dtype = _dtype(info['dtype'])
    shape = tuple(int(s) for s in info['shape'])
    begin, end = (int(o) for o in info['data_offsets'])
    if not 0 <= begin <= end <= len(buffer) or end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise ValueError(f'{name} is truncated or corrupt (tensor {key} lies outside the file).')
    out[key] = np.frombuffer(buffer[begin:end], dtype).reshape(shape).astype(dtype.newbyteorder('='))
  return out
