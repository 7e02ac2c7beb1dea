"""The α-σ form of progressive distillation (Salimans & Ho 2022, arXiv 2202.00512), in σ-space.

Progressive distillation writes the forward process as z_t = α_t·x + σ_t·ε with α_t² + σ_t² = 1 and
the continuous cosine log-SNR schedule (§2, App. A of the paper)

    λ(t) = log(α_t²/σ_t²) = −2·log tan(a·t + b),   t ∈ [0, 1],                              (cos)
    b = arctan(e^(−λ_max/2)),   a = arctan(e^(−λ_min/2)) − b,   λ ∈ [λ_min, λ_max] = [−20, 20],
    α_t² = sigmoid(λ(t)),   σ_t² = sigmoid(−λ(t)).

The σ-space core of diffjax (EDM) sees the same process as x_EDM = z/α with noise level
σ = σ_t/α_t = e^(−λ/2) = tan(a·t + b): the cosine log-SNR schedule is simply σ(t) = tan(a·t + b).
So every α-σ parameterization is a *preconditioning* of the one `Denoiser` (REFERENCE §4.2):

    network input   z = α·x_EDM                                (c_in = α = 1/sqrt(1 + σ²))
    conditioning    c_noise = 1000·t                           (t = (arctan σ − b)/a)
    x-prediction    x̂ = F                                     (c_skip = 0,  c_out = 1)
    ε-prediction    x̂ = (z − σ_t ε̂)/α_t = x_EDM − σ·ε̂        (c_skip = 1,  c_out = −σ)
    v-prediction    x̂ = α_t z − σ_t v̂ = α² x_EDM − σ_t v̂     (c_skip = α², c_out = −σ_t)
    both            x̂ = σ_t² x̃ + α_t(z − σ_t ε̃)              (two output channel groups [x̃, ε̃])

and the losses are `objectives.edm.DenoisingLoss`es (`objectives.alpha_sigma`): t ~ U[0, 1], weighted on ‖x − x̂‖² by the truncated SNR
max(SNR, 1) (every released config of the paper) or SNR + 1 (= v-MSE); SNR = α_t²/σ_t² = 1/σ².

The DDIM step t → s (Song et al. 2021, PD Eq. 3) is z_s = α_s x̂ + σ_s (z_t − α_t x̂)/σ_t; in σ-space
it is the Euler step of the probability-flow ODE, x_s = x̂ + (σ_s/σ_t)(x_t − x̂) — which is why every
σ-space sampler runs an α-σ model and every α-σ sampler (`samplers.distilled`) runs any σ-space model.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from diffjax import registry
from diffjax.processes import schedules

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0
# c_noise = TIME_SCALE·t puts t ∈ [0, 1] on the range of step indices the positional noise embedding
# of DDPM++ was designed for (as VP's c_noise = (M − 1)·t does).
TIME_SCALE = 1000.0
PARAMETERIZATIONS = ('x', 'eps', 'v', 'both')
WEIGHTINGS = ('snr_trunc', 'snr_plus_one', 'snr')


class CosineSchedule(NamedTuple):
  """The constants a, b of λ(t) = −2 log tan(a·t + b) (PD App. A)."""
  a: float
  b: float


def cosine_coefficients(logsnr_min: float = LOGSNR_MIN,
                        logsnr_max: float = LOGSNR_MAX) -> CosineSchedule:
  """a and b with λ(0) = λ_max and λ(1) = λ_min; for [−20, 20]: b = 4.539993e−5, a = 1.570705527."""
  if not logsnr_min < logsnr_max:
    raise ValueError(f'The log-SNR range must have logsnr_min < logsnr_max, got '
                     f'[{logsnr_min}, {logsnr_max}].')
  b = math.atan(math.exp(-0.5 * logsnr_max))
  a = math.atan(math.exp(-0.5 * logsnr_min)) - b
  return CosineSchedule(a, b)


def _angles(t, logsnr_min: float, logsnr_max: float) -> tuple[jax.Array, jax.Array]:
  """φ = a·t + b and its complement π/2 − φ = a·(1 − t) + c, each computed directly.

  c = π/2 − a − b = arctan(e^(λ_min/2)). Near t = 1, φ is within 5e−5 of π/2, where float32
  cos φ and tan φ lose three digits; the complement keeps them (sin, cos and 1/tan of a small angle).
  """
  a, b = cosine_coefficients(logsnr_min, logsnr_max)
  c = math.atan(math.exp(0.5 * logsnr_min))
  t = jnp.asarray(t, jnp.float32)
  return a * t + b, a * (1.0 - t) + c


def sigma_of_t(t, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX) -> jax.Array:
  """The σ-space noise level σ(t) = e^(−λ(t)/2) = tan(a·t + b)."""
  phi, phi_c = _angles(t, logsnr_min, logsnr_max)
  return jnp.where(phi < phi_c, jnp.tan(phi), 1.0 / jnp.tan(phi_c))


def logsnr(t, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX) -> jax.Array:
  """λ(t) = −2 log tan(a·t + b), elementwise (PD App. A)."""
  return -2.0 * jnp.log(sigma_of_t(t, logsnr_min, logsnr_max))


def t_of_sigma(sigma, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX) -> jax.Array:
  """The inverse of `sigma_of_t`: t = (arctan σ − b)/a."""
  a, b = cosine_coefficients(logsnr_min, logsnr_max)
  return (jnp.arctan(jnp.asarray(sigma, jnp.float32)) - b) / a


def logsnr_of_sigma(sigma) -> jax.Array:
  """λ = log(α²/σ_t²) = −2 log σ for the σ-space noise level σ = σ_t/α_t."""
  return -2.0 * jnp.log(jnp.asarray(sigma, jnp.float32))


def alpha_sigma_of_logsnr(lam) -> tuple[jax.Array, jax.Array]:
  """(α, σ_t) with α² = sigmoid(λ), σ_t² = sigmoid(−λ) (variance preserving)."""
  lam = jnp.asarray(lam, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))


def alpha_sigma_of_sigma(sigma) -> tuple[jax.Array, jax.Array]:
  """(α, σ_t) = (1, σ)/sqrt(1 + σ²) for the σ-space noise level σ (σ = ∞ gives (0, 1))."""
  sigma = jnp.asarray(sigma, jnp.float32)
  alpha = jax.lax.rsqrt(1.0 + jnp.square(sigma))
  return alpha, sigma * alpha


def alpha_sigma_of_t(t, logsnr_min: float = LOGSNR_MIN,
                     logsnr_max: float = LOGSNR_MAX) -> tuple[jax.Array, jax.Array]:
  """(α_t, σ_t) = (cos φ, sin φ) with φ = a·t + b (the schedule is a rotation by a·t)."""
  phi, phi_c = _angles(t, logsnr_min, logsnr_max)
  low = phi < phi_c
  return jnp.where(low, jnp.cos(phi), jnp.sin(phi_c)), jnp.where(low, jnp.sin(phi), jnp.cos(phi_c))


def cosine_logsnr_schedule(logsnr_min: float = LOGSNR_MIN,
                           logsnr_max: float = LOGSNR_MAX) -> schedules.Schedule:
  """σ(t) = tan(a·t + b) as a `schedules.Schedule`: σ' = a(1 + σ²), σ⁻¹(σ) = (arctan σ − b)/a."""
  a, _ = cosine_coefficients(logsnr_min, logsnr_max)
  return schedules.Schedule(
      sigma=lambda t: sigma_of_t(t, logsnr_min, logsnr_max),
      sigma_deriv=lambda t: a * (1.0 + jnp.square(sigma_of_t(t, logsnr_min, logsnr_max))),
      sigma_inv=lambda s: t_of_sigma(s, logsnr_min, logsnr_max))


