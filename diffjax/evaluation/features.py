"""Inception features of image sources and of a run's samples, sharded over every device and
streamed into moments, so 50k images never sit in memory (REFERENCE §6: EDM's quantization).

The same batches can also go through DINOv2 ViT-L/14 (`networks=('inception', 'dinov2')`), whose
feature moments give FD_DINOv2 (EDM2); `networks=('dinov2',)` skips Inception altogether."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional

import jax
import numpy as np

from diffjax import build, parallel, sampling
from diffjax.evaluation import dinov2_weights, fid, inception_weights
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


@functools.lru_cache(maxsize=1)
def load_dinov2(path: Optional[str] = None) -> dict:
  """The DINOv2 ViT-L/14 weights as Flax variables (cached; reading 1.2 GB takes a while).

  Args:
    path: the published `.pth`; None searches the default places (`find_dinov2_weights`, whose error
      says where to download it from).
  """
  return dinov2_weights.load_dinov2_params(path)


_DINOV2_FNS: dict = {}


def _dinov2_fn(variables: Optional[Mapping[str, Any]], mesh) -> Callable:
  """A data-parallel DINOv2 feature function, built once per (weights, mesh), as `_inception_fn`."""
  if variables is None:
    variables = load_dinov2()
  key = (id(variables), mesh)
  if key not in _DINOV2_FNS:
    if len(_DINOV2_FNS) >= 2:
      _DINOV2_FNS.pop(next(iter(_DINOV2_FNS)))
    _DINOV2_FNS[key] = (variables, dinov2_weights.make_dinov2_fn(variables, mesh=mesh))
  return _DINOV2_FNS[key][1]


NETWORKS = ('inception', 'dinov2')


def _check_networks(networks: Sequence[str]) -> tuple[str, ...]:
  networks = tuple(networks)
  unknown = [n for n in networks if n not in NETWORKS]
  if unknown or not networks:
    raise ValueError(f'Unknown feature network(s) {", ".join(unknown) or "(none)"}; known: '
                     f'{", ".join(NETWORKS)}.')
  return networks


# --------------------------------------------------------------------------------------------------------
# Features.


@dataclasses.dataclass
class Features:
  """What Inception saw of one image set.

  Attributes:
    stats: mean and covariance of the pool3 features (2048); None if Inception was not run.
    num_images: N.
    pool3: [N, 2048] float32 features, if kept (KID).
    logits: [N, 1008] float32 unbiased logits, if kept (IS).
    preview: uint8 [<=100, H, W, C], the first images (generated sets only).
    dinov2: mean and covariance of the DINOv2 features (1024, FD_DINOv2), if computed.
  """

  stats: Any
  num_images: int
  pool3: Optional[np.ndarray] = None
  logits: Optional[np.ndarray] = None
  preview: Optional[np.ndarray] = None
  dinov2: Any = None


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
  """Streams device batches of uint8 images through Inception (and DINOv2) into `StreamingStats`."""

  def __init__(self, variables, mesh, keep_pool3: bool, keep_logits: bool,
               networks: Sequence[str] = ('inception',), dinov2_variables=None):
    networks = _check_networks(networks)
    outputs = ('pool3', 'logits_unbiased') if keep_logits else ('pool3',)
    self.fn = _inception_fn(variables, outputs, mesh) if 'inception' in networks else None
    self.dinov2_fn = _dinov2_fn(dinov2_variables, mesh) if 'dinov2' in networks else None
    self.stats, self.dinov2_stats = fid.StreamingStats(), fid.StreamingStats()
    self.keep_pool3, self.keep_logits = keep_pool3, keep_logits
    self.pool3, self.logits, self.preview = [], [], []
    self.num_preview = 0

  def add(self, images, valid: int, keep_preview: bool = False) -> None:
    """Adds the first `valid` images of a (sharded, padded) uint8 batch [B, H, W, C]."""
    mask = np.arange(images.shape[0]) < valid
    if self.dinov2_fn is not None:
      self.dinov2_stats.update(self.dinov2_fn(images), None if mask.all() else mask)
    if self.fn is not None:
      out = self.fn(images)
      self.stats.update(out['pool3'], None if mask.all() else mask)
      if self.keep_pool3:
        self.pool3.append(_to_host(out['pool3'])[:valid])
      if self.keep_logits:
        self.logits.append(_to_host(out['logits_unbiased'])[:valid])
    if keep_preview and self.num_preview < _PREVIEW:
      self.preview.append(_to_host(images)[:min(valid, _PREVIEW - self.num_preview)])
      self.num_preview += len(self.preview[-1])

  def result(self) -> Features:
    # statistics() raises one sentence for fewer than 2 images.
    stats = self.stats.statistics() if self.fn is not None else None
    dinov2 = self.dinov2_stats.statistics() if self.dinov2_fn is not None else None
    cat = lambda xs: np.concatenate(xs) if xs else None
    return Features(stats, int((stats or dinov2).n), cat(self.pool3), cat(self.logits),
                    cat(self.preview), dinov2)

  def _moments(self) -> tuple[tuple[str, Any], ...]:
    """(name, StreamingStats) of every feature network's moments: what a shard persists."""
    return (('inception', self.stats), ('dinov2', self.dinov2_stats))

  def state(self) -> dict[str, np.ndarray]:
    """What the sink has gathered, as arrays: every network's moments (float64, see
    `StreamingStats.state`) as '<network>_<n|mean|scatter>', and the kept `pool3`, `logits`
    (float32) and `preview` images (uint8). A shard of a resumable evaluation is one sink's state.
    """
    out = {f'{name}_{k}': v for name, stats in self._moments() for k, v in stats.state().items()}
    for name in ('pool3', 'logits', 'preview'):
      if getattr(self, name):
        out[name] = np.concatenate(getattr(self, name))
    return out

  def absorb(self, state: Mapping[str, np.ndarray]) -> None:
    """Adds another sink's `state()` (e.g. a shard read back): moments by the pairwise update,
    features, logits and preview appended after what is already here."""
    for name, stats in self._moments():
      prefix = name + '_'
      part = {k[len(prefix):]: state[k] for k in state if k.startswith(prefix)}
      if part:
        stats.merge(fid.StreamingStats.from_state(part))
    for name in ('pool3', 'logits', 'preview'):
      if name in state and len(state[name]):
        getattr(self, name).append(np.asarray(state[name]))
    self.num_preview = sum(len(p) for p in self.preview)


