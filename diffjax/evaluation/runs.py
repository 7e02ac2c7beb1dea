"""Evaluating trained runs and image sets: FID / IS / KID with Inception, reference statistics, digits.

What `evaluate.py` calls; every function here is usable (and tested) from Python.

    stats = reference_statistics('cifar10', out='refs/cifar10-train.npz')       # evaluate.py ref
    result = evaluate_fid('runs/cifar10', 'refs/cifar10-train.npz', num_images=50_000,
                          protocol='edm3')                                      # evaluate.py fid
    result = evaluate_images('samples.npz', 'refs/cifar10-train.npz')           # evaluate.py fid --images

Images reach Inception as uint8 NHWC. Generated images are quantized as EDM writes its PNGs,
round(x·127.5 + 127.5) clipped (REFERENCE §6), on device, so sampling → quantize → Inception → feature
moments never leaves the accelerators: each batch is sharded over every device, and `StreamingStats`
sums the per-device moments (float64 on the host), so 50k images never sit in memory. Greyscale images
(1 channel, e.g. the digits) are fed to Inception with the grey channel repeated to RGB — the same as
converting a greyscale PNG to RGB — so a folder of grey PNGs and the same images as an array agree.

The reference (`ref=`) of a FID evaluation may be
  * an `.npz` of statistics with `mu`, `sigma` (ours or NVlabs/edm's published files); written by
    `reference_statistics(..., keep_features=True)` it also holds the pool3 `features`, which KID needs;
  * an `.npz` with `images` (uint8 [N, H, W, C]) or a folder of PNG/JPEG files (searched recursively);
  * a registered dataset name, optionally with a split: 'cifar10' (train split) or 'digits:test'.
KID needs reference *features*, so it works with every form except a statistics-only `.npz`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import numpy as np

from diffjax import build, images as images_lib, sampling

METRICS = ('fid', 'is', 'kid')
PROTOCOLS = ('edm3',)
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
_PREVIEW = 100  # images in the PNG grid written next to a result


# --------------------------------------------------------------------------------------------------------
# Inception.


@functools.lru_cache(maxsize=2)
def load_inception(path: Optional[str] = None) -> dict:
  """The FID Inception weights as Flax variables (cached per path; reading 95 MB takes seconds).

  Args:
    path: the published `.pth`; None searches the default places (`find_inception_weights`, whose
      error says where to put the file).
  """
  from diffjax.evaluation import inception
  return inception.load_inception_params(path)


_INCEPTION_FNS: dict = {}


def _inception_fn(variables: Optional[Mapping[str, Any]], outputs: tuple[str, ...], mesh) -> Callable:
  """A data-parallel Inception feature function, built once per (weights, outputs, mesh).

  Rebuilding `make_inception_fn` would make a new jit and recompile the network (tens of seconds on a
  CPU), so evaluations in one process share it. The variables are kept in the cache entry so their id
  cannot be reused by another object.
  """
  from diffjax.evaluation import inception
  if variables is None:
    variables = load_inception()
  key = (id(variables), outputs, mesh)
  if key not in _INCEPTION_FNS:
    if len(_INCEPTION_FNS) >= 4:
      _INCEPTION_FNS.pop(next(iter(_INCEPTION_FNS)))
    fn = inception.make_inception_fn(variables, outputs=outputs, mesh=mesh)
    _INCEPTION_FNS[key] = (variables, fn)
  return _INCEPTION_FNS[key][1]


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
    if 'images' not in data.files:
      raise ValueError(f'{path} has no `images` array (keys: {", ".join(sorted(data.files))}); an image '
                       '.npz needs uint8 `images` [N, H, W, C].')
    images = data['images']
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
  from diffjax import data
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


# --------------------------------------------------------------------------------------------------------
# Features.


@dataclasses.dataclass
class Features:
  """What Inception saw of one image set.

  Attributes:
    stats: mean and covariance of the pool3 features (2048).
    num_images: N.
    pool3: [N, 2048] float32 features, if kept (KID).
    logits: [N, 1008] float32 unbiased logits, if kept (IS).
    preview: uint8 [<=100, H, W, C], the first images (generated sets only).
  """

  stats: Any
  num_images: int
  pool3: Optional[np.ndarray] = None
  logits: Optional[np.ndarray] = None
  preview: Optional[np.ndarray] = None


def _to_host(x) -> np.ndarray:
  """A (possibly multi-host sharded) jax.Array as one numpy array on every host."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _global_batch(host: np.ndarray, sharding):
  """A global jax.Array sharded on its batch axis from an array every process holds in full."""
  import jax
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _round_batch(batch_size: int, num_devices: int) -> int:
  if batch_size < 1:
    raise ValueError(f'--batch must be positive, got {batch_size}.')
  return max(num_devices, (batch_size // num_devices) * num_devices)


class _FeatureSink:
  """Streams device batches of uint8 images through Inception into `StreamingStats`."""

  def __init__(self, variables, mesh, keep_pool3: bool, keep_logits: bool):
    from diffjax.evaluation import fid
    outputs = ('pool3', 'logits_unbiased') if keep_logits else ('pool3',)
    self.fn = _inception_fn(variables, outputs, mesh)
    self.stats = fid.StreamingStats()
    self.keep_pool3, self.keep_logits = keep_pool3, keep_logits
    self.pool3, self.logits, self.preview = [], [], []
    self.num_preview = 0

  def add(self, images, valid: int, keep_preview: bool = False) -> None:
    """Adds the first `valid` images of a (sharded, padded) uint8 batch [B, H, W, C]."""
    out = self.fn(images)
    mask = np.arange(images.shape[0]) < valid
    self.stats.update(out['pool3'], None if mask.all() else mask)
    if self.keep_pool3:
      self.pool3.append(_to_host(out['pool3'])[:valid])
    if self.keep_logits:
      self.logits.append(_to_host(out['logits_unbiased'])[:valid])
    if keep_preview and self.num_preview < _PREVIEW:
      self.preview.append(_to_host(images)[:min(valid, _PREVIEW - self.num_preview)])
      self.num_preview += len(self.preview[-1])

  def result(self) -> Features:
    stats = self.stats.statistics()  # raises one sentence for fewer than 2 images
    cat = lambda xs: np.concatenate(xs) if xs else None
    return Features(stats, int(stats.n), cat(self.pool3), cat(self.logits), cat(self.preview))


def _progress(progress: bool, total: Optional[int], desc: str):
  if not progress:
    return None
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit='img', dynamic_ncols=True)


def source_features(source: ImageSource, *, keep_pool3: bool = False, keep_logits: bool = False,
                    batch_size: int = 128, inception_variables: Optional[Mapping[str, Any]] = None,
                    mesh=None, progress: bool = False) -> Features:
  """Inception features of an image set, streamed in sharded batches of a fixed size.

  Host batches of any size are re-cut into batches of `batch_size` (rounded to the device count); the
  last one is padded and the padding masked out, so the network compiles for one shape only.

  Args:
    source: the images (`array_source`, `file_source`, `dataset_source`).
    keep_pool3: also return the [N, 2048] features (KID).
    keep_logits: also return the [N, 1008] logits (IS).
    batch_size: images per Inception call, over all devices.
    inception_variables: Flax variables of `InceptionV3` (tests pass random ones); None loads the
      published weights (`load_inception`).
    mesh: the device mesh (default: all devices).
    progress: show a progress bar.
  """
  from diffjax.training import parallel
  mesh = mesh or parallel.make_mesh()
  batch_size = _round_batch(batch_size, mesh.devices.size)
  sharding = parallel.batch_sharding(mesh)
  sink = _FeatureSink(inception_variables, mesh, keep_pool3, keep_logits)
  bar = _progress(progress, source.num_images, source.description)
  pending = []

  def flush(chunk: np.ndarray) -> None:
    valid = len(chunk)
    if valid < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, axis=0)])
    sink.add(_global_batch(chunk, sharding), valid)
    if bar is not None:
      bar.update(valid)

  shape = None
  try:
    for batch in source.batches():
      batch = _check_uint8_images(batch, source.description)
      if shape is None:
        shape = batch.shape[1:]
      elif batch.shape[1:] != shape:
        raise ValueError(f'{source.description}: images of shape {batch.shape[1:]} after {shape}; '
                         'FID reads images of one size.')
      pending.append(batch)
      buffered = sum(len(b) for b in pending)
      if buffered >= batch_size:
        joined = np.concatenate(pending)
        full = (len(joined) // batch_size) * batch_size
        for start in range(0, full, batch_size):
          flush(joined[start:start + batch_size])
        pending = [joined[full:]] if full < len(joined) else []
    if pending:
      flush(np.concatenate(pending))
  finally:
    if bar is not None:
      bar.close()
  if shape is None:
    raise ValueError(f'{source.description} holds no images.')
  return sink.result()


def generated_features(run, seeds: Sequence[int], *, sampler: Optional[str] = None,
                       num_steps: Optional[int] = None, guidance: float = 0.0,
                       keep_pool3: bool = False, keep_logits: bool = False, batch_size: int = 128,
                       inception_variables: Optional[Mapping[str, Any]] = None, mesh=None,
                       progress: bool = False, **sampler_kwargs) -> Features:
  """Samples one image per seed from a trained run and streams it through Inception.

  Image k depends on seed k only (its latents and noise), whatever the batch size or device count;
  class-conditional models get class seed mod num_classes (`sampling.default_labels`), so every class
  is equally represented. Sampling, quantization and Inception all run sharded over the mesh.

  Args:
    run: a `build.Run` (`build.load(workdir)`).
    seeds: the seeds, [N].
    sampler, num_steps, sampler_kwargs: override the run's config.sample (e.g. s_churn).
    guidance: classifier-free guidance weight w.
    keep_pool3, keep_logits, batch_size, inception_variables, mesh, progress: as in `source_features`.

  Returns:
    `Features` of the N images, with a preview of the first 100.
  """
  import jax

  from diffjax.evaluation import fid
  from diffjax.training import parallel

  seeds = np.asarray(list(seeds), np.int64)
  if len(seeds) < 2:
    raise ValueError(f'FID needs at least 2 images; got {len(seeds)} seed(s).')
  mesh = mesh or parallel.make_mesh()
  batch_size = _round_batch(batch_size, mesh.devices.size)
  shard, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  labels = sampling.default_labels(seeds, run.num_classes)
  fn = build.sampler_fn(run.config, run.denoiser.precond, sampler, num_steps, **sampler_kwargs)
  shape = (run.spec.resolution, run.spec.resolution, run.spec.channels)
  sample_fn = sampling.make_sample_fn(run.denoiser, fn, shape, run.num_classes, guidance)

  # Keys are made on device from uint32 seeds (exactly `samplers.seed_keys`), so the per-batch inputs are plain
  # integer arrays that any process can shard; the output is already uint8 for Inception.
  def sample_uint8(params, seed_words, class_labels):
    keys = jax.vmap(jax.random.key)(seed_words)
    return fid.quantize_images(sample_fn(params, keys, class_labels))

  jitted = jax.jit(sample_uint8, in_shardings=(rep, shard, None if labels is None else shard),
                   out_shardings=shard)
  params = jax.device_put(run.ema_params, rep)
  sink = _FeatureSink(inception_variables, mesh, keep_pool3, keep_logits)
  desc = f'seeds {_seed_text(seeds)}'
  bar = _progress(progress, len(seeds), desc)
  try:
    for start in range(0, len(seeds), batch_size):
      chunk = seeds[start:start + batch_size]
      valid = len(chunk)
      # Pad to the full batch (padding images are masked out) so sampling and Inception compile once.
      idx = np.concatenate([np.arange(start, start + valid), np.full(batch_size - valid, start)])
      words = _global_batch((seeds[idx] % (1 << 32)).astype(np.uint32), shard)
      lab = None if labels is None else _global_batch(np.asarray(labels[idx], np.int32), shard)
      images = jitted(params, words, lab)
      sink.add(images, valid, keep_preview=True)
      if bar is not None:
        bar.update(valid)
  finally:
    if bar is not None:
      bar.close()
  return sink.result()


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
  from diffjax import data
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
    if 'images' in keys:
      return 'images'
    raise ValueError(f'{ref} has neither `mu`/`sigma` (statistics) nor `images` (keys: '
                     f'{", ".join(sorted(keys))}).')
  if _split_dataset_name(ref, split) is not None:
    return 'dataset'
  from diffjax import data
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
  from diffjax.evaluation import fid
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
  from diffjax.evaluation import fid
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
  if out and _is_main():
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
  from diffjax.evaluation import fid
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


# --------------------------------------------------------------------------------------------------------
# Evaluations.


def _seed_text(seeds: Sequence[int]) -> str:
  """'0-49999' for a contiguous range, else a compact comma list of ranges."""
  seeds = [int(s) for s in seeds]
  parts, start = [], 0
  for i in range(1, len(seeds) + 1):
    if i == len(seeds) or seeds[i] != seeds[i - 1] + 1:
      lo, hi = seeds[start], seeds[i - 1]
      parts.append(str(lo) if lo == hi else f'{lo}-{hi}')
      start = i
  return ','.join(parts)


def seed_sets(num_images: int, *, seeds: Optional[Sequence[int] | str] = None, first_seed: int = 0,
              protocol: Optional[str] = None) -> list[list[int]]:
  """The seed sets of an evaluation.

  Without a protocol: `seeds` (a list or text like '0-49999'), else first_seed … first_seed+N−1.
  `protocol='edm3'` is EDM's: three sets first_seed + [0, N), [N, 2N), [2N, 3N), whose minimum FID
  is reported (Karras et al. 2022, §5 / Table 2 footnote).

  Raises:
    ValueError: malformed seeds, an unknown protocol, or seeds together with edm3.
  """
  if protocol:
    if protocol not in PROTOCOLS:
      raise ValueError(f'Unknown protocol {protocol!r}; known: {", ".join(PROTOCOLS)}.')
    if seeds:
      raise ValueError('--protocol=edm3 picks its seeds itself (0 to N−1, N to 2N−1, 2N to 3N−1); '
                       'pass --num (and --first_seed) instead of --seeds.')
  if seeds:
    seeds = sampling.parse_seeds(seeds) if isinstance(seeds, str) else [int(s) for s in seeds]
    if len(seeds) < 2:
      raise ValueError('FID needs at least 2 seeds.')
    return [seeds]
  if num_images < 2:
    raise ValueError(f'--num must be at least 2 for FID, got {num_images}.')
  if first_seed < 0:
    raise ValueError(f'--first_seed must be non-negative, got {first_seed}.')
  sets = 3 if protocol == 'edm3' else 1
  return [list(range(first_seed + k * num_images, first_seed + (k + 1) * num_images))
          for k in range(sets)]


def _fmt(x: float) -> str:
  return f'{x:g}'.replace('.', 'p').replace('-', 'm')


def _result_name(step: int, sampler: str, steps: int, guidance: float, kwargs: dict,
                 num_images: int, protocol: Optional[str]) -> str:
  """fid_<step>_<sampler><steps>[_w<g>][_<option><v>]_n<N>[_edm3]: one file per setting, not per call."""
  parts = [f'fid_{step:08d}', f'{sampler}{steps}']
  if guidance:
    parts.append(f'w{_fmt(guidance)}')
  parts += [f'{k.removeprefix("s_")}{_fmt(v)}' for k, v in sorted(kwargs.items())]
  parts.append(f'n{num_images}')
  if protocol:
    parts.append(protocol)
  return '_'.join(parts)


def _digits_result_name(step: int, sampler: str, steps: int, guidance: float, kwargs: dict,
                        num_images: int = 1000, first_seed: int = 0) -> str:
  """digits_<step>_<sampler><steps>[_w<g>][_<option><v>][_n<N>][_seed<k>], e.g. digits_00001200_heun18.

  Guidance, sampler options, the number of images and the first seed appear only when they are set
  (not 0, not the defaults 1000 and 0), so that two evaluations of one checkpoint with different settings
  never overwrite each other's file and the common case stays short.
  """
  parts = [f'digits_{step:08d}', f'{sampler}{steps}']
  if guidance:
    parts.append(f'w{_fmt(guidance)}')
  parts += [f'{k.removeprefix("s_")}{_fmt(v)}' for k, v in sorted(kwargs.items())]
  if num_images != 1000:
    parts.append(f'n{num_images}')
  if first_seed:
    parts.append(f'seed{first_seed}')
  return '_'.join(parts)


def _is_main() -> bool:
  """Only process 0 writes files; every process computes the same results."""
  import jax
  return jax.process_index() == 0


def _write_json(path: str, result: dict) -> None:
  if not _is_main():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, path)


