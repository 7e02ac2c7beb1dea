"""Bits per dimension of a discrete-time model: the full variational bound (Ho et al. 2020 §3.3;
Nichol & Dhariwal 2021 §2, Table 2 "NLL").

    −log p(x_0) ≤ L_vlb = L_T + Σ_{t=1}^{T−1} L_t + L_0        (DDPM Eq. 5, iDDPM Eq. 4–7)

evaluated term by term for every t with fresh noise (one draw per image and t), the discretized
Gaussian decoder at t = 0 and the prior term KL(q(x_T|x_0) ‖ N(0, I)); each term is a mean over
dimensions divided by ln 2, so their sum is bits/dim. This is improved-diffusion's `calc_bpd_loop`
(x̂_0 clipped to [−1, 1] by default, as its image_nll.py).

The batch is sharded over every device (`training.parallel`); image i's noise at step t comes from
`fold_in(seed_keys(i), t)`, so the result does not depend on the batch size or the device count.
`evaluate_bpd(workdir)` is `evaluate.py bpd_vlb`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import discrete
from diffjax import losses_ddpm
from diffjax.precond import Denoiser
from diffjax.samplers import noise as noise_lib


def vb_terms_fn(denoiser: Denoiser, schedule: discrete.DiscreteSchedule, *, variance: str,
                clip_denoised: bool = True, num_classes: int = 0) -> Callable:
  """A pure `terms(params, x0, labels, keys, t) -> {'vb', 'mse', 'xstart_mse'}` (each [B]).

  Args:
    denoiser: the model (its precond's schedule is `schedule`).
    schedule: the model's full (not respaced) process.
    variance: the model's reverse variance: 'learned' (2C outputs), 'fixed_small', 'fixed_large'.
    clip_denoised: clip x̂_0 to [−1, 1] before the posterior mean.
    num_classes: > 0 feeds one-hot labels.

  The returned function takes x0 [B, H, W, C] on the 8-bit grid of [−1, 1], int labels [B],
  per-example keys [B] and a scalar int t; vb is L_t in bits/dim, mse ‖ε − ε̂‖² and xstart_mse
  ‖x_0 − x̂_0‖² (means over dimensions).
  """
  discrete.check_variance(variance)

  def terms(params, x0, labels, keys, t):
    t_batch = jnp.full(x0.shape[:1], t, jnp.int32)
    eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), x0.shape[1:]))(keys)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) if num_classes else None
    xt, _, d, extra = losses_ddpm.model_outputs(denoiser, params, schedule, x0, t_batch, eps,
                                                one_hot)
    x0_pred = jnp.clip(d, -1.0, 1.0) if clip_denoised else d
    v = extra if variance == 'learned' else None
    log_var = discrete.model_log_variance(schedule, t_batch, variance, v, like=x0)
    vb = losses_ddpm.vb_terms_bpd(schedule, x0, xt, t_batch, x0_pred, log_var)
    eps_pred = discrete.eps_from_x0(schedule, xt, t_batch, x0_pred)
    axes = tuple(range(1, x0.ndim))
    return {'vb': vb, 'mse': jnp.mean(jnp.square(eps_pred - eps), axis=axes),
            'xstart_mse': jnp.mean(jnp.square(x0_pred - x0), axis=axes)}

  return terms


def _gather(x) -> np.ndarray:
  """A (possibly multi-host) sharded array as a host numpy array."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def bits_per_dim(denoiser: Denoiser, params, batches: Iterable[dict], *, variance: str,
                 schedule: Optional[discrete.DiscreteSchedule] = None, clip_denoised: bool = True,
                 num_classes: int = 0, batch_size: int, num_images: Optional[int] = None,
                 mesh=None, progress: bool = False, seed: int = 0) -> dict:
  """The full-VLB bits/dim of the images in `batches` (iDDPM's calc_bpd_loop over a dataset).

  Args:
    denoiser, params: the model and its (EMA) parameters.
    batches: this host's batches {'image': float [b, H, W, C] in [−1, 1] (8-bit values),
      'label': int [b]}, b ≤ batch_size / process_count; a short last batch is padded.
    variance: the model's reverse variance ('learned', 'fixed_small', 'fixed_large').
    schedule: the process; the precond's by default.
    clip_denoised: clip x̂_0 (improved-diffusion's image_nll.py default).
    num_classes: > 0 for a class-conditional model.
    batch_size: the global batch size (a multiple of the device count).
    num_images: stop after this many images (all of `batches` by default).
    mesh: the device mesh (all devices by default).
    progress: show a progress bar over batches × T model calls.
    seed: offsets the per-image noise keys.

  Returns:
    {'bpd': mean total bits/dim, 'prior_bpd', 'vb_bpd' (Σ_t L_t), 'num_images',
     'num_timesteps', 'per_image_bpd' [N], 'vb_terms' / 'mse_terms' / 'xstart_mse_terms' [T]
     (means over images)}.
  """
  from diffjax.training import parallel

  schedule = schedule or discrete.schedule_of(denoiser.precond)
  num_t = schedule.num_steps
  mesh = mesh or parallel.make_mesh()
  parallel.check_batch_size(batch_size, mesh)
  local = batch_size // jax.process_count()
  rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  terms = jax.jit(vb_terms_fn(denoiser, schedule, variance=variance, clip_denoised=clip_denoised,
                              num_classes=num_classes),
                  in_shardings=(rep, shard, shard, shard, rep), out_shardings=shard)
  prior = jax.jit(lambda x0: losses_ddpm.prior_bpd(schedule, x0), in_shardings=shard,
                  out_shardings=shard)
  params = jax.device_put(params, rep)

  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm
    total = None if num_images is None else math.ceil(num_images / batch_size) * num_t
    bar = tqdm(total=total, desc='bits/dim', unit='t', dynamic_ncols=True)

  per_image, prior_sum = [], 0.0
  sums = {'vb': np.zeros(num_t), 'mse': np.zeros(num_t), 'xstart_mse': np.zeros(num_t)}
  count, start = 0, 0
  try:
    for batch in batches:
      images = np.asarray(batch['image'], np.float32)
      labels = np.asarray(batch.get('label', np.zeros(len(images))), np.int32)
      n = len(images)
      if n == 0 or n > local:
        raise ValueError(f'Expected host batches of 1 to {local} images, got {n}.')
      pad = local - n
      images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
      labels = np.concatenate([labels, np.repeat(labels[-1:], pad)])
      index = start + jax.process_index() * local + np.arange(local)
      x0 = parallel.shard_batch(images, mesh)
      lab = parallel.shard_batch(labels, mesh)
      keys = jax.device_put(noise_lib.seed_keys(index + seed * (1 << 24)), shard)
      take = _gather(parallel.shard_batch(np.arange(local) < n, mesh))
      if num_images is not None:  # only the first num_images images of the split count
        take = take & (np.cumsum(take) + count <= num_images)
      total = _gather(prior(x0)).astype(np.float64)
      prior_sum += float(np.sum(total[take]))
      for t in range(num_t - 1, -1, -1):  # from noise to data, as the reference loop
        out = terms(params, x0, lab, keys, jnp.int32(t))
        out = {k: _gather(v).astype(np.float64) for k, v in out.items()}
        total += out['vb']
        for k in sums:
          sums[k][t] += np.sum(out[k][take])
        if bar is not None:
          bar.update(1)
      per_image.append(total[take])
      count += int(np.sum(take))
      start += batch_size
      if bar is not None:
        bar.set_postfix(bpd=f'{np.mean(np.concatenate(per_image)):.4f}', images=count)
      if num_images is not None and count >= num_images:
        break
  finally:
    if bar is not None:
      bar.close()
  if count == 0:
    raise ValueError('No images to evaluate: the split is empty or num_images is 0.')
  per_image = np.concatenate(per_image)
  vb_terms = sums['vb'] / count
  return {
      'bpd': float(np.mean(per_image)),
      'prior_bpd': prior_sum / count,
      'vb_bpd': float(np.sum(vb_terms)),
      'num_images': int(count),
      'num_timesteps': int(num_t),
      'per_image_bpd': per_image,
      'vb_terms': vb_terms,
      'mse_terms': sums['mse'] / count,
      'xstart_mse_terms': sums['xstart_mse'] / count,
  }


