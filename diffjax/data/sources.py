"""Reading a split: TensorFlow hygiene, per-example preprocessing, random-access sources (arrays,
array_record, image folders), tf.data streaming for TFRecord data, and whole splits as arrays."""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

# Must precede any TensorFlow import: keep its C++ start-up chatter out of training logs.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from diffjax.data import digits as digits_lib  # noqa: E402
from diffjax.data import folders  # noqa: E402
from diffjax.data.specs import (  # noqa: E402
  DatasetNotPreparedError,
  DatasetSpec,
  _folder_root,
  _image_folder,
  _tf,
  get_dataset_spec,
  resolve_data_dir,
)

Batch = Dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------------
# Per-example preprocessing (uint8 in, uint8 out), shared by every reading path.
# ------------------------------------------------------------------------------------------------


def preprocess_image(image: np.ndarray, spec: DatasetSpec) -> np.ndarray:
  """Crops, resizes and converts one image to the spec's shape.

  Args:
    image: uint8 [h, w, c] or [h, w].
    spec: the dataset spec.

  Returns:
    uint8 [resolution, resolution, channels]; the input itself when it already has that shape.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape == spec.shape and image.dtype == np.uint8:
    return image
  from PIL import Image

  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  pil = pil.convert('L' if spec.channels == 1 else 'RGB')
  w, h = pil.size
  side = spec.crop or min(h, w)
  if (side, side) != (h, w):
    top, left = (h - side) // 2, (w - side) // 2
    pil = pil.crop((left, top, left + side, top + side))
  if side != spec.resolution:
    resample = {'bicubic': Image.BICUBIC, 'lanczos': Image.LANCZOS}[spec.resize_filter]
    pil = pil.resize((spec.resolution, spec.resolution), resample=resample)
  out = np.asarray(pil, np.uint8)
  return out[..., None] if out.ndim == 2 else out


def _label_of(example: Dict[str, Any], spec: DatasetSpec) -> int:
  return int(example[spec.label_key]) if spec.label_key else 0


# ------------------------------------------------------------------------------------------------
# Random-access sources.
# ------------------------------------------------------------------------------------------------


class _ArraySource:
  """A split held in memory: uint8 images [N, H, W, C], int32 labels [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]


class _RecordSource:
  """A split read example by example (a TFDS data source or image files), decoded on threads."""

  def __init__(
    self,
    length: int,
    fetch: Callable[[int], Tuple[np.ndarray, int]],
    spec: DatasetSpec,
    num_threads: int,
  ):
    self._length, self._fetch, self._spec = length, fetch, spec
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads))

  def __len__(self) -> int:
    return self._length

  def _one(self, i: int) -> Tuple[np.ndarray, int]:
    image, label = self._fetch(int(i))
    return preprocess_image(image, self._spec), label

  def read(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    items = list(self._pool.map(self._one, indices))  # map keeps the order of `indices`.
    images = (
      np.stack([x for x, _ in items]) if items else np.zeros((0,) + self._spec.shape, np.uint8)
    )
    return images, np.asarray([y for _, y in items], np.int32)


def _prepared_builder(spec: DatasetSpec, data_dir: str):
  """The TFDS builder of `spec`, prepared; the digits are prepared here when missing."""
  if spec.tfds_name.startswith('digits'):
    return digits_lib.prepare_digits(data_dir, config=spec.tfds_name.split('/')[1])
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    hint = spec.prepare_hint.format(data_dir=data_dir) or f'tfds build {spec.tfds_name}'
    raise DatasetNotPreparedError(
      f'Dataset {spec.name!r} (TFDS {spec.tfds_name!r}) is not prepared in {data_dir}: prepare it '
      f'once with `{hint}`, or point --config.data.data_dir (or $TFDS_DATA_DIR) at the directory '
      'that holds it; nothing is downloaded implicitly.'
    )
  return builder


def _check_split(spec: DatasetSpec, split: str, known: Sequence[str]) -> None:
  if split not in known:
    raise ValueError(
      f'Dataset {spec.name!r} has no split {split!r}; its splits: {", ".join(sorted(known))}.'
    )


def _is_array_record(builder) -> bool:
  file_format = getattr(builder.info, 'file_format', None)
  return file_format is not None and 'array_record' in str(
    getattr(file_format, 'value', file_format)
  )


def _num_threads(num_threads: Optional[int]) -> int:
  return num_threads or min(8, os.cpu_count() or 1)


def _open_random_access(
  spec: DatasetSpec,
  split: str,
  data_dir: Optional[str],
  num_threads: Optional[int] = None,
  skip_bad_images: bool = False,
):
  """A random-access source for (spec, split), or None when only streaming is possible.

  An image folder's files are checked up front (`folders.usable_images`); `skip_bad_images`
  leaves out files that are not images, and skips files that fail to decode, counting both.

  Returns:
    (source, builder): source is an `_ArraySource` / `_RecordSource` or None; builder is the TFDS
    builder (None for folders).
  """
  if spec.source == 'folder':
    root = _folder_root(spec, data_dir)
    examples, _ = _image_folder(root)
    if split not in examples:
      folders.check_layout(root, split)
    _check_split(spec, split, list(examples))
    items = folders.usable_images(root, split, tuple(examples[split]), skip_bad_images,
                                  _num_threads(num_threads))
    fetch = folders.Reader(items, 'L' if spec.channels == 1 else 'RGB', spec.num_classes == 0,
                           skip_bad_images)
    return _RecordSource(len(items), fetch, spec, _num_threads(num_threads)), None

  if spec.in_memory:
    images, labels = load_split_as_array(spec.name, split, data_dir)
    return _ArraySource(images, labels), None
  builder = _prepared_builder(spec, resolve_data_dir(data_dir))
  # A mocked builder (`tfds.testing.mock_data`) knows no splits in advance; let it through.
  _check_split(spec, split, list(builder.info.splits.keys()) or [split])
  if not _is_array_record(builder):
    return None, builder
  records = builder.as_data_source(split=split)

  def fetch(i: int) -> Tuple[np.ndarray, int]:
    example = records[i]
    return example['image'], _label_of(example, spec)

  return _RecordSource(len(records), fetch, spec, _num_threads(num_threads)), builder


def _stream_split(
  builder,
  spec: DatasetSpec,
  split: str,
  *,
  batch_size: int,
  shuffle: bool,
  repeat: bool,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  buffer_size: int = 10_000,
) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Streams (uint8 images [b, H, W, C], int32 labels [b]) of this host's shard with tf.data."""
  tf = _tf()
  sub_split = tfds.split_for_jax_process(
    split, process_index=process_index, process_count=process_count
  )
  tf_seed = int(seed % (2**31 - 1))
  read_config = tfds.ReadConfig(shuffle_seed=tf_seed)
  ds = builder.as_dataset(split=sub_split, shuffle_files=shuffle, read_config=read_config)
  image_spec = ds.element_spec['image']
  needs_preprocess = tuple(image_spec.shape) != spec.shape

  def to_pair(example):
    image = example['image']
    if needs_preprocess:
      image = tf.numpy_function(lambda x: preprocess_image(x, spec), [image], tf.uint8)
      image = tf.ensure_shape(image, spec.shape)
    label = (
      tf.cast(example[spec.label_key], tf.int32) if spec.label_key else tf.constant(0, tf.int32)
    )
    return image, label

  if repeat:
    ds = ds.repeat()
  if shuffle:
    ds = ds.shuffle(buffer_size, seed=tf_seed, reshuffle_each_iteration=True)
  ds = ds.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=repeat).prefetch(2)
  for images, labels in tfds.as_numpy(ds):
    yield images, labels


