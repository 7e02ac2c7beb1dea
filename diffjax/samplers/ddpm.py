"""Samplers of discrete-time models: DDPM ancestral sampling and DDIM (Ho et al. 2020; Nichol &
Dhariwal 2021; Song, Meng & Ermon 2021), on the full or a respaced process.

Both walk the K steps of a `discrete.DiscreteSchedule` (respaced or not) from x_{K−1} = latents ~ N(0, I)
down to x_0 in the VP/α form x_k = sqrt(ᾱ_k)·(y + σ_k n), and talk to the model only through
`denoise_fn(x, σ)` in σ-space: at step k it is called on x_k/sqrt(ᾱ_k) at σ_k, the σ of the original
index (so the network sees its training timestep), and x̂_0 = D.

    ancestral:  x_{k−1} = μ̃_k(x_k, x̂_0) + [k > 0]·exp(½ log Σ_k)·z                   (DDPM Alg. 2)
                Σ_k = β̃_k (fixed_small), β_k (fixed_large) or iDDPM's learned interpolation (Eq. 15)
    DDIM(η):    ε̂ = (x_k − sqrt(ᾱ_k) x̂_0)/sqrt(1 − ᾱ_k),
                s = η·sqrt((1 − ᾱ_{k−1})/(1 − ᾱ_k))·sqrt(1 − ᾱ_k/ᾱ_{k−1}),
                x_{k−1} = sqrt(ᾱ_{k−1}) x̂_0 + sqrt(1 − ᾱ_{k−1} − s²)·ε̂ + [k > 0]·s·z      (DDIM Eq. 12)

with ᾱ_{−1} = 1, so the last step returns x̂_0 (clipped to [−1, 1] when `clip_denoised`). In σ-space
DDIM with η = 0 is exactly EDM's Euler step x + (σ_{k−1} − σ_k)(x − D)/σ_k (EDM §3).

The learned variance needs the network's extra channels: a `denoise_fn` made by `Denoiser.bind`
carries them as `denoise_fn.raw(x, σ) -> (D, extra)`. Noise z of step i comes from the ancestral stream
of each sample's own key (`noise.ANCESTRAL_STREAM`), so image b depends on key b alone.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax import registry
from diffjax.precond import Preconditioning
from diffjax.precond import discrete as precond_discrete
from diffjax.processes import discrete
from diffjax.samplers import noise

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def _per_sample(value: jax.Array, x: jax.Array) -> jax.Array:
  """A scalar step value broadcast to [B, 1, …, 1] against x [B, …]."""
  return jnp.reshape(value, (1,) * x.ndim)


def _model_call(denoise_fn: DenoiseFn, need_extra: bool) -> Callable:
  """(x, σ [B]) -> (D, extra or None), using denoise_fn.raw when the extra channels are needed."""
  if not need_extra:
    return lambda x, sigma: (denoise_fn(x, sigma), None)
  raw = precond_discrete.denoiser_raw_fn(denoise_fn)
  if raw is None:
    raise ValueError(
        'variance="learned" needs the network\'s extra output channels, which this denoise_fn '
        'does not expose (a guided or wrapped denoiser); pass a denoise_fn from Denoiser.bind, or '
        'use variance="fixed_small" / "fixed_large".')
  return raw


def _step_tables(schedule: discrete.DiscreteSchedule, variance: Optional[str]) -> dict:
  """Per-step float32 inputs of the scan, in sampling order (k = K−1 … 0)."""
  order = np.arange(schedule.num_steps)[::-1]
  tables = {
      'k': order.astype(np.int32),
      'sigma': schedule.sigmas[order],
      'sqrt_ab': np.sqrt(schedule.alphas_cumprod[order]),
      'sqrt_1m_ab': np.sqrt(1.0 - schedule.alphas_cumprod[order]),
      'ab_prev': schedule.alphas_cumprod_prev[order],
      'ab': schedule.alphas_cumprod[order],
      'coef1': schedule.posterior_mean_coef1[order],
      'coef2': schedule.posterior_mean_coef2[order],
      'min_log': schedule.posterior_log_variance_clipped[order],
      'max_log': schedule.log_betas[order],
  }
  if variance in ('fixed_small', 'fixed_large'):
    tables['fixed_log'] = schedule.model_log_variance(variance)[order]
  return {k: jnp.asarray(v.astype(np.int32) if k == 'k' else v.astype(np.float32))
          for k, v in tables.items()}


def _check_keys(keys, batch: int, what: str) -> jax.Array:
  if keys is None:
    raise ValueError(f'{what} is stochastic and needs PRNG keys: pass '
                     'keys=samplers.seed_keys(seeds), one per sample.')
  return noise.stream(noise.as_keys(keys, batch), noise.ANCESTRAL_STREAM)


def ancestral(denoise_fn: DenoiseFn, latents: jax.Array, schedule: discrete.DiscreteSchedule, *,
              keys, variance: str = 'fixed_large', clip_denoised: bool = True) -> jax.Array:
  """DDPM ancestral sampling (DDPM Alg. 2; iDDPM learned variance), one `lax.scan` over K steps.

  Args:
    denoise_fn: D(x [B, …], σ [B]) -> [B, …]; with `.raw` for the learned variance.
    latents: x_{K−1} ~ N(0, I), [B, H, W, C].
    schedule: the (possibly respaced) discrete process.
    keys: per-sample keys [B] (`seed_keys`); noise at step i is drawn from keys[b] and i alone.
    variance: 'fixed_small' (β̃), 'fixed_large' (β) or 'learned'.
    clip_denoised: clip x̂_0 to [−1, 1] before forming the posterior mean.

  Returns:
    x_0 [B, H, W, C] float32.
  """
  discrete.check_variance(variance)
  x = jnp.asarray(latents, jnp.float32)
  stream_keys = _check_keys(keys, x.shape[0], 'Ancestral sampling')
  call = _model_call(denoise_fn, variance == 'learned')

  def step(x_cur, row):
    i, s = row
    sigma = jnp.broadcast_to(s['sigma'], x_cur.shape[:1])
    d, extra = call(x_cur / _per_sample(s['sqrt_ab'], x_cur), sigma)
    x0 = jnp.clip(d, -1.0, 1.0) if clip_denoised else d
    mean = _per_sample(s['coef1'], x_cur) * x0 + _per_sample(s['coef2'], x_cur) * x_cur
    if variance == 'learned':
      frac = (extra[..., :x_cur.shape[-1]] + 1.0) / 2.0
      log_var = frac * s['max_log'] + (1.0 - frac) * s['min_log']
    else:
      log_var = _per_sample(s['fixed_log'], x_cur)
    z = noise.step_normal(stream_keys, i, x_cur.shape[1:], x_cur.dtype)
    nonzero = (s['k'] > 0).astype(x_cur.dtype)
    return mean + nonzero * jnp.exp(0.5 * log_var) * z, None

  tables = _step_tables(schedule, variance)
  steps = jnp.arange(schedule.num_steps, dtype=jnp.int32)
  x_final, _ = lax.scan(step, x, (steps, tables))
  return x_final


def ddim(denoise_fn: DenoiseFn, latents: jax.Array, schedule: discrete.DiscreteSchedule, *,
         keys=None, eta: float = 0.0, clip_denoised: bool = True) -> jax.Array:
  """DDIM (Song et al. 2021, Eq. 12) with stochasticity η, one `lax.scan` over K steps.

  Args:
    denoise_fn: D(x [B, …], σ [B]) -> [B, …].
    latents: x_{K−1} ~ N(0, I), [B, H, W, C].
    schedule: the (possibly respaced) discrete process; η = 1 on the full process is DDPM with
      the fixed_small variance.
    keys: per-sample keys [B]; needed only when η > 0.
    eta: η ≥ 0.
    clip_denoised: clip x̂_0 to [−1, 1] (ε̂ is then recomputed from the clipped x̂_0, as the
      reference does).

  Returns:
    x_0 [B, H, W, C] float32.
  """
  x = jnp.asarray(latents, jnp.float32)
  stochastic = not (isinstance(eta, (int, float)) and float(eta) == 0.0)
  stream_keys = _check_keys(keys, x.shape[0], 'DDIM with eta > 0') if stochastic else None

  def step(x_cur, row):
    i, s = row
    sigma = jnp.broadcast_to(s['sigma'], x_cur.shape[:1])
    d = denoise_fn(x_cur / _per_sample(s['sqrt_ab'], x_cur), sigma)
    x0 = jnp.clip(d, -1.0, 1.0) if clip_denoised else d
    eps = (x_cur - s['sqrt_ab'] * x0) / s['sqrt_1m_ab']
    ab, ab_prev = s['ab'], s['ab_prev']
    x_next = jnp.sqrt(ab_prev) * x0
    if stochastic:
      std = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab)) * jnp.sqrt(1.0 - ab / ab_prev)
      z = noise.step_normal(stream_keys, i, x_cur.shape[1:], x_cur.dtype)
      x_next = (x_next + jnp.sqrt(jnp.maximum(1.0 - ab_prev - std**2, 0.0)) * eps +
                (s['k'] > 0).astype(x_cur.dtype) * std * z)
    else:
      x_next = x_next + jnp.sqrt(1.0 - ab_prev) * eps
    return x_next, None

  tables = _step_tables(schedule, None)
  steps = jnp.arange(schedule.num_steps, dtype=jnp.int32)
  x_final, _ = lax.scan(step, x, (steps, tables))
  return x_final


def respaced_schedule(precond: Preconditioning, num_steps: int,
                      respacing: Optional[str] = None) -> discrete.DiscreteSchedule:
  """The model's process respaced to the sampler's steps.

  Args:
    precond: the model's discrete preconditioning ('ddpm', or EDM's 'iddpm').
    num_steps: K.
    respacing: None or '' → K evenly spaced steps ("K"); 'ddim' → the DDIM stride "ddimK"; any
      other `space_timesteps` spec ("10,15,20", "ddim50", "250") must keep exactly K steps.

  Raises:
    ValueError: when the spec keeps a different number of steps than num_steps.
  """
  schedule = precond_discrete.schedule_of(precond)
  t = schedule.num_steps
  if num_steps < 1 or num_steps > t:
    raise ValueError(f'num_steps must be in [1, {t}] for a {t}-step model, got {num_steps}.')
  spec = respacing or str(num_steps)
  if spec == 'ddim':
    spec = f'ddim{num_steps}'
  if spec == str(t):
    return schedule
  kept = discrete.space_timesteps(t, spec)
  if kept.size != num_steps:
    raise ValueError(f'The respacing {respacing!r} keeps {kept.size} of {t} steps but num_steps '
                     f'is {num_steps}; set num_steps={kept.size} or drop the respacing.')
  return schedule.respace(kept)


def ddpm_sampler(denoise_fn: DenoiseFn, latents: jax.Array, keys=None, *,
                 precond: Preconditioning, num_steps: int, variance: str = 'fixed_large',
                 clip_denoised: bool = True, respacing: Optional[str] = None) -> jax.Array:
  """Registered 'ddpm': ancestral sampling of a discrete model with `num_steps` respaced steps.

  Args:
    denoise_fn, latents, keys: see `ancestral`; latents are standard normal (x_T ~ N(0, I)).
    precond: the model's discrete preconditioning (its process).
    num_steps: K (K = T samples the full process).
    variance, clip_denoised: see `ancestral`.
    respacing: see `respaced_schedule`.
  """
  schedule = respaced_schedule(precond, num_steps, respacing)
  return ancestral(denoise_fn, latents, schedule, keys=keys, variance=variance,
                   clip_denoised=clip_denoised)


def ddim_sampler(denoise_fn: DenoiseFn, latents: jax.Array, keys=None, *,
                 precond: Preconditioning, num_steps: int, eta: float = 0.0,
                 clip_denoised: bool = True, respacing: Optional[str] = None) -> jax.Array:
  """Registered 'ddim': DDIM(η) on `num_steps` respaced steps of a discrete model.

  Args:
    denoise_fn, latents, keys: see `ddim`.
    precond: the model's discrete preconditioning (its process).
    num_steps: K.
    eta, clip_denoised: see `ddim`.
    respacing: see `respaced_schedule` ('ddim' for the DDIM paper's stride).
  """
  schedule = respaced_schedule(precond, num_steps, respacing)
  return ddim(denoise_fn, latents, schedule, keys=keys, eta=eta, clip_denoised=clip_denoised)


registry.add('sampler', 'ddpm', ddpm_sampler)
registry.add('sampler', 'ddim', ddim_sampler)
