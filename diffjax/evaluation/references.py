"""FID references (statistics .npz, images, or a dataset name[:split]) and the metrics computed
against them (FID, IS, KID)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from diffjax import parallel
from diffjax.evaluation import fid
from diffjax.evaluation.features import Features, source_features
from diffjax.evaluation.sources import dataset_source, file_source

METRICS = ('fid', 'is', 'kid')


# --------------------------------------------------------------------------------------------------------
# References.


@dataclasses.dataclass
class Reference:
  """The reference side of a FID/KID evaluation.

  Attributes:
    description: what it is (path or dataset:split).
    stats: the pool3 statistics.
    pool3: [N, 2048] features when known (needed by KID).
  """

  description: str
  stats: Any
  pool3: Optional[np.ndarray] = None


def _split_dataset_name(ref: str, split: str) -> tuple[str, str] | None:
  """('cifar10', 'train') for 'cifar10' / 'cifar10:train' if that names a registered dataset."""
  from diffjax import data  # Lazy: tensorflow_datasets loads only when data is read.
  name, _, named_split = ref.partition(':')
  if name in data.list_datasets():
    return name, named_split or split
  return None


def check_reference(ref: str, *, need_features: bool = False, split: str = 'train') -> str:
  """Checks cheaply (before any sampling) that `ref` can serve as a reference; returns its kind.

  Returns:
    'statistics', 'images' or 'dataset'.

  Raises:
    FileNotFoundError / ValueError: one sentence saying what `ref` may be.
  """
  if not ref:
    raise ValueError('Pass --ref: reference statistics (.npz from `evaluate.py ref`), images '
                     '(.npz or folder) or a dataset name.')
  if os.path.isdir(ref):
    return 'images'
  if os.path.isfile(ref):
    if not ref.endswith('.npz'):
      raise ValueError(f'Cannot read reference {ref}: pass an .npz (statistics or images), a folder of '
                       'images or a dataset name.')
    with np.load(ref) as data:
      keys = set(data.files)
    if {'mu', 'sigma'} <= keys:
      if need_features and 'features' not in keys:
        raise ValueError(
          f'KID needs the reference features, and {ref} holds only mu/sigma: pass --ref as images '
          '(.npz or folder), a dataset name, or statistics made with `evaluate.py ref --features`.'
        )
      return 'statistics'
    if 'images' in keys or 'arr_0' in keys:  # ours, or an openai reference batch of images
      return 'images'
    raise ValueError(f'{ref} has neither `mu`/`sigma` (statistics) nor `images` / `arr_0` (keys: '
                     f'{", ".join(sorted(keys))}).')
  if _split_dataset_name(ref, split) is not None:
    return 'dataset'
  from diffjax import data  # Lazy: tensorflow_datasets loads only when data is read.
  raise FileNotFoundError(
    f'No reference at {ref}: pass statistics made with `evaluate.py ref --dataset=... --out={ref}`, '
    f'an .npz or folder of images, or a dataset name ({", ".join(data.list_datasets())}).'
  )


def load_reference(ref: str, *, need_features: bool = False, split: str = 'train',
                   data_dir: Optional[str] = None, batch_size: int = 128,
                   inception_variables: Optional[Mapping[str, Any]] = None, mesh=None,
                   progress: bool = False) -> Reference:
  """The reference of an evaluation, computing Inception features where `ref` holds images.

  Args:
    ref: see the module docstring (statistics `.npz`, images `.npz`/folder, dataset[:split]).
    need_features: keep the reference pool3 features (KID).
    split, data_dir: for a dataset name without an explicit split, and where its data lives.
    batch_size, inception_variables, mesh, progress: as in `source_features`.
  """
  kind = check_reference(ref, need_features=need_features, split=split)
  if kind == 'statistics':
    stats = fid.load_statistics(ref)
    pool3 = None
    if need_features:
      with np.load(ref) as data:
        pool3 = np.asarray(data['features'], np.float32)
    return Reference(ref, stats, pool3)
  if kind == 'images':
    source = file_source(ref, batch_size)
  else:
    name, named_split = _split_dataset_name(ref, split)
    source = dataset_source(name, named_split, data_dir, batch_size=batch_size)
  features = source_features(source, keep_pool3=need_features, batch_size=batch_size,
                             inception_variables=inception_variables, mesh=mesh, progress=progress)
  return Reference(source.description, features.stats, features.pool3)


def save_reference(path: str, stats, features: Optional[np.ndarray] = None) -> str:
  """Writes statistics as NVlabs/edm's `.npz` (`mu`, `sigma`; plus `n`, and `features` if given)."""
  if features is None:
    fid.save_statistics(path, stats)
    return path
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp.npz'  # written whole, then renamed: never a truncated reference file
  np.savez(tmp, mu=np.asarray(stats.mu, np.float64), sigma=np.asarray(stats.sigma, np.float64),
           n=np.int64(stats.n), features=np.asarray(features, np.float32))
  os.replace(tmp, path)
  return path


