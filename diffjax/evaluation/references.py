"""FID references (statistics .npz, images, or a dataset name[:split]) and the metrics computed
against them (FID, IS, KID, and EDM2's FD_DINOv2: the Fréchet distance of DINOv2 ViT-L/14 features).

A statistics `.npz` holds Inception's `mu`, `sigma` and, when written with DINOv2 (`reference_statistics(
..., networks=('inception', 'dinov2'))`, `evaluate.py ref --metrics=fid,fd_dinov2`), `dinov2_mu`,
`dinov2_sigma` too. (EDM2's own reference `.pkl` files are pickles and are not read.)"""

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
from diffjax.runs import files

METRICS = ('fid', 'is', 'kid', 'fd_dinov2')
_INCEPTION_METRICS = ('fid', 'is', 'kid')


def feature_networks(metrics: Sequence[str]) -> tuple[str, ...]:
  """The feature networks `metrics` need: ('inception',), ('dinov2',) or both."""
  return (('inception',) if any(m in _INCEPTION_METRICS for m in metrics) else ()) + (
    ('dinov2',) if 'fd_dinov2' in metrics else ())


# --------------------------------------------------------------------------------------------------------
# References.


@dataclasses.dataclass
class Reference:
  """The reference side of a FID/KID evaluation.

  Attributes:
    description: what it is (path or dataset:split).
    stats: the pool3 statistics (None when only DINOv2 was computed).
    pool3: [N, 2048] features when known (needed by KID).
    dinov2: the DINOv2 feature statistics (FD_DINOv2), when known.
  """

  description: str
  stats: Any
  pool3: Optional[np.ndarray] = None
  dinov2: Any = None


def _split_dataset_name(ref: str, split: str) -> tuple[str, str] | None:
  """('cifar10', 'train') for 'cifar10' / 'cifar10:train' if that names a registered dataset."""
  from diffjax import data  # Lazy: tensorflow_datasets loads only when data is read.
  name, _, named_split = ref.partition(':')
  if name in data.list_datasets():
    return name, named_split or split
  return None


