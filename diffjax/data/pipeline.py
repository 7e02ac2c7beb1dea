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

import concurrent.futures
import dataclasses
import functools
import logging
import os
import queue
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

# Must precede any TensorFlow import: keep its C++ start-up chatter out of training logs.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from diffjax import registry  # noqa: E402
from diffjax.data import digits as digits_lib  # noqa: E402  (registers the 'digits' TFDS builder)

Batch = Dict[str, np.ndarray]

# ------------------------------------------------------------------------------------------------
# Dataset specs.
# ------------------------------------------------------------------------------------------------


class DatasetNotPreparedError(FileNotFoundError):
  """The named dataset is not prepared in the data directory (and is never downloaded implicitly)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What a dataset is and how its examples become model inputs.

  Attributes:
    name: the name configs use (`config.data.name`).
    resolution: side length H = W of the images the pipeline yields.
    channels: C of the images the pipeline yields (1 or 3).
    num_classes: number of label classes; 0 when the data has no labels (then label = 0). None for a
      generic image folder whose classes are only known once the folder is read (see
      `get_dataset_spec(name, data_dir=...)`).
    source: 'tfds' (a TFDS dataset) or 'folder' (`tfds.folder_dataset.ImageFolder` layout).
    tfds_name: the TFDS name with config, e.g. 'cifar10' or 'digits/8x8' (source 'tfds' only).
    splits: the splits the dataset offers, training split first.
    in_memory: hold a whole split in RAM as uint8 (small datasets): always exactly resumable.
    crop: side of the centred square cropped before resizing (CelebA: 140); None crops the largest
      centred square of non-square images.
    resize_filter: Pillow filter for resizing ('bicubic' or 'lanczos'); Pillow antialiases when it
      shrinks.
    label_key: the feature holding the class label; None when there is none.
    prepare_hint: the command that prepares the dataset, shown when it is missing.
    description: one line for listings.
  """

  name: str
  resolution: int
  channels: int
  num_classes: Optional[int]
  source: str = 'tfds'
  tfds_name: Optional[str] = None
  splits: Tuple[str, ...] = ('train', 'test')
  in_memory: bool = False
  crop: Optional[int] = None
  resize_filter: str = 'bicubic'
  label_key: Optional[str] = 'label'
  prepare_hint: str = ''
  description: str = ''

  @property
  def shape(self) -> Tuple[int, int, int]:
    """(H, W, C) of one yielded image."""
    return (self.resolution, self.resolution, self.channels)


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
  """Registers `spec` under its name (kind 'dataset'); returns it."""
  return registry.add('dataset', spec.name, spec)


def register_image_folder(
  name: str,
  resolution: int,
  channels: int = 3,
  num_classes: Optional[int] = None,
  splits: Tuple[str, ...] = ('train',),
  resize_filter: str = 'lanczos',
  description: str = '',
) -> DatasetSpec:
  """Registers a dataset read from a folder laid out as `<root>/<split>/<class>/<image files>`.

  The layout is that of `tfds.folder_dataset.ImageFolder`; classes are the sorted subfolder names.
  Images are cropped to their largest centred square and resized to `resolution` with Pillow.

  Args:
    name: the dataset name.
    resolution: side length of the yielded images.
    channels: 3 (RGB) or 1 (grey); images are converted on load.
    num_classes: the number of classes, 0 for an unconditional set (label 0), None to take the number
      of class subfolders.
    splits: the split subfolders, training split first.
    resize_filter: 'lanczos' (EDM's dataset tool) or 'bicubic'.
    description: one line for listings.
  """
  return register_dataset(
    DatasetSpec(
      name=name,
      resolution=resolution,
      channels=channels,
      num_classes=num_classes,
      source='folder',
      splits=splits,
      resize_filter=resize_filter,
      prepare_hint=f'put the images in <data_dir>/{name}/train/<class>/ (or pass the folder itself)',
      description=description,
    )
  )