def reference_statistics(dataset: str, *, split: str = 'train', data_dir: Optional[str] = None,
                         out: Optional[str] = None, max_images: Optional[int] = None,
                         keep_features: bool = False, batch_size: int = 128,
                         inception_variables: Optional[Mapping[str, Any]] = None, mesh=None,
                         progress: bool = False):
  """Inception statistics of a dataset split, written in NVlabs/edm's reference format.

  The images are those the model trains on (the dataset's crop and resize, no flips), so the numbers
  compare with EDM's published reference files when the dataset matches theirs.

  Args:
    dataset: a registered dataset name.
    split: its split.
    data_dir: the TFDS data directory.
    out: where to write the `.npz` (`mu` [2048], `sigma` [2048, 2048], `n`); None writes nothing.
    max_images: use only the first N images.
    keep_features: also store the pool3 `features` [N, 2048] (float32) in the file, for KID.
    batch_size, inception_variables, mesh, progress: as in `source_features`.

  Returns:
    The `Statistics` (with `n`).
  """
  source = dataset_source(dataset, split, data_dir, max_images, batch_size)
  features = source_features(source, keep_pool3=keep_features, batch_size=batch_size,
                             inception_variables=inception_variables, mesh=mesh, progress=progress)
  if out and parallel.is_main_process():
    save_reference(out, features.stats, features.pool3)
  return features.stats


# --------------------------------------------------------------------------------------------------------
# Metrics.


def parse_metrics(metrics: Sequence[str] | str) -> tuple[str, ...]:
  """('fid', 'kid') from 'fid,kid' or a list; unknown names fail listing the known ones."""
  if isinstance(metrics, str):
    metrics = [m for m in metrics.replace(' ', '').split(',') if m]
  metrics = tuple(dict.fromkeys(m.lower() for m in metrics))
  unknown = [m for m in metrics if m not in METRICS]
  if unknown or not metrics:
    raise ValueError(f'Unknown metric(s) {", ".join(unknown) or "(none)"}; known: {", ".join(METRICS)}.')
  return metrics


def compute_metrics(features: Features, reference: Reference, metrics: Sequence[str] = ('fid',), *,
                    is_splits: int = 10, kid_subset_size: int = 1000,
                    kid_subsets: int = 100) -> dict:
  """FID (and IS, KID) of a feature set against a reference.

  Args:
    features: of the evaluated images (with `logits` for IS, `pool3` for KID).
    reference: with `pool3` for KID.
    metrics: any of 'fid', 'is', 'kid'.
    is_splits: IS splits (10 is the standard; N must be at least this).
    kid_subset_size, kid_subsets: KID subsets (torch-fidelity's 1000 × 100; the size is capped at N).

  Returns:
    {'fid'} / {'is_mean', 'is_std'} / {'kid_mean', 'kid_std'}, plus 'num_images'.
  """
  out = {'num_images': features.num_images}
  if 'fid' in metrics:
    out['fid'] = fid.fid_from_statistics(features.stats, reference.stats)
  if 'is' in metrics:
    if features.num_images < is_splits:
      raise ValueError(f'The Inception Score uses {is_splits} splits and needs at least that many '
                       f'images; got {features.num_images}.')
    out['is_mean'], out['is_std'] = fid.inception_score(features.logits, splits=is_splits)
  if 'kid' in metrics:
    out['kid_mean'], out['kid_std'] = fid.kernel_inception_distance(
      features.pool3, reference.pool3, num_subsets=kid_subsets, subset_size=kid_subset_size)
  return out
