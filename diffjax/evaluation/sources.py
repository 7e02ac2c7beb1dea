"""Image sources for evaluation: host-side uint8 batches from arrays, .npz files, image folders
and TFDS datasets (greyscale as one channel; Inception repeats it to RGB)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Optional

import numpy as np

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


# --------------------------------------------------------------------------------------------------------
# Image sources: host-side uint8 batches.


def _check_uint8_images(images: np.ndarray, what: str) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim == 3:  # [N, H, W] greyscale
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'{what} must be images [N, H, W, 1 or 3]; got shape {images.shape}.')
  if images.dtype != np.uint8:
    raise ValueError(
      f'{what} are {images.dtype}; FID reads uint8 images (quantize model output in [-1, 1] with '
      'diffjax.images.to_uint8).'
    )
  return images


def _image_files(folder: str) -> list[str]:
  files = []
  for root, _, names in os.walk(folder):
    files.extend(os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
  return sorted(files)


def _read_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3]: every file as 8-bit RGB, so grey and colour files mix (Inception would repeat a
  grey channel to RGB anyway, so grey files give the same features either way)."""
  from PIL import Image
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'), np.uint8)


@dataclasses.dataclass
class ImageSource:
  """A set of uint8 images read batch by batch.

  Attributes:
    description: what it is, for results and progress bars.
    batches: a function returning a fresh iterator of uint8 [b, H, W, C] batches.
    num_images: the number of images, when known in advance (for the progress bar).
  """

  description: str
  batches: Callable[[], Iterator[np.ndarray]]
  num_images: Optional[int] = None


def array_source(images: np.ndarray, description: str = 'array', batch_size: int = 256) -> ImageSource:
  """An `ImageSource` over uint8 images [N, H, W, C] held in memory."""
  images = _check_uint8_images(images, description)

  def batches():
    for start in range(0, len(images), batch_size):
      yield images[start:start + batch_size]

  return ImageSource(description, batches, len(images))


def file_source(path: str, batch_size: int = 256) -> ImageSource:
  """An `ImageSource` over an `.npz` with `images` (uint8 NHWC) or a folder of image files.

  A folder is searched recursively for PNG/JPEG/BMP/WebP files, read in sorted order and converted to
  8-bit RGB (greyscale too: Inception sees the same input); all images must have one size.

  Raises:
    FileNotFoundError / ValueError: one sentence on what is missing or malformed.
  """
  if os.path.isdir(path):
    files = _image_files(path)
    if not files:
      raise FileNotFoundError(f'No image files ({", ".join(IMAGE_EXTENSIONS)}) in folder {path}.')

    def batches():
      for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = [_read_image(f) for f in chunk]
        for f, image in zip(chunk, images):
          if image.shape != images[0].shape:
            raise ValueError(f'{f} is {image.shape[1]}×{image.shape[0]} and {chunk[0]} '
                             f'{images[0].shape[1]}×{images[0].shape[0]}; FID reads images of one size.')
        yield np.stack(images)

    return ImageSource(path, batches, len(files))
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No images at {path}: pass an .npz with `images` or a folder of PNGs.')
  if not path.endswith('.npz'):
    raise ValueError(f'Cannot read images from {path}: pass an .npz with `images` (uint8 NHWC) or a '
                     'folder of PNG files.')
  with np.load(path) as data:
    # `images` (diffjax's sample.py), else `arr_0` (openai's sample and reference batches).
    key = next((k for k in ('images', 'arr_0') if k in data.files), None)
    if key is None:
      raise ValueError(f'{path} has no `images` array (keys: {", ".join(sorted(data.files))}); an image '
                       '.npz needs uint8 `images` (or openai\'s `arr_0`) [N, H, W, C].')
    images = data[key]
  return array_source(images, path, batch_size)


def dataset_source(name: str, split: str = 'train', data_dir: Optional[str] = None,
                   max_images: Optional[int] = None, batch_size: int = 256) -> ImageSource:
  """An `ImageSource` over a split of a registered dataset, as the model sees it (cropped, resized).

  The split is read once in its stored order, without flips, through `diffjax.data.make_iterator`
  (every process reads all of it; reference statistics are a one-off job).

  Args:
    name: a registered dataset name (`diffjax.data.list_datasets()`).
    split: its split.
    data_dir: the TFDS data directory (None: `$TFDS_DATA_DIR` or ~/tensorflow_datasets).
    max_images: read at most this many (the first ones).
    batch_size: images per read.
  """
  from diffjax import data  # Lazy: tensorflow_datasets loads only when data is read.
  data.get_dataset_spec(name)  # an unknown name fails here, listing the known ones
  if max_images is not None and max_images < 1:
    raise ValueError(f'--max_images must be positive, got {max_images}.')

  def batches():
    it = data.make_iterator(name, split, global_batch_size=batch_size, data_dir=data_dir,
                            shuffle=False, repeat=False, x_flip=False, process_index=0,
                            process_count=1)
    count = 0
    with it:
      for batch in it:
        # The pipeline yields x = u/127.5 − 1 for uint8 u; this inverts it exactly.
        images = np.rint((batch['image'] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        if max_images is not None:
          images = images[:max_images - count]
        count += len(images)
        yield images
        if max_images is not None and count >= max_images:
          return

  return ImageSource(f'{name}:{split}', batches, max_images)
