"""The α-σ losses of Salimans & Ho / Meng et al.: t ~ U[0, 1] on the cosine log-SNR schedule,
weighted on ‖x − x̂‖² (truncated SNR, SNR+1, SNR)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffjax import registry
from diffjax.objectives.edm import DenoisingLoss
from diffjax.processes.alpha_sigma import LOGSNR_MAX, LOGSNR_MIN, WEIGHTINGS, sigma_of_t

# ------------------------------------------------------------------------------------------------
# Losses: t ~ U[0, 1] on the cosine schedule, weighted on ‖x − x̂‖².


def truncated_snr_weight(sigma) -> jax.Array:
  """max(SNR, 1) = max(1/σ², 1): x-MSE at low noise, ε-like at high noise (PD §4)."""
  return jnp.maximum(1.0 / jnp.square(sigma), 1.0)


def snr_plus_one_weight(sigma) -> jax.Array:
  """SNR + 1 = 1/σ² + 1: equal to the v-MSE ‖v − v̂‖² (PD §4)."""
  return 1.0 / jnp.square(sigma) + 1.0


def snr_weight(sigma) -> jax.Array:
  """SNR = 1/σ²: equal to the ε-MSE (DDPM's L_simple in continuous time)."""
  return 1.0 / jnp.square(sigma)


def weighting(name: str) -> Callable[[jax.Array], jax.Array]:
  """The weighting λ(σ) on ‖x − x̂‖² named 'snr_trunc', 'snr_plus_one' or 'snr'."""
  table = {'snr_trunc': truncated_snr_weight, 'snr_plus_one': snr_plus_one_weight,
           'snr': snr_weight}
  if name not in table:
    raise ValueError(f'Unknown weighting {name!r}; known weightings: {", ".join(WEIGHTINGS)}.')
  return table[name]


def sample_sigma(key, n: int, logsnr_min: float = LOGSNR_MIN,
                 logsnr_max: float = LOGSNR_MAX) -> jax.Array:
  """σ(t) with t ~ U[0, 1] (continuous time, PD Alg. 1)."""
  t = jax.random.uniform(key, (n,), jnp.float32)
  return sigma_of_t(t, logsnr_min, logsnr_max)


def make_loss(weighting_name: str = 'snr_trunc', logsnr_min: float = LOGSNR_MIN,
              logsnr_max: float = LOGSNR_MAX) -> DenoisingLoss:
  """The α-σ training loss of progressive distillation as a σ-space `DenoisingLoss`."""
  weight = weighting(weighting_name)
  return DenoisingLoss(
      f'alpha_sigma_{weighting_name}',
      lambda key, n: sample_sigma(key, n, logsnr_min, logsnr_max), weight)


registry.add('loss', 'alpha_sigma',
             lambda weighting='snr_trunc', logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX: make_loss(
                 weighting, logsnr_min, logsnr_max))
