"""The input pipeline: TFDS datasets and image folders → per-host numpy batches, exactly resumable.

Every dataset a config can name is a `DatasetSpec` registered in `diffjax.registry` under the kind
`'dataset'`; `get_dataset_spec(name)` returns it, and an unknown name fails with the list of known ones.

Batches. `make_iterator` yields `{'image': float32 [B_local, H, W, C] in [-1, 1], 'label': int32
[B_local]}` with B_local = global_batch_size // process_count. Images are uint8 x mapped to x/127.5 − 1;
datasets without labels give label 0.

Order and exact resume. The training stream is a pure function of (seed, step, process_index,
process_count) whenever the split has random access:

* Global position p = step·B + j (j in [0, B)) is example `perm_e[p mod N]` of the split, where e =
  p div N is the epoch and perm_e a permutation drawn from `RandomState([seed, e])` (NumPy keeps that
  stream frozen, so a checkpoint resumes identically after upgrades). Batches that straddle an epoch
  boundary take the end of one permutation and the start of the next.
* Process k of P reads positions j in [k·B/P, (k+1)·B/P) of every global batch: the processes' batches
  are disjoint slices whose concatenation in process order is exactly the single-process global batch
  (the same even split `tfds.split_for_jax_process` makes, applied to the global order).
* The optional x-flip of position p is a hash of (seed, p), so it too resumes exactly.
* `make_iterator(..., start_step=k)` therefore yields the batches k, k+1, … of an uninterrupted iterator
  without reading the first k: the cost of resuming is one permutation per epoch touched.

Random access exists for (a) small splits held in memory (digits, cifar10: loaded once per process and
cached), (b) TFDS datasets prepared in the array_record format (`tfds build NAME
--file_format=array_record`), read through `tfds.data_source`, and (c) image folders (the files are
listed once, then opened by index). A large TFDS dataset prepared as TFRecord has no random access: it
is streamed with tf.data (`tfds.split_for_jax_process` for the host's shard, a shuffle buffer and file
shuffling seeded by (seed, start_step, process_index)). Its order is then reproducible for a given
(seed, start_step) but a resumed run does *not* repeat the uninterrupted run's order bit for bit; it
continues with a fresh, statistically equivalent shuffle. `BatchIterator.exact_resume` tells which case
applies.

TensorFlow is imported only where tf.data is needed (TFRecord data, image-folder listing); the digits
are written and read without it. When it is imported, it is kept off any GPU and its C++ logging is
quiet.

Data directory: the `data_dir` argument, else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`. Only the
built-in digits are prepared on demand; any other dataset that is missing ends in one sentence that
says how to prepare it — nothing is ever downloaded implicitly.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Dict, Iterator, Optional

# Must precede any TensorFlow import: keep its C++ start-up chatter out of training logs.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import numpy as np  # noqa: E402

from diffjax.data.sources import (  # noqa: E402
  Batch,
  _open_random_access,
  _stream_split,
)
from diffjax.data.specs import DatasetSpec, get_dataset_spec  # noqa: E402

# ------------------------------------------------------------------------------------------------
# The order: positions → examples, flips.
# ------------------------------------------------------------------------------------------------

_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser, elementwise on uint64 (wraps modulo 2^64): a cheap stateless hash."""
  with np.errstate(over='ignore'):  # Wrapping is the point; NumPy warns only for scalars.
    x = np.asarray(x, _U64) + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _seed_words(*values: int) -> np.ndarray:
  """Non-negative ints → uint32 words for `RandomState` (64 bits each, so large seeds stay distinct)."""
  words = []
  for v in values:
    v = int(v) % 2**64
    words += [v & 0xFFFFFFFF, v >> 32]
  return np.asarray(words, np.uint32)


class _Order:
  """Maps global positions to example indices and flip bits (see the module docstring)."""

  def __init__(self, num_examples: int, seed: int, shuffle: bool):
    self.n, self.seed, self.shuffle = num_examples, int(seed), shuffle
    self._perms: Dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) >= 2:  # A batch touches at most two epochs; keep memory at two perms.
        self._perms.pop(min(self._perms))
      rng = np.random.RandomState(_seed_words(self.seed, epoch))
      self._perms[epoch] = rng.permutation(self.n)
    return self._perms[epoch]

  def indices(self, positions: np.ndarray) -> np.ndarray:
    """Example indices [k] of global positions [k]."""
    within = positions % self.n
    if not self.shuffle:
      return within
    epochs = positions // self.n
    out = np.empty_like(within)
    for e in np.unique(epochs):
      mask = epochs == e
      out[mask] = self._perm(int(e))[within[mask]]
    return out

  def flips(self, positions: np.ndarray) -> np.ndarray:
    """x-flip bits (bool [k]) of global positions [k]: a hash of (seed, position)."""
    key = _splitmix64(_U64(self.seed % 2**64) ^ _U64(0x5DEECE66D))
    return (_splitmix64(key ^ positions.astype(_U64)) >> _U64(63)).astype(bool)


