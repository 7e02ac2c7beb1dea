"""Preconditionings: how a raw network F becomes a denoiser D (Karras et al. 2022, §5, Table 1).

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ))                          (EDM Eq. 7)

The network never sees σ-space: c_in scales its input to unit variance, c_noise is what it is
conditioned on, and c_skip/c_out choose what it predicts (ε for VP/VE/iDDPM, a mix of signal and
noise for EDM). Each formulation of EDM Table 1 is a coefficient function and a `Preconditioning`
that also knows the σ range its network supports (samplers clamp their grid to it).

A `Denoiser` binds a Flax network and a preconditioning into the only interface samplers use:
`denoise_fn(x: [B,H,W,C], sigma: [B]) -> [B,H,W,C]`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import registry
from diffjax.processes import schedules


class Coefficients(NamedTuple):
  """c_skip, c_out, c_in and c_noise of EDM Eq. 7, each shaped like σ."""
  c_skip: jax.Array
  c_out: jax.Array
  c_in: jax.Array
  c_noise: jax.Array


def edm(sigma, sigma_data: float = 0.5) -> Coefficients:
  """EDM preconditioning (Table 1, §5): unit-variance input and target at every σ.

  c_skip = σ_d²/(σ² + σ_d²), c_out = σ·σ_d/sqrt(σ² + σ_d²), c_in = 1/sqrt(σ² + σ_d²),
  c_noise = ¼ ln σ.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  total = sigma**2 + sigma_data**2
  return Coefficients(
      c_skip=sigma_data**2 / total,
      c_out=sigma * sigma_data / jnp.sqrt(total),
      c_in=1.0 / jnp.sqrt(total),
      c_noise=0.25 * jnp.log(sigma),
  )


def vp(sigma, beta_d: float = schedules.VP_BETA_D, beta_min: float = schedules.VP_BETA_MIN,
       M: int = schedules.IDDPM_M) -> Coefficients:
  """VP preconditioning (Song et al. 2021 as written in EDM Table 1): an ε-prediction network.

  c_skip = 1, c_out = −σ, c_in = 1/sqrt(σ² + 1), c_noise = (M − 1)·σ⁻¹(σ).
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  return Coefficients(
      c_skip=jnp.ones_like(sigma),
      c_out=-sigma,
      c_in=1.0 / jnp.sqrt(sigma**2 + 1.0),
      c_noise=(M - 1) * schedules.vp_sigma_inv(sigma, beta_d, beta_min),
  )


def ve(sigma) -> Coefficients:
  """VE preconditioning (NCSN++ of Song et al. 2021, EDM Table 1).

  c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(½σ).
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  return Coefficients(
      c_skip=jnp.ones_like(sigma),
      c_out=sigma,
      c_in=jnp.ones_like(sigma),
      c_noise=jnp.log(0.5 * sigma),
  )


def iddpm(sigma, u: Optional[np.ndarray] = None) -> Coefficients:
  """iDDPM preconditioning (Nichol & Dhariwal 2021 in EDM Table 1): ε-prediction on a discrete grid.

  c_skip = 1, c_out = −σ, c_in = 1/sqrt(σ² + 1), c_noise = M − 1 − argmin_j |u_j − σ|: the
  network is conditioned on the index of the nearest level of its training grid u ([M + 1]).
  """
  if u is None:
    u = schedules.iddpm_u()
  sigma = jnp.asarray(sigma, jnp.float32)
  levels = jnp.asarray(u[:-1], jnp.float32)  # u_0 … u_{M−1}; u_M = 0 is never a noise level
  M = levels.shape[0]
  index = jnp.argmin(jnp.abs(sigma[..., None] - levels), axis=-1)
  return Coefficients(
      c_skip=jnp.ones_like(sigma),
      c_out=-sigma,
      c_in=1.0 / jnp.sqrt(sigma**2 + 1.0),
      c_noise=(M - 1 - index).astype(jnp.float32),
  )


@dataclasses.dataclass(frozen=True)
class Preconditioning:
  """A preconditioning with the σ range its network supports.

  Attributes:
    name: registry name.
    coefficients: σ [...] -> Coefficients.
    sigma_min, sigma_max: the σ range the network was trained on; samplers clamp grids to it.
    round_sigma: σ -> the nearest σ the network can take (identity unless the model is discrete).
    combine: optional (x [B,H,W,C], F [B,H,W,C_out], σ [B]) -> (D, extra) replacing
      c_skip·x + c_out·F[..., :C] for networks that predict several quantities at once (e.g. the
      "both" x/ε parameterization of progressive distillation, `alpha_sigma.combine_both`).
  """
  name: str
  coefficients: Callable[[jax.Array], Coefficients]
  sigma_min: float
  sigma_max: float
  round_sigma: Callable[[jax.Array], jax.Array] = lambda sigma: sigma
  combine: Optional[Callable] = None


def make_edm(sigma_data: float = 0.5, sigma_min: float = 0.0,
             sigma_max: float = float('inf')) -> Preconditioning:
  """The EDM preconditioning; its network takes any σ > 0."""
  return Preconditioning('edm', lambda s: edm(s, sigma_data), sigma_min, sigma_max)


