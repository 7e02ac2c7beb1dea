"""The discrete (DDPM/iDDPM) preconditioning over a `processes.discrete` schedule, and what the
DDPM samplers and the VLB read from a preconditioning: its schedule, a denoiser's raw outputs."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import registry
from diffjax.precond import core as precond_lib
from diffjax.processes import schedules
from diffjax.processes.discrete import DiscreteSchedule, make_schedule, schedule_from_sigmas

# ------------------------------------------------------------------------------------------------
# The discrete preconditioning (EDM Table 1, iDDPM column, on any β schedule).


@dataclasses.dataclass(frozen=True, eq=False)
class DiscretePreconditioning(precond_lib.Preconditioning):
  """A `Preconditioning` that also carries the discrete process (for the DDPM samplers and losses).

  Attributes:
    schedule: the model's (not respaced) `DiscreteSchedule`.
    rescale_timesteps: c_noise = t·1000/T instead of t.
  """
  schedule: Optional[DiscreteSchedule] = None
  rescale_timesteps: bool = False
  predict_xstart: bool = False


def _nearest_index(sigma, grid: jax.Array) -> jax.Array:
  """Index of the grid level nearest to σ (elementwise; grid [K])."""
  return jnp.argmin(jnp.abs(sigma[..., None] - grid), axis=-1)


def discrete_coefficients(sigma, schedule: DiscreteSchedule, rescale_timesteps: bool = False,
                          predict_xstart: bool = False) -> precond_lib.Coefficients:
  """c_skip = 1, c_out = −σ, c_in = 1/sqrt(σ² + 1), c_noise = the index of σ on the grid.

  c_in·x = sqrt(ᾱ)(x_0 + σε) is exactly DDPM's x_t, so the network sees what it would in
  improved-diffusion; σ off the grid is conditioned on the nearest level (as EDM's iDDPM wrapper).
  With predict_xstart (openai's flag) the network outputs x_0 itself: c_skip = 0, c_out = 1.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  grid = jnp.asarray(schedule.sigmas, jnp.float32)
  labels = jnp.asarray(schedule.noise_labels(rescale_timesteps), jnp.float32)
  index = _nearest_index(sigma, grid)
  if predict_xstart:
    c_skip, c_out = jnp.zeros_like(sigma), jnp.ones_like(sigma)
  else:
    c_skip, c_out = jnp.ones_like(sigma), -sigma
  return precond_lib.Coefficients(
      c_skip=c_skip, c_out=c_out, c_in=jax.lax.rsqrt(sigma**2 + 1.0), c_noise=labels[index])


def make_ddpm(beta_schedule: str = 'cosine', num_timesteps: int = 1000,
              rescale_timesteps: bool = False,
              predict_xstart: bool = False) -> DiscretePreconditioning:
  """The preconditioning of a discrete ε-prediction model trained on `beta_schedule` with T steps.

  Supports σ ∈ [σ_0, σ_{T−1}] and snaps σ to that grid, so EDM's samplers can use the model
  (REFERENCE §1.2: "σ snapped to the grid by round_sigma").

  Args:
    beta_schedule: 'linear' (Ho et al.) or 'cosine' (Nichol & Dhariwal).
    num_timesteps: T.
    rescale_timesteps: feed t·1000/T (improved-diffusion's default) instead of t.
    predict_xstart: the network predicts x_0 (D = its output), not ε.
  """
  schedule = make_schedule(beta_schedule, num_timesteps)
  grid32 = np.asarray(schedule.sigmas, np.float32)

  def round_sigma(sigma):
    sigma = jnp.asarray(sigma)
    grid = jnp.asarray(grid32, sigma.dtype if jnp.issubdtype(sigma.dtype, jnp.floating)
                       else jnp.float32)
    return grid[_nearest_index(sigma, grid)]

  return DiscretePreconditioning(
      name='ddpm',
      coefficients=lambda s: discrete_coefficients(s, schedule, rescale_timesteps,
                                                   predict_xstart),
      sigma_min=float(schedule.sigmas[0]), sigma_max=float(schedule.sigmas[-1]),
      round_sigma=round_sigma, schedule=schedule, rescale_timesteps=rescale_timesteps,
      predict_xstart=predict_xstart)


registry.add('precond', 'ddpm', make_ddpm)


def schedule_of(precond: precond_lib.Preconditioning) -> DiscreteSchedule:
  """The discrete process behind a preconditioning, for the DDPM samplers and the VLB.

  'ddpm' carries its schedule; EDM's 'iddpm' (e.g. an ADM model) is the cosine process whose σ-grid
  is its u_{M−1…0}, recovered here from its round_sigma grid ends.

  Raises:
    ValueError: for a continuous preconditioning (edm, vp, ve), which has no discrete posterior.
  """
  schedule = getattr(precond, 'schedule', None)
  if isinstance(schedule, DiscreteSchedule):
    return schedule
  if precond.name == 'iddpm':
    for m in (1000, 4000):  # the two M of the released iDDPM/ADM models
      u = schedules.iddpm_u(m)
      if math.isclose(float(u[m - 1]), precond.sigma_min, rel_tol=1e-9) and math.isclose(
          float(u[0]), precond.sigma_max, rel_tol=1e-9):
        return schedule_from_sigmas(u[:m][::-1])
  raise ValueError(
      f'The DDPM samplers need a discrete model (precond "ddpm" or "iddpm"); this one uses '
      f'{precond.name!r}. Use an EDM sampler (heun, euler) instead.')


def denoiser_raw_fn(denoise_fn: Callable) -> Optional[Callable]:
  """The `(x, σ) -> (D, extra)` function a bound denoiser carries as `.raw`, or None."""
  return getattr(denoise_fn, 'raw', None)