registry.add('schedule', 'cosine_logsnr', cosine_logsnr_schedule)


# ------------------------------------------------------------------------------------------------
# Conversions between x, ε, v and the latent z (PD §4: v ≡ α ε − σ x).


def _b(c, x):
  """A per-example coefficient [B] (or scalar) broadcast against x [B, ...]."""
  c = jnp.asarray(c, jnp.float32)
  return c if c.ndim == 0 else c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def x_from_eps(z, eps, alpha, sigma):
  """x̂ = (z − σ_t ε̂)/α_t."""
  return (z - _b(sigma, z) * eps) / _b(alpha, z)


def eps_from_x(z, x, alpha, sigma):
  """ε̂ = (z − α_t x̂)/σ_t."""
  return (z - _b(alpha, z) * x) / _b(sigma, z)


def x_from_v(z, v, alpha, sigma):
  """x̂ = α_t z − σ_t v̂ (uses α² + σ² = 1)."""
  return _b(alpha, z) * z - _b(sigma, z) * v


def v_from_x(z, x, alpha, sigma):
  """v̂ = α_t ε̂ − σ_t x̂ with ε̂ from x̂ (PD Eq. 9)."""
  return _b(alpha, z) * eps_from_x(z, x, alpha, sigma) - _b(sigma, z) * x


def x_from_both(z, x_tilde, eps_tilde, alpha, sigma):
  """The "both" merge x̂ = σ_t² x̃ + α_t(z − σ_t ε̃) (PD §4): x̃ trusted at high noise, ε̃ at low."""
  a, s = _b(alpha, z), _b(sigma, z)
  return jnp.square(s) * x_tilde + a * (z - s * eps_tilde)


def guide(pred_cond, pred_uncond, w):
  """Classifier-free guidance (1 + w)·p_c − w·p_u in any of the x-, ε- or v-spaces (Ho & Salimans).

  The three agree (map to the same x̂) because the conversions are affine in the prediction with
  the same z; clipping x̂ before combining is what would break that.
  """
  w = jnp.asarray(w, jnp.float32)
  w = w if w.ndim == 0 else w.reshape(w.shape + (1,) * (pred_cond.ndim - w.ndim))
  return (1.0 + w) * pred_cond - w * pred_uncond


def ddim_step(z_t, x_hat, alpha_t, sigma_t, alpha_s, sigma_s, clip: Optional[float] = None):
  """One DDIM step in α-σ form: z_s = α_s x̂ + σ_s (z_t − α_t x̂)/σ_t (PD Eq. 3, DDIM η = 0).

  Works in either direction (s < t samples, s > t encodes).

  Args:
    z_t: latents [B, ...] at t.
    x_hat: the model's prediction of x [B, ...] at (z_t, t).
    alpha_t, sigma_t, alpha_s, sigma_s: scalars or per-example [B].
    clip: if given, x̂ is clipped to [−clip, clip] first (sampling-time clipping; ε̂ follows x̂).

  Returns:
    z_s [B, ...].
  """
  if clip is not None:
    x_hat = jnp.clip(x_hat, -clip, clip)
  eps_hat = eps_from_x(z_t, x_hat, alpha_t, sigma_t)
  return _b(alpha_s, z_t) * x_hat + _b(sigma_s, z_t) * eps_hat
