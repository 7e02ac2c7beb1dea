"""Resumable feature statistics: the moments of a generated image set, kept on disk shard by shard.

A FID of 50k samples of a large model is hours of sampling, and preemptible machines get killed.
So `evaluate_fid` cuts each seed set into shards of `shard_size` consecutive seeds, and when a
shard's images have gone through the feature networks it writes what they gave to one `.npz` in
OUT/shards/ — written aside and renamed into place (as `sampling.sample_run` writes its sample
shards), so a shard is there whole or not at all:

  * per network, the count n, the mean and the centred scatter Σ(f − mean)(f − mean)ᵀ in float64
    (`StreamingStats.state`: the sums Σf = n·mean and Σffᵀ = scatter + n·mean·meanᵀ, in the form
    that does not cancel);
  * the pool3 features if KID is asked (it needs them all), the logits if IS is (it shuffles and
    splits the whole set), and the images among the first 100 (the preview grid).

A rerun of the same command skips the shards already there and then merges every shard of a set in
seed order, exactly as an uninterrupted run merges them, so it reports the same numbers (bit for bit
with the same batch size and devices). Memory holds one shard's statistics at a time (plus what KID
and IS need whole). OUT/shards/settings.json records what the statistics depend on; shards made with
other settings are never mixed in: the call refuses, naming what differs. Multi-host: every process
computes the same shard list (process 0 reads the folder and shares what it found) and its part of
each shard; process 0 alone reads and writes the folder.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import numpy as np

from diffjax.runs import files
from diffjax.runs import shards as shards_lib

log = logging.getLogger(__name__)

SHARD_DIR = 'shards'           # OUT/shards/ of an evaluation (OUT = the result JSON without .json)
SETTINGS_FILE = shards_lib.SETTINGS_FILE
DEFAULT_SHARD_SIZE = 5120      # seeds per shard: 10 shards for 50k; a multiple of common batches
FORMAT = 1


def shard_groups(num_images: int, shard_size: int = DEFAULT_SHARD_SIZE) -> list[np.ndarray]:
  """The shards of a seed set of `num_images`: positions [0, S), [S, 2S), … (the last may be short).

  Raises:
    ValueError: a shard size below 1.
  """
  if int(shard_size) < 1:
    raise ValueError(f'--shard_size must be at least 1 image, got {shard_size}.')
  shard_size = int(shard_size)
  return [np.arange(lo, min(lo + shard_size, num_images)) for lo in range(0, num_images, shard_size)]


def shard_name(seeds: Sequence[int]) -> str:
  """shard-<first seed>-<count>-<crc32 of the seeds>.npz: one name per exact list of seeds."""
  seeds = np.asarray(seeds, np.int64)
  return f'shard-{int(seeds[0]):010d}-{len(seeds):06d}-{zlib.crc32(seeds.tobytes()):08x}.npz'


def weights_id(variables: Optional[Mapping[str, Any]]) -> str:
  """A fingerprint of a feature network's weights (crc32 of every array), or 'default' for None
  (the published file, found by the usual search)."""
  if variables is None:
    return 'default'
  crc = 0
  for leaf in jax.tree_util.tree_leaves(variables):
    crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), crc)
  return f'crc32:{crc:08x}'


def reference_id(ref: str, kind: str, split: str) -> dict:
  """What names a FID reference in the settings: a file by its absolute path and a crc32 of its
  bytes (a reference replaced at the same path is another one), a folder by its path, a dataset by
  name:split. Cheap: nothing goes through a network.

  Args:
    ref: as passed (`references.check_reference`'s `ref`).
    kind: what `check_reference` said it is: 'statistics', 'images' or 'dataset'.
    split: the split of a dataset name given without one.
  """
  if kind == 'dataset':
    return {'dataset': ref if ':' in ref else f'{ref}:{split}'}
  path = os.path.abspath(ref)
  if not os.path.isfile(path):
    return {'folder': path}
  crc = 0
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      crc = zlib.crc32(chunk, crc)
  return {'file': path, 'crc32': f'{crc:08x}'}


class FeatureShards:
  """OUT/shards/: one `.npz` per finished shard (a sink's state and its seeds) and the settings they
  were made with. Process 0 only.

  Args:
    directory: the shard folder.
    settings: JSON-able; everything the statistics depend on (model, step, sampler, seeds,
      reference, metrics, feature weights, shard size).
  """

  def __init__(self, directory: files.PathLike, settings: dict):
    self._root = files.path(directory)  # local or a URL (`runs.files`)
    self.dir = os.fspath(self._root)     # as text: it goes into the result JSON
    self.settings = shards_lib.canonical_settings(settings)
    self.done: set[str] = set()

  def open(self) -> list[str]:
    """Checks the settings of earlier shards, removes half-written files, and lists the shards that
    are there and readable.

    Returns:
      Their file names (`shard_name`).

    Raises:
      ValueError: the folder holds shards of other settings (one sentence naming what differs).
      OSError: the folder cannot be made or written.
    """
    shards_lib.open_shard_dir(self._root, self.settings, 'feature statistics')
    for name in shards_lib.shard_names(self._root):
      try:
        with files.read_npz(self._root / name) as z:
          ok = shard_name(z['seeds']) == name
      except Exception as e:  # noqa: BLE001 - an unreadable shard is evaluated again.
        log.warning('Ignoring the unreadable feature shard %s (%s); its seeds are evaluated again.',
                    self._root / name, e)
        continue
      if ok:
        self.done.add(name)
    return sorted(self.done)

  def write(self, seeds: Sequence[int], state: Mapping[str, np.ndarray]) -> None:
    """Writes a shard: the sink state of exactly these seeds."""
    seeds = np.asarray(seeds, np.int64)
    name = shard_name(seeds)
    files.write_whole(self._root / name, lambda f: np.savez(f, seeds=seeds, **state))
    self.done.add(name)

  def read(self, seeds: Sequence[int]) -> dict[str, np.ndarray]:
    """The state written for exactly these seeds.

    Raises:
      OSError: the shard vanished or cannot be read.
    """
    path = self._root / shard_name(seeds)
    try:
      with files.read_npz(path) as z:
        return {k: z[k] for k in z.files if k != 'seeds'}
    except Exception as e:  # noqa: BLE001 - zip, zlib and npy errors alike: evaluate it again.
      self.done.discard(path.name)
      files.remove(path)  # so that the rerun evaluates its seeds again
      raise OSError(f'Cannot read the feature shard {path} ({e}); it was removed: rerun the same '
                    'command to evaluate its seeds again.') from e
