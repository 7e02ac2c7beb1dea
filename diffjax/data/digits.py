"""A TFDS builder for the 8×8 handwritten digits that scikit-learn ships (the offline default dataset).

`sklearn.datasets.load_digits` bundles 1,797 grey-scale 8×8 images of the digits 0–9 (the test part of
the UCI "Optical Recognition of Handwritten Digits" set, Alpaydin & Kaynak 1998) with integer
intensities 0..16. Because the data comes with scikit-learn, this builder prepares fully offline in
about a second, which makes it the dataset of the quick start and of every test that needs real images.

Conversion: intensity v ∈ {0..16} becomes the uint8 value round(v·255/16) (half up; v = 8 → 128), so 0 is
black, 16 is white. The `16x16` config upsamples each image 2× with bilinear interpolation (half-pixel
centres, edges clamped) on the same 0..255 scale, then rounds.

Splits (fixed and stratified, identical for both configs): for each class c in order 0..9 the row indices
of class c are shuffled with one `numpy.random.RandomState(0)` (whose stream NumPy keeps frozen) and the
first round(0.2·n_c) go to `test`, the rest to `train`: 1,438 train and 359 test examples. Each example
records its scikit-learn row as `index`, so the prepared data can be compared with `load_digits()`.

The examples are written as PNG bytes encoded with Pillow in the array_record format: preparing and
reading (`tfds.data_source`) then never import TensorFlow (~6 s), and the data supports random access,
which the input pipeline uses for exactly resumable order.

Usage:
  >>> builder = prepare_digits('/tmp/tfds')             # no-op when already prepared
  >>> source = builder.as_data_source(split='train')   # random access, no TensorFlow
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Dict, Iterator, Tuple

import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0

_CITATION = """\
@misc{alpaydin1998optdigits,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49}
}"""


def load_sklearn_digits(resolution: int = 8) -> Tuple[np.ndarray, np.ndarray]:
  """The scikit-learn digits as uint8 images, in scikit-learn's row order.

  Args:
    resolution: 8 (native) or 16 (2× bilinear upsampling).

  Returns:
    images: uint8 [1797, resolution, resolution, 1], values round(v·255/16) for v in 0..16.
    labels: int64 [1797], the digit 0..9.
  """
  from sklearn.datasets import load_digits  # Deferred: only preparing needs scikit-learn.

  bunch = load_digits()
  values = np.asarray(bunch.images, np.float64) * (255.0 / 16.0)  # [1797, 8, 8] in [0, 255].
  if resolution == 16:
    values = _upsample2_bilinear(values)
  elif resolution != 8:
    raise ValueError(f'digits come at resolution 8 or 16, not {resolution}.')
  # floor(x + 0.5) rounds half up explicitly (v = 8 gives 127.5 → 128) rather than to even.
  images = np.floor(values + 0.5).clip(0, 255).astype(np.uint8)[..., None]
  return images, np.asarray(bunch.target, np.int64)


def split_indices(labels: np.ndarray) -> Dict[str, np.ndarray]:
  """The fixed stratified train/test split of the digits (see the module docstring).

  Args:
    labels: int [N], the class of each scikit-learn row.

  Returns:
    {'train': int64 [N_train], 'test': int64 [N_test]}: sorted scikit-learn row indices.
  """
  rng = np.random.RandomState(SPLIT_SEED)
  test = []
  for c in range(NUM_CLASSES):
    rows = np.flatnonzero(labels == c)
    rng.shuffle(rows)
    test.append(rows[: int(round(TEST_FRACTION * len(rows)))])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return {'train': train.astype(np.int64), 'test': test.astype(np.int64)}


def _upsample2_bilinear(x: np.ndarray) -> np.ndarray:
  """2× bilinear upsampling of [N, H, W] with half-pixel centres and clamped edges → [N, 2H, 2W]."""
  for axis in (1, 2):
    n = x.shape[axis]
    # Output pixel j sits at input coordinate j/2 − 1/4: weights 3/4 and 1/4 on its two neighbours.
    near = np.repeat(np.arange(n), 2)
    far = np.clip(near + np.tile([-1, 1], n), 0, n - 1)
    x = 0.75 * np.take(x, near, axis=axis) + 0.25 * np.take(x, far, axis=axis)
  return x


def _png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 1] → PNG bytes (Pillow, so that preparing never imports TensorFlow)."""
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(image[..., 0], mode='L').save(buffer, format='PNG')
  return buffer.getvalue()


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
  """A digits variant: the side length of the stored images."""

  resolution: int = 8


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes), prepared offline."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: stratified 80/20 split with seed 0.'}
  BUILDER_CONFIGS = [
    DigitsConfig(name='8x8', description='Native 8×8 images.', resolution=8),
    DigitsConfig(name='16x16', description='2× bilinear upsampling to 16×16.', resolution=16),
  ]
  DEFAULT_CONFIG_NAME = '8x8'

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    return tfds.core.DatasetInfo(
      builder=self,
      description="scikit-learn's 8×8 handwritten digits (UCI optdigits test part), 10 classes.",
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(r, r, 1)),
          'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
          'index': tfds.features.Scalar(
            dtype=np.int32, doc='Row in sklearn.datasets.load_digits().'
          ),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html',
      citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data comes with scikit-learn.
    images, labels = load_sklearn_digits(self.builder_config.resolution)
    splits = split_indices(labels)
    return {name: self._generate_examples(images, labels, rows) for name, rows in splits.items()}

  def _generate_examples(self, images, labels, rows) -> Iterator[Tuple[int, dict]]:
    for i in rows:
      yield int(i), {'image': _png(images[i]), 'label': int(labels[i]), 'index': int(i)}


def prepare_digits(data_dir: str, config: str = '8x8') -> tfds.core.DatasetBuilder:
  """Prepares the digits into `data_dir` unless they are there already, and returns the builder.

  Safe when several processes race: TFDS writes into a temporary folder and renames it, and a loser
  of the race re-checks the folder instead of failing.

  Args:
    data_dir: the TFDS data directory (the builder writes `data_dir/digits/<config>/1.0.0`).
    config: '8x8' or '16x16'.
  """
  builder = tfds.builder(f'digits/{config}', data_dir=data_dir, file_format='array_record')
  if builder.is_prepared():
    return builder
  os.makedirs(data_dir, exist_ok=True)
  download_dir = os.path.join(data_dir, 'downloads')
  # A second of work needs no progress bars; TFDS keeps the switch in a module global, so restore it.
  from tensorflow_datasets.core.utils import tqdm_utils

  was_active = getattr(tqdm_utils, '_active', True)
  tfds.disable_progress_bar()
  try:
    builder.download_and_prepare(download_dir=download_dir)
  except Exception:  # Another process may have finished first; only then is the error harmless.
    builder = tfds.builder(f'digits/{config}', data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():
      raise
  finally:
    tfds.display_progress_bar(was_active)
  return builder
