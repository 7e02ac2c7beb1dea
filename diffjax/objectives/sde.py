"""score_sde's continuous-time denoising score matching as an EDM-family `DenoisingLoss`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from diffjax import registry
from diffjax.objectives.edm import DenoisingLoss
from diffjax.processes.sde import SDE, SDES, TRAIN_EPSILON, _split_kwargs

# ------------------------------------------------------------------------------------------------
# Continuous-time training: denoising score matching in σ-space.


def sample_sigma(sde: SDE, key, n: int, epsilon: float = TRAIN_EPSILON) -> jax.Array:
  """σ = σ(t) with t ~ U(ε, 1): score_sde's continuous-time training distribution."""
  t = jax.random.uniform(key, (n,), jnp.float32, minval=epsilon, maxval=sde.T)
  return sde.sigma(t)


def loss_weight(sde: SDE, sigma, *, likelihood_weighting: bool = False, reduce_mean: bool = False,
                num_dims: int = 0) -> jax.Array:
  """λ(σ) that turns Σ_pixels ‖D − y‖² into score_sde's per-example loss (Eq. 7).

  With x_t = s(y + σn), z = n and ∇log p_0t = −z/std, the score error is
  s_θ + z/std = (D − y)/(σ·std) (std = sσ), so
    σ²-weighting, λ(t) = std²:    std²‖s_θ + z/std‖² = ‖D − y‖²/σ²       →  λ = 1/σ²
    likelihood weighting, g(t)²:  g²‖s_θ + z/std‖²   = g²‖D − y‖²/(s²σ⁴)  →  λ = g²/(s²σ⁴)
  times score_sde's reduction over pixels: ½·sum (reduce_mean=False, the VE configs) or the mean
  over the D = num_dims data dimensions (reduce_mean=True, the VP and sub-VP configs). The scale
  matters beyond Adam's invariance because score_sde clips gradients at norm 1.

  Args:
    sde: the SDE.
    sigma: noise levels [B].
    likelihood_weighting: use λ(t) = g(t)² (Song et al. 2021b) instead of std².
    reduce_mean: mean over pixels instead of ½·sum.
    num_dims: D, needed when reduce_mean.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  if likelihood_weighting:
    t = sde.sigma_inv(sigma)
    weight = sde.diffusion(t)**2 / (sde.s(t)**2 * sigma**4)
  else:
    weight = 1.0 / sigma**2
  return weight * (1.0 / num_dims if reduce_mean else 0.5)


def make_loss(name: str, **kwargs) -> Any:
  """The DenoisingLoss of SDE `name`.

  kwargs: the SDE's constants, and epsilon (1e-5), likelihood_weighting (False), reduce_mean
  (False), num_dims (required with reduce_mean; e.g. 3072 for CIFAR-10).
  """
  sde, rest = _split_kwargs(name, kwargs)
  epsilon = float(rest.pop('epsilon', TRAIN_EPSILON))
  likelihood_weighting = bool(rest.pop('likelihood_weighting', False))
  reduce_mean = bool(rest.pop('reduce_mean', False))
  num_dims = int(rest.pop('num_dims', 0))
  if rest:
    raise ValueError(f'Unknown sde_{name} loss option(s) {", ".join(sorted(rest))}; known: '
                     'epsilon, likelihood_weighting, reduce_mean, num_dims and the SDE constants.')
  if reduce_mean and num_dims <= 0:
    raise ValueError(f'The sde_{name} loss with reduce_mean=True needs num_dims (H·W·C of the '
                     'data, e.g. 3072 for CIFAR-10).')
  return DenoisingLoss(
      name=f'sde_{name}',
      sample_sigma=lambda key, n: sample_sigma(sde, key, n, epsilon),
      weight=lambda sigma: loss_weight(sde, sigma, likelihood_weighting=likelihood_weighting,
                                       reduce_mean=reduce_mean, num_dims=num_dims))


for _name in SDES:
  registry.add('loss', f'sde_{_name}', lambda _n=_name, **kwargs: make_loss(_n, **kwargs))
