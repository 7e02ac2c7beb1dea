"""The run's paths through `etils.epath`: a workdir may be local or a `gs://bucket/run` URL.

`os.path` calls mangle URLs (`os.path.abspath('gs://b/r')` is a local path under the current
directory), so every run file goes through `path()`: a local path is made absolute once, a URL
is kept as given, and both come back as an `epath.Path`, which Orbax also takes natively.

Renames are atomic on a local file system but not on object stores (a GCS "rename" is a copy and
a delete); an object written in one call, however, appears whole or not at all. `write_atomic`
uses whichever of the two a path has, so a reader never sees half a file; `write_whole` does the
same for binary writers (an .npz, a PNG), `write_json` for a result, and `read_npz` reads an .npz
back from either kind of path. `check_writable_dir` refuses an output folder before any work is
done for it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from typing import BinaryIO, Callable, Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_url(p: PathLike) -> bool:
  """True for 'gs://…'-style paths (a scheme before '://'), which os.path must not touch."""
  return '://' in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path: local paths absolute (as os.path.abspath), URLs untouched."""
  if isinstance(p, epath.Path) and not is_local(p):
    return p
  text = os.fspath(p)
  return epath.Path(text if is_url(text) else os.path.abspath(text))


def is_local(p: PathLike) -> bool:
  """True if `p` is on this machine's file system (pids, hard links and fsync mean something)."""
  return not is_url(os.fspath(p))


def write_atomic(p: PathLike, text: str) -> None:
  """Writes `text` to `p` so that no reader ever sees a truncated file.

  Local: written aside and renamed (a run killed mid-write leaves the old file). Remote: one
  object write, which the store commits whole. (`write_whole` with the text as UTF-8.)
  """
  write_whole(p, lambda f: f.write(text.encode()))


def write_whole(p: PathLike, write: Callable[[BinaryIO], object]) -> None:
  """Writes a binary file by `write(f)` so that it appears whole or not at all, even after a hard
  kill or a lost machine.

  Local: written to `.tmp-<pid>-<name>` beside it (a prefix shard folders clear on open), synced
  and renamed. Remote: one object written in one stream, which the store commits whole on close.
  The parent folder must exist locally (an object store has none to make).
  """
  p = path(p)
  if not is_local(p):
    with p.open('wb') as f:
      write(_StreamOnly(f))
    return
  tmp = p.parent / f'.tmp-{os.getpid()}-{p.name}'
  with open(tmp, 'wb') as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, p)


class _StreamOnly(io.RawIOBase):
  """An object-store upload seen as what it is, a stream: no seek and no tell.

  Writers that can stream ask first (zipfile, so np.savez, falls back to data descriptors when
  `tell` fails); a store's upload may instead raise its own error type from `seek` (gcsfs a
  ValueError, TensorFlow's client an OpError), which zipfile would not catch.
  """

  def __init__(self, f):
    super().__init__()
    self._f = f

  def writable(self) -> bool:
    return True

  def write(self, b) -> int:
    self._f.write(bytes(b))
    return len(b)

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:  # the upload is committed by its own close, after `write` returns
    super().close()


def write_json(p: PathLike, value, make_parent: bool = True) -> str:
  """Writes `value` as indented JSON to `p` (whole or not at all); returns the path as text."""
  p = path(p)
  if make_parent:
    p.parent.mkdir(parents=True, exist_ok=True)
  write_atomic(p, json.dumps(value, indent=2))
  return os.fspath(p)


def write_npz(p: PathLike, make_parent: bool = True, **arrays) -> str:
  """`np.savez` of `arrays` to `p` exactly (no '.npz' added), whole or not at all; returns the path
  as text."""
  import numpy as np  # Lazy: only the array files need it.
  p = path(p)
  if make_parent:
    p.parent.mkdir(parents=True, exist_ok=True)
  write_whole(p, lambda f: np.savez(f, **arrays))
  return os.fspath(p)


def write_png(p: PathLike, pixels, make_parent: bool = True) -> str:
  """Writes uint8 pixels [H, W, C] (C = 1, 3 or 4) as a PNG, whole or not at all; returns the
  path as text."""
  import numpy as np
  from PIL import Image  # Pillow is only needed when a PNG is written.
  pixels = np.asarray(pixels, np.uint8)
  if pixels.ndim == 3 and pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  p = path(p)
  if make_parent:
    p.parent.mkdir(parents=True, exist_ok=True)
  write_whole(p, lambda f: Image.fromarray(pixels).save(f, format='PNG'))
  return os.fspath(p)


@contextlib.contextmanager
def read_npz(p: PathLike) -> Iterator:
  """`np.load` of an .npz at a local path or a URL, as a context manager (closes the file)."""
  import numpy as np  # Lazy: only the array files need it.
  p = path(p)
  if is_local(p):
    with np.load(os.fspath(p)) as z:
      yield z
    return
  with p.open('rb') as f, np.load(f) as z:
    yield z


def remove(p: PathLike) -> None:
  """Removes one file; a file already gone is fine."""
  path(p).unlink(missing_ok=True)


def check_writable_dir(p: PathLike, flag: str, holds: str) -> epath.Path:
  """Raises one sentence, before any work is done for it, unless `p` can be an output folder.

  Nothing is left behind (a call that fails later leaves no empty folder): locally, the nearest
  existing folder must take a file (one is written and removed: os.access says yes to root on an
  immutable folder or a read-only mount); on an object store, a probe object is written into `p`
  and removed.

  Args:
    p: the output folder (local path or URL).
    flag: how the user named it, for the message ('--out').
    holds: what it gets, for the message ('grid.png, samples.npz and shards/').

  Returns:
    `p` as an epath.Path (local: absolute).
  """
  p = path(p)
  shown = os.fspath(p)
  if p.exists() and not p.is_dir():
    raise ValueError(f'{flag} {shown} is a file; pass a directory (it gets {holds}).')
  parent = p
  if is_local(p):
    while not parent.exists():
      parent = parent.parent
    if not parent.is_dir():
      raise ValueError(f'{flag} {shown} is inside {parent}, which is a file; pass a directory.')
  probe = parent / f'.write-test-{os.getpid()}'
  try:
    if is_local(p):
      with open(probe, 'xb'):
        pass
    else:  # a store has no folders to make (mkdir makes at most a marker object)
      p.mkdir(parents=True, exist_ok=True)
      probe.write_bytes(b'')
    probe.unlink()
  except OSError as e:
    article = 'an' if flag.lstrip('-')[:1] in 'aeiou' else 'a'
    raise OSError(f'Cannot write to {shown} ({parent}: {e.strerror or e}); pass {article} {flag} '
                  'on a writable disk.') from e
  return p


def remove_tree(p: PathLike) -> None:
  """Removes a directory tree, ignoring errors (a leftover is retried by the next run)."""
  p = path(p)
  if is_local(p):
    shutil.rmtree(p, ignore_errors=True)
    return
  try:
    p.rmtree(missing_ok=True)
  except Exception:  # noqa: BLE001 - as shutil's ignore_errors: the next save retries.
    pass
