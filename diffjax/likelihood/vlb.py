"""Bits per dimension of a discrete-time model: the full variational bound (Ho et al. 2020 §3.3;
Nichol & Dhariwal 2021 §2, Table 2 "NLL").

    −log p(x_0) ≤ L_vlb = L_T + Σ_{t=1}^{T−1} L_t + L_0        (DDPM Eq. 5, iDDPM Eq. 4–7)

evaluated term by term for every t with fresh noise (one draw per image and t), the discretized
Gaussian decoder at t = 0 and the prior term KL(q(x_T|x_0) ‖ N(0, I)); each term is a mean over
dimensions divided by ln 2, so their sum is bits/dim. This is improved-diffusion's `calc_bpd_loop`
(x̂_0 clipped to [−1, 1] by default, as its image_nll.py).

The batch is sharded over every device (`diffjax.parallel`); image i's noise at step t comes from
`fold_in(seed_keys(i), t)`, so the result does not depend on the batch size or the device count.
`evaluate_bpd(workdir)` is `evaluate.py bpd_vlb`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import special

from diffjax import parallel
from diffjax.precond import Denoiser
from diffjax.precond import discrete as precond_discrete
from diffjax.processes import discrete
from diffjax.samplers import noise as noise_lib

_LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------
# Gaussian log-likelihood pieces (elementwise).


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats, elementwise (broadcasting)."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) +
                jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _log_ndtr_diff(a, b) -> jax.Array:
  """log(Φ(b) − Φ(a)) for a < b, accurate in both tails (uses the side where Φ is small)."""
  # On the right tail Φ(b) − Φ(a) = Φ(−a) − Φ(−b): evaluate where the CDF values are small.
  flip = a > 0
  lo = jnp.where(flip, -b, a)
  hi = jnp.where(flip, -a, b)
  log_hi = special.log_ndtr(hi)
  return log_hi + jnp.log(-jnp.expm1(special.log_ndtr(lo) - log_hi))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> jax.Array:
  """log p(x) of the 8-bit decoder: N(means, e^{2·log_scales}) integrated over x's bin (DDPM §3.3).

  x lies on the 256-level grid of [−1, 1] (u/127.5 − 1); its bin is [x − 1/255, x + 1/255], with the
  edge bins open: (−∞, −1 + 1/255] and [1 − 1/255, ∞). The 256 probabilities sum to 1 exactly.
  Uses the exact normal CDF (improved-diffusion uses a tanh approximation of it).

  Args:
    x, means, log_scales: broadcastable arrays.

  Returns:
    log-probabilities in nats, elementwise.
  """
  x = jnp.asarray(x, jnp.float32)
  inv_std = jnp.exp(-log_scales)
  upper = (x - means + 1.0 / 255.0) * inv_std
  lower = (x - means - 1.0 / 255.0) * inv_std
  log_cdf_upper = special.log_ndtr(upper)
  log_one_minus_cdf_lower = special.log_ndtr(-lower)
  # Clamp so an impossible bin is very unlikely rather than −∞ (the reference clamps at 1e-12).
  log_bin = jnp.maximum(_log_ndtr_diff(lower, upper), math.log(1e-12))
  return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_one_minus_cdf_lower,
                                                        log_bin))


def _mean_flat(x) -> jax.Array:
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vb_terms_bpd(schedule: discrete.DiscreteSchedule, x0, xt, t, x0_pred,
                 model_log_var) -> jax.Array:
  """L_t in bits/dim per example: the KL for t > 0, the decoder NLL at t = 0 (iDDPM Eq. 5–6).

  Args:
    schedule: the discrete process (possibly respaced: t indexes it).
    x0: data [B, H, W, C] on the 8-bit grid of [−1, 1].
    xt: x_t [B, H, W, C] (VP/α form).
    t: int steps [B].
    x0_pred: the model's x̂_0 = D(x_t/sqrt(ᾱ_t); σ_t) [B, …] (clipped or not).
    model_log_var: log Σ_θ [B, …].

  Returns:
    [B] bits per dimension.
  """
  true_mean = discrete.q_posterior_mean(schedule, x0, xt, t)
  true_log_var = discrete.gather(schedule.posterior_log_variance_clipped, t, xt)
  model_mean = discrete.q_posterior_mean(schedule, x0_pred, xt, t)
  kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / _LN2
  nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean,
                                                        0.5 * model_log_var)) / _LN2
  return jnp.where(jnp.asarray(t) == 0, nll, kl)


def prior_bpd(schedule: discrete.DiscreteSchedule, x0) -> jax.Array:
  """L_T = KL(q(x_T|x_0) ‖ N(0, I)) in bits/dim per example [B]; about 0 for a good schedule."""
  last = schedule.num_steps - 1
  ab = float(schedule.alphas_cumprod[last])
  mean = math.sqrt(ab) * x0
  return _mean_flat(normal_kl(mean, math.log1p(-ab), 0.0, 0.0)) / _LN2


# ------------------------------------------------------------------------------------------------
# Importance sampling of t (iDDPM §3.3): the loss history is objective state.


def model_outputs(denoiser: Denoiser, params, schedule: discrete.DiscreteSchedule, x0, t, noise,
                  class_labels=None, augment_labels=None, *, train: bool = False, rngs=None):
  """Runs the denoiser at (x_t, t) and returns (x_t, ε̂, x̂_0, extra).

  x = x_0 + σ_t·ε is the EDM-form state; the network sees c_in·x = x_t. With c_skip = 1 and
  c_out = −σ, x̂_0 = D and ε̂ = (x − D)/σ.

  Returns:
    x_t [B, …], ε̂ [B, …], x̂_0 [B, …], extra output channels [B, …, C_extra].
  """
  sigma = discrete.gather(schedule.sigmas, t, x0)
  x = x0 + sigma * noise
  d, extra = denoiser.raw(params, x, sigma.reshape(-1), class_labels, augment_labels,
                          train=train, rngs=rngs)
  eps = (x - d) / sigma
  return discrete.q_sample(schedule, x0, t, noise), eps, d, extra


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
    xt, _, d, extra = model_outputs(denoiser, params, schedule, x0, t_batch, eps,
                                                one_hot)
    x0_pred = jnp.clip(d, -1.0, 1.0) if clip_denoised else d
    v = extra if variance == 'learned' else None
    log_var = discrete.model_log_variance(schedule, t_batch, variance, v, like=x0)
    vb = vb_terms_bpd(schedule, x0, xt, t_batch, x0_pred, log_var)
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

  schedule = schedule or precond_discrete.schedule_of(denoiser.precond)
  num_t = schedule.num_steps
  mesh = mesh or parallel.make_mesh()
  parallel.check_batch_size(batch_size, mesh)
  local = batch_size // jax.process_count()
  rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  terms = jax.jit(vb_terms_fn(denoiser, schedule, variance=variance, clip_denoised=clip_denoised,
                              num_classes=num_classes),
                  in_shardings=(rep, shard, shard, shard, rep), out_shardings=shard)
  prior = jax.jit(lambda x0: prior_bpd(schedule, x0), in_shardings=shard,
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
