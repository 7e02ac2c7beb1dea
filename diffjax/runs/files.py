"""The run's paths through `etils.epath`: a workdir may be local or a `gs://bucket/run` URL.

`os.path` calls mangle URLs (`os.path.abspath('gs://b/r')` is a local path under the current
directory), so every run file goes through `path()`: a local path is made absolute once, a URL
is kept as given, and both come back as an `epath.Path`, which Orbax also takes natively.

Renames are atomic on a local file system but not on object stores (a GCS "rename" is a copy and
a delete); an object written in one call, however, appears whole or not at all. `write_atomic`
uses whichever of the two a path has, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import shutil
from typing import Union

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
  object write, which the store commits whole.
  """
  p = path(p)
  if not is_local(p):
    p.write_text(text)
    return
  tmp = p.parent / f'{p.name}.tmp-{os.getpid()}'
  tmp.write_text(text)
  os.replace(tmp, p)


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