def make_vp(beta_d: float = schedules.VP_BETA_D, beta_min: float = schedules.VP_BETA_MIN,
            M: int = schedules.IDDPM_M, epsilon_t: float = schedules.VP_EPSILON_T) -> Preconditioning:
  """The VP preconditioning; supports σ(ε_t) = 0.0010005 … σ(1) = 152.167."""
  return Preconditioning(
      'vp', lambda s: vp(s, beta_d, beta_min, M),
      sigma_min=float(schedules.vp_sigma(epsilon_t, beta_d, beta_min)),
      sigma_max=float(schedules.vp_sigma(1.0, beta_d, beta_min)))


def make_ve(sigma_min: float = schedules.VE_SIGMA_MIN,
            sigma_max: float = schedules.VE_SIGMA_MAX) -> Preconditioning:
  """The VE preconditioning; supports σ ∈ [0.02, 100]."""
  return Preconditioning('ve', ve, sigma_min, sigma_max)


def make_iddpm(M: int = schedules.IDDPM_M, C1: float = schedules.IDDPM_C1,
               C2: float = schedules.IDDPM_C2) -> Preconditioning:
  """The iDDPM preconditioning; supports u_{M−1} … u_0 and snaps σ to that grid."""
  u = schedules.iddpm_u(M, C1, C2)
  return Preconditioning(
      'iddpm', lambda s: iddpm(s, u), sigma_min=float(u[M - 1]), sigma_max=float(u[0]),
      round_sigma=lambda s: schedules.iddpm_round_sigma(s, u[:-1]))


registry.add('precond', 'edm', make_edm)
registry.add('precond', 'vp', make_vp)
registry.add('precond', 've', make_ve)
registry.add('precond', 'iddpm', make_iddpm)


def get_preconditioning(name: str, **kwargs) -> Preconditioning:
  """The preconditioning `name` ∈ {edm, vp, ve, iddpm} built with kwargs."""
  return registry.get('precond', name)(**kwargs)


def _per_example(c: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a per-example coefficient [B] to broadcast against x [B, ...]."""
  return jnp.reshape(c, c.shape + (1,) * (x.ndim - c.ndim))


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise) for a Flax network F (EDM Eq. 7).

  The network is called as `network.apply({'params': params}, x_in, c_noise, class_labels,
  augment_labels, train=train, rngs=rngs)` and returns [B, H, W, C_out]; only its first C channels
  (C of x) are the prediction F — any further channels (e.g. iDDPM's learned variance) are
  returned separately by `raw`.

  Attributes:
    network: a Flax module with the signature above.
    precond: the preconditioning.
  """
  network: Any
  precond: Preconditioning

  def raw(self, params, x, sigma, class_labels=None, augment_labels=None, *, train=False,
          rngs=None, guidance=None):
    """The denoised image and the network's extra output channels.

    Args:
      params: the network's parameters.
      x: noisy images [B, H, W, C].
      sigma: noise levels [B] (or a scalar, broadcast over the batch).
      class_labels: one-hot labels [B, label_dim], or None.
      augment_labels: augmentation labels [B, augment_dim], or None.
      train: enables dropout.
      rngs: Flax rngs (e.g. {'dropout': key}) when train is True.
      guidance: guidance weight w, scalar or [B], for a w-conditioned network (guided
        distillation); None calls the network without it.

    Returns:
      (D [B, H, W, C] float32, extra [B, H, W, C_out − C] float32).
    """
    x = jnp.asarray(x, jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    # Discrete models snap σ only inside c_noise (the coefficient functions do it); c_skip and
    # c_out use σ as given, as in EDM's iDDPM wrapper. Samplers pass grid values anyway.
    c = self.precond.coefficients(sigma)
    # Only a w-conditioned network takes the guidance weight; every other network is called as before.
    kwargs = {} if guidance is None else {'guidance': guidance}
    f = self.network.apply({'params': params}, _per_example(c.c_in, x) * x, c.c_noise,
                           class_labels, augment_labels, train=train, rngs=rngs, **kwargs)
    f = jnp.asarray(f, jnp.float32)
    if self.precond.combine is not None:
      return self.precond.combine(x, f, sigma)
    channels = x.shape[-1]
    d = _per_example(c.c_skip, x) * x + _per_example(c.c_out, x) * f[..., :channels]
    return d, f[..., channels:]

  def __call__(self, params, x, sigma, class_labels=None, augment_labels=None, *, train=False,
               rngs=None, guidance=None):
    """D(x; σ) [B, H, W, C]; see `raw` for the arguments."""
    return self.raw(params, x, sigma, class_labels, augment_labels, train=train, rngs=rngs,
                    guidance=guidance)[0]

  def bind(self, params, class_labels=None, augment_labels=None, guidance=None) -> Callable:
    """A sampler-ready `denoise_fn(x [B,H,W,C], sigma [B]) -> [B,H,W,C]` in eval mode.

    Class labels, if given, are fixed for the batch the function will be called on. Augmentation
    labels default to zeros (no augmentation) when the network was trained with them.
    """

    def denoise_fn(x, sigma):
      return self(params, x, sigma, class_labels, augment_labels, guidance=guidance)

    # `denoise_fn.raw(x, sigma) -> (D, extra)` exposes the extra output channels to samplers that
    # need them (the learned variance of the DDPM ancestral sampler) without changing the interface.
    denoise_fn.raw = lambda x, sigma: self.raw(params, x, sigma, class_labels, augment_labels,
                                               guidance=guidance)
    return denoise_fn