def check_reference(ref: str, *, need_features: bool = False, split: str = 'train',
                    need_dinov2: bool = False, need_inception: bool = True) -> str:
  """Checks cheaply (before any sampling) that `ref` can serve as a reference; returns its kind.

  Args:
    need_features: KID (the reference pool3 features); need_dinov2: FD_DINOv2 (DINOv2 statistics);
      need_inception: any Inception metric (`mu`, `sigma`).

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
    if {'mu', 'sigma'} <= keys or {'dinov2_mu', 'dinov2_sigma'} <= keys:
      if need_dinov2 and not {'dinov2_mu', 'dinov2_sigma'} <= keys:
        raise ValueError(
          f'FD_DINOv2 needs DINOv2 statistics, and {ref} has none: pass --ref as images (.npz or '
          'folder), a dataset name, or statistics made with `evaluate.py ref --metrics=fid,fd_dinov2`.')
      if need_inception and not {'mu', 'sigma'} <= keys:
        raise ValueError(f'{ref} holds only DINOv2 statistics; FID/IS/KID need Inception\'s: make it '
                         'with `evaluate.py ref --metrics=fid,fd_dinov2`, or pass images or a dataset.')
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
                   progress: bool = False, networks: Sequence[str] = ('inception',),
                   dinov2_variables: Optional[Mapping[str, Any]] = None) -> Reference:
  """The reference of an evaluation, computing Inception (DINOv2) features where `ref` holds images.

  Args:
    ref: see the module docstring (statistics `.npz`, images `.npz`/folder, dataset[:split]).
    need_features: keep the reference pool3 features (KID).
    split, data_dir: for a dataset name without an explicit split, and where its data lives.
    batch_size, inception_variables, mesh, progress, networks, dinov2_variables: as in
      `source_features`.
  """
  kind = check_reference(ref, need_features=need_features, split=split,
                         need_dinov2='dinov2' in networks, need_inception='inception' in networks)
  if kind == 'statistics':
    with np.load(ref) as data:
      keys = set(data.files)
      pool3 = np.asarray(data['features'], np.float32) if need_features else None
      dinov2 = None
      if {'dinov2_mu', 'dinov2_sigma'} <= keys:
        dinov2 = fid.Statistics(np.asarray(data['dinov2_mu'], np.float64),
                                np.asarray(data['dinov2_sigma'], np.float64),
                                int(data['n']) if 'n' in keys else None)
    stats = fid.load_statistics(ref) if {'mu', 'sigma'} <= keys else None
    return Reference(ref, stats, pool3, dinov2)
  if kind == 'images':
    source = file_source(ref, batch_size)
  else:
    name, named_split = _split_dataset_name(ref, split)
    source = dataset_source(name, named_split, data_dir, batch_size=batch_size)
  features = source_features(source, keep_pool3=need_features, batch_size=batch_size,
                             inception_variables=inception_variables, mesh=mesh, progress=progress,
                             networks=networks, dinov2_variables=dinov2_variables)
  return Reference(source.description, features.stats, features.pool3, features.dinov2)


def save_reference(path: str, stats, features: Optional[np.ndarray] = None, dinov2=None) -> str:
  """Writes statistics as NVlabs/edm's `.npz` (`mu`, `sigma`; plus `n`, `features` if given, and
  `dinov2_mu`, `dinov2_sigma` if DINOv2 statistics are given; `stats` may be None with `dinov2`)."""
  if features is None and dinov2 is None:
    fid.save_statistics(path, stats)
    return path
  arrays = {'n': np.int64((stats or dinov2).n)}
  if stats is not None:
    arrays.update(mu=np.asarray(stats.mu, np.float64), sigma=np.asarray(stats.sigma, np.float64))
  if features is not None:
    arrays['features'] = np.asarray(features, np.float32)
  if dinov2 is not None:
    arrays.update(dinov2_mu=np.asarray(dinov2.mu, np.float64),
                  dinov2_sigma=np.asarray(dinov2.sigma, np.float64))
  files.write_npz(path, **arrays)  # written whole: never a truncated reference file
  return path


def reference_statistics(dataset: str, *, split: str = 'train', data_dir: Optional[str] = None,
                         out: Optional[str] = None, max_images: Optional[int] = None,
                         keep_features: bool = False, batch_size: int = 128,
                         inception_variables: Optional[Mapping[str, Any]] = None, mesh=None,
                         progress: bool = False, networks: Sequence[str] = ('inception',),
                         dinov2_variables: Optional[Mapping[str, Any]] = None):
  """Inception (and DINOv2) statistics of a dataset split, written in NVlabs/edm's reference format.

  The images are those the model trains on (the dataset's crop and resize, no flips), so the numbers
  compare with EDM's published reference files when the dataset matches theirs.

  Args:
    dataset: a registered dataset name.
    split: its split.
    data_dir: the TFDS data directory.
    out: where to write the `.npz` (`mu` [2048], `sigma` [2048, 2048], `n`); None writes nothing.
    max_images: use only the first N images.
    keep_features: also store the pool3 `features` [N, 2048] (float32) in the file, for KID.
    batch_size, inception_variables, mesh, progress, networks, dinov2_variables: as in
      `source_features` (with 'dinov2' the file also holds `dinov2_mu`, `dinov2_sigma`).

  Returns:
    The Inception `Statistics` (with `n`), or the DINOv2 ones if Inception was not run.
  """
  source = dataset_source(dataset, split, data_dir, max_images, batch_size)
  features = source_features(source, keep_pool3=keep_features, batch_size=batch_size,
                             inception_variables=inception_variables, mesh=mesh, progress=progress,
                             networks=networks, dinov2_variables=dinov2_variables)
  if out and parallel.is_main_process():
    save_reference(out, features.stats, features.pool3, features.dinov2)
  return features.stats or features.dinov2


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
    metrics: any of 'fid', 'is', 'kid', 'fd_dinov2' (the Fréchet distance of DINOv2 features).
    is_splits: IS splits (10 is the standard; N must be at least this).
    kid_subset_size, kid_subsets: KID subsets (torch-fidelity's 1000 × 100; the size is capped at N).

  Returns:
    {'fid'} / {'is_mean', 'is_std'} / {'kid_mean', 'kid_std'} / {'fd_dinov2'}, plus 'num_images'.
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
  if 'fd_dinov2' in metrics:
    out['fd_dinov2'] = fid.fid_from_statistics(features.dinov2, reference.dinov2)
  return out