def evaluate_fid(workdir: str, ref: str, *, num_images: int = 50_000,
                 seeds: Optional[Sequence[int] | str] = None, first_seed: int = 0,
                 protocol: Optional[str] = None, metrics: Sequence[str] | str = ('fid',),
                 sampler: Optional[str] = None, num_steps: Optional[int] = None,
                 guidance: float = 0.0, batch_size: int = 128, step: Optional[int] = None,
                 split: str = 'train', data_dir: Optional[str] = None, out: Optional[str] = None,
                 is_splits: int = 10, kid_subset_size: int = 1000,
                 inception_variables: Optional[Mapping[str, Any]] = None, mesh=None,
                 progress: bool = False, **sampler_kwargs) -> dict:
  """FID (IS, KID) of a trained run's samples against a reference; results to WORKDIR/eval/*.json.

  Args:
    workdir: a train.py run.
    ref: the reference (module docstring): statistics `.npz`, images, or a dataset name.
    num_images: N, images per seed set.
    seeds: explicit seeds (list or '0-999,2000-2999'); overrides num_images / first_seed.
    first_seed: first seed of the (first) set.
    protocol: None, or 'edm3' (three sets of N seeds; the set of minimum FID is reported).
    metrics: 'fid', 'is', 'kid' (list or comma-separated text).
    sampler, num_steps, guidance, sampler_kwargs: sampling settings (default: the run's config).
    batch_size: images per device batch, over all devices.
    step: checkpoint step (default: the newest).
    split, data_dir: for a dataset reference.
    out: the JSON path (default WORKDIR/eval/fid_<step>_<settings>.json; a PNG preview goes beside).
    is_splits, kid_subset_size: see `compute_metrics`.
    inception_variables: Inception weights (tests pass random ones); None loads the published file.
    mesh, progress: devices and progress bar.

  Returns:
    The result dict (as written): the metrics of the reported set at the top level ('fid', …), with
    'sets' holding every set's metrics and seeds when the protocol has several; plus the settings,
    'step', 'ref', 'seconds' and 'json' (the path written).
  """
  metrics = parse_metrics(metrics)
  sets = seed_sets(num_images, seeds=seeds, first_seed=first_seed, protocol=protocol)
  need_kid = 'kid' in metrics
  check_reference(ref, need_features=need_kid, split=split)  # fail before loading and sampling
  start = time.time()
  run = build.load(workdir, step)
  name = sampler or run.config.sample.sampler
  steps = int(num_steps or run.config.sample.num_steps)
  reference = load_reference(ref, need_features=need_kid, split=split, data_dir=data_dir,
                             batch_size=batch_size, inception_variables=inception_variables,
                             mesh=mesh, progress=progress)
  results, preview = [], None
  for set_seeds in sets:
    features = generated_features(
      run, set_seeds, sampler=name, num_steps=steps, guidance=guidance, keep_pool3=need_kid,
      keep_logits='is' in metrics, batch_size=batch_size, inception_variables=inception_variables,
      mesh=mesh, progress=progress, **sampler_kwargs)
    preview = features.preview if preview is None else preview
    entry = compute_metrics(features, reference, metrics, is_splits=is_splits,
                            kid_subset_size=kid_subset_size)
    entry['seeds'] = _seed_text(set_seeds)
    results.append(entry)
  best = min(range(len(results)), key=lambda i: results[i].get('fid', 0.0))
  result = dict(results[best])
  if len(results) > 1:
    result.update(sets=results, reported_set=best)
  result.update(
    step=run.step, workdir=workdir, ref=reference.description, sampler=name, num_steps=steps,
    guidance=float(guidance), protocol=protocol, metrics=list(metrics), batch_size=batch_size,
    seconds=round(time.time() - start, 1),
    **{k: float(v) for k, v in sampler_kwargs.items()},
  )
  kwargs = {k: float(v) for k, v in sampler_kwargs.items()}
  out = out or os.path.join(workdir, 'eval', _result_name(run.step, name, steps, guidance, kwargs,
                                                          len(sets[0]), protocol) + '.json')
  result['json'] = out
  _write_json(out, result)
  if preview is not None and len(preview) and _is_main():
    images_lib.save_grid(preview, os.path.splitext(out)[0] + '.png', ncols=10)
  return result


