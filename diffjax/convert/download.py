"""Fetching a checkpoint named by URL: downloaded once into a cache, with a progress bar.

`fetch(src)` returns a local path: `src` itself when it is one, else the cached copy of an http(s)
URL (downloaded to a temporary name and renamed when complete, so an interrupted download is never
mistaken for a finished one). A URL of a `.zip` / `.tar(.gz)` archive (a diffusers pipeline folder)
is unpacked next to it, refusing members that would land outside the folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile
from typing import Optional

_ARCHIVES = ('.zip', '.tar', '.tar.gz', '.tgz')


def cache_dir(path: Optional[str] = None) -> str:
  """`path`, else $DIFFJAX_CACHE/convert, else ~/.cache/diffjax/convert."""
  if path:
    return os.path.abspath(os.path.expanduser(path))
  root = os.environ.get('DIFFJAX_CACHE') or os.path.join('~', '.cache', 'diffjax')
  return os.path.abspath(os.path.join(os.path.expanduser(root), 'convert'))


def is_url(src: str) -> bool:
  return urllib.parse.urlparse(str(src)).scheme in ('http', 'https')


def _download(url: str, dest: str, progress: bool) -> None:
  tmp = f'{dest}.part-{os.getpid()}'
  try:
    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, 'wb') as out:
      total = int(response.headers.get('Content-Length') or 0) or None
      bar = None
      if progress:
        from tqdm import tqdm  # a dependency of diffjax; only a download needs it

        bar = tqdm(total=total, unit='B', unit_scale=True, unit_divisor=1024, file=sys.stderr,
                   desc=os.path.basename(dest), leave=True)
      try:
        while True:
          block = response.read(1 << 20)
          if not block:
            break
          out.write(block)
          if bar is not None:
            bar.update(len(block))
      finally:
        if bar is not None:
          bar.close()
    if total is not None and os.path.getsize(tmp) != total:
      raise OSError(f'the server sent {os.path.getsize(tmp)} of {total} bytes')
    os.replace(tmp, dest)
  except (OSError, ValueError) as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    reason = getattr(e, 'reason', None) or e
    raise OSError(f'Could not download {url} ({reason}); check the URL and the network, or '
                  'download the file yourself and pass its path.') from e


def _unpack(archive: str, dest: str) -> None:
  tmp = f'{dest}.part-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  root = os.path.realpath(tmp)

  def inside(name: str) -> bool:
    target = os.path.realpath(os.path.join(root, name))
    return target == root or target.startswith(root + os.sep)

  if archive.endswith('.zip'):
    with zipfile.ZipFile(archive) as z:
      bad = [n for n in z.namelist() if not inside(n)]
      if bad:
        raise ValueError(f'{archive} has a member {bad[0]} outside its folder; refusing to unpack.')
      z.extractall(tmp)
  else:
    with tarfile.open(archive) as t:
      bad = [m.name for m in t.getmembers()
             if not inside(m.name) or not (m.isfile() or m.isdir())]
      if bad:
        raise ValueError(f'{archive} has a member {bad[0]} that is not a plain file inside its '
                         'folder; refusing to unpack.')
      t.extractall(tmp)
  # A pipeline archive usually holds one top folder; the pipeline is that folder.
  entries = os.listdir(tmp)
  if len(entries) == 1 and os.path.isdir(os.path.join(tmp, entries[0])):
    shutil.move(os.path.join(tmp, entries[0]), dest)
    shutil.rmtree(tmp)
  else:
    os.replace(tmp, dest)


def fetch(src: str | os.PathLike, *, cache: Optional[str] = None, progress: bool = True) -> str:
  """A local path for `src`: a path as is, a URL downloaded (once) into the cache.

  Args:
    src: a file or folder path, or an http(s) URL (of a file, or of a .zip / .tar(.gz) archive of
      a folder, which is unpacked).
    cache: the cache folder (default: see `cache_dir`).
    progress: show a progress bar on stderr while downloading.

  Returns:
    The local path (for an archive, the unpacked folder).

  Raises:
    FileNotFoundError: a local `src` does not exist.
    OSError: the download failed (one sentence with the reason).
  """
  src = os.fspath(src)
  if not is_url(src):
    if not os.path.exists(src):
      raise FileNotFoundError(f'No such file or folder: {src}')
    return src
  folder = cache_dir(cache)
  os.makedirs(folder, exist_ok=True)
  name = os.path.basename(urllib.parse.urlparse(src).path) or 'download'
  # The hash keeps two URLs with the same file name apart.
  dest = os.path.join(folder, f'{hashlib.sha256(src.encode()).hexdigest()[:12]}-{name}')
  if not os.path.exists(dest):
    _download(src, dest, progress)
  if name.endswith(_ARCHIVES):
    unpacked = dest + '.d'
    if not os.path.isdir(unpacked):
      _unpack(dest, unpacked)
    return unpacked
  return dest
