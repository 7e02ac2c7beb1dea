"""Soft Diffusion samplers: the Momentum Sampler (Algorithm 2 of Daras et al. 2022) and the naive one.

Both reverse the forward process x_t = C_t x_0 + σ_t η of `diffjax.processes.corruptions` on the uniform time
grid t_i = 1 − i/N, i = 0 … N, in one `lax.scan`. Step t → t' = t − Δt of the Momentum Sampler
(REFERENCE §5, transcribed from the paper's Algorithm 2):

    x̂_0 = φ_θ(x_t | t) + x_t                       (the model's clean estimate)
    ŷ_t = C_t x̂_0,   ε̂_t = ŷ_t − x_t
    z   = x_t − ((σ_{t'}² − σ_t²)/σ_t²)·ε̂_t + sqrt(σ_t² − σ_{t'}²)·η     (denoise in noise level, keep blur)
    ŷ_{t'} = C_{t'} x̂_0
    x_{t'} = z + (ŷ_{t'} − ŷ_t)                                          (move the blur level)

With C ≡ I it is the reverse-diffusion (ancestral VE) step of Song et al. (2021),
x + (σ_t² − σ_{t'}²)·s(x) + sqrt(σ_t² − σ_{t'}²)·η with s = (x̂_0 − x)/σ_t²; with σ ≡ 0 it is Cold
Diffusion's x_t − C_t x̂_0 + C_{t'} x̂_0 (the noise coefficient is defined as 0 when σ_t = 0). The
naive sampler re-corrupts the estimate from scratch, x_{t'} = C_{t'} x̂_0 + σ_{t'}·η, and is far worse
(paper: CelebA-64 FID 27.82 against 1.85).

How these samplers meet the common interface `sampler(denoise_fn, latents, keys, *, precond,
num_steps, **options)` — the adapter: a Soft Diffusion model is a `precond.Denoiser` whose
preconditioning is `precond.soft.SoftPreconditioning`. Its `denoise_fn(x, t)` returns x̂_0 and takes the
**diffusion time t ∈ [0, 1]** (a [B] vector) where EDM models take σ, and the preconditioning carries the
`SoftSchedule` (C_t, σ_t, p_1). So the samplers read the process from `precond.schedule` and call
`denoise_fn(x, t)`; everything that wraps a denoise_fn linearly (classifier-free guidance) works
unchanged, and a non-soft model fails with one sentence.

Start: `latents` (standard normal, stream 0 of each sample's key) become x_1 ~ p_1, the Gaussian fit of
the fully corrupted data (`SoftSchedule.start`, documented in `diffjax.processes.corruptions`). Step noise comes
from the sample's own key, stream `noise.SOFT_STREAM`, folded with the step index, so image b depends
on seed b only. The output is x_0 of Algorithm 2 (noise level σ(0) = σ_min remains); with
`final_denoise=True` one more evaluation returns x̂_0(x_0, 0) instead.

`gaussian_variance_ratio` computes in closed form what either sampler returns on Gaussian data with
the exact model — the check of a schedule's step sizes that scripts/soft_levels.py prints.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import registry
from diffjax.precond.soft import schedule_of
from diffjax.processes.corruptions import SoftSchedule, multipliers
from diffjax.processes.soft_levels import GaussianFit
from diffjax.samplers import noise

METHODS = ('momentum', 'naive')


def momentum_step(x, y_t, y_next, sigma_t, sigma_next, eta):
  """One Momentum Sampler step (Algorithm 2) from x_t to x_{t'}.

  Args:
    x: x_t [B, H, W, C].
    y_t: ŷ_t = C_t x̂_0 [B, H, W, C].
    y_next: ŷ_{t'} = C_{t'} x̂_0 [B, H, W, C].
    sigma_t, sigma_next: σ_t ≥ σ_{t'} ≥ 0, scalars (or [B, 1, 1, 1]).
    eta: standard normals η [B, H, W, C].

  Returns:
    x_{t'} [B, H, W, C].
  """
  var_t, var_next = jnp.square(sigma_t), jnp.square(sigma_next)
  # (σ_{t'}² − σ_t²)/σ_t², defined as 0 without noise (σ_t = 0: Cold Diffusion has nothing to remove).
  ratio = jnp.where(var_t > 0, (var_next - var_t) / jnp.where(var_t > 0, var_t, 1.0), 0.0)
  eps_hat = y_t - x
  z = x - ratio * eps_hat + jnp.sqrt(jnp.maximum(var_t - var_next, 0.0)) * eta
  return z + (y_next - y_t)


def naive_step(y_next, sigma_next, eta):
  """One naive step: x_{t'} = C_{t'} x̂_0 + σ_{t'}·η (y_next = C_{t'} x̂_0 [B, H, W, C])."""
  return y_next + sigma_next * eta


def time_grid(num_steps: int) -> jnp.ndarray:
  """t_i = 1 − i/N for i = 0 … N, float32 [N + 1] (the last is 0)."""
  return 1.0 - jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps


def sample(denoise_fn: Callable, schedule: SoftSchedule, x1, keys, num_steps: int,
           method: str = 'momentum', final_denoise: bool = False) -> jax.Array:
  """Runs the Momentum (or naive) sampler from x_1 to t = 0 in one `lax.scan`.

  Args:
    denoise_fn: (x [B,H,W,C], t [B]) -> x̂_0 [B,H,W,C].
    schedule: the forward process (C_t, σ_t).
    x1: the start x_1 [B, H, W, C] (e.g. `schedule.start(latents)`).
    keys: per-sample typed keys [B] (see `noise.as_keys`).
    num_steps: N ≥ 1 steps of Δt = 1/N (NFE = N, + 1 with final_denoise).
    method: 'momentum' (Algorithm 2) or 'naive'.
    final_denoise: return x̂_0(x_0, 0) instead of x_0.

  Returns:
    images [B, H, W, C] float32.
  """
  if method not in METHODS:
    raise ValueError(f'Unknown soft sampler {method!r}; known: {", ".join(METHODS)}.')
  if num_steps < 1:
    raise ValueError(f'num_steps must be at least 1, got {num_steps}.')
  x1 = jnp.asarray(x1, jnp.float32)
  batch, shape = x1.shape[0], x1.shape[1:]
  if keys is None:
    raise ValueError('The soft samplers are stochastic: pass per-sample keys '
                     '(samplers.seed_keys(seeds)).')
  step_keys = noise.stream(noise.as_keys(keys, batch), noise.SOFT_STREAM)
  ts = time_grid(num_steps)

  def body(x, inputs):
    i, t, t_next = inputs
    x0_hat = jnp.asarray(denoise_fn(x, jnp.full((batch,), t)), jnp.float32)
    y_next = schedule.corrupt(x0_hat, t_next)
    sigma_next = schedule.sigma_at(t_next)
    eta = noise.step_normal(step_keys, i, shape)
    if method == 'naive':
      return naive_step(y_next, sigma_next, eta), None
    y_t = schedule.corrupt(x0_hat, t)
    return momentum_step(x, y_t, y_next, schedule.sigma_at(t), sigma_next, eta), None

  steps = (jnp.arange(num_steps), ts[:-1], ts[1:])
  x0, _ = jax.lax.scan(body, x1, steps)
  if final_denoise:
    x0 = jnp.asarray(denoise_fn(x0, jnp.zeros((batch,), jnp.float32)), jnp.float32)
  return x0


def gaussian_variance_ratio(fit: GaussianFit, schedule: SoftSchedule, num_steps: int,
                            method: str = 'momentum') -> np.ndarray:
  """Exact output variance of a soft sampler driven by the exact model of Gaussian data, per coefficient.

  For data whose coefficients in the corruption's basis are independent N(μ_k, v_k) (`fit`), the
  exact model is x̂_0 = μ + g (x − d μ) with g = d v/(d² v + σ²) coefficient-wise, so both samplers
  are affine recursions per coefficient and the output variance follows in closed form from
  P_1 = d_1² v + σ_1² (the start p_1):

    momentum: x' = A x + …, A = 1 + ((σ² − σ'²)/σ²)(d g − 1) + (d' − d) g,  P' = A² P + σ² − σ'²
    naive:    x' = d' g x + …,                                        P' = (d' g)² P + σ'²

  A schedule-design audit: the ratio P_0 / (v + σ_0²) is 1 for a sampler that reproduces the data
  (up to the σ(0) of noise Algorithm 2 leaves), and shows where a schedule's steps are too coarse
  (e.g. a mode created from a single prediction in one step keeps only a fraction of its variance).

  Args:
    fit: the data's diagonal Gaussian fit (`processes.soft_levels.fit_gaussian`); only the std is used.
    schedule: the forward process.
    num_steps: N steps on the sampler's grid t_i = 1 − i/N.
    method: 'momentum' or 'naive'.

  Returns:
    [H, W, C] ratios of output variance to v + σ(0)².
  """
  if method not in METHODS:
    raise ValueError(f'Unknown soft sampler {method!r}; known: {", ".join(METHODS)}.')
  v = np.asarray(fit.std, np.float64)**2
  height, width = v.shape[:2]
  level = lambda t: np.interp(t, schedule.t, schedule.level)
  sigma = lambda t: float(np.interp(t, schedule.t, schedule.sigma))
  d = lambda t: multipliers(schedule.corruption, level(t), height, width, xp=np)[..., None]
  ts = 1.0 - np.arange(num_steps + 1) / num_steps
  p = d(1.0)**2 * v + sigma(1.0)**2
  for t, t_next in zip(ts[:-1], ts[1:]):
    d_t, d_next, s2, s2_next = d(t), d(t_next), sigma(t)**2, sigma(t_next)**2
    gain = d_t * v / np.maximum(d_t**2 * v + s2, 1e-300)
    if method == 'naive':
      p = (d_next * gain)**2 * p + s2_next
    else:
      ratio = (s2 - s2_next) / s2 if s2 > 0 else 0.0
      a = 1.0 + ratio * (d_t * gain - 1.0) + (d_next - d_t) * gain
      p = a**2 * p + (s2 - s2_next)
  return p / (v + sigma(0.0)**2)


def _registered(method: str) -> Callable:
  """The registry form: the process from precond.schedule, x_1 ~ p_1 from the latents."""

  def sampler(denoise_fn, latents, keys=None, *, precond, num_steps: int,
              final_denoise: bool = False) -> jax.Array:
    schedule = schedule_of(precond)
    x1 = schedule.start(latents)
    return sample(denoise_fn, schedule, x1, keys, int(num_steps), method, bool(final_denoise))

  sampler.__name__ = f'{method}_sampler'
  sampler.__doc__ = (
      f'Soft Diffusion {method} sampler for a model with the "soft" preconditioning.\n\n'
      '  Args: denoise_fn (x, t) -> x̂_0; latents [B,H,W,C] standard normal (start x_1 ~ p_1);\n'
      '  keys [B] per-sample keys; precond (carries the SoftSchedule); num_steps N (Δt = 1/N);\n'
      '  final_denoise: return x̂_0(x_0, 0) after the last step.\n')
  return sampler


momentum = _registered('momentum')
naive = _registered('naive')
registry.add('sampler', 'momentum', momentum)
registry.add('sampler', 'soft_naive', naive)