def _register_builtin() -> None:
  register_dataset(
    DatasetSpec(
      name='digits',
      resolution=8,
      channels=1,
      num_classes=10,
      tfds_name='digits/8x8',
      in_memory=True,
      description="scikit-learn's 8×8 digits, built in and prepared offline on first use.",
    )
  )
  register_dataset(
    DatasetSpec(
      name='digits16',
      resolution=16,
      channels=1,
      num_classes=10,
      tfds_name='digits/16x16',
      in_memory=True,
      description='The digits upsampled 2× (bilinear) to 16×16.',
    )
  )
  register_dataset(
    DatasetSpec(
      name='cifar10',
      resolution=32,
      channels=3,
      num_classes=10,
      tfds_name='cifar10',
      in_memory=True,
      prepare_hint='tfds build cifar10 --data_dir={data_dir}',
      description='CIFAR-10, 50k train / 10k test, 32×32.',
    )
  )
  register_dataset(
    DatasetSpec(
      name='celeb_a',
      resolution=64,
      channels=3,
      num_classes=0,
      tfds_name='celeb_a',
      splits=('train', 'validation', 'test'),
      crop=140,
      label_key=None,
      prepare_hint='tfds build celeb_a --data_dir={data_dir} --file_format=array_record',
      description='CelebA 218×178, centre crop 140, resized to 64×64 (bicubic, antialiased).',
    )
  )
  register_dataset(
    DatasetSpec(
      name='imagenet64',
      resolution=64,
      channels=3,
      num_classes=1000,
      tfds_name='imagenet_resized/64x64',
      splits=('train', 'validation'),
      prepare_hint='tfds build imagenet_resized/64x64 --data_dir={data_dir} --file_format=array_record',
      description='Class-conditional ImageNet 64×64 (box-resized, Chrabaszcz et al. 2017).',
    )
  )
  register_dataset(
    DatasetSpec(
      name='downsampled_imagenet64',
      resolution=64,
      channels=3,
      num_classes=0,
      tfds_name='downsampled_imagenet/64x64',
      splits=('train', 'validation'),
      label_key=None,
      prepare_hint=(
        'tfds build downsampled_imagenet/64x64 --data_dir={data_dir} --file_format=array_record'
      ),
      description='Unconditional downsampled ImageNet 64×64 (van den Oord et al. 2016; bits/dim).',
    )
  )
  register_image_folder(
    'ffhq64',
    64,
    num_classes=0,
    description='FFHQ at 64×64 from an image folder (EDM: unconditional).',
  )
  register_image_folder(
    'afhqv2_64',
    64,
    num_classes=3,
    description='AFHQv2 (cat/dog/wild) at 64×64 from an image folder.',
  )
  register_image_folder(
    'image_folder',
    64,
    num_classes=None,
    splits=('train', 'test'),
    description='Any <root>/<split>/<class>/ image folder, resized to 64×64.',
  )


_register_builtin()


def list_datasets() -> List[str]:
  """The sorted names of the registered datasets."""
  return registry.names('dataset')


def get_dataset_spec(name: str, data_dir: Optional[str] = None) -> DatasetSpec:
  """The spec of the dataset registered as `name`.

  Args:
    name: a registered dataset name.
    data_dir: only for image folders whose number of classes is read from the folder: where to look.
      When given (or when the default location exists), `num_classes` is filled in.

  Raises:
    registry.UnknownNameError: for an unknown name, listing the known ones.
  """
  spec = registry.get('dataset', name)
  if spec.source == 'folder' and spec.num_classes is None:
    root = _folder_root(spec, data_dir, must_exist=False)
    if root is not None:
      spec = dataclasses.replace(spec, num_classes=len(_image_folder(root)[1]))
  return spec


def resolve_data_dir(data_dir: Optional[str] = None) -> str:
  """`data_dir`, else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets` (user-expanded, absolute)."""
  data_dir = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return os.path.abspath(os.path.expanduser(data_dir))