def evaluate_images(images: str | np.ndarray, ref: str, *, metrics: Sequence[str] | str = ('fid',),
                    split: str = 'train', data_dir: Optional[str] = None, out: Optional[str] = None,
                    batch_size: int = 128, is_splits: int = 10, kid_subset_size: int = 1000,
                    inception_variables: Optional[Mapping[str, Any]] = None, mesh=None,
                    progress: bool = False) -> dict:
  """FID (IS, KID) of a set of images against a reference.

  Args:
    images: an `.npz` with `images` (uint8 NHWC), a folder of image files, or a uint8 array.
    ref: the reference (module docstring).
    metrics, split, data_dir, batch_size, is_splits, kid_subset_size, inception_variables, mesh,
      progress: as in `evaluate_fid`.
    out: a JSON path to write the result to (None: only returned).

  Returns:
    {'fid', …, 'num_images', 'images', 'ref', 'seconds'} (+ 'json' when written).
  """
  metrics = parse_metrics(metrics)
  need_kid = 'kid' in metrics
  if isinstance(images, (str, os.PathLike)):
    source = file_source(os.fspath(images), batch_size)
  else:
    source = array_source(images, batch_size=batch_size)
  check_reference(ref, need_features=need_kid, split=split)
  start = time.time()
  reference = load_reference(ref, need_features=need_kid, split=split, data_dir=data_dir,
                             batch_size=batch_size, inception_variables=inception_variables,
                             mesh=mesh, progress=progress)
  features = source_features(source, keep_pool3=need_kid, keep_logits='is' in metrics,
                             batch_size=batch_size, inception_variables=inception_variables,
                             mesh=mesh, progress=progress)
  result = compute_metrics(features, reference, metrics, is_splits=is_splits,
                           kid_subset_size=kid_subset_size)
  result.update(images=source.description, ref=reference.description, metrics=list(metrics),
                seconds=round(time.time() - start, 1))
  if out:
    result['json'] = out
    _write_json(out, result)
  return result