def _to_batch(images: np.ndarray, labels: np.ndarray, flips: Optional[np.ndarray]) -> Batch:
  """uint8 [b,H,W,C], int [b], bool [b] → {'image': float32 in [-1, 1], 'label': int32}."""
  if flips is not None and flips.any():
    images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
  return {
    'image': images.astype(np.float32) / np.float32(127.5) - np.float32(1.0),
    'label': np.asarray(labels, np.int32),
  }


# ------------------------------------------------------------------------------------------------
# The iterator.
# ------------------------------------------------------------------------------------------------

_END = object()


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
  """Puts `item` unless `stop` is set first; returns whether it was put."""
  while not stop.is_set():
    try:
      q.put(item, timeout=0.1)
      return True
    except queue.Full:
      continue
  return False


def _produce(batches: Iterator[Batch], q: queue.Queue, stop: threading.Event) -> None:
  """The prefetch thread: batches in order, then `_END`, or the exception that stopped them."""
  try:
    for batch in batches:
      if not _put(q, stop, batch):
        return
    _put(q, stop, _END)
  except BaseException as e:  # noqa: BLE001  Re-raised in the consumer's thread.
    _put(q, stop, e)


class BatchIterator:
  """An iterator of batch dicts with an optional background prefetch thread.

  Attributes:
    spec: the dataset spec.
    step: the index of the batch the next `next()` returns.
    local_batch_size: B_local, the leading dimension of every batch (except a final partial one
      when not repeating).
    exact_resume: True when the order is an exact function of (seed, step, process_index,
      process_count); False for a streamed TFRecord dataset (see the module docstring).
  """

  def __init__(
    self,
    batches: Iterator[Batch],
    *,
    spec: DatasetSpec,
    start_step: int,
    local_batch_size: int,
    exact_resume: bool,
    prefetch: int,
  ):
    self.spec, self.step = spec, start_step
    self.local_batch_size, self.exact_resume = local_batch_size, exact_resume
    self._batches = batches
    self._queue: Optional[queue.Queue] = None
    self._stop = threading.Event()
    if prefetch > 0:
      self._queue = queue.Queue(maxsize=prefetch)
      # The thread gets the queue and the stop flag, not `self`: an abandoned iterator can then be
      # garbage-collected, and its `__del__` stops the thread.
      self._thread = threading.Thread(
        target=_produce, args=(batches, self._queue, self._stop), name='diffjax-data', daemon=True
      )
      self._thread.start()

  def __iter__(self) -> 'BatchIterator':
    return self

  def __next__(self) -> Batch:
    if self._queue is None:
      item = next(self._batches, _END)
    else:
      if self._stop.is_set():
        raise StopIteration
      item = self._queue.get()
    if item is _END:
      self._stop.set()
      raise StopIteration
    if isinstance(item, BaseException):
      self._stop.set()
      raise item
    self.step += 1
    return item

  def close(self) -> None:
    """Stops the prefetch thread (batches already prefetched are dropped)."""
    self._stop.set()

  def __enter__(self) -> 'BatchIterator':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    self._stop.set()


def _random_access_batches(
  source,
  order: _Order,
  *,
  global_batch: int,
  lo: int,
  hi: int,
  start_step: int,
  repeat: bool,
  x_flip: bool,
) -> Iterator[Batch]:
  n = len(source)
  step = start_step
  while True:
    first = step * global_batch
    if not repeat and first >= n:
      return
    positions = np.arange(first + lo, first + hi, dtype=np.int64)
    if not repeat:
      positions = positions[positions < n]  # The final, partial batch of a single pass.
    images, labels = source.read(order.indices(positions))
    yield _to_batch(images, labels, order.flips(positions) if x_flip else None)
    step += 1


