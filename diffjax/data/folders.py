"""Image folders that can be trusted: the layout, the files' headers, and bad files found while reading.

An image folder (`specs.register_image_folder`) is laid out as `<root>/<split>/<class>/<image files>`.
A user's folder can be laid out otherwise, or hold files that are not images (a zero-byte file, a
text file named .png) or images cut short by an interrupted copy. Each is found as early as it can
be, and said in one sentence that names the file:

- the layout, when the folder is listed (`check_layout`);
- files that are not images, before training starts: every file's header is read up front
  (`usable_images`; Pillow's `Image.open` reads the header only, so this costs one small read per
  file, on threads);
- a truncated image, whose header is fine, when it is decoded (`Reader`).

With `config.data.skip_bad_images` the run goes on instead: files that are not images are left out
up front, and a file that fails to decode is replaced by the next good one in the folder's order
(the same one every time, so exact resume still holds), each with a warning and a running count.
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


def _header_problem(path: str) -> Optional[str]:
  """Why `path` is not an image, from its header; None for an image."""
  from PIL import Image
  try:
    if os.path.getsize(path) == 0:
      return 'an empty file'
    with Image.open(path) as image:
      image.size  # noqa: B018 - read from the header: an unreadable one raises here
  except Exception as e:  # noqa: BLE001 - any failure to read a header: not an image.
    text = str(e).replace(f" '{path}'", '').strip() or type(e).__name__
    return text.splitlines()[0]
  return None


@functools.lru_cache(maxsize=16)
def _scan(root: str, split: str, paths: Tuple[str, ...], num_threads: int
          ) -> Tuple[Tuple[str, str], ...]:
  """(path, problem) of each file among `paths` that is not an image (cached per folder)."""
  del root, split  # part of the cache key only
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    problems = list(pool.map(_header_problem, paths))
  return tuple((p, why) for p, why in zip(paths, problems) if why is not None)


def usable_images(root: str, split: str, items: Sequence[Tuple[str, int]], skip_bad: bool,
                  num_threads: int = 8) -> List[Tuple[str, int]]:
  """The (path, label) items of `root/split` whose headers are images'.

  Args:
    root, split: the folder (for messages and the cache).
    items: every listed (path, label).
    skip_bad: leave out files that are not images (with a warning and the count) instead of
      raising.
    num_threads: threads reading headers.

  Raises:
    ValueError: a file that is not an image (named, with how many there are), unless `skip_bad`;
      or every file is bad.
  """
  bad = _scan(root, split, tuple(p for p, _ in items), int(num_threads))
  if not bad:
    return list(items)
  folder = os.path.join(root, split)
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
