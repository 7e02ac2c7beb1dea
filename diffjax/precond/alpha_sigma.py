"""The α-σ parameterizations (x, ε, v, both) of Salimans & Ho / Meng et al. as preconditionings."""

from __future__ import annotations

import math

import jax.numpy as jnp

from diffjax import registry
from diffjax.precond import core as precond_lib
from diffjax.processes.alpha_sigma import (
  LOGSNR_MAX,
  LOGSNR_MIN,
  PARAMETERIZATIONS,
  TIME_SCALE,
  _b,
  alpha_sigma_of_sigma,
  t_of_sigma,
  x_from_both,
)

# ------------------------------------------------------------------------------------------------
# Preconditionings: the parameterizations as c_skip, c_out, c_in, c_noise of EDM Eq. 7.


def coefficients(sigma, parameterization: str = 'v', logsnr_min: float = LOGSNR_MIN,
                 logsnr_max: float = LOGSNR_MAX) -> precond_lib.Coefficients:
  """c_skip, c_out, c_in, c_noise of an α-σ parameterization at σ-space noise levels σ [...].

  With x_EDM = z/α, α = 1/sqrt(1 + σ²) and σ_t = σ·α (module docstring):
    x:    c_skip = 0,  c_out = 1;       eps: c_skip = 1, c_out = −σ;
    v:    c_skip = α², c_out = −σ_t;    both: see `combine_both` (c_skip, c_out unused);
  and for all of them c_in = α (the network sees z) and c_noise = 1000·t(σ).
  """
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f'Unknown α-σ parameterization {parameterization!r}; known: '
                     f'{", ".join(PARAMETERIZATIONS)}.')
  sigma = jnp.asarray(sigma, jnp.float32)
  alpha, sigma_t = alpha_sigma_of_sigma(sigma)
  ones, zeros = jnp.ones_like(sigma), jnp.zeros_like(sigma)
  c_skip, c_out = {
      'x': (zeros, ones),
      'eps': (ones, -sigma),
      'v': (jnp.square(alpha), -sigma_t),
      'both': (jnp.square(alpha), -sigma_t),
  }[parameterization]
  return precond_lib.Coefficients(c_skip=c_skip, c_out=c_out, c_in=alpha,
                                  c_noise=TIME_SCALE * t_of_sigma(sigma, logsnr_min, logsnr_max))


def combine_both(x, f, sigma):
  """The "both" head: the network's [x̃, ε̃, extra...] channels merged into x̂ (PD §4).

  Args:
    x: x_EDM [B, H, W, C] (z = α·x).
    f: network output [B, H, W, ≥ 2C].
    sigma: σ-space noise levels [B].

  Returns:
    (x̂ [B, H, W, C], extra [B, H, W, C_out − 2C]).
  """
  channels = x.shape[-1]
  if f.shape[-1] < 2 * channels:
    raise ValueError(f'The "both" parameterization needs a network with 2×{channels} output '
                     f'channels (set config.model.out_channel_mult=2), got {f.shape[-1]}.')
  alpha, sigma_t = alpha_sigma_of_sigma(sigma)
  z = _b(alpha, x) * x
  x_hat = x_from_both(z, f[..., :channels], f[..., channels:2 * channels], alpha, sigma_t)
  return x_hat, f[..., 2 * channels:]


def make_precond(parameterization: str = 'v', logsnr_min: float = LOGSNR_MIN,
                 logsnr_max: float = LOGSNR_MAX) -> precond_lib.Preconditioning:
  """An α-σ parameterization as a `Preconditioning` on σ ∈ [e^(−λ_max/2), e^(−λ_min/2)]."""
  coefficients(1.0, parameterization)  # fail early on an unknown name
  return precond_lib.Preconditioning(
      f'alpha_sigma_{parameterization}',
      lambda s: coefficients(s, parameterization, logsnr_min, logsnr_max),
      sigma_min=math.exp(-0.5 * logsnr_max), sigma_max=math.exp(-0.5 * logsnr_min),
      combine=combine_both if parameterization == 'both' else None)


for _p in PARAMETERIZATIONS:
  registry.add('precond', f'alpha_sigma_{_p}',
               lambda logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX, _p=_p: make_precond(
                   _p, logsnr_min, logsnr_max))