def model_variance(config) -> str:
  """The reverse variance a run's model was trained with (its config.loss.kwargs.variance)."""
  kwargs = config.loss.get('kwargs', None) or {}
  variance = kwargs.get('variance', None)
  if variance is None:
    variance = 'learned' if int(config.model.get('out_channel_mult', 1)) == 2 else 'fixed_large'
  return str(variance)


def evaluate_bpd(workdir: str, *, split: str = 'test', num_images: Optional[int] = None,
                 batch_size: int = 256, clip_denoised: bool = True, step: Optional[int] = None,
                 progress: bool = False, out: Optional[str] = None, seed: int = 0) -> dict:
  """bits/dim of a discrete run on a dataset split (`evaluate.py bpd_vlb`).

  Writes WORKDIR/eval/bpd_vlb_<step>.json (the summary) and .npz (per-t terms, per-image bpd).

  Args:
    workdir: a train.py run with a discrete ('ddpm' or 'iddpm') preconditioning.
    split: the dataset split ('test' by default).
    num_images: evaluate the first N images of the split (all by default).
    batch_size: global batch size, rounded to a multiple of the device count.
    clip_denoised: clip x̂_0 to [−1, 1].
    step: checkpoint step (newest by default).
    progress: show a progress bar.
    out: the JSON path (default WORKDIR/eval/bpd_vlb_<step>.json).
    seed: noise seed.

  Returns:
    The summary dict (bpd, prior_bpd, vb_bpd, num_images, num_timesteps, step, split, …).
  """
  from diffjax import build
  from diffjax import data
  from diffjax.training import parallel

  run = build.load(workdir, step)
  schedule = discrete.schedule_of(run.denoiser.precond)
  variance = model_variance(run.config)
  mesh = parallel.make_mesh()
  n_dev = mesh.devices.size
  batch_size = max(n_dev, (int(batch_size) // n_dev) * n_dev)
  iterator = data.make_iterator(run.config.data.name, split=split, global_batch_size=batch_size,
                                seed=0, data_dir=run.config.data.data_dir or None, shuffle=False,
                                repeat=False, prefetch=0)
  try:
    result = bits_per_dim(run.denoiser, run.ema_params, iterator, variance=variance,
                          schedule=schedule, clip_denoised=clip_denoised,
                          num_classes=run.num_classes, batch_size=batch_size,
                          num_images=num_images, mesh=mesh, progress=progress, seed=seed)
  finally:
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()
  summary: dict[str, Any] = {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}
  summary.update(step=run.step, split=split, variance=variance, clip_denoised=clip_denoised,
                 dataset=run.config.data.name)
  if jax.process_index() == 0:
    path = out or os.path.join(workdir, 'eval', f'bpd_vlb_{run.step:08d}.json')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(summary, f, indent=2)
    np.savez(os.path.splitext(path)[0] + '.npz',
             **{k: v for k, v in result.items() if isinstance(v, np.ndarray)})
    summary['out'] = path
  return summary
