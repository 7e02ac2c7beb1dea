"""A CPU-scale evaluator for the 8x8 digits quickstart: a small CNN classifier and its feature space.

Inception at 299x299 is meaningless (and slow) for 8x8 greyscale digits, so the digits runs report:

* `fd`: the Fréchet distance between generated images and the digits *train* split in the penultimate
  feature space of a small CNN trained on that split (the FID recipe with a domain-appropriate network);
* `accuracy`: how often the classifier recognizes the class a class-conditional sample was asked for;
* `confidence`: the classifier's mean max-probability (a crude sharpness measure, for unconditional runs).

The classifier's weights and the train/test feature statistics are committed in
`assets/digits_classifier.npz`, made by `scripts/train_digits_classifier.py` (seconds on a CPU).

Data: scikit-learn's bundled digits (1797 images of 8x8 pixels with values 0..16), scaled to uint8 by
round(v * 255 / 16) (half up), in the fixed stratified split of the project's TFDS `digits` dataset: 1438
train and 359 test images (see `digits_split_indices`).
"""

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffjax.evaluation.fid import Statistics, frechet_distance, load_statistics

__all__ = [
  'DIGITS_CLASSIFIER_PATH',
  'DigitsClassifier',
  'digits_features',
  'digits_logits',
  'digits_metrics',
  'digits_reference_statistics',
  'digits_split_indices',
  'load_digits_classifier',
  'load_digits_split',
]

DIGITS_CLASSIFIER_PATH = os.path.join(os.path.dirname(__file__), 'assets', 'digits_classifier.npz')
SPLIT_SEED = 0
TEST_FRACTION = 0.2
_BATCH = 512  # inputs are padded to a multiple of this, so any N reuses one compiled function


# --------------------------------------------------------------------------------------------------------
# Data.


def digits_split_indices(split: str) -> np.ndarray:
  """Sorted row indices into `sklearn.datasets.load_digits()` of the 'train' (1438) or 'test' (359) split.

  The split of the project's TFDS `digits` dataset (`diffjax/data/digits.py`), restated here so the
  evaluator needs neither TFDS nor a prepared dataset: for each class c = 0..9 in order, the rows of class c
  are shuffled by one shared `np.random.RandomState(0)` and the first round(0.2 * n_c) go to 'test'.
  """
  from sklearn.datasets import load_digits  # noqa: PLC0415 - only needed for the data, not the metric

  if split not in ('train', 'test'):
    raise ValueError(f"Unknown digits split {split!r}; known: 'train', 'test'.")
  labels = load_digits().target
  rng = np.random.RandomState(SPLIT_SEED)
  test = []
  for c in range(10):
    rows = np.flatnonzero(labels == c)
    rng.shuffle(rows)
    test.append(rows[: int(round(TEST_FRACTION * len(rows)))])
  test = np.sort(np.concatenate(test))
  if split == 'test':
    return test
  return np.setdiff1d(np.arange(len(labels)), test)