def _streamed_batches(
  builder,
  spec: DatasetSpec,
  split: str,
  *,
  global_batch: int,
  local_batch: int,
  seed: int,
  start_step: int,
  process_index: int,
  process_count: int,
  shuffle: bool,
  repeat: bool,
  x_flip: bool,
) -> Iterator[Batch]:
  # Re-seeded by where we start: a resumed run continues with a fresh shuffle (not bit-exact).
  stream_seed = _splitmix64(_splitmix64(_U64(seed % 2**64)) ^ _U64(start_step))
  stream_seed = int(_splitmix64(stream_seed ^ _U64(process_index)) >> _U64(33))
  order = _Order(1, seed, shuffle=False)
  step = start_step
  for images, labels in _stream_split(
    builder,
    spec,
    split,
    batch_size=local_batch,
    shuffle=shuffle,
    repeat=repeat,
    seed=stream_seed,
    process_index=process_index,
    process_count=process_count,
  ):
    first = step * global_batch + process_index * local_batch
    positions = np.arange(first, first + len(labels), dtype=np.int64)
    yield _to_batch(images, labels, order.flips(positions) if x_flip else None)
    step += 1


def make_iterator(
  name: str,
  split: str = 'train',
  global_batch_size: int = 128,
  seed: int = 0,
  start_step: int = 0,
  data_dir: Optional[str] = None,
  x_flip: bool = False,
  process_index: Optional[int] = None,
  process_count: Optional[int] = None,
  *,
  shuffle: bool = True,
  repeat: bool = True,
  prefetch: int = 2,
  num_threads: Optional[int] = None,
  skip_bad_images: bool = False,
) -> BatchIterator:
  """The batches of one host, from step `start_step` on.

  Args:
    name: a registered dataset name (`list_datasets()`).
    split: the split to read.
    global_batch_size: B, the batch summed over all processes; must be divisible by process_count.
    seed: the data seed (order and flips).
    start_step: the index of the first batch to yield; with random access the result equals an
      uninterrupted iterator's batches from that step on, without reading the earlier ones.
    data_dir: the TFDS data directory (or image-folder root); None: `resolve_data_dir()`.
    x_flip: mirror each example horizontally with probability 1/2 (decided by (seed, position)).
    process_index: this host's index; None: `jax.process_index()`.
    process_count: the number of hosts; None: `jax.process_count()`.
    shuffle: shuffle (per-epoch permutations); False reads the split in its stored order.
    repeat: cycle over the split forever; False makes one pass whose last batch may be partial (and,
      with several processes, of unequal local sizes).
    prefetch: batches prepared ahead on a background thread (0: synchronous).
    num_threads: decoding threads for record sources (None: min(8, CPU count)).
    skip_bad_images: an image folder's files that are not images are left out, and files that
      fail to decode are skipped, with a count (`data.folders`); otherwise either is an error
      naming the file (found up front for the former).

  Returns:
    A `BatchIterator` of {'image': float32 [B_local, H, W, C] in [-1, 1], 'label': int32 [B_local]},
    B_local = global_batch_size // process_count.

  Raises:
    registry.UnknownNameError: unknown dataset name.
    DatasetNotPreparedError: the dataset is not prepared (or the image folder is missing).
    ValueError: unknown split, or a batch size that does not split evenly across processes.
  """
  spec = get_dataset_spec(name)
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f'global_batch_size {global_batch_size} must be a positive multiple of the '
      f'process count {process_count}.'
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is outside [0, {process_count}).')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  local = global_batch_size // process_count
  lo = process_index * local
  source, builder = _open_random_access(spec, split, data_dir, num_threads, skip_bad_images)
  if source is not None:
    if len(source) == 0:
      raise ValueError(f'Split {split!r} of dataset {name!r} is empty.')
    order = _Order(len(source), seed, shuffle)
    batches = _random_access_batches(
      source,
      order,
      global_batch=global_batch_size,
      lo=lo,
      hi=lo + local,
      start_step=start_step,
      repeat=repeat,
      x_flip=x_flip,
    )
  else:
    batches = _streamed_batches(
      builder,
      spec,
      split,
      global_batch=global_batch_size,
      local_batch=local,
      seed=seed,
      start_step=start_step,
      process_index=process_index,
      process_count=process_count,
      shuffle=shuffle,
      repeat=repeat,
      x_flip=x_flip,
    )
  return BatchIterator(
    batches,
    spec=spec,
    start_step=start_step,
    local_batch_size=local,
    exact_resume=source is not None,
    prefetch=prefetch,
  )
