"""N-step samplers of progressive and guided distillation, and the DDIM encoder (α-σ form).

All three walk the cosine log-SNR time grid t_i = 1 − i/N (`alpha_sigma`), keep the latent
z_t = α_t x + σ_t ε as their state and talk to the model only through the σ-space
`denoise_fn(z/α_t, σ_t/α_t) -> x̂` — so they run a distilled student, an α-σ teacher or any EDM-family
model alike. A guidance weight w is bound into `denoise_fn` (a w-conditioned student takes it as an
input, a classifier-free-guided teacher combines its two branches; `sampling.make_sample_fn` and
`training.distill.guided_denoise_fn` build either).

Deterministic (Salimans & Ho 2022, Alg. 2; Meng et al. 2022 §4.3): DDIM from z_1 ~ N(0, I),

    z_s = α_s x̂(z_t) + σ_s (z_t − α_t x̂(z_t))/σ_t,   s = t − 1/N,   and x̂(z_{1/N}) at the end.

Stochastic (Meng et al. 2022 §4.3): while t > 1/N, a deterministic jump of twice the step,
k = max(t − 2/N, 0), then forward noise back to s = t − 1/N:

    z_k = α_k x̂(z_t) + σ_k (z_t − α_t x̂(z_t))/σ_t,
    z_s = (α_s/α_k) z_k + σ_{s|k} ξ,   σ²_{s|k} = (1 − e^(λ_s − λ_k)) σ_s²,   ξ ~ N(0, I);

the last step from t = 1/N is the plain deterministic one (return x̂). It costs N evaluations whose
jumps are 2/N long: it is meant for a student distilled to N/2 steps (the jump that student was
trained for), evaluated on the twice finer grid — the "slightly different time-steps" of the paper,
which `training.distill` covers with its `stochastic_grid` option (including the half-length last
step). In σ-space the re-noise step is EDM's churn, x_s = x_k + sqrt(σ_s² − σ_k²)·ξ.

Encoder (DDIM inversion, Meng et al. 2022 §5): the same DDIM step with time running upward from
z_0 = α_0 x to z_1, used for style transfer (encode with class A, decode with class B).

Each sampler is one `lax.scan`; the stochastic one draws its noise from per-sample keys
(`noise.RENOISE_STREAM`), so image b depends only on key b.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax import registry
from diffjax.precond import Preconditioning
from diffjax.processes import alpha_sigma
from diffjax.samplers import noise

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def logsnr_range(precond: Optional[Preconditioning] = None, logsnr_min: Optional[float] = None,
                 logsnr_max: Optional[float] = None) -> tuple[float, float]:
  """[λ_min, λ_max] of the grid: [−20, 20] (or as given) inside the network's supported σ range."""
  lo = alpha_sigma.LOGSNR_MIN if logsnr_min is None else float(logsnr_min)
  hi = alpha_sigma.LOGSNR_MAX if logsnr_max is None else float(logsnr_max)
  if precond is not None:
    # σ = e^(−λ/2): the largest σ bounds λ from below, the smallest from above.
    if 0.0 < precond.sigma_max < math.inf:
      lo = max(lo, -2.0 * math.log(precond.sigma_max))
    if precond.sigma_min > 0.0:
      hi = min(hi, -2.0 * math.log(precond.sigma_min))
  return lo, hi


def time_grid(num_steps: int, logsnr_min: float = alpha_sigma.LOGSNR_MIN,
              logsnr_max: float = alpha_sigma.LOGSNR_MAX, upward: bool = False) -> dict:
  """The grid t_i = 1 − i/N (or i/N when `upward`) with α, σ_t and σ-space σ, in float64.

  Returns:
    {'t', 'alpha', 'sigma', 'sigma_edm', 'logsnr'}: numpy float64 arrays [N + 1].
  """
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f'The number of sampling steps must be a positive integer, got {num_steps!r}.')
  a, b = alpha_sigma.cosine_coefficients(logsnr_min, logsnr_max)
  i = np.arange(num_steps + 1, dtype=np.float64)
  t = i / num_steps if upward else 1.0 - i / num_steps
  phi = a * t + b  # α = cos φ, σ_t = sin φ, σ = tan φ (alpha_sigma module docstring)
  return {'t': t, 'alpha': np.cos(phi), 'sigma': np.sin(phi), 'sigma_edm': np.tan(phi),
          'logsnr': -2.0 * np.log(np.tan(phi))}


def _predict(denoise_fn: DenoiseFn, z, alpha_t, sigma_edm_t, clip: Optional[float]):
  """x̂(z_t): the σ-space denoiser at x = z/α_t, σ = σ_t/α_t, optionally clipped."""
  x_hat = denoise_fn(z / alpha_t, jnp.broadcast_to(sigma_edm_t, z.shape[:1]))
  x_hat = jnp.asarray(x_hat, z.dtype)
  return x_hat if clip is None else jnp.clip(x_hat, -clip, clip)


