"""Image folders that can be trusted: the layout, the files' headers, and bad files found while reading.

An image folder (`specs.register_image_folder`) is laid out as `<root>/<split>/<class>/<image files>`.
A user's folder can be laid out otherwise, or hold files that are not images (a zero-byte file, a
text file named .png) or images cut short by an interrupted copy. Each is found as early as it can
be, and said in one sentence that names the file:

- the layout, when the folder is listed (`check_layout`);
- files that are not images, and images cut short (an interrupted copy), before training starts:
  every file's header and its last bytes are read up front (`usable_images`, on threads). A whole
  PNG ends with its IEND chunk and a whole JPEG with its EOI marker; a file whose end lacks them
  is decoded to confirm (a writer may append bytes after them), so nothing good is refused;
- any other image that fails to decode (damaged inside, its ends intact), when it is decoded
  (`Reader`).

Why not decode every file up front (`python benchmarks/folder_scan.py`, 8 threads on 2 busy CPU
cores, files in the page cache): on 500 PNGs of 256×256 (129 KB) the headers took 40-60 ms, the
headers plus the ends 33-54 ms, Pillow's `verify()` 82-103 ms (it reads the whole file and checks
the CRCs, and checks nothing in a JPEG: one cut short passes it), a full decode 1.3-1.7 s; on 2000
PNGs of 32×32 all four took 0.1-0.2 s. A full decode grows with the pixels (about an hour for
ImageNet's 1.28M files at this rate); reading the ends stays one small read a file.

With `config.data.skip_bad_images` the run goes on instead: files that are not images are left out
up front, and a file that fails to decode (cut short or damaged) is replaced by the next good one
in the folder's order (the same one every time, so exact resume still holds), each with a warning
and a running count.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import threading
from typing import List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

SKIP_FLAG = '--config.data.skip_bad_images=True'
# The extensions `tfds.folder_dataset.ImageFolder` lists.
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')


def _layout(split: str) -> str:
  return f'<root>/{split}/<class>/<image files>'


def check_layout(root: str, split: str) -> None:
  """Raises one sentence when `root/split` exists but is not laid out as class subfolders of images.

  Does nothing when `root/split` does not exist (the caller lists the splits there are).
  """
  folder = os.path.join(root, split)
  if not os.path.isdir(folder):
    return
  entries = sorted(os.listdir(folder))
  images = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)
            and os.path.isfile(os.path.join(folder, e))]
  if images:
    raise ValueError(
        f'{folder} holds {len(images)} image file(s) directly (e.g. {images[0]}), but an image '
        f'folder is laid out as {_layout(split)}; move them into a class subfolder (one, e.g. '
        f'{os.path.join(folder, "all")}/, for unlabelled data).')
  raise ValueError(
      f'{folder} holds no images in class subfolders; lay the images out as {_layout(split)} '
      f'(e.g. {os.path.join(folder, "all", "0001.png")}) and point --config.data.data_dir at '
      f'{root}.')


# The last bytes of a whole file: PNG's IEND chunk (its type and CRC) and JPEG's EOI marker.
_ENDS = {'PNG': b'IEND\xaeB`\x82', 'JPEG': b'\xff\xd9'}
_TAIL_BYTES = 64  # read from the end: room for a few bytes of padding some writers add
NOT_IMAGE, CUT_SHORT = 'not an image', 'cut short'


def _why(e: BaseException, path: str) -> str:
  text = str(e).replace(f" '{path}'", '').strip() or type(e).__name__
  return text.splitlines()[0]


def _header_problem(path: str) -> Optional[Tuple[str, str]]:
  """(NOT_IMAGE or CUT_SHORT, why) for a file that is not an image or is cut short; None if fine.

  The header is read (Pillow's `Image.open` reads no pixels) and the file's last bytes; only a file
  whose end lacks its format's end marker is decoded, to confirm it is cut short.
  """
  from PIL import Image
  try:
    size = os.path.getsize(path)
    if size == 0:
      return NOT_IMAGE, 'an empty file'
    with Image.open(path) as image:
      image.size  # noqa: B018 - read from the header: an unreadable one raises here
      end = _ENDS.get(image.format)
  except Exception as e:  # noqa: BLE001 - any failure to read a header: not an image.
    return NOT_IMAGE, _why(e, path)
  if end is None:
    return None
  try:
    with open(path, 'rb') as f:
      f.seek(max(0, size - _TAIL_BYTES))
      if end in f.read():
        return None
    with Image.open(path) as image:
      image.load()  # no end marker: decoding says whether it is whole (bytes after it are fine)
  except Exception as e:  # noqa: BLE001 - what the decoder says, in the file's sentence.
    return CUT_SHORT, _why(e, path)
  return None


@functools.lru_cache(maxsize=16)
def _scan(root: str, split: str, paths: Tuple[str, ...], num_threads: int
          ) -> Tuple[Tuple[str, str, str], ...]:
  """(path, kind, why) of each file among `paths` that is not an image or is cut short (cached
  per folder)."""
  del root, split  # part of the cache key only
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    problems = list(pool.map(_header_problem, paths))
  return tuple((p, *problem) for p, problem in zip(paths, problems) if problem is not None)


def usable_images(root: str, split: str, items: Sequence[Tuple[str, int]], skip_bad: bool,
                  num_threads: int = 8) -> List[Tuple[str, int]]:
  """The (path, label) items of `root/split` whose headers are images'.

  Args:
    root, split: the folder (for messages and the cache).
    items: every listed (path, label).
    skip_bad: leave out files that are not images (with a warning and the count) instead of
      raising; images cut short stay in, for `Reader` to skip (each warned and counted).
    num_threads: threads reading headers.

  Raises:
    ValueError: a file that is not an image or is cut short (named, with how many there are),
      unless `skip_bad`; or every file is not an image.
  """
  found = _scan(root, split, tuple(p for p, _ in items), int(num_threads))
  folder = os.path.join(root, split)
  cut = [(p, why) for p, kind, why in found if kind == CUT_SHORT]
  bad = [(p, why) for p, kind, why in found if kind == NOT_IMAGE]
  if cut and not bad and not skip_bad:
    path, why = cut[0]
    more = f' ({len(cut)} of {len(items)} files in {folder} are cut short)' if len(cut) > 1 else ''
    raise ValueError(f'Cannot decode the image {path} ({why}){more}; replace or remove the '
                     f'file{"s" if more else ""}, or pass {SKIP_FLAG} to skip files that do not '
                     'decode.')
  if cut and skip_bad:
    log.warning('%d of %d files in %s are cut short (e.g. %s: %s); each is skipped when read.',
                len(cut), len(items), folder, cut[0][0], cut[0][1])
  if not bad:
    return list(items)
  path, why = bad[0]
  more = f' ({len(bad)} of {len(items)} files in {folder} are not images)' if len(bad) > 1 else ''
  if not skip_bad or len(bad) == len(items):
    fix = ('remove or replace them' if len(bad) == len(items) else
           f'remove or replace {"them" if len(bad) > 1 else "it"}, or pass {SKIP_FLAG} to leave '
           'such files out')
    raise ValueError(f'{path} is not an image ({why}){more}; {fix}.')
  log.warning('Left out %d of %d files in %s that are not images (e.g. %s: %s).', len(bad),
              len(items), folder, path, why)
  dropped = {p for p, _ in bad}
  return [item for item in items if item[0] not in dropped]


class Reader:
  """`fetch(i) -> (uint8 pixels [h, w, c], label)` over (path, label) items; thread-safe.

  A file that fails to decode (a truncated image) raises one sentence naming it — or, with
  `skip_bad`, is replaced by the next item that decodes (deterministic: the same one on every
  epoch and after a resume), with a warning and the running count in `skipped`.
  """

  def __init__(self, items: Sequence[Tuple[str, int]], mode: str, unlabelled: bool,
               skip_bad: bool):
    self.items, self.mode, self.unlabelled, self.skip_bad = list(items), mode, unlabelled, skip_bad
    self.skipped: set = set()
    self._lock = threading.Lock()

  def _decode(self, i: int) -> Tuple[np.ndarray, int]:
    from PIL import Image
    path, label = self.items[i]
    with Image.open(path) as image:
      pixels = np.asarray(image.convert(self.mode))
    return pixels, 0 if self.unlabelled else label

  def __call__(self, i: int) -> Tuple[np.ndarray, int]:
    n = len(self.items)
    for k in range(n):
      j = (i + k) % n
      try:
        return self._decode(j)
      except Exception as e:  # noqa: BLE001 - a file that does not decode, in one sentence.
        path = self.items[j][0]
        why = (str(e).replace(f" '{path}'", '').splitlines() or [type(e).__name__])[0]
        if not self.skip_bad:
          raise ValueError(f'Cannot decode the image {path} ({why}); replace or remove the '
                           f'file, or pass {SKIP_FLAG} to skip files that do not decode.') from e
        with self._lock:
          new = path not in self.skipped
          self.skipped.add(path)
          count = len(self.skipped)
        if new:
          log.warning('Skipped the image %s (%s): %d bad file(s) skipped so far.', path, why,
                      count)
    raise ValueError(f'No image in this folder decodes (the first: {self.items[i][0]}); replace '
                     'the files.')