def evaluate_digits(
  workdir: str,
  *,
  num_images: int = 1000,
  first_seed: int = 0,
  sampler: Optional[str] = None,
  num_steps: Optional[int] = None,
  guidance: float = 0.0,
  batch_size: int = 500,
  step: Optional[int] = None,
  progress: bool = False,
  **sampler_kwargs,
) -> dict:
  """Scores a digits run with the digits evaluator (classifier Fréchet distance and accuracy).

  Samples `num_images` images from seeds first_seed… with classes cycling (seed mod 10), then
  reports the evaluator's Fréchet distance to the train split, the accuracy of the classifier on
  the intended classes, and its mean confidence. Writes WORKDIR/eval/<name>.json and a 100-image grid
  <name>.png, the name saying what was evaluated (see `_digits_result_name`): e.g.
  digits_00001200_heun18.json, or digits_00001200_heun18_w0p5.json with guidance 0.5.

  Returns:
    The metrics dict (also with 'step', 'sampler', 'num_steps', 'nfe'-relevant settings, and 'json',
    the path written).
  """
  from diffjax.evaluation import digits_classifier

  run = build.load(workdir, step)
  if run.config.data.name != 'digits':
    raise ValueError(
      f'The digits evaluator scores digits runs; {workdir} trained on {run.config.data.name!r}.'
    )
  seeds = list(range(first_seed, first_seed + num_images))
  labels = sampling.default_labels(seeds, run.num_classes)
  name = sampler or run.config.sample.sampler
  steps = int(num_steps or run.config.sample.num_steps)
  fn = build.sampler_fn(run.config, run.denoiser.precond, name, steps, **sampler_kwargs)
  shape = (run.spec.resolution, run.spec.resolution, run.spec.channels)
  sample_fn = sampling.make_sample_fn(run.denoiser, fn, shape, run.num_classes, guidance)
  x = sampling.generate(
    sample_fn, run.ema_params, seeds, labels, batch_size=batch_size, progress=progress
  )
  images = images_lib.to_uint8(x)
  metrics = digits_classifier.digits_metrics(images, labels)
  metrics.update(
    step=run.step,
    sampler=name,
    num_steps=steps,
    guidance=guidance,
    first_seed=first_seed,
    **{k: float(v) for k, v in sampler_kwargs.items()},
  )
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, _digits_result_name(run.step, name, steps, guidance, sampler_kwargs,
                                                   num_images, first_seed))
  with open(base + '.json', 'w') as f:
    json.dump(metrics, f, indent=2)
  images_lib.save_grid(images[:100], base + '.png', ncols=10)
  metrics['json'] = base + '.json'
  return metrics