def load_digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The digits images and labels of a split, without TFDS (equal to the TFDS `digits` 8x8 split).

  Returns:
    (images [N, 8, 8, 1] uint8 = round(v * 255 / 16), labels [N] int32).
  """
  from sklearn.datasets import load_digits  # noqa: PLC0415

  data = load_digits()
  idx = digits_split_indices(split)
  # floor(x + 0.5): round half up (v = 8 -> 127.5 -> 128), as the TFDS builder does.
  images = np.floor(data.images[idx] * (255.0 / 16.0) + 0.5).astype(np.uint8)[..., None]
  return images, data.target[idx].astype(np.int32)


# --------------------------------------------------------------------------------------------------------
# The network.


class DigitsClassifier(nn.Module):
  """Conv(32) -> Conv(64) -> avg pool 2 -> Conv(64) -> Dense(feature_dim) = features -> Dense(10).

  Attributes:
    feature_dim: width of the penultimate (feature) layer.
    num_classes: 10.
  """

  feature_dim: int = 64
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Classifies images.

    Args:
      x: [B, 8, 8, 1] float in [-1, 1] (see `_to_input`).
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      (features [B, feature_dim] after ReLU, logits [B, num_classes]).
    """
    x = nn.relu(nn.Conv(32, (3, 3), name='conv1')(x))
    x = nn.relu(nn.Conv(64, (3, 3), name='conv2')(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # 4x4
    x = nn.relu(nn.Conv(64, (3, 3), name='conv3')(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(0.3, deterministic=not train)(x)
    features = nn.relu(nn.Dense(self.feature_dim, name='features')(x))
    logits = nn.Dense(self.num_classes, name='logits')(
      nn.Dropout(0.3, deterministic=not train)(features)
    )
    return features, logits


def _to_input(images_uint8: Any) -> jax.Array:
  """uint8 [N, 8, 8(, 1)] -> float [N, 8, 8, 1] in [-1, 1], the project's data range."""
  return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


def _check_images(images: Any) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[1:] != (8, 8, 1):
    raise ValueError(
      f'The digits evaluator takes [N, 8, 8, 1] (or [N, 8, 8]) images, got shape {images.shape}.'
    )
  if images.dtype != np.uint8:
    raise ValueError(
      f'The digits evaluator takes uint8 images, got {images.dtype}; convert model output in [-1, 1] with '
      'diffjax.evaluation.quantize_images first.'
    )
  return images


# --------------------------------------------------------------------------------------------------------
# Weights and statistics.


def save_digits_classifier(
  path: str, variables: Mapping[str, Any], extra: Mapping[str, np.ndarray]
) -> None:
  """Writes weights (flattened with '/') and extra arrays (e.g. 'stats/train/mu') into one `.npz`."""
  flat = {
    '/'.join(k): np.asarray(v, np.float32)
    for k, v in traverse_util.flatten_dict(dict(variables)).items()
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez_compressed(path, **flat, **{k: np.asarray(v) for k, v in extra.items()})


@functools.cache
def _load_asset(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'Digits classifier weights not found at {path}; run `python scripts/train_digits_classifier.py`.'
    )
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def load_digits_classifier(path: str | None = None) -> dict[str, Any]:
  """The classifier's Flax variables ({'params': ...}) from the committed asset (or `path`)."""
  asset = _load_asset(os.fspath(path or DIGITS_CLASSIFIER_PATH))
  flat = {tuple(k.split('/')): v for k, v in asset.items() if k.startswith('params/')}
  return traverse_util.unflatten_dict(flat)


def digits_reference_statistics(split: str = 'train', path: str | None = None) -> Statistics:
  """Feature statistics of a digits split, stored with the weights (so they always match them)."""
  asset = _load_asset(os.fspath(path or DIGITS_CLASSIFIER_PATH))
  if f'stats/{split}/mu' not in asset:
    raise ValueError(f"No stored statistics for digits split {split!r}; known: 'train', 'test'.")
  return Statistics(
    asset[f'stats/{split}/mu'], asset[f'stats/{split}/sigma'], int(asset[f'stats/{split}/n'])
  )


@functools.cache
def _apply_fn(feature_dim: int):
  model = DigitsClassifier(feature_dim=feature_dim)
  return jax.jit(lambda variables, x: model.apply(variables, _to_input(x)))


def _run(images: Any, variables: Mapping[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
  images = _check_images(images)
  variables = load_digits_classifier() if variables is None else variables
  fn = _apply_fn(int(variables['params']['features']['kernel'].shape[-1]))
  n = images.shape[0]
  padded = -(-max(n, 1) // _BATCH) * _BATCH
  images = np.concatenate([images, np.zeros((padded - n, 8, 8, 1), np.uint8)])
  feats, logits = [], []
  for i in range(0, padded, _BATCH):
    f, z = fn(variables, images[i : i + _BATCH])
    feats.append(np.asarray(f))
    logits.append(np.asarray(z))
  return np.concatenate(feats)[:n], np.concatenate(logits)[:n]


def digits_features(images_uint8: Any, variables: Mapping[str, Any] | None = None) -> np.ndarray:
  """Penultimate-layer features.

  Args:
    images_uint8: [N, 8, 8, 1] (or [N, 8, 8]) uint8.
    variables: classifier variables; None uses the committed ones.

  Returns:
    [N, F] float32 (F = 64).
  """
  return _run(images_uint8, variables)[0]


def digits_logits(images_uint8: Any, variables: Mapping[str, Any] | None = None) -> np.ndarray:
  """Class logits [N, 10] float32 of [N, 8, 8, 1] uint8 images (see `digits_features`)."""
  return _run(images_uint8, variables)[1]


def digits_metrics(
  images_uint8: Any,
  labels: Any = None,
  reference: str | Statistics = 'train',
  variables: Mapping[str, Any] | None = None,
) -> dict[str, float]:
  """The digits quickstart's evaluation of a set of (generated) images.

  Args:
    images_uint8: [N, 8, 8, 1] (or [N, 8, 8]) uint8, N >= 2.
    labels: optional [N] int, the classes the samples were conditioned on.
    reference: 'train' / 'test' (stored split statistics), a `Statistics`, or a path to a `.npz` of them.
    variables: classifier variables; None uses the committed ones.

  Returns:
    {'fd': Fréchet distance to the reference in classifier feature space, 'confidence': mean max-prob,
     'accuracy': fraction of argmax == labels (only if labels are given), 'num_images': N}.
  """
  features, logits = _run(images_uint8, variables)
  if features.shape[0] < 2:
    raise ValueError('digits_metrics needs at least 2 images.')
  if isinstance(reference, Statistics):
    ref = reference
  elif reference in ('train', 'test'):
    ref = digits_reference_statistics(reference)
  else:
    ref = load_statistics(reference)
  f = features.astype(np.float64)
  fd = frechet_distance(f.mean(0), np.cov(f, rowvar=False), ref.mu, ref.sigma)
  z = logits.astype(np.float64)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  out = {'fd': fd, 'confidence': float(p.max(1).mean()), 'num_images': int(features.shape[0])}
  if labels is not None:
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != features.shape[0]:
      raise ValueError(f'{labels.shape[0]} labels for {features.shape[0]} images.')
    out['accuracy'] = float(np.mean(np.argmax(z, 1) == labels))
  return out
