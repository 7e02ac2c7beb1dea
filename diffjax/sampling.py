"""Generating images from a denoiser: seeds → latents → sampler, sharded over every device.

Image k depends only on seed k (its latents and its churn noise come from `seed_keys`), so a
sample is reproducible whatever the batch size or the number of devices.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import build, parallel, runs
from diffjax import images as images_lib
from diffjax import samplers as samplers_lib
from diffjax.precond import Denoiser


def parse_seeds(text: str) -> list[int]:
  """Parses '0-63', '5', '0,3,10-12' into a list of non-negative seeds (ranges inclusive).

  Raises:
    ValueError: one sentence on the expected format.
  """
  seeds = []
  for part in str(text).split(','):
    part = part.strip()
    m = re.fullmatch(r'(\d+)(?:-(\d+))?', part)
    if not m:
      raise ValueError(f'Cannot read seeds {text!r}; write them like 0-63 or 0,5,10-19.')
    lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
    if hi < lo:
      raise ValueError(f'Seed range {part!r} runs backwards; write it as {hi}-{lo}.')
    seeds.extend(range(lo, hi + 1))
  return seeds


def _check_guidance(network, num_classes: int, guidance: float) -> bool:
  """Raises for guidance on an unconditional model; True for a w-conditioned network."""
  w_network = bool(getattr(network, 'guidance_embedding', False))
  if guidance and not num_classes and not w_network:
    raise ValueError('Guidance needs a class-conditional model; this one is unconditional, so '
                     'drop --guidance (or train with conditional labels and label dropout).')
  return w_network


def make_sample_fn(denoiser: Denoiser, sampler: Callable, shape: Sequence[int],
                   num_classes: int = 0, guidance: float = 0.0) -> Callable:
  """A pure `sample(params, keys [B], class_labels int [B] | None) -> images [B, *shape]`.

  Args:
    denoiser: the preconditioned network.
    sampler: (denoise_fn, latents, keys) -> images, e.g. from `build.sampler_fn`.
    shape: (H, W, C) of one image.
    num_classes: > 0 for a class-conditional network.
    guidance: classifier-free guidance weight w: (1 + w)·D(x|c) − w·D(x|∅) with ∅ the all-zero
      label the network saw under label dropout. A w-conditioned network (a guided-distillation
      student, `guidance_embedding=True`) takes w as an input instead: one evaluation per step.
  """
  w_network = _check_guidance(denoiser.network, num_classes, guidance)

  def sample(params, keys, class_labels=None):
    latents = samplers_lib.latents(keys, tuple(shape))
    one_hot = None
    if num_classes:
      one_hot = jax.nn.one_hot(class_labels, num_classes, dtype=jnp.float32)
    if w_network:
      denoise_fn = denoiser.bind(params, one_hot, guidance=jnp.float32(guidance))
    elif guidance:
      denoise_fn = samplers_lib.guided_batched(
          lambda x, sigma, labels: denoiser(params, x, sigma, labels), one_hot, guidance)
    else:
      denoise_fn = denoiser.bind(params, one_hot)
    return sampler(denoise_fn, latents, keys)

  return sample


def generate(sample_fn: Callable, params, seeds: Sequence[int], class_labels=None, *,
             batch_size: int = 64, mesh=None, progress: bool = False) -> np.ndarray:
  """Runs `sample_fn` over all seeds in sharded batches; returns float32 images [N, H, W, C].

  Batches are padded to a multiple of the device count (padding images are dropped), so any
  number of seeds works on any number of devices.
  """
  mesh = mesh or parallel.make_mesh()
  n_dev = mesh.devices.size
  batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
  seeds = np.asarray(list(seeds), np.int64)
  labels = None if class_labels is None else np.asarray(class_labels, np.int32)
  shard = parallel.batch_sharding(mesh)
  rep = parallel.replicated(mesh)
  # Multi-host: every process holds all seeds and labels and builds the global arrays from them
  # (device_put cannot place host data on other processes' devices; keys are made on device from
  # the seeds' uint32 words, as `seed_keys` does), and every process gets all images back.
  multihost = jax.process_count() > 1

  def put(x):
    return jax.make_array_from_callback(x.shape, shard, lambda index: x[index])

  def sample_seeds(params, words, class_labels):
    return sample_fn(params, jax.vmap(jax.random.key)(words), class_labels)

  jitted = jax.jit(sample_seeds, in_shardings=(rep, shard, shard),
                   out_shardings=rep if multihost else shard)
  if not multihost:
    params = jax.device_put(params, rep)
  out = []
  starts = range(0, len(seeds), batch_size)
  if progress:
    from tqdm import tqdm
    starts = tqdm(starts, desc='sampling', unit='batch')
  for start in starts:
    chunk = seeds[start:start + batch_size]
    pad = (-len(chunk)) % n_dev
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad)])
    words = put((padded % (1 << 32)).astype(np.uint32))
    lab = None
    if labels is not None:
      lab_chunk = labels[start:start + batch_size]
      lab = put(np.concatenate([lab_chunk, np.repeat(lab_chunk[-1:], pad)]))
    images = np.asarray(jitted(params, words, lab))
    out.append(images[:len(chunk)])
  return np.concatenate(out, axis=0)


def default_labels(seeds: Sequence[int], num_classes: int, class_label: Optional[int] = None):
  """Class labels for seeds: a fixed class, or classes cycling with the seed (k mod classes)."""
  if not num_classes:
    return None
  if class_label is not None:
    if not 0 <= int(class_label) < num_classes:
      raise ValueError(f'Class {class_label} is out of range; this model has classes 0..'
                       f'{num_classes - 1}.')
    return np.full(len(seeds), int(class_label), np.int32)
  return np.asarray(seeds, np.int64) % num_classes


def sample_run(workdir: str, seeds, *, out: Optional[str] = None, sampler: Optional[str] = None,
               num_steps: Optional[int] = None, class_label: Optional[int] = None,
               guidance: float = 0.0, batch_size: int = 64, progress: bool = False,
               step: Optional[int] = None, **sampler_kwargs) -> dict:
  """Samples a trained run and writes OUT/grid.png and OUT/samples.npz.

  Args:
    workdir: a train.py run.
    seeds: list of ints or text like '0-63'.
    out: output directory (default WORKDIR/samples/cli).
    sampler, num_steps, sampler_kwargs: override config.sample.
    class_label: one class for every image (default: seed mod num_classes).
    guidance: classifier-free guidance weight.
    batch_size: images per batch.
    step: checkpoint step (default: newest).

  Returns:
    {'images': uint8 [N,H,W,C], 'seeds': [N], 'labels': [N] or None, 'grid': path, 'npz': path}.
  """
  seeds = parse_seeds(seeds) if isinstance(seeds, str) else list(seeds)
  # Options are checked against the run's config before its weights are read.
  config = runs.read_config(workdir)
  spec = build.dataset_spec(config)
  _check_guidance(build.build_network(config, spec), build.num_classes(config, spec), guidance)
  if class_label is not None and not build.num_classes(config, spec):
    raise ValueError('--class needs a class-conditional model; this one is unconditional.')
  default_labels(seeds, build.num_classes(config, spec), class_label)
  run = runs.load(workdir, step)
  labels = default_labels(seeds, run.num_classes, class_label)
  fn = build.sampler_fn(run.config, run.denoiser.precond, sampler, num_steps, **sampler_kwargs)
  shape = (run.spec.resolution, run.spec.resolution, run.spec.channels)
  sample_fn = make_sample_fn(run.denoiser, fn, shape, run.num_classes, guidance)
  x = generate(sample_fn, run.ema_params, seeds, labels, batch_size=batch_size,
               progress=progress)
  images = images_lib.to_uint8(x)
  out = out or os.path.join(workdir, 'samples', 'cli')
  os.makedirs(out, exist_ok=True)
  grid = images_lib.save_grid(images, os.path.join(out, 'grid.png'))
  npz = os.path.join(out, 'samples.npz')
  np.savez_compressed(npz, images=images, seeds=np.asarray(seeds),
                      labels=np.asarray(labels if labels is not None else []))
  return {'images': images, 'seeds': np.asarray(seeds), 'labels': labels, 'grid': grid, 'npz': npz}