# ------------------------------------------------------------------------------------------------
# TensorFlow and logging hygiene.
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _tf():
  """Imports TensorFlow once, kept off GPUs (JAX owns the accelerators) and quiet."""
  import tensorflow as tf

  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # Devices already initialised elsewhere; nothing more we can do.
    pass
  tf.get_logger().setLevel('ERROR')
  return tf


class _TfdsNoiseFilter(logging.Filter):
  """Drops TFDS warnings that say nothing actionable here (no OpenCV, an unprepared variant folder:
  the latter ends in our own `DatasetNotPreparedError`)."""

  _PREFIXES = ('OpenCV is not installed', 'Variant folder ')

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._PREFIXES)


def _install_log_filter() -> None:
  logger = logging.getLogger('absl')  # TFDS logs through absl, whose records go to this logger.
  if not any(isinstance(f, _TfdsNoiseFilter) for f in logger.filters):
    logger.addFilter(_TfdsNoiseFilter())


_install_log_filter()


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


def _folder_root(
  spec: DatasetSpec, data_dir: Optional[str], must_exist: bool = True
) -> Optional[str]:
  """The image-folder root of `spec`: data_dir itself, data_dir/NAME or data_dir/downloads/manual/NAME."""
  base = resolve_data_dir(data_dir)
  candidates = [os.path.join(base, spec.name), os.path.join(base, 'downloads', 'manual', spec.name)]
  if data_dir:
    candidates.insert(0, base)
  for root in candidates:
    if os.path.isdir(os.path.join(root, spec.splits[0])):
      return root
  if not must_exist:
    return None
  raise DatasetNotPreparedError(
    f'Image folder for dataset {spec.name!r} not found (looked in {", ".join(candidates)}): lay the '
    f'images out as <root>/{spec.splits[0]}/<class>/<image files> and point --config.data.data_dir '
    'at <root>.'
  )


@functools.lru_cache(maxsize=16)
def _image_folder(root: str) -> Tuple[Dict[str, List[Tuple[str, int]]], List[str]]:
  """Lists an ImageFolder root once: ({split: [(path, label)]}, class names)."""
  _tf()  # ImageFolder lists files through tf.io.gfile.
  builder = tfds.folder_dataset.ImageFolder(root)
  names = list(builder.info.features['label'].names)
  index = {n: i for i, n in enumerate(names)}
  # ImageFolder keeps its deterministic, shuffled example list in `_split_examples`; reading the list
  # (rather than its tf.data stream) gives random access, which exact resume needs.
  examples = {
    split: [(ex.image_path, index[ex.label]) for ex in exs]
    for split, exs in builder._split_examples.items()  # noqa: SLF001
  }
  return examples, names


def _num_threads(num_threads: Optional[int]) -> int:
  return num_threads or min(8, os.cpu_count() or 1)


def _open_random_access(
  spec: DatasetSpec, split: str, data_dir: Optional[str], num_threads: Optional[int] = None
):
  """A random-access source for (spec, split), or None when only streaming is possible.

  Returns:
    (source, builder): source is an `_ArraySource` / `_RecordSource` or None; builder is the TFDS
    builder (None for folders).
  """
  if spec.source == 'folder':
    root = _folder_root(spec, data_dir)
    examples, _ = _image_folder(root)
    _check_split(spec, split, list(examples))
    items = examples[split]
    unlabelled = spec.num_classes == 0
    mode = 'L' if spec.channels == 1 else 'RGB'

    def fetch(i: int) -> Tuple[np.ndarray, int]:
      from PIL import Image

      path, label = items[i]
      with Image.open(path) as image:
        pixels = np.asarray(image.convert(mode))
      return pixels, 0 if unlabelled else label

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
  source, builder = _open_random_access(spec, split, data_dir, num_threads)
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
