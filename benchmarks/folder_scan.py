"""What the image-folder scan before training costs: headers, headers plus file ends, Pillow's
`verify()`, and a full decode, on folders of PNGs.

    python benchmarks/folder_scan.py                        # 2000 PNGs of 32×32 and 500 of 256×256
    python benchmarks/folder_scan.py --num=1000 --size=64   # one folder

`diffjax.data.folders` reads every file's header and its last bytes up front (a whole PNG ends
with IEND, a whole JPEG with EOI) and decodes only files whose end lacks the marker; this measures
that choice against the alternatives, on 8 threads as the scan uses. The files are written fresh
(so they are in the page cache: a cold disk adds a seek per file to every method); each method
is timed three times and the fastest is printed, in milliseconds for the whole folder.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import tempfile
import time

import numpy as np
from PIL import Image


def _header(path):
  with Image.open(path) as image:
    image.size  # noqa: B018 - the header only


def _ends(path):
  _header(path)
  with open(path, 'rb') as f:
    f.seek(-64, os.SEEK_END)
    f.read()


def _verify(path):
  with Image.open(path) as image:
    image.verify()


def _decode(path):
  with Image.open(path) as image:
    image.load()


METHODS = {'header': _header, 'header+ends (diffjax)': _ends, 'verify()': _verify,
           'full decode': _decode}


def measure(num: int, size: int, threads: int = 8) -> dict:
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:size, :size]
  # Smooth with a little noise: compresses like a photograph rather than like pure noise.
  pixels = (np.sin(xx / 7.0)[..., None] * 60 + np.cos(yy / 11.0)[..., None] * 60 + 128
            + rng.integers(0, 20, (size, size, 3))).clip(0, 255).astype(np.uint8)
  with tempfile.TemporaryDirectory() as folder:
    paths = [os.path.join(folder, f'{i:06d}.png') for i in range(num)]
    for path in paths:
      Image.fromarray(pixels).save(path)
    result = {'files': num, 'size': size, 'bytes_per_file': os.path.getsize(paths[0])}
    for name, fn in METHODS.items():
      best = float('inf')
      for _ in range(3):
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
          list(pool.map(fn, paths))
        best = min(best, time.perf_counter() - start)
      result[name] = round(1e3 * best, 1)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--num', type=int)
  parser.add_argument('--size', type=int)
  args = parser.parse_args()
  cases = [(args.num, args.size)] if args.num and args.size else [(2000, 32), (500, 256)]
  for num, size in cases:
    print(measure(num, size), flush=True)


if __name__ == '__main__':
  main()
