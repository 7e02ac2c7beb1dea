"""Noise schedules σ(t), scalings s(t) and σ-grids (Karras et al. 2022, Table 1).

Everything in diffjax talks in σ-space: the noise level σ of `x = s·(y + σ·n)`. A *schedule* maps
time t to σ(t) (with its derivative and inverse), a *scaling* gives s(t), and a *discretization*
produces the decreasing grid of noise levels σ_0 > … > σ_{N−1} > σ_N = 0 a sampler walks down.

Time functions are written with `jnp` so they are jittable and differentiable; the grids are
computed once in float64 numpy (they are constants of a sampler) and handed to the sampler, which
casts them to float32.

Table 1 of EDM (arXiv 2206.00364), with the constants of its "original" formulations:
  VP:     σ(t) = sqrt(exp(½β_d t² + β_min t) − 1),   β_d = 19.9, β_min = 0.1, ε_s = 1e-3, ε_t = 1e-5
  VE:     σ(t) = sqrt(t),                           σ_min = 0.02, σ_max = 100
  iDDPM:  σ(t) = t on the grid u_j,                 C1 = 0.001, C2 = 0.008, M = 1000, j0 = 8
  EDM:    σ(t) = t,                                 σ_min = 0.002, σ_max = 80, ρ = 7
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from diffjax import registry

# EDM Table 1 constants.
VP_BETA_D = 19.9
VP_BETA_MIN = 0.1
VP_EPSILON_S = 1e-3
VP_EPSILON_T = 1e-5
VE_SIGMA_MIN = 0.02
VE_SIGMA_MAX = 100.0
IDDPM_C1 = 0.001
IDDPM_C2 = 0.008
IDDPM_M = 1000
EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0
EDM_RHO = 7.0


class Schedule(NamedTuple):
  """A noise schedule: σ(t), dσ/dt and σ⁻¹, each elementwise on arrays of any shape."""
  sigma: Callable
  sigma_deriv: Callable
  sigma_inv: Callable


class Scaling(NamedTuple):
  """A signal scaling: s(t) and ds/dt, elementwise."""
  s: Callable
  s_deriv: Callable


# ------------------------------------------------------------------------------------------------
# Schedules σ(t).


def vp_sigma(t, beta_d=VP_BETA_D, beta_min=VP_BETA_MIN):
  """VP noise level σ(t) = sqrt(exp(½β_d t² + β_min t) − 1) (EDM Table 1)."""
  t = jnp.asarray(t)
  return jnp.sqrt(jnp.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_sigma_deriv(t, beta_d=VP_BETA_D, beta_min=VP_BETA_MIN):
  """dσ/dt of the VP schedule: ½(β_min + β_d t)(σ + 1/σ)."""
  sigma = vp_sigma(t, beta_d, beta_min)
  return 0.5 * (beta_min + beta_d * t) * (sigma + 1.0 / sigma)


def vp_sigma_inv(sigma, beta_d=VP_BETA_D, beta_min=VP_BETA_MIN):
  """Inverse of the VP schedule: t = (sqrt(β_min² + 2β_d ln(σ²+1)) − β_min)/β_d."""
  sigma = jnp.asarray(sigma)
  return (jnp.sqrt(beta_min**2 + 2 * beta_d * jnp.log1p(sigma**2)) - beta_min) / beta_d


def vp_schedule(beta_d=VP_BETA_D, beta_min=VP_BETA_MIN) -> Schedule:
  """The VP schedule of Song et al. (2021) in σ-space."""
  return Schedule(
      sigma=lambda t: vp_sigma(t, beta_d, beta_min),
      sigma_deriv=lambda t: vp_sigma_deriv(t, beta_d, beta_min),
      sigma_inv=lambda s: vp_sigma_inv(s, beta_d, beta_min),
  )


def ve_schedule() -> Schedule:
  """The VE schedule σ(t) = sqrt(t) (EDM Table 1: VE time is the variance)."""
  return Schedule(
      sigma=lambda t: jnp.sqrt(jnp.asarray(t)),
      sigma_deriv=lambda t: 0.5 / jnp.sqrt(jnp.asarray(t)),
      sigma_inv=lambda s: jnp.asarray(s)**2,
  )


def linear_schedule() -> Schedule:
  """σ(t) = t: the schedule of iDDPM/DDIM and EDM (straight ODE trajectories near the data)."""
  return Schedule(
      sigma=lambda t: jnp.asarray(t),
      sigma_deriv=lambda t: jnp.ones_like(jnp.asarray(t)),
      sigma_inv=lambda s: jnp.asarray(s),
  )


registry.add('schedule', 'vp', vp_schedule)
registry.add('schedule', 've', ve_schedule)
registry.add('schedule', 'linear', linear_schedule)


# ------------------------------------------------------------------------------------------------
# Scalings s(t).


def no_scaling() -> Scaling:
  """s(t) = 1: the VE, iDDPM and EDM formulations."""
  return Scaling(s=lambda t: jnp.ones_like(jnp.asarray(t)),
                 s_deriv=lambda t: jnp.zeros_like(jnp.asarray(t)))


def vp_scaling(schedule: Schedule) -> Scaling:
  """s(t) = 1/sqrt(1 + σ(t)²), s'(t) = −σ(t)σ'(t)s(t)³ (EDM Table 1), for any σ(t)."""

  def s(t):
    return 1.0 / jnp.sqrt(1.0 + schedule.sigma(t)**2)

  def s_deriv(t):
    return -schedule.sigma(t) * schedule.sigma_deriv(t) * s(t)**3

  return Scaling(s=s, s_deriv=s_deriv)


def get_scaling(name: str, schedule: Schedule) -> Scaling:
  """The scaling `name` ('vp' or 'none') built on `schedule`."""
  return registry.get('scaling', name)(schedule)


registry.add('scaling', 'vp', vp_scaling)
registry.add('scaling', 'none', lambda schedule: no_scaling())


# ------------------------------------------------------------------------------------------------
# σ-grids (discretizations). Each returns a float64 array [n + 1] of decreasing σ with a final 0.


def _append_zero(sigmas: np.ndarray) -> np.ndarray:
  return np.concatenate([np.asarray(sigmas, np.float64), [0.0]])


def _check_steps(n: int) -> None:
  if int(n) != n or n < 1:
    raise ValueError(f'The number of sampling steps must be a positive integer, got {n!r}.')


def _ramp(n: int) -> np.ndarray:
  """i/(N−1) for i = 0..N−1 (a single step sits at the start of the ramp)."""
  return np.arange(n, dtype=np.float64) / max(n - 1, 1)


def karras(n: int, sigma_min: float | None = EDM_SIGMA_MIN,
           sigma_max: float | None = EDM_SIGMA_MAX, rho: float = EDM_RHO) -> np.ndarray:
  """EDM's grid (Eq. 5): σ_i = (σ_max^(1/ρ) + i/(N−1)(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, σ_N = 0.

  Args:
    n: number of sampling steps N.
    sigma_min, sigma_max: the end points σ_{N−1} and σ_0.
    rho: ρ; 7 balances the truncation error over the levels (EDM §3).

  Returns:
    float64 [n + 1], decreasing, last entry 0.
  """
  _check_steps(n)
  sigma_min = EDM_SIGMA_MIN if sigma_min is None else sigma_min
  sigma_max = EDM_SIGMA_MAX if sigma_max is None else sigma_max
  a, b = sigma_max**(1.0 / rho), sigma_min**(1.0 / rho)
  return _append_zero((a + _ramp(n) * (b - a))**rho)


def vp_betas_for_range(sigma_min: float, sigma_max: float,
                       epsilon_s: float = VP_EPSILON_S) -> tuple[float, float]:
  """(β_d, β_min) for which the VP schedule has σ(ε_s) = σ_min and σ(1) = σ_max.

  From ln(σ² + 1) = ½β_d t² + β_min t at t = 1 and t = ε_s: β_d = 2(L_ε/ε_s − L_1)/(ε_s − 1) and
  β_min = L_1 − ½β_d with L_t = ln(σ(t)² + 1). This is how a VP grid is fitted to another model's
  supported range (EDM's generalized sampler does the same).
  """
  l_1 = math.log1p(sigma_max**2)
  l_eps = math.log1p(sigma_min**2)
  beta_d = 2.0 * (l_eps / epsilon_s - l_1) / (epsilon_s - 1.0)
  return beta_d, l_1 - 0.5 * beta_d


def vp_grid(n: int, sigma_min: float | None = None, sigma_max: float | None = None,
            epsilon_s: float = VP_EPSILON_S, beta_d: float = VP_BETA_D,
            beta_min: float = VP_BETA_MIN) -> np.ndarray:
  """VP grid: σ(t_i) with t_i = 1 + i/(N−1)(ε_s − 1), uniform in time (EDM Table 1).

  With sigma_min and sigma_max given, β_d and β_min are refitted so the grid spans exactly that
  range (`vp_betas_for_range`); otherwise the Table 1 constants are used.
  """
  _check_steps(n)
  if sigma_min is not None and sigma_max is not None:
    beta_d, beta_min = vp_betas_for_range(sigma_min, sigma_max, epsilon_s)
  t = 1.0 + _ramp(n) * (epsilon_s - 1.0)
  return _append_zero(np.sqrt(np.expm1(0.5 * beta_d * t**2 + beta_min * t)))


def ve_grid(n: int, sigma_min: float | None = VE_SIGMA_MIN,
            sigma_max: float | None = VE_SIGMA_MAX) -> np.ndarray:
  """VE grid: t_i = σ_max²(σ_min²/σ_max²)^(i/(N−1)), σ = sqrt(t): geometric in σ (EDM Table 1)."""
  _check_steps(n)
  sigma_min = VE_SIGMA_MIN if sigma_min is None else sigma_min
  sigma_max = VE_SIGMA_MAX if sigma_max is None else sigma_max
  t = sigma_max**2 * (sigma_min**2 / sigma_max**2)**_ramp(n)
  return _append_zero(np.sqrt(t))


def iddpm_alpha_bar(j, M: int = IDDPM_M, C2: float = IDDPM_C2):
  """ᾱ_j = sin²(π/2 · j/(M(C2 + 1))), the cosine schedule indexed backwards as in EDM App. C.3.4."""
  return np.sin(0.5 * np.pi * np.asarray(j, np.float64) / M / (C2 + 1.0))**2


def iddpm_u(M: int = IDDPM_M, C1: float = IDDPM_C1, C2: float = IDDPM_C2) -> np.ndarray:
  """The M + 1 noise levels u_0 > … > u_M = 0 of a discrete iDDPM model (EDM Table 1).

  u_{j−1} = sqrt((u_j² + 1)/max(ᾱ_{j−1}/ᾱ_j, C1) − 1), u_M = 0. u_0 ≈ 20291 and u_{M−1} ≈ 0.0064
  bound the σ a model trained on this grid supports.

  Returns:
    float64 [M + 1].
  """
  u = np.zeros(M + 1, np.float64)
  for j in range(M, 0, -1):
    ratio = max(iddpm_alpha_bar(j - 1, M, C2) / iddpm_alpha_bar(j, M, C2), C1)
    u[j - 1] = math.sqrt((u[j]**2 + 1.0) / ratio - 1.0)
  return u


def iddpm_grid(n: int, sigma_min: float | None = 0.002, sigma_max: float | None = 81.0,
               M: int = IDDPM_M, C1: float = IDDPM_C1, C2: float = IDDPM_C2) -> np.ndarray:
  """iDDPM/DDIM grid: σ_i = u_⌊j0 + (M−1−j0)/(N−1)·i + ½⌋ (EDM Table 1).

  j0 is the first index whose u_j ≤ sigma_max and the grid ends at the last u_j ≥ sigma_min. The
  defaults (0.002, 81) are those of EDM's generalized sampler for this discretization: they give
  j0 = 8 (u_8 = 80.2037) and end at u_{M−1} = 0.0064254. The rounding is ⌊x + ½⌋ as in the paper.

  Returns:
    float64 [n + 1], the n levels taken from u, then 0.
  """
  _check_steps(n)
  u = iddpm_u(M, C1, C2)[:M]
  keep = u <= (np.inf if sigma_max is None else sigma_max)
  if sigma_min is not None:
    keep &= u >= sigma_min
  u = u[keep]
  if u.size == 0:
    raise ValueError(f'No iDDPM level lies in [{sigma_min}, {sigma_max}]; widen the range.')
  index = np.floor(_ramp(n) * (u.size - 1) + 0.5).astype(np.int64)
  return _append_zero(u[index])


def iddpm_round_sigma(sigma, u):
  """Snaps σ to the nearest level of the discrete grid u ([K]); elementwise, jittable."""
  sigma = jnp.asarray(sigma)
  u = jnp.asarray(u, sigma.dtype)
  index = jnp.argmin(jnp.abs(sigma[..., None] - u), axis=-1)
  return u[index]


registry.add('discretization', 'edm', karras)
registry.add('discretization', 'vp', vp_grid)
registry.add('discretization', 've', ve_grid)
registry.add('discretization', 'iddpm', iddpm_grid)


def sigma_grid(name: str, n: int, **kwargs) -> np.ndarray:
  """The registered σ-grid `name` (edm = karras, vp, ve, iddpm, exponential, …) with n steps."""
  return registry.get('discretization', name)(n, **kwargs)


# ------------------------------------------------------------------------------------------------
# More σ-grids of the k-diffusion family and DPM-Solver (issue 18). Same contract as above: float64
# [n + 1], decreasing, last entry 0; `karras` is also registered under its own name.


def exponential(n: int, sigma_min: float | None = EDM_SIGMA_MIN,
                sigma_max: float | None = EDM_SIGMA_MAX) -> np.ndarray:
  """Geometric levels, uniform in log σ: σ_i = exp(log σ_max + i/(N−1)(log σ_min − log σ_max)).

  Uniform steps in λ = −log σ, the variable of DPM-Solver's exponential integrators
  (k-diffusion's `get_sigmas_exponential`).
  """
  _check_steps(n)
  sigma_min = EDM_SIGMA_MIN if sigma_min is None else sigma_min
  sigma_max = EDM_SIGMA_MAX if sigma_max is None else sigma_max
  log_max, log_min = math.log(sigma_max), math.log(sigma_min)
  return _append_zero(np.exp(log_max + _ramp(n) * (log_min - log_max)))


def polyexponential(n: int, sigma_min: float | None = EDM_SIGMA_MIN,
                    sigma_max: float | None = EDM_SIGMA_MAX, rho: float = 1.0) -> np.ndarray:
  """log σ polynomial in the ramp: σ_i = exp((1 − i/(N−1))^ρ (log σ_max − log σ_min) + log σ_min).

  ρ = 1 is `exponential`; ρ > 1 puts more steps at low σ (k-diffusion's
  `get_sigmas_polyexponential`).
  """
  _check_steps(n)
  sigma_min = EDM_SIGMA_MIN if sigma_min is None else sigma_min
  sigma_max = EDM_SIGMA_MAX if sigma_max is None else sigma_max
  log_max, log_min = math.log(sigma_max), math.log(sigma_min)
  return _append_zero(np.exp((1.0 - _ramp(n))**rho * (log_max - log_min) + log_min))


def linear_logsnr(n: int, sigma_min: float | None = EDM_SIGMA_MIN,
                  sigma_max: float | None = EDM_SIGMA_MAX) -> np.ndarray:
  """Levels uniform in log-SNR (DPM-Solver's 'logSNR' time steps, Lu et al. 2022a §3.3).

  log SNR = log(α²/σ_vp²) = −2 log σ in σ-space, so these are the `exponential` levels (up to
  rounding); the name is the one DPM-Solver and VDM users know them by.
  """
  _check_steps(n)
  sigma_min = EDM_SIGMA_MIN if sigma_min is None else sigma_min
  sigma_max = EDM_SIGMA_MAX if sigma_max is None else sigma_max
  lo, hi = -2.0 * math.log(sigma_max), -2.0 * math.log(sigma_min)
  return _append_zero(np.exp(-0.5 * (lo + _ramp(n) * (hi - lo))))


registry.add('discretization', 'karras', karras)
registry.add('discretization', 'exponential', exponential)
registry.add('discretization', 'polyexponential', polyexponential)
registry.add('discretization', 'linear_logsnr', linear_logsnr)
