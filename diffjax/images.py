"""Image quantization and PNG grids: the formats people look at and evaluators read."""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np


def to_uint8(images) -> np.ndarray:
  """Quantizes images in [-1, 1] to uint8 as EDM does: round(x·127.5 + 127.5), clipped.

  Args:
    images: float array [..., H, W, C] in [-1, 1].

  Returns:
    uint8 array of the same shape.
  """
  x = np.asarray(images, np.float32)
  return np.clip(np.rint(x * 127.5 + 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: Optional[int] = None, pad: int = 1,
              min_size: int = 32) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one uint8 image [rows·H', cols·W', 3].

  Small images (e.g. the 8×8 digits) are enlarged by an integer nearest-neighbour factor so each
  tile is at least `min_size` pixels, which keeps the pixels crisp when viewed.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'make_grid wants images [N, H, W, C]; got shape {images.shape}.')
  n, h, w, c = images.shape
  if c == 1:
    images = np.repeat(images, 3, axis=-1)
  scale = max(1, math.ceil(min_size / max(h, w)))
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  h, w = h * scale, w * scale
  ncols = ncols or max(1, int(math.ceil(math.sqrt(n))))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, np.uint8)
  for k in range(n):
    r, q = divmod(k, ncols)
    y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
    grid[y0:y0 + h, x0:x0 + w] = images[k, ..., :3]
  return grid


def save_grid(images: np.ndarray, path: str, ncols: Optional[int] = None) -> str:
  """Writes uint8 images [N, H, W, C] as one PNG grid at `path`; returns the path."""
  from PIL import Image  # Pillow is only needed when a grid is written.
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(make_grid(images, ncols)).save(path)
  return path