def _f32(x) -> jax.Array:
  return jnp.asarray(np.asarray(x, np.float64), jnp.float32)


def ddim(denoise_fn: DenoiseFn, latents: jax.Array, *, num_steps: int,
         clip: Optional[float] = None, logsnr_min: float = alpha_sigma.LOGSNR_MIN,
         logsnr_max: float = alpha_sigma.LOGSNR_MAX) -> jax.Array:
  """N-step deterministic DDIM in α-σ form (PD Alg. 2); returns x̂ of the last step.

  Args:
    denoise_fn: σ-space D(x [B, ...], σ [B]) -> x̂ [B, ...] with labels and w bound.
    latents: z_1 [B, ...], standard normal.
    num_steps: N (model evaluations).
    clip: clip x̂ to [−clip, clip] at every step (sampling-time clipping), or None.
    logsnr_min, logsnr_max: the schedule's λ range.

  Returns:
    samples [B, ...].
  """
  g = time_grid(num_steps, logsnr_min, logsnr_max)
  z = jnp.asarray(latents, jnp.float32)
  xs = tuple(_f32(v) for v in (g['alpha'][:-1], g['sigma'][:-1], g['sigma_edm'][:-1],
                               g['alpha'][1:], g['sigma'][1:]))

  def step(carry, inputs):
    z, _ = carry
    alpha_t, sigma_t, sigma_edm_t, alpha_s, sigma_s = inputs
    x_hat = _predict(denoise_fn, z, alpha_t, sigma_edm_t, clip)
    return (alpha_sigma.ddim_step(z, x_hat, alpha_t, sigma_t, alpha_s, sigma_s), x_hat), None

  (_, x_hat), _ = lax.scan(step, (z, jnp.zeros_like(z)), xs)
  return x_hat


def stochastic_tables(num_steps: int, logsnr_min: float = alpha_sigma.LOGSNR_MIN,
                      logsnr_max: float = alpha_sigma.LOGSNR_MAX) -> dict:
  """Per-step constants of the stochastic sampler (float64), step i from t_i = 1 − i/N.

  Returns:
    {'t', 'k', 's', 'alpha_t', 'sigma_t', 'sigma_edm_t', 'alpha_k', 'sigma_k', 'ratio' (α_s/α_k),
     'var' (σ²_{s|k})}, each [N]. The last entry (t = 1/N) is the deterministic edge step: its
    jump and noise entries are unused (ratio 1, var 0).
  """
  g = time_grid(num_steps, logsnr_min, logsnr_max)
  a, b = alpha_sigma.cosine_coefficients(logsnr_min, logsnr_max)
  n = num_steps
  t = g['t'][:-1]
  k = np.maximum(t - 2.0 / n, 0.0)
  s = t - 1.0 / n
  lam = lambda u: -2.0 * np.log(np.tan(a * u + b))
  alpha_k, sigma_k = np.cos(a * k + b), np.sin(a * k + b)
  alpha_s, sigma_s = np.cos(a * s + b), np.sin(a * s + b)
  # Meng et al. §4.3: σ²_{s|k} = (1 − e^(λ_s − λ_k))·σ_s², the variance of q(z_s | z_k).
  var = -np.expm1(lam(s) - lam(k)) * sigma_s**2
  ratio = alpha_s / alpha_k
  edge = np.arange(n) == n - 1
  return {'t': t, 'k': k, 's': s, 'alpha_t': g['alpha'][:-1], 'sigma_t': g['sigma'][:-1],
          'sigma_edm_t': g['sigma_edm'][:-1], 'alpha_k': alpha_k, 'sigma_k': sigma_k,
          'ratio': np.where(edge, 1.0, ratio), 'var': np.where(edge, 0.0, var)}


