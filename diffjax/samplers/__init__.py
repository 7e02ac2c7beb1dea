"""Samplers: pure functions over a σ-grid that talk to a model only through `denoise_fn(x, σ)`.

Low level (σ-space, DESIGN.md's public API):
    x0 = samplers.heun(denoise_fn, latents * sigmas[0], sigmas, key=keys, s_churn=...)
    x0 = samplers.euler(...)
    x0 = samplers.generalized(denoise_fn, latents, num_steps=18, discretization='edm', ...)
    x0 = samplers.dpmpp_2m(denoise_fn, latents * sigmas[0], sigmas)   # and the k-diffusion
    x0 = samplers.unipc(denoise_fn, latents * sigmas[0], sigmas, order=3)  # family, UniPC, DEIS
    denoise_fn = samplers.guided(denoise_cond, denoise_uncond, w)

High level (what configs name): every registered sampler has the signature

    sampler(denoise_fn, latents, keys, *, precond, num_steps, **options) -> images

with standard-normal `latents` [B, H, W, C], per-sample `keys` [B] (`seed_keys(seeds)`; None for a
deterministic sampler) and the network's `precond.Preconditioning` (its σ range and round_sigma).
`get_sampler(name)` looks one up; an unknown name fails with the list of known ones.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from diffjax import registry
from diffjax.precond import Preconditioning
from diffjax.samplers import (
  brownian,
  ddpm,  # noqa: F401  (registers 'ddpm', 'ddim')
  deis_solver,  # registers 'deis'
  distilled,
  dpm_solver,  # registers 'dpm_fast', 'dpm_adaptive'
  guidance,
  kdiffusion,  # registers 'euler_ancestral', 'lms', 'dpm_2', …, 'dpmpp_3m_sde'
  momentum,  # noqa: F401  (registers 'momentum', 'soft_naive')
  noise,
  ode,
  sde,  # noqa: F401  (registers 'pc', 'pf_ode')
  stepping,
  unipc_solver,  # registers 'unipc', 'unipc_bh1'
)
from diffjax.samplers.deis_solver import deis
from diffjax.samplers.dpm_solver import dpm_adaptive, dpm_fast
from diffjax.samplers.guidance import combine, guided, guided_batched
from diffjax.samplers.kdiffusion import (
  dpm_2,
  dpm_2_ancestral,
  dpmpp_2m,
  dpmpp_2m_sde,
  dpmpp_2s_ancestral,
  dpmpp_3m_sde,
  dpmpp_sde,
  euler_ancestral,
  lms,
)
from diffjax.samplers.noise import latents, seed_keys
from diffjax.samplers.ode import (
  edm_grid_for,
  euler,
  generalized,
  generalized_setup,
  heun,
  integrate,
  ode_derivative,
)
from diffjax.samplers.unipc_solver import unipc

__all__ = [
    'brownian', 'combine', 'deis', 'deis_solver', 'distilled', 'dpm_2', 'dpm_2_ancestral',
    'dpm_adaptive', 'dpm_fast', 'dpm_solver',
    'dpmpp_2m', 'dpmpp_2m_sde', 'dpmpp_2s_ancestral', 'dpmpp_3m_sde', 'dpmpp_sde', 'edm_grid_for',
    'euler', 'euler_ancestral', 'generalized', 'generalized_setup', 'get_sampler', 'guidance',
    'guided', 'guided_batched', 'heun', 'integrate', 'kdiffusion', 'latents', 'lms', 'names',
    'noise', 'ode', 'ode_derivative', 'seed_keys', 'stepping', 'unipc', 'unipc_solver',
]


def _edm_sampler(solver: str) -> Callable:
  """The registry form of EDM's sampler with `solver`: Karras grid clamped to the network.

  `grid` names another σ-grid (`stepping.sigma_grid_for`), e.g. 'exponential'.
  """

  def sampler(denoise_fn, latents: jax.Array, keys=None, *, precond: Preconditioning,
              num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
              rho: Optional[float] = None, s_churn: float = 0.0, s_tmin: float = 0.0,
              s_tmax: float = float('inf'), s_noise: float = 1.0,
              grid: Optional[str] = None) -> jax.Array:
    sigmas = stepping.sigma_grid_for(precond, num_steps, grid, sigma_min, sigma_max, rho)
    x = latents * jnp.asarray(sigmas[0], latents.dtype)
    return solve(denoise_fn, x, sigmas, key=keys, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                 s_noise=s_noise, round_sigma=precond.round_sigma)

  solve = {'euler': euler, 'heun': heun}[solver]

  sampler.__name__ = f'{solver}_sampler'
  sampler.__doc__ = (
      f'EDM sampler with the {solver} solver on the Karras grid clamped to precond\'s σ range.\n\n'
      '  Args: denoise_fn, latents [B, ...] standard normal, keys [B] or None; precond, num_steps;\n'
      '  sigma_min, sigma_max, rho, grid (the σ-grid); s_churn, s_tmin, s_tmax, s_noise (EDM\n'
      '  Alg. 2).\n')
  return sampler


def _generalized_sampler(denoise_fn, latents: jax.Array, keys=None, *,
                         precond: Optional[Preconditioning], num_steps: int,
                         **options) -> jax.Array:
  """EDM's generalized sampler (see `ode.generalized` for the options)."""
  return generalized(denoise_fn, latents, num_steps=num_steps, keys=keys, precond=precond,
                     **options)


registry.add('sampler', 'euler', _edm_sampler('euler'))
registry.add('sampler', 'heun', _edm_sampler('heun'))
registry.add('sampler', 'generalized', _generalized_sampler)


def get_sampler(name: str) -> Callable:
  """The registered sampler `name`; raises registry.UnknownNameError listing the known names."""
  return registry.get('sampler', name)


def names() -> list[str]:
  """Names of the registered samplers."""
  return registry.names('sampler')
