"""Datasets a config can name: `DatasetSpec`s in the registry (kind 'dataset'), the built-in ones,
image folders, and the data directory."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from typing import Dict, List, Optional, Tuple

# Must precede any TensorFlow import: keep its C++ start-up chatter out of training logs.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import tensorflow_datasets as tfds  # noqa: E402

from diffjax import registry  # noqa: E402

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


_GENERIC = re.compile(r'images(\d+)x\1x([13])(?:_(\d+)classes)?')


def generic_spec(name: str) -> Optional[DatasetSpec]:
  """The spec a generic name gives: 'images256x256x3' (unconditional) or
  'images128x128x3_1000classes', i.e. R×R×C images (C 1 or 3) and K classes. It names a shape
  only: a converted run with no matching dataset (e.g. diffusers' ddpm-celebahq-256) samples
  without any data; training or evaluating on the dataset itself reads an image folder
  <data_dir>/NAME/train/<class>/ (FID: pass a reference, e.g. openai's reference batch). None when
  `name` is not of that form."""
  m = _GENERIC.fullmatch(name)
  if m is None:
    return None
  resolution, channels, classes = int(m[1]), int(m[2]), int(m[3] or 0)
  return DatasetSpec(name=name, resolution=resolution, channels=channels, num_classes=classes,
                     source='folder', splits=('train',), resize_filter='lanczos',
                     prepare_hint=f'put the images in <data_dir>/{name}/train/<class>/',
                     description=f'Any {resolution}×{resolution}×{channels} images, '
                     f'{classes or "no"} classes (a shape, for converted runs).')


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
  if name not in registry.names('dataset') and generic_spec(name) is not None:
    return generic_spec(name)
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
