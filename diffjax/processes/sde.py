"""Score SDEs (Song et al. 2021, arXiv 2011.13456) as schedules in diffjax's σ-space core.

The forward SDE dx = f(x, t)dt + g(t)dw (Eq. 5) of each model family is linear, so its marginal is
Gaussian: x_t = m(t)·x_0 + std(t)·z. Writing s(t) = m(t) and σ(t) = std(t)/m(t) this is

    x_t = s(t)·(x_0 + σ(t)·n),   n ~ N(0, I),

exactly EDM's form (Karras et al. 2022, §2 and App. B; REFERENCE §1.1). An SDE here is therefore a
`schedules.Schedule` σ(t) plus a `schedules.Scaling` s(t), and every σ-space part applies unchanged:
the denoiser D(x̃; σ) of x̃ = x/s, the PF-ODE of EDM Eq. 4 (`samplers.ode.ode_derivative`), the
σ-grid samplers. Conversely, for any linear SDE with drift f(t)·x the marginals satisfy

    s'/s = f(t),   g(t)² = 2·s(t)²·σ(t)·σ'(t),                                           (★)

which the three families below obey (the tests check it) and which makes their PF-ODE
dx = [f − ½g²·∇log p_t]dt (Eq. 13) the EDM ODE.

  VP (Eq. 11, DDPM):  β(t) = β_min + t(β_max − β_min), f = −½β(t)x, g = sqrt(β(t)),
                      log m = −¼t²(β_max − β_min) − ½tβ_min (App. B),
                      std = sqrt(1 − m²),  σ = sqrt(1/m² − 1) = sqrt(e^(2L) − 1), L = −log m.
  sub-VP (§3.4):      f = −½β(t)x, g² = β(t)(1 − e^(−2β_min t − (β_max − β_min)t²)) = β(t)(1 − m⁴),
                      std = 1 − m² (App. B),  σ = (1 − m²)/m = 2·sinh(L).
  VE (Eq. 9, SMLD):   σ(t) = σ_min(σ_max/σ_min)^t, f = 0, g = σ(t)·sqrt(2 ln(σ_max/σ_min)), s = 1.

Units. diffjax keeps data in [−1, 1]. The VP and sub-VP models of score_sde are trained on centred
data too, so their constants carry over (β_min = 0.1, β_max = 20). Its VE models see data in [0, 1];
x ↦ 2x − 1 doubles every noise level, so score_sde's CIFAR-10 σ ∈ [0.01, 50] is σ ∈ [0.02, 100]
here (EDM Table 1 writes it the same way), and NCSN++'s noise label log σ_[0,1] is ln(½σ).

Priors: N(0, I) for VP and sub-VP, N(0, σ_max²I) for VE. `prior_logp` sums over all non-batch axes.

Every SDE is registered (kind 'sde') under 'vp', 'subvp' and 've'; `get_sde(name, **kwargs)`.
Preconditionings ('sde_vp', 'sde_subvp', 'sde_ve', kind 'precond') condition the DDPM++/NCSN++
networks as score_sde does, and carry their SDE so SDE samplers and the likelihood find it.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from diffjax import registry
from diffjax.processes import schedules

# score_sde's constants (REFERENCE §3; configs/default_cifar10_configs.py of the released code).
BETA_MIN = 0.1
BETA_MAX = 20.0
VE_SIGMA_MIN = 0.02    # 0.01 on [0, 1] data
VE_SIGMA_MAX = 100.0   # 50 on [0, 1] data
TRAIN_EPSILON = 1e-5   # t ~ U(ε, 1) in training and the likelihood's lower limit
VP_SAMPLING_EPSILON = 1e-3
VE_SAMPLING_EPSILON = 1e-5
# Continuous-time VP / sub-VP networks are conditioned on 999·t (score_sde models/utils.py).
TIME_LABEL_SCALE = 999.0


def _bcast(c, x):
  """Reshapes a scalar or per-example coefficient [B] to broadcast against x [B, ...]."""
  c = jnp.asarray(c, jnp.result_type(x, jnp.float32))
  return jnp.reshape(c, c.shape + (1,) * (x.ndim - c.ndim)) if c.ndim else c


def _num_dims(z) -> int:
  return math.prod(z.shape[1:])


@dataclasses.dataclass(frozen=True)
class SDE:
  """A linear forward SDE on t ∈ [0, T = 1] with marginal x_t = s(t)(x_0 + σ(t)n).

  Subclasses give σ(t), σ'(t), σ⁻¹, s(t), s'(t), g(t), the prior's std and `c_noise`; the rest —
  drift, marginals, prior, discretization, Schedule/Scaling views — follows from those. All time
  functions are elementwise and jittable; t may be a scalar or an array.

  Attributes (class level):
    name: registry name.
    sampling_epsilon: score_sde's last sampling time (1e-3 VP/sub-VP, 1e-5 VE).
    eps_prediction: whether score_sde's network predicts −ε (VP, sub-VP) or σ·score (VE).
  """

  T = 1.0
  name = 'sde'
  sampling_epsilon = VP_SAMPLING_EPSILON
  eps_prediction = True

  # --- σ-space view (EDM Table 1 columns). ---------------------------------------------------
  def sigma(self, t):
    """σ(t) = std(t)/m(t), the noise level of x̃ = x_t/s(t)."""
    raise NotImplementedError

  def sigma_deriv(self, t):
    """dσ/dt."""
    raise NotImplementedError

  def sigma_inv(self, sigma):
    """t with σ(t) = sigma."""
    raise NotImplementedError

  def s(self, t):
    """s(t) = m(t), the mean coefficient."""
    raise NotImplementedError

  def s_deriv(self, t):
    """ds/dt."""
    raise NotImplementedError

  def s_of_sigma(self, sigma):
    """s(σ⁻¹(σ)), written in closed form where it is more accurate."""
    return self.s(self.sigma_inv(sigma))

  def schedule(self) -> schedules.Schedule:
    """σ(t) as a `schedules.Schedule` (for `samplers.ode.integrate` and friends)."""
    return schedules.Schedule(self.sigma, self.sigma_deriv, self.sigma_inv)

  def scaling(self) -> schedules.Scaling:
    """s(t) as a `schedules.Scaling`."""
    return schedules.Scaling(self.s, self.s_deriv)

  # --- the paper's view. ---------------------------------------------------------------------
  def mean_coeff(self, t):
    """m(t): E[x_t | x_0] = m(t)·x_0 (the perturbation kernels of App. B)."""
    return self.s(t)

  def marginal_std(self, t):
    """std(t) of x_t given x_0 (= s(t)·σ(t))."""
    return self.s(t) * self.sigma(t)

  def marginal_prob(self, x0, t):
    """The perturbation kernel p_0t(x_t | x_0) = N(m(t)x_0, std(t)²I).

    Args:
      x0: data [B, ...].
      t: times [B] or a scalar.

    Returns:
      (mean [B, ...], std shaped like t).
    """
    return _bcast(self.mean_coeff(t), x0) * x0, self.marginal_std(t)

  def drift(self, x, t):
    """f(x, t) = (s'(t)/s(t))·x, the linear drift [B, ...]; t scalar or [B]."""
    return _bcast(self.s_deriv(t) / self.s(t), x) * x

  def diffusion(self, t):
    """g(t)."""
    raise NotImplementedError

  def sde(self, x, t):
    """(f(x, t) [B, ...], g(t)) of Eq. 5."""
    return self.drift(x, t), self.diffusion(t)

  def score(self, denoise_fn, x, t):
    """∇_x log p_t(x) in the scaled coordinates x = x_t, from a σ-space denoiser.

    p_t(x) = p(x/s; σ)/s^D, so ∇_x log p_t(x) = (D(x/s; σ) − x/s)/(s·σ²) (EDM Eq. 3).

    Args:
      denoise_fn: D(x̃ [B, ...], σ [B]) -> [B, ...].
      x: states [B, ...].
      t: a scalar time or times [B].
    """
    s, sigma = self.s(t), self.sigma(t)
    x_tilde = x / _bcast(s, x)
    denoised = denoise_fn(x_tilde, jnp.broadcast_to(sigma, x.shape[:1]).astype(x.dtype))
    return (denoised - x_tilde) / _bcast(s * sigma**2, x)

  # --- prior p_T. ----------------------------------------------------------------------------
  @property
  def prior_std(self) -> float:
    raise NotImplementedError

  def prior_sample(self, latents):
    """x_T ~ p_T from standard-normal latents [B, ...] (use `samplers.latents(keys, shape)`)."""
    return latents * self.prior_std

  def prior_logp(self, z):
    """log p_T(z) [B] of N(0, prior_std²I), summed over the non-batch axes of z [B, ...]."""
    var = self.prior_std**2
    dims = _num_dims(z)
    sq = jnp.sum(jnp.square(z).reshape(z.shape[0], -1), axis=-1)
    return -0.5 * dims * math.log(2 * math.pi * var) - 0.5 * sq / var

  # --- discretization. -----------------------------------------------------------------------
  def discretize(self, x, t, t_next):
    """The forward transition from t_next to t > t_next: x_t = x_{t_next} + f + G·z.

    See `transition`; this is it for the SDE's own σ(t) and s(t). score_sde's DDPM (VP) and SMLD
    (VE) discretizations are exactly this on their grids, with β_i = 1 − m(t)²/m(t_next)².

    Returns:
      (f [B, ...], G) with f = (a − 1)·x.
    """
    a, g2 = transition(self.sigma(t), self.s(t), self.sigma(t_next), self.s(t_next))
    return _bcast(a - 1.0, x) * x, jnp.sqrt(g2)

  # --- the network. --------------------------------------------------------------------------
  def c_noise(self, sigma):
    """The label score_sde's network is conditioned on, as a function of σ."""
    raise NotImplementedError


def transition(sigma, s, sigma_next, s_next):
  """The Gaussian step between two marginals of x = s(x_0 + σn), σ_next < σ: x = a·x_next + G·z.

  a = s/s_next and G² = s²(σ² − σ_next²) reproduce the marginal at σ from the one at σ_next
  exactly, for any schedule: for VP a² = 1 − β_i (DDPM), for VE a = 1 and G² = σ² − σ_next²
  (SMLD). Ancestral and reverse-diffusion samplers step backwards along it.

  Returns:
    (a, G²) shaped like the inputs.
  """
  return s / s_next, s**2 * (sigma - sigma_next) * (sigma + sigma_next)


@dataclasses.dataclass(frozen=True)
class VPSDE(SDE):
  """The variance-preserving SDE (Eq. 11) with β(t) = β_min + t(β_max − β_min)."""

  beta_min: float = BETA_MIN
  beta_max: float = BETA_MAX
  name = 'vp'

  def beta(self, t):
    """β(t), linear in t."""
    return self.beta_min + jnp.asarray(t) * (self.beta_max - self.beta_min)

  def _log_inv_mean(self, t):
    """L(t) = −log m(t) = ¼t²(β_max − β_min) + ½tβ_min = ½∫₀ᵗβ (App. B)."""
    t = jnp.asarray(t)
    return 0.25 * t**2 * (self.beta_max - self.beta_min) + 0.5 * t * self.beta_min

  def sigma(self, t):
    return jnp.sqrt(jnp.expm1(2.0 * self._log_inv_mean(t)))

  def sigma_deriv(self, t):
    # σ² = e^(2L) − 1 ⇒ 2σσ' = 2L'e^(2L) = β(1 + σ²)   (EDM Table 1: ½β(σ + 1/σ)).
    sigma = self.sigma(t)
    return 0.5 * self.beta(t) * (sigma + 1.0 / sigma)

  def sigma_inv(self, sigma):
    # ½β_d t² + β_min t = ln(1 + σ²), solved for t ≥ 0.
    beta_d = self.beta_max - self.beta_min
    sigma = jnp.asarray(sigma)
    return (jnp.sqrt(self.beta_min**2 + 2.0 * beta_d * jnp.log1p(sigma**2)) - self.beta_min) / beta_d

  def s(self, t):
    return jnp.exp(-self._log_inv_mean(t))

  def s_deriv(self, t):
    return -0.5 * self.beta(t) * self.s(t)

  def s_of_sigma(self, sigma):
    return 1.0 / jnp.sqrt(1.0 + jnp.asarray(sigma)**2)

  def marginal_std(self, t):
    # sqrt(1 − m²) via expm1: accurate at small t, where 1 − m² ≈ 2L.
    return jnp.sqrt(-jnp.expm1(-2.0 * self._log_inv_mean(t)))

  def diffusion(self, t):
    return jnp.sqrt(self.beta(t))

  @property
  def prior_std(self) -> float:
    return 1.0

  def c_noise(self, sigma):
    return TIME_LABEL_SCALE * self.sigma_inv(sigma)


@dataclasses.dataclass(frozen=True)
class SubVPSDE(VPSDE):
  """The sub-VP SDE (§3.4): the VP drift with g² = β(t)(1 − e^(−2∫₀ᵗβ)); std = 1 − m²."""

  name = 'subvp'

  def sigma(self, t):
    # σ = (1 − m²)/m = 1/m − m = 2 sinh(L): no cancellation at small t.
    return 2.0 * jnp.sinh(self._log_inv_mean(t))

  def sigma_deriv(self, t):
    return jnp.cosh(self._log_inv_mean(t)) * self.beta(t)   # 2cosh(L)·L', L' = ½β

  def sigma_inv(self, sigma):
    # L = asinh(σ/2) = ¼β_d t² + ½β_min t, solved for t ≥ 0.
    beta_d = self.beta_max - self.beta_min
    log_inv_mean = jnp.arcsinh(0.5 * jnp.asarray(sigma))
    return (jnp.sqrt(self.beta_min**2 + 4.0 * beta_d * log_inv_mean) - self.beta_min) / beta_d

  def s_of_sigma(self, sigma):
    return jnp.exp(-jnp.arcsinh(0.5 * jnp.asarray(sigma)))

  def marginal_std(self, t):
    return -jnp.expm1(-2.0 * self._log_inv_mean(t))

  def diffusion(self, t):
    # β(t)(1 − e^(−4L)) with 4L = 2β_min t + (β_max − β_min)t² (REFERENCE §3).
    return jnp.sqrt(self.beta(t) * -jnp.expm1(-4.0 * self._log_inv_mean(t)))


@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
  """The variance-exploding SDE (Eq. 9) with σ(t) = σ_min(σ_max/σ_min)^t; σ in [−1, 1] units."""

  sigma_min: float = VE_SIGMA_MIN
  sigma_max: float = VE_SIGMA_MAX
  name = 've'
  sampling_epsilon = VE_SAMPLING_EPSILON
  eps_prediction = False

  @property
  def _log_ratio(self) -> float:
    return math.log(self.sigma_max / self.sigma_min)

  def sigma(self, t):
    return self.sigma_min * jnp.exp(jnp.asarray(t) * self._log_ratio)

  def sigma_deriv(self, t):
    return self.sigma(t) * self._log_ratio

  def sigma_inv(self, sigma):
    return jnp.log(jnp.asarray(sigma) / self.sigma_min) / self._log_ratio

  def s(self, t):
    return jnp.ones_like(jnp.asarray(t, jnp.float32))

  def s_deriv(self, t):
    return jnp.zeros_like(jnp.asarray(t, jnp.float32))

  def s_of_sigma(self, sigma):
    return jnp.ones_like(jnp.asarray(sigma, jnp.float32))

  def drift(self, x, t):
    return jnp.zeros_like(x)

  def diffusion(self, t):
    return self.sigma(t) * math.sqrt(2.0 * self._log_ratio)

  @property
  def prior_std(self) -> float:
    return float(self.sigma_max)

  def c_noise(self, sigma):
    # NCSN++ embeds log σ of [0, 1] data: ln(½σ) in our units (= EDM Table 1's VE c_noise).
    return jnp.log(0.5 * jnp.asarray(sigma, jnp.float32))


SDES = {'vp': VPSDE, 'subvp': SubVPSDE, 've': VESDE}
for _name, _cls in SDES.items():
  registry.add('sde', _name, _cls)


def get_sde(name: str, **kwargs) -> SDE:
  """The SDE `name` ∈ {vp, subvp, ve} with constants from kwargs (beta_min/beta_max or
  sigma_min/sigma_max); unknown names fail with the list of known ones."""
  cls = registry.get('sde', name)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f'The {name} SDE has no parameter(s) {", ".join(unknown)}; known: '
                     f'{", ".join(sorted(fields))}.')
  return cls(**kwargs)


def _split_kwargs(name: str, kwargs: dict) -> tuple[SDE, dict]:
  """(SDE built from the SDE's own fields in kwargs, the remaining kwargs)."""
  fields = {f.name for f in dataclasses.fields(SDES[name])}
  sde = get_sde(name, **{k: v for k, v in kwargs.items() if k in fields})
  return sde, {k: v for k, v in kwargs.items() if k not in fields}