def _progress(progress: bool, total: Optional[int], desc: str):
  if not progress:
    return None
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit='img', dynamic_ncols=True)


def source_features(source: ImageSource, *, keep_pool3: bool = False, keep_logits: bool = False,
                    batch_size: int = 128, inception_variables: Optional[Mapping[str, Any]] = None,
                    mesh=None, progress: bool = False, networks: Sequence[str] = ('inception',),
                    dinov2_variables: Optional[Mapping[str, Any]] = None) -> Features:
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
    networks: which feature networks see the images: 'inception' (FID, IS, KID), 'dinov2' (FD_DINOv2).
    dinov2_variables: Flax variables of `dinov2.DINOv2` (tests pass a tiny random one; its config is
      read from the shapes); None loads the published ViT-L/14 (`load_dinov2`).
  """
  mesh = mesh or parallel.make_mesh()
  batch_size = _round_batch(batch_size, mesh.devices.size)
  sharding = parallel.batch_sharding(mesh)
  sink = _FeatureSink(inception_variables, mesh, keep_pool3, keep_logits, networks, dinov2_variables)
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
                       progress: bool = False, networks: Sequence[str] = ('inception',),
                       dinov2_variables: Optional[Mapping[str, Any]] = None,
                       **sampler_kwargs) -> Features:
  """Samples one image per seed from a trained run and streams it through Inception.

  Image k depends on seed k only (its latents and noise), whatever the batch size or device count;
  class-conditional models get class seed mod num_classes (`sampling.default_labels`), so every class
  is equally represented. Sampling, quantization and Inception all run sharded over the mesh.

  Args:
    run: a `runs.Run` (`runs.load(workdir)`).
    seeds: the seeds, [N].
    sampler, num_steps, sampler_kwargs: override the run's config.sample (e.g. s_churn).
    guidance: classifier-free guidance weight w.
    keep_pool3, keep_logits, batch_size, inception_variables, mesh, progress, networks,
      dinov2_variables: as in `source_features`.

  Returns:
    `Features` of the N images, with a preview of the first 100.
  """


  seeds = np.asarray(list(seeds), np.int64)
  if len(seeds) < 2:
    raise ValueError(f'FID needs at least 2 images; got {len(seeds)} seed(s).')
  (_, sink), = generated_feature_groups(  # one group: all the seeds
      run, seeds, [np.arange(len(seeds))], sampler=sampler, num_steps=num_steps, guidance=guidance,
      keep_pool3=keep_pool3, keep_logits=keep_logits, batch_size=batch_size,
      inception_variables=inception_variables, mesh=mesh, progress=progress, networks=networks,
      dinov2_variables=dinov2_variables, **sampler_kwargs)
  return sink.result()


def generated_feature_groups(run, seeds: Sequence[int], groups: Sequence[Sequence[int]], *,
                             sampler: Optional[str] = None, num_steps: Optional[int] = None,
                             guidance: float = 0.0, keep_pool3: bool = False,
                             keep_logits: bool = False, batch_size: int = 128,
                             inception_variables: Optional[Mapping[str, Any]] = None, mesh=None,
                             progress: bool = False, networks: Sequence[str] = ('inception',),
                             dinov2_variables: Optional[Mapping[str, Any]] = None,
                             **sampler_kwargs) -> Iterator[tuple[np.ndarray, '_FeatureSink']]:
  """`generated_features` group by group: one fresh sink per group of seeds, yielded when full.

  What a resumable evaluation keeps as shards (`feature_shards`): sampling and the networks are
  compiled once for all groups, and each group is sampled in batches of `batch_size` from its first
  position, so a group's moments do not depend on which other groups are sampled in the same call.

  Args:
    run, seeds, sampler, num_steps, guidance, keep_pool3, keep_logits, batch_size,
      inception_variables, mesh, progress, networks, dinov2_variables, sampler_kwargs: as in
      `generated_features`.
    groups: the groups, each a contiguous increasing range of positions into `seeds` ([G] ints).

  Yields:
    (positions [G], sink) per group, in order; the sink keeps the preview of positions < 100.
  """
  seeds = np.asarray(list(seeds), np.int64)
  groups = [np.asarray(g, np.int64).reshape(-1) for g in groups]
  groups = [g for g in groups if len(g)]
  if not groups:
    return
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
  desc = f'seeds {_seed_text(np.concatenate([seeds[g] for g in groups]))}'
  bar = _progress(progress, sum(len(g) for g in groups), desc)
  try:
    for group in groups:
      sink = _FeatureSink(inception_variables, mesh, keep_pool3, keep_logits, networks,
                          dinov2_variables)
      sink.num_preview = min(_PREVIEW, int(group[0]))  # the preview is of the first 100 seeds
      for start in range(0, len(group), batch_size):
        chunk = group[start:start + batch_size]
        valid = len(chunk)
        # Padded to the full batch (padding images are masked out): sampling and Inception compile
        # once.
        idx = np.concatenate([chunk, np.full(batch_size - valid, chunk[0])])
        words = _global_batch((seeds[idx] % (1 << 32)).astype(np.uint32), shard)
        lab = None if labels is None else _global_batch(np.asarray(labels[idx], np.int32), shard)
        images = jitted(params, words, lab)
        sink.add(images, valid, keep_preview=True)
        if bar is not None:
          bar.update(valid)
      yield group, sink
  finally:
    if bar is not None:
      bar.close()


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