# ------------------------------------------------------------------------------------------------
# Whole splits as arrays (evaluators, small datasets).
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _load_split_cached(
  name: str, split: str, data_dir: str, max_examples: Optional[int]
) -> Tuple[np.ndarray, np.ndarray]:
  spec = get_dataset_spec(name)
  if spec.source == 'folder' or not spec.in_memory:
    source, builder = _open_random_access(spec, split, data_dir)
  else:
    builder = _prepared_builder(spec, data_dir)
    # A mocked builder (`tfds.testing.mock_data`) knows no splits in advance; let it through.
    _check_split(spec, split, list(builder.info.splits.keys()) or [split])
    source = None
    if _is_array_record(builder):
      records = builder.as_data_source(split=split)

      def fetch(i: int) -> Tuple[np.ndarray, int]:
        example = records[i]
        return example['image'], _label_of(example, spec)

      source = _RecordSource(len(records), fetch, spec, _num_threads(None))
  if source is not None:
    n = len(source) if max_examples is None else min(max_examples, len(source))
    images, labels = source.read(np.arange(n))
  else:
    chunks = []
    count = 0
    for chunk in _stream_split(
      builder, spec, split, batch_size=1024, shuffle=False, repeat=False, seed=0
    ):
      chunks.append(chunk)
      count += len(chunk[1])
      if max_examples is not None and count >= max_examples:
        break
    images = np.concatenate([c[0] for c in chunks])[:max_examples]
    labels = np.concatenate([c[1] for c in chunks])[:max_examples]
  images, labels = np.ascontiguousarray(images, np.uint8), labels.astype(np.int32)
  images.flags.writeable = False  # Shared by every caller through the cache.
  labels.flags.writeable = False
  return images, labels


def load_split_as_array(
  name: str,
  split: str = 'train',
  data_dir: Optional[str] = None,
  max_examples: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray]:
  """A whole split in its stored order, preprocessed, as numpy arrays (cached per process).

  Args:
    name: a registered dataset name.
    split: the split, e.g. 'train' or 'test'.
    data_dir: the TFDS data directory (or image-folder root); None: `resolve_data_dir()`.
    max_examples: read at most this many examples (large datasets).

  Returns:
    images: uint8 [N, H, W, C], read-only.
    labels: int32 [N] (zeros for datasets without labels), read-only.
  """
  return _load_split_cached(name, split, resolve_data_dir(data_dir), max_examples)