def stochastic(denoise_fn: DenoiseFn, latents: jax.Array, keys=None, *, num_steps: int,
               clip: Optional[float] = None, logsnr_min: float = alpha_sigma.LOGSNR_MIN,
               logsnr_max: float = alpha_sigma.LOGSNR_MAX) -> jax.Array:
  """The N-step stochastic sampler of Meng et al. (2022, §4.3); see the module docstring.

  Args:
    denoise_fn: σ-space D(x [B, ...], σ [B]) -> x̂ [B, ...] with labels and w bound.
    latents: z_1 [B, ...], standard normal.
    keys: per-sample keys [B] (`samplers.seed_keys`); may be None only when N = 1 (no noise).
    num_steps: N (model evaluations); the jumps are 2/N long.
    clip: clip x̂ to [−clip, clip], or None.
    logsnr_min, logsnr_max: the schedule's λ range.

  Returns:
    samples [B, ...].
  """
  z = jnp.asarray(latents, jnp.float32)
  if keys is None and num_steps > 1:
    raise ValueError('The stochastic sampler needs per-sample keys (samplers.seed_keys(seeds)) '
                     'when it takes more than one step.')
  tab = stochastic_tables(num_steps, logsnr_min, logsnr_max)
  renoise_keys = None if keys is None else noise.stream(noise.as_keys(keys, z.shape[0]),
                                                        noise.RENOISE_STREAM)
  xs = (_f32(tab['alpha_t']), _f32(tab['sigma_t']), _f32(tab['sigma_edm_t']),
        _f32(tab['alpha_k']), _f32(tab['sigma_k']), _f32(tab['ratio']),
        _f32(np.sqrt(tab['var'])), jnp.arange(num_steps))

  def step(carry, inputs):
    z, _ = carry
    alpha_t, sigma_t, sigma_edm_t, alpha_k, sigma_k, ratio, std, i = inputs
    x_hat = _predict(denoise_fn, z, alpha_t, sigma_edm_t, clip)
    z_k = alpha_sigma.ddim_step(z, x_hat, alpha_t, sigma_t, alpha_k, sigma_k)
    if renoise_keys is None:
      xi = jnp.zeros_like(z)
    else:
      xi = noise.step_normal(renoise_keys, i, z.shape[1:], z.dtype)
    return (ratio * z_k + std * xi, x_hat), None

  (_, x_hat), _ = lax.scan(step, (z, jnp.zeros_like(z)), xs)
  return x_hat


def encode(denoise_fn: DenoiseFn, images: jax.Array, *, num_steps: int,
           logsnr_min: float = alpha_sigma.LOGSNR_MIN,
           logsnr_max: float = alpha_sigma.LOGSNR_MAX) -> jax.Array:
  """The N-step DDIM encoder: z_0 = α_0 x, then DDIM steps with t running up to 1 (Meng et al. §5).

  Args:
    denoise_fn: σ-space D(x [B, ...], σ [B]) -> x̂ (labels and w bound; an encoder student).
    images: x [B, ...] in [−1, 1].
    num_steps: N.
    logsnr_min, logsnr_max: the schedule's λ range.

  Returns:
    latents z_1 [B, ...] for `ddim` / `stochastic`.
  """
  g = time_grid(num_steps, logsnr_min, logsnr_max, upward=True)
  z = jnp.asarray(images, jnp.float32) * jnp.float32(g['alpha'][0])
  xs = tuple(_f32(v) for v in (g['alpha'][:-1], g['sigma'][:-1], g['sigma_edm'][:-1],
                               g['alpha'][1:], g['sigma'][1:]))

  def step(z, inputs):
    alpha_t, sigma_t, sigma_edm_t, alpha_s, sigma_s = inputs
    x_hat = _predict(denoise_fn, z, alpha_t, sigma_edm_t, None)
    return alpha_sigma.ddim_step(z, x_hat, alpha_t, sigma_t, alpha_s, sigma_s), None

  z, _ = lax.scan(step, z, xs)
  return z


# ------------------------------------------------------------------------------------------------
# Registry forms: sampler(denoise_fn, latents, keys, *, precond, num_steps, **options).


def _clip_value(clip_denoised) -> Optional[float]:
  if clip_denoised is True:
    return 1.0
  return float(clip_denoised) if clip_denoised else None


def distill_ddim(denoise_fn: DenoiseFn, latents: jax.Array, keys=None, *,
                 precond: Optional[Preconditioning] = None, num_steps: int,
                 clip_denoised=False, logsnr_min: Optional[float] = None,
                 logsnr_max: Optional[float] = None) -> jax.Array:
  """Registry form of `ddim`: the grid's λ range is clipped to precond's σ range.

  Args: denoise_fn, latents (standard normal), keys (unused); precond, num_steps; clip_denoised
  (True clips x̂ to [−1, 1], a number to [−c, c]); logsnr_min, logsnr_max.
  """
  del keys  # deterministic
  lo, hi = logsnr_range(precond, logsnr_min, logsnr_max)
  return ddim(denoise_fn, latents, num_steps=num_steps, clip=_clip_value(clip_denoised),
              logsnr_min=lo, logsnr_max=hi)


def distill_stochastic(denoise_fn: DenoiseFn, latents: jax.Array, keys=None, *,
                       precond: Optional[Preconditioning] = None, num_steps: int,
                       clip_denoised=False, logsnr_min: Optional[float] = None,
                       logsnr_max: Optional[float] = None) -> jax.Array:
  """Registry form of `stochastic` (N evaluations, jumps of 2/N: use a student of N/2 steps)."""
  lo, hi = logsnr_range(precond, logsnr_min, logsnr_max)
  return stochastic(denoise_fn, latents, keys, num_steps=num_steps,
                    clip=_clip_value(clip_denoised), logsnr_min=lo, logsnr_max=hi)


registry.add('sampler', 'distill_ddim', distill_ddim)
registry.add('sampler', 'distill_stochastic', distill_stochastic)
