"""Inception features of image sources and of a run's samples, sharded over every device and
streamed into moments, so 50k images never sit in memory (REFERENCE §6: EDM's quantization)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import numpy as np

from diffjax import build, parallel, sampling
from diffjax.evaluation import fid, inception_weights
from diffjax.evaluation.sources import ImageSource, _check_uint8_images

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
  return inception_weights.load_inception_params(path)


_INCEPTION_FNS: dict = {}


def _inception_fn(variables: Optional[Mapping[str, Any]], outputs: tuple[str, ...], mesh) -> Callable:
  """A data-parallel Inception feature function, built once per (weights, outputs, mesh).

  Rebuilding `make_inception_fn` would make a new jit and recompile the network (tens of seconds on a
  CPU), so evaluations in one process share it. The variables are kept in the cache entry so their id
  cannot be reused by another object.
  """
  if variables is None:
    variables = load_inception()
  key = (id(variables), outputs, mesh)
  if key not in _INCEPTION_FNS:
    if len(_INCEPTION_FNS) >= 4:
      _INCEPTION_FNS.pop(next(iter(_INCEPTION_FNS)))
    fn = inception_weights.make_inception_fn(variables, outputs=outputs, mesh=mesh)
    _INCEPTION_FNS[key] = (variables, fn)
  return _INCEPTION_FNS[key][1]


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
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _round_batch(batch_size: int, num_devices: int) -> int:
  if batch_size < 1:
    raise ValueError(f'--batch must be positive, got {batch_size}.')
  return max(num_devices, (batch_size // num_devices) * num_devices)


class _FeatureSink:
  """Streams device batches of uint8 images through Inception into `StreamingStats`."""

  def __init__(self, variables, mesh, keep_pool3: bool, keep_logits: bool):
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
    run: a `runs.Run` (`runs.load(workdir)`).
    seeds: the seeds, [N].
    sampler, num_steps, sampler_kwargs: override the run's config.sample (e.g. s_churn).
    guidance: classifier-free guidance weight w.
    keep_pool3, keep_logits, batch_size, inception_variables, mesh, progress: as in `source_features`.

  Returns:
    `Features` of the N images, with a preview of the first 100.
  """


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
