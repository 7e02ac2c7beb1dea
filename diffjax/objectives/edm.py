"""Training losses in σ-space (Karras et al. 2022, §5 and Table 1).

Every EDM-family loss is the same expectation, differing only in how σ is drawn and weighted:

    L = E_{σ, y, n} [ λ(σ) · ‖D(y + n; σ) − y‖² ],   n ~ N(0, σ²I)                      (EDM Eq. 8)

per example the squared error is **summed** over pixels, then averaged over the batch (as in the
released EDM code, which keeps the loss scale independent of the batch but not of the resolution).
A `DenoisingLoss` is the pair (p(σ), λ(σ)); `denoising_loss` evaluates L for any denoiser, and
`denoising_objective` makes it the `Objective` the train step minimizes.

Constants (EDM Table 1):
  VP:  σ = σ_vp(t), t ~ U(ε_t, 1), ε_t = 1e-5, λ = 1/σ²
  VE:  ln σ ~ U(ln σ_min, ln σ_max), σ ∈ [0.02, 100], λ = 1/σ²
  EDM: ln σ ~ N(P_mean, P_std²), P_mean = −1.2, P_std = 1.2, λ = (σ² + σ_d²)/(σ·σ_d)²
With these, λ(σ)·c_out(σ)² = 1 for VP, VE and EDM: the network's own target has unit weight.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from diffjax import registry
from diffjax.objectives.base import Objective, conditioned_batch
from diffjax.precond import Denoiser
from diffjax.processes import schedules


@dataclasses.dataclass(frozen=True)
class DenoisingLoss:
  """A training distribution of noise levels and its loss weighting.

  Attributes:
    name: registry name.
    sample_sigma: (key, n) -> σ [n] float32.
    weight: σ [...] -> λ(σ), same shape.
  """
  name: str
  sample_sigma: Callable[[jax.Array, int], jax.Array]
  weight: Callable[[jax.Array], jax.Array]


def edm_sigma(key, n: int, p_mean: float = -1.2, p_std: float = 1.2) -> jax.Array:
  """ln σ ~ N(P_mean, P_std²) (EDM §5): concentrates training where the loss can be reduced."""
  return jnp.exp(p_mean + p_std * jax.random.normal(key, (n,), jnp.float32))


def edm_weight(sigma, sigma_data: float = 0.5) -> jax.Array:
  """λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/c_out(σ)² for the EDM preconditioning."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data)**2


def inverse_variance_weight(sigma) -> jax.Array:
  """λ(σ) = 1/σ², the weighting of VP and VE (ε-matching with unit weight)."""
  return 1.0 / sigma**2


def vp_sigma(key, n: int, beta_d: float = schedules.VP_BETA_D,
             beta_min: float = schedules.VP_BETA_MIN,
             epsilon_t: float = schedules.VP_EPSILON_T) -> jax.Array:
  """σ = σ_vp(t) with t ~ U(ε_t, 1): uniform in VP time."""
  t = jax.random.uniform(key, (n,), jnp.float32, minval=epsilon_t, maxval=1.0)
  return schedules.vp_sigma(t, beta_d, beta_min)


def ve_sigma(key, n: int, sigma_min: float = schedules.VE_SIGMA_MIN,
             sigma_max: float = schedules.VE_SIGMA_MAX) -> jax.Array:
  """ln σ ~ U(ln σ_min, ln σ_max): log-uniform noise levels of NCSN."""
  u = jax.random.uniform(key, (n,), jnp.float32)
  return sigma_min * (sigma_max / sigma_min)**u


def make_edm(p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5) -> DenoisingLoss:
  """The EDM loss: log-normal σ, λ = 1/c_out²."""
  return DenoisingLoss('edm', lambda key, n: edm_sigma(key, n, p_mean, p_std),
                       lambda s: edm_weight(s, sigma_data))


