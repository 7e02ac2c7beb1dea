"""Image folders with bad files or the wrong layout: one sentence naming the file, before training.

Truncated PNGs (an interrupted copy), zero-byte and non-image `.png` files, images directly in
train/, an empty train/: each must be named with what to do, and `skip_bad_images` must leave bad
files out (counted) while every image read is one of the folder's good images.
"""

import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import edm as edm_configs
from diffjax import data
from diffjax.data import folders, sources, specs
from diffjax.training import loop

N = 6


def _folder(root, name):
  """root/name/train/a/{0..N-1}.png: N distinct 8×8 RGB images; returns (root/name, images)."""
  images = {}
  for i in range(N):
    path = os.path.join(root, name, 'train', 'a', f'{i}.png')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.full((8, 8, 3), 40 * i, np.uint8)
    Image.fromarray(pixels).save(path)
    images[path] = pixels
  return os.path.join(root, name), images


@pytest.fixture
def folder(tmp_path):
  specs._image_folder.cache_clear()  # listings are cached per root
  yield lambda name: _folder(str(tmp_path), name)
  specs._image_folder.cache_clear()


def _open(root, skip=False):
  spec = data.get_dataset_spec('image_folder', data_dir=root)
  source, _ = sources._open_random_access(spec, 'train', root, 2, skip_bad_images=skip)
  return source


def _truncate(path):
  """Rewrites `path` as a noisy 32×32 PNG cut short in its pixel data (its header intact)."""
  Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 32, 3), np.uint8)).save(path)
  raw = open(path, 'rb').read()
  open(path, 'wb').write(raw[:len(raw) * 3 // 4])


def test_a_truncated_png_is_named_and_can_be_skipped(folder, caplog):
  root, images = folder('trunc')
  bad = os.path.join(root, 'train', 'a', '3.png')
  _truncate(bad)
  with pytest.raises(ValueError, match=rf'^Cannot decode the image {bad} \(image file is '
                                       r'truncated\); replace or remove the file, or pass '
                                       r'--config\.data\.skip_bad_images=True'):
    _open(root).read(np.arange(N))
  source = _open(root, skip=True)
  with caplog.at_level(logging.WARNING, logger=folders.__name__):
    got, _ = source.read(np.arange(N))
    source.read(np.arange(N))  # a second epoch: the same file, counted once
  skipped = [r.getMessage() for r in caplog.records if 'Skipped' in r.getMessage()]
  assert len(skipped) == 1 and bad in skipped[0] and '1 bad file(s) skipped so far' in skipped[0]
  # Every image read is one of the good files, pixel for pixel (the 8×8 images come back
  # resized to 64×64 by the folder's spec: compare their mean level).
  good_levels = {int(p.mean()) for path, p in images.items() if path != bad}
  assert {int(round(float(g.mean()))) for g in got} <= good_levels
  assert len(got) == N


def test_non_images_are_found_before_training(folder, tmp_path, caplog):
  root, _ = folder('junk')
  empty = os.path.join(root, 'train', 'a', '2.png')
  text = os.path.join(root, 'train', 'a', '4.png')
  open(empty, 'wb').close()
  open(text, 'w').write('not an image')
  with pytest.raises(ValueError) as e:
    _open(root)  # opening reads every header: nothing is decoded yet
  message = str(e.value)
  assert message.startswith((f'{empty} is not an image (an empty file)',
                             f'{text} is not an image (cannot identify image file)'))
  assert f'(2 of {N} files in {os.path.join(root, "train")} are not images)' in message
  assert message.endswith('pass --config.data.skip_bad_images=True to leave such files out.')
  with caplog.at_level(logging.WARNING, logger=folders.__name__):
    source = _open(root, skip=True)
  assert len(source) == N - 2
  assert any(f'Left out 2 of {N} files' in r.getMessage() for r in caplog.records)

  # train.py: refused before the first step: no checkpoint, no config.json.
  c = edm_configs.get_config('tiny')
  c.data.name, c.data.data_dir, c.data.conditional = 'image_folder', root, False
  c.train.batch_size, c.train.num_preview = 4, 0
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match=r'is not an image'):
    loop.train(c, workdir, progress=False)
  assert not os.path.exists(os.path.join(workdir, 'config.json'))
  checkpoints = os.path.join(workdir, 'checkpoints')
  assert not os.path.isdir(checkpoints) or not os.listdir(checkpoints)


def test_wrong_layouts_say_what_is_expected(folder, tmp_path):
  root, _ = folder('flat')
  train = os.path.join(root, 'train')
  for name in os.listdir(os.path.join(train, 'a')):  # images directly in train/
    shutil.move(os.path.join(train, 'a', name), train)
  os.rmdir(os.path.join(train, 'a'))
  with pytest.raises(ValueError, match=rf'^{train} holds {N} image file\(s\) directly \(e\.g\. '
                                       r'0\.png\), but an image folder is laid out as '
                                       r'<root>/train/<class>/<image files>; move them into a '
                                       r'class subfolder'):
    _open(root)
  empty = tmp_path / 'empty'
  (empty / 'train').mkdir(parents=True)
  with pytest.raises(ValueError, match=rf'^{empty}/train holds no images in class subfolders; lay '
                                       r'the images out as <root>/train/<class>/<image files>'):
    _open(str(empty))
  with pytest.raises(ValueError, match=r"has no split 'test'; its splits: train"):
    spec = data.get_dataset_spec('image_folder', data_dir=str(_folder(str(tmp_path), 'ok')[0]))
    sources._open_random_access(spec, 'test', str(tmp_path / 'ok'), 2)
