"""The scan before training finds images cut short, cheaply and without refusing good files.

A PNG cut in its pixel data and a JPEG that lost its last bytes have intact headers (Pillow opens
both); the scan reads each file's end, decodes only the files whose end lacks their format's end
marker, and names the cut ones in one sentence. Files with bytes appended after the end marker
(some writers add them) decode fine and must pass. Independent check: Pillow's own full decode of
every file says which are cut short.
"""

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from diffjax.data import folders


def _encoded(fmt, seed):
  buf = io.BytesIO()
  pixels = np.random.RandomState(seed).randint(0, 255, (32, 32, 3), np.uint8)
  Image.fromarray(pixels).save(buf, format=fmt)
  return buf.getvalue()


@pytest.fixture
def files(tmp_path):
  png, jpg = _encoded('PNG', 0), _encoded('JPEG', 1)
  contents = {'good.png': png, 'good.jpg': jpg,
              'padded.png': png + b'\0' * 100, 'padded.jpg': jpg + b'trailing bytes' * 10,
              'cut.png': png[:len(png) * 3 // 4], 'cut.jpg': jpg[:-2]}
  folder = tmp_path / 'train' / 'a'
  folder.mkdir(parents=True)
  paths = {}
  for name, raw in contents.items():
    (folder / name).write_bytes(raw)
    paths[name] = str(folder / name)
  folders._scan.cache_clear()
  yield paths
  folders._scan.cache_clear()


def _decodes(path):
  try:
    with Image.open(path) as image:
      image.load()
    return True
  except OSError:
    return False


def test_the_scan_names_cut_images_and_decodes_only_suspects(files, tmp_path, monkeypatch):
  assert {n for n, p in files.items() if not _decodes(p)} == {'cut.png', 'cut.jpg'}
  for name in ('cut.png', 'cut.jpg'):  # headers intact: a header-only scan would pass them
    with Image.open(files[name]) as image:
      assert image.size == (32, 32)
  loads = []
  real = ImageFile.ImageFile.load
  monkeypatch.setattr(ImageFile.ImageFile, 'load',
                      lambda self: loads.append(os.path.basename(self.filename)) or real(self))
  items = [(p, 0) for p in sorted(files.values())]
  with pytest.raises(ValueError, match=(
      rf'^Cannot decode the image {files["cut.jpg"]} \(image file is truncated.*\) \(2 of 6 files in '
      rf'{tmp_path / "train"} are cut short\); replace or remove the files, or pass '
      r'--config\.data\.skip_bad_images=True to skip files that do not decode\.$')):
    folders.usable_images(str(tmp_path), 'train', items, skip_bad=False, num_threads=2)
  # Decoded: the four files without an end marker at their end, not the two whole ones.
  assert sorted(loads) == ['cut.jpg', 'cut.png', 'padded.jpg', 'padded.png']

  # With skip_bad_images they stay listed, for the reader to skip (each named when read).
  assert folders.usable_images(str(tmp_path), 'train', items, skip_bad=True) == items
  reader = folders.Reader(items, 'RGB', unlabelled=True, skip_bad=True)
  cut = items.index((files['cut.png'], 0))
  assert reader(cut)[0].shape == (32, 32, 3) and reader.skipped == {files['cut.png']}