def make_vp(beta_d: float = schedules.VP_BETA_D, beta_min: float = schedules.VP_BETA_MIN,
            epsilon_t: float = schedules.VP_EPSILON_T) -> DenoisingLoss:
  """The VP loss of Song et al. (2021) in σ-space."""
  return DenoisingLoss('vp', lambda key, n: vp_sigma(key, n, beta_d, beta_min, epsilon_t),
                       inverse_variance_weight)


def make_ve(sigma_min: float = schedules.VE_SIGMA_MIN,
            sigma_max: float = schedules.VE_SIGMA_MAX) -> DenoisingLoss:
  """The VE loss of Song et al. (2021) in σ-space."""
  return DenoisingLoss('ve', lambda key, n: ve_sigma(key, n, sigma_min, sigma_max),
                       inverse_variance_weight)


registry.add('loss', 'edm', make_edm)
registry.add('loss', 'vp', make_vp)
registry.add('loss', 've', make_ve)


def get_loss(name: str, **kwargs) -> DenoisingLoss:
  """The loss `name` ∈ {edm, vp, ve} built with kwargs."""
  return registry.get('loss', name)(**kwargs)


def weighted_squared_error(denoised, y, sigma, weight: Callable) -> jax.Array:
  """λ(σ)·‖D − y‖² summed over pixels, per example.

  Args:
    denoised: D(y + n; σ) [B, H, W, C].
    y: clean images [B, H, W, C].
    sigma: noise levels [B].
    weight: λ(σ).

  Returns:
    [B] per-example losses.
  """
  err = jnp.sum(jnp.square(denoised.astype(jnp.float32) - y), axis=tuple(range(1, y.ndim)))
  return weight(sigma) * err


def denoising_loss(denoise: Callable, loss: DenoisingLoss, y, key,
                   sigma: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """EDM Eq. 8 for one batch: draw σ and n, denoise, weight, sum over pixels, mean over batch.

  Args:
    denoise: (x_noisy [B,H,W,C], sigma [B]) -> D [B,H,W,C]; any labels, augmentation labels and
      dropout keys are already bound.
    loss: the σ distribution and weighting.
    y: clean (possibly augmented) images [B, H, W, C].
    key: PRNG key for σ and n.
    sigma: optional fixed noise levels [B] (tests, evaluation at given σ).

  Returns:
    (scalar loss, aux) with aux = {'per_example': [B], 'sigma': [B]}.
  """
  key_sigma, key_noise = jax.random.split(key)
  if sigma is None:
    sigma = loss.sample_sigma(key_sigma, y.shape[0])
  n = jax.random.normal(key_noise, y.shape, jnp.float32) * sigma.reshape((-1,) + (1,) * (y.ndim - 1))
  per_example = weighted_squared_error(denoise(y + n, sigma), y, sigma, loss.weight)
  return jnp.mean(per_example), {'per_example': per_example, 'sigma': sigma}


def denoising_objective(denoiser: Denoiser, loss: DenoisingLoss, *,
                        num_classes: int = 0, augment_fn: Optional[Callable] = None) -> Objective:
  """The EDM-family objective (EDM Eq. 8 with the loss's p(σ) and λ(σ)).

  Args:
    denoiser: the preconditioned network.
    loss: σ distribution and weighting.
    num_classes: > 0 feeds one-hot class labels to the network.
    augment_fn: (key, images [B,H,W,C]) -> (images, augment_labels [B, A]) or None.
  """

  def loss_fn(params, batch, key, extra):
    del extra  # The EDM family keeps no state between steps.
    key_aug, key_loss, key_dropout = jax.random.split(key, 3)
    y, class_labels, augment_labels = conditioned_batch(batch, key_aug, num_classes=num_classes,
                                                        augment_fn=augment_fn)

    def denoise(x, sigma):
      return denoiser(params, x, sigma, class_labels, augment_labels, train=True,
                      rngs={'dropout': key_dropout})

    return denoising_loss(denoise, loss, y, key_loss)

  return Objective(loss=loss_fn)
