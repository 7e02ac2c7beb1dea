"""The k-diffusion family of σ-grid solvers: ancestral, linear multistep, DPM-Solver(++) and SDEs.

Each is the method of k-diffusion's `k_diffusion.sampling` (Crowson, v0.1.1; MIT), written afresh
from the papers with the same step rules, so that on the same grid the deterministic ones agree
with it to float32 precision (tests/samplers/test_kdiffusion.py checks this against golden
trajectories made by scripts/make_kdiffusion_golden.py). Notation (REFERENCE-2 §2): σ-space,
d = (x − D)/σ the PF-ODE derivative dx/dσ, λ = −log σ (k-diffusion's t), h = λ_{i+1} − λ_i.

  euler_ancestral      Euler step to σ_down, fresh noise σ_up (1 NFE/step)
  lms                  linear multistep on d, Lagrange weights ∫ over [σ_i, σ_{i+1}] (1 NFE)
  dpm_2                DPM-Solver-2 in σ: midpoint at sqrt(σ_i σ_{i+1}) (Lu et al. 2022a) (2)
  dpm_2_ancestral      dpm_2 to σ_down, then noise σ_up (2)
  dpmpp_2s_ancestral   DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1) to σ_down, then noise (2)
  dpmpp_sde            stochastic DPM-Solver++ with an intermediate point at λ_i + r·h (2)
  dpmpp_2m             DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) (1)
  dpmpp_2m_sde         2M for the SDE with η (midpoint or heun correction) (1)
  dpmpp_3m_sde         third-order multistep for the SDE with η (1)

Every solver has the calling convention of `ode.heun` — `fn(denoise_fn, x, sigmas, key=...,
**options)`, x already at sigmas[0] — is one `lax.scan` over the steps with no branch in its body
(`stepping.scan_steps`), and makes its step coefficients before the loop, in float64 when the grid
is known now. A step that lands on σ = 0 returns the denoised image (the first-order step's limit);
two-evaluation solvers skip their second call there, so they cost 2N − 1 evaluations.

Noise (ancestral and SDE solvers, η > 0) comes from per-sample keys through `brownian`: 'gaussian'
(fresh per step; k-diffusion's default for the ancestral ones) or 'brownian' (one Brownian path
per sample, the default of the SDE ones as in k-diffusion, so that refining the grid converges).
η = 0 makes each of them deterministic (then no keys are needed).
"""

from __future__ import annotations

import math
from typing import Union

import jax.numpy as jnp
import numpy as np

from diffjax import registry
from diffjax.samplers import brownian, noise, stepping

DenoiseFn = stepping.DenoiseFn

_MAX_GAMMA = math.sqrt(2.0) - 1.0


def _noise_fn(problem: stepping.Problem, noise_sampler, key, stochastic: bool):
  if not stochastic:
    return None
  return brownian.make(noise_sampler, key, problem.x.shape[0], problem.x.shape[1:],
                       problem.sigmas[0], problem.dtype)


def _log(xp, sigma):
  """λ = −log σ is −(this); log 0 = −inf, which the tables select away."""
  return xp.log(sigma)


# ------------------------------------------------------------------------------------------------
# Ancestral Euler.


def euler_ancestral(denoise_fn: DenoiseFn, x, sigmas, *, key=None, eta: float = 1.0,
                    s_noise: float = 1.0,
                    noise_sampler: Union[str, brownian.NoiseFn] = 'gaussian'):
  """Ancestral sampling with Euler steps; N denoiser calls.

  Step i: D = D(x; σ_i), (σ_down, σ_up) = `stepping.ancestral_step`(σ_i, σ_{i+1}, η),
  x ← x + (σ_down − σ_i)·(x − D)/σ_i + S_noise·σ_up·n_i. With η = 1 this is DDPM's ancestral
  sampler in σ-space; with η = 0 it is Euler.

  Args:
    denoise_fn: D(x [B, ...], σ [B]) -> [B, ...].
    x: the initial state at sigmas[0] (latents·sigmas[0]), [B, ...].
    sigmas: decreasing noise levels [N + 1] ending in 0 (e.g. `schedules.karras`).
    key: per-sample keys [B] (`seed_keys(seeds)`); needed when η > 0.
    eta: η, the fraction of the posterior noise re-added (0 = deterministic).
    s_noise: S_noise, a factor on the added noise.
    noise_sampler: 'gaussian', 'brownian' or a `brownian.NoiseFn`.

  Returns:
    The samples [B, ...].
  """
  p, eta_, s_noise_, stochastic = stepping.setup_ancestral(denoise_fn, x, sigmas, eta, s_noise)

  def make(xp, sigma, sigma_next):
    down, up = stepping.ancestral_step(xp, sigma, sigma_next, eta_)
    return dict(sigma=sigma, sigma_next=sigma_next, dt=down - sigma, noise=s_noise_ * up)

  inputs = p.inputs(**stepping.tables(p, make, p.sigmas[:-1], p.sigmas[1:]))
  noise_fn = _noise_fn(p, noise_sampler, key, stochastic)

  def step(x, s, finish):
    denoised = p.denoise(x, s['sigma'])
    x = x + (x - denoised) / s['sigma'] * s['dt']
    if noise_fn is not None:  # σ_up = 0 on a step landing on 0
      x = x + noise_fn(s['i'], 0, s['sigma'], s['sigma_next']) * s['noise']
    return x

  return p.unflatten(stepping.scan_steps(step, p.x, inputs))


# ------------------------------------------------------------------------------------------------
# Linear multistep.

# Gauss–Legendre nodes and weights on [−1, 1]: three nodes integrate polynomials of degree ≤ 5
# exactly, and a Lagrange basis polynomial of LMS order ≤ 4 has degree ≤ 3.
_GL_NODES = np.array([-math.sqrt(0.6), 0.0, math.sqrt(0.6)])
_GL_WEIGHTS = np.array([5.0, 8.0, 5.0]) / 9.0


def lms_coefficients(xp, sigmas, order: int):
  """Weights c_{i,j} = ∫_{σ_i}^{σ_{i+1}} ℓ_{i,j}(τ) dτ of the linear multistep method.

  ℓ_{i,j} is the Lagrange basis polynomial on the nodes σ_i, σ_{i−1}, …, σ_{i−p+1} that is 1 at
  σ_{i−j}, with p = min(i + 1, order) (the first steps have fewer past points). The integral is
  exact (Gauss–Legendre); k-diffusion integrates the same polynomials numerically (scipy quad).

  Args:
    xp: numpy or jax.numpy.
    sigmas: the grid [N + 1].
    order: the method's order, >= 1.

  Returns:
    [N, order]: column j weighs d_{i−j}; columns j >= p are 0.
  """
  n = sigmas.shape[0] - 1
  a, b = sigmas[:-1], sigmas[1:]
  taus = 0.5 * (a + b)[:, None] + 0.5 * (b - a)[:, None] * _GL_NODES  # [N, 3]
  weights = 0.5 * (b - a)[:, None] * _GL_WEIGHTS
  # Past nodes σ_{i−k}; before the grid's start any distinct finite values (their columns are 0).
  pad = sigmas[0] + 1.0 + xp.arange(order, dtype=sigmas.dtype)
  padded = xp.concatenate([pad[::-1], sigmas])
  nodes = [padded[order - k:order - k + n] for k in range(order)]  # nodes[k][i] = σ_{i−k}
  index = xp.arange(n)
  columns = []
  for j in range(order):
    per_order = []
    for p in range(1, order + 1):
      if j >= p:
        per_order.append(xp.zeros(n, sigmas.dtype))
        continue
      basis = xp.ones_like(taus)
      for k in range(p):
        if k != j:
          basis = basis * (taus - nodes[k][:, None]) / (nodes[j] - nodes[k])[:, None]
      per_order.append(xp.sum(weights * basis, axis=1))
    cur = xp.minimum(index + 1, order)
    column = per_order[0]
    for p in range(2, order + 1):
      column = xp.where(cur == p, per_order[p - 1], column)
    columns.append(column)
  return xp.stack(columns, axis=1)


def lms(denoise_fn: DenoiseFn, x, sigmas, *, key=None, order: int = 4):
  """Linear multistep (Adams–Bashforth in σ on d = (x − D)/σ) of `order`; N denoiser calls.

  x_{i+1} = x_i + Σ_{j<p} c_{i,j}·d_{i−j} with the weights of `lms_coefficients`: the exact
  integral over [σ_i, σ_{i+1}] of the polynomial through the last p derivatives.

  Args:
    denoise_fn, x, sigmas: as for `euler_ancestral`.
    key: unused (the method is deterministic); accepted for the common calling convention.
    order: the order p, >= 1 (k-diffusion's default 4).

  Returns:
    The samples [B, ...].
  """
  del key
  order = int(order)
  if order < 1:
    raise ValueError(f'The LMS order must be at least 1, got {order}.')
  p = stepping.setup(denoise_fn, x, sigmas)
  coeffs = stepping.tables(p, lms_coefficients, p.sigmas, order)
  inputs = p.inputs(sigma=p.sigmas[:-1])
  inputs['c'] = jnp.asarray(coeffs, p.dtype)

  def step(carry, s, finish):
    x, history = carry  # d_i, …, d_{i−order+1} once d_i is pushed (`stepping.ring`)
    d = (x - p.denoise(x, s['sigma'])) / s['sigma']
    history = stepping.ring_push(history, d, s['i'])
    x = x + sum(s['c'][j] * stepping.ring_get(history, s['i'], j) for j in range(order))
    return x, history

  carry = (p.x, stepping.ring(p.x, order))
  return p.unflatten(stepping.scan_steps(step, carry, inputs)[0])


# ------------------------------------------------------------------------------------------------
# DPM-Solver-2 and its ancestral form.


def dpm_2(denoise_fn: DenoiseFn, x, sigmas, *, key=None, s_churn: float = 0.0,
          s_tmin: float = 0.0, s_tmax: float = float('inf'), s_noise: float = 1.0):
  """DPM-Solver-2 in σ (Lu et al. 2022a, Alg. 1 with r = ½), with EDM's churn; 2N − 1 calls.

  After the churn of EDM Alg. 2 (σ̂ = (1 + γ)σ_i), the midpoint σ_mid = exp(½(log σ̂ + log
  σ_{i+1})): x' = x̂ + (σ_mid − σ̂)·d(x̂, σ̂), x_{i+1} = x̂ + (σ_{i+1} − σ̂)·d(x', σ_mid). A step
  landing on σ = 0 is an Euler step.

  Args:
    denoise_fn, x, sigmas: as for `euler_ancestral`.
    key: per-sample keys [B]; needed when s_churn > 0 (the churn noise is `ode.heun`'s stream).
    s_churn, s_tmin, s_tmax, s_noise: EDM's stochasticity (Alg. 2); 0 churn is deterministic.

  Returns:
    The samples [B, ...].
  """
  p = stepping.setup(denoise_fn, x, sigmas, s_churn, s_tmin, s_tmax, s_noise)
  churn, tmin, tmax, s_noise_ = p.params
  stochastic = not stepping.equals(s_churn, 0.0)
  if stochastic and key is None:
    raise ValueError('Stochastic sampling (s_churn > 0) needs PRNG keys: pass '
                     'key=samplers.seed_keys(seeds), one per sample.')
  num_steps = p.num_steps

  def make(xp, sigma, sigma_next):
    in_range = (tmin <= sigma) & (sigma <= tmax)
    gamma = xp.where(in_range, xp.minimum(churn / num_steps, _MAX_GAMMA), 0.0)
    sigma_hat = sigma * (gamma + 1.0)
    sigma_mid = xp.exp(0.5 * (_log(xp, sigma_hat) + _log(xp, sigma_next)))
    return dict(sigma_hat=sigma_hat, sigma_mid=sigma_mid, dt_1=sigma_mid - sigma_hat,
                dt_2=sigma_next - sigma_hat, sigma_next=sigma_next,
                churn=s_noise_ * xp.sqrt(xp.maximum(sigma_hat**2 - sigma**2, 0.0)))

  inputs = p.inputs(**stepping.tables(p, make, p.sigmas[:-1], p.sigmas[1:]))
  churn_keys = None
  if stochastic:
    churn_keys = noise.stream(noise.as_keys(key, p.x.shape[0]), noise.CHURN_STREAM)

  def step(x, s, finish):
    if churn_keys is not None:
      x = x + s['churn'] * noise.step_normal(churn_keys, s['i'], x.shape[1:], x.dtype)
    d = (x - p.denoise(x, s['sigma_hat'])) / s['sigma_hat']

    def second():
      x_2 = x + d * s['dt_1']
      d_2 = (x_2 - p.denoise(x_2, s['sigma_mid'])) / s['sigma_mid']
      return x + d_2 * s['dt_2']

    return finish(second, x + d * s['dt_2'], s['sigma_next'])

  levels = p.sigmas[1:]
  return p.unflatten(stepping.scan_steps(step, p.x, inputs, levels))


def dpm_2_ancestral(denoise_fn: DenoiseFn, x, sigmas, *, key=None, eta: float = 1.0,
                    s_noise: float = 1.0,
                    noise_sampler: Union[str, brownian.NoiseFn] = 'gaussian'):
  """Ancestral sampling with DPM-Solver-2 steps to σ_down, then noise σ_up; 2N − 1 calls.

  As k-diffusion, a step whose σ_down is 0 is an Euler step and adds no noise.

  Args:
    denoise_fn, x, sigmas, key, eta, s_noise, noise_sampler: as for `euler_ancestral`.

  Returns:
    The samples [B, ...].
  """
  p, eta_, s_noise_, stochastic = stepping.setup_ancestral(denoise_fn, x, sigmas, eta, s_noise)

  def make(xp, sigma, sigma_next):
    down, up = stepping.ancestral_step(xp, sigma, sigma_next, eta_)
    sigma_mid = xp.exp(0.5 * (_log(xp, sigma) + _log(xp, down)))
    return dict(sigma=sigma, sigma_next=sigma_next, down=down, sigma_mid=sigma_mid,
                dt_1=sigma_mid - sigma, dt_2=down - sigma, noise=s_noise_ * up)

  table = stepping.tables(p, make, p.sigmas[:-1], p.sigmas[1:])
  inputs = p.inputs(**table)
  noise_fn = _noise_fn(p, noise_sampler, key, stochastic)

  def step(x, s, finish):
    d = (x - p.denoise(x, s['sigma'])) / s['sigma']

    def second():
      x_2 = x + d * s['dt_1']
      d_2 = (x_2 - p.denoise(x_2, s['sigma_mid'])) / s['sigma_mid']
      x_next = x + d_2 * s['dt_2']
      if noise_fn is not None:
        x_next = x_next + noise_fn(s['i'], 0, s['sigma'], s['sigma_next']) * s['noise']
      return x_next

    return finish(second, x + d * s['dt_2'], s['down'])

  return p.unflatten(stepping.scan_steps(step, p.x, inputs, table['down']))


# ------------------------------------------------------------------------------------------------
# DPM-Solver++: single-step (2S, SDE) and multistep (2M, 2M SDE, 3M SDE).


def dpmpp_2s_ancestral(denoise_fn: DenoiseFn, x, sigmas, *, key=None, eta: float = 1.0,
                       s_noise: float = 1.0,
                       noise_sampler: Union[str, brownian.NoiseFn] = 'gaussian'):
  """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022b, Alg. 1, r = ½); 2N − 1.

  To σ_down with λ = −log σ, h = λ_down − λ_i, s = λ_i + h/2:
    u = (σ_s/σ_i)·x − (e^{−h/2} − 1)·D(x; σ_i),
    x ← (σ_down/σ_i)·x − (e^{−h} − 1)·D(u; σ_s),
  then noise S_noise·σ_up·n. A step whose σ_down is 0 is an Euler step.

  Args:
    denoise_fn, x, sigmas, key, eta, s_noise, noise_sampler: as for `euler_ancestral`.

  Returns:
    The samples [B, ...].
  """
  p, eta_, s_noise_, stochastic = stepping.setup_ancestral(denoise_fn, x, sigmas, eta, s_noise)

  def make(xp, sigma, sigma_next):
    down, up = stepping.ancestral_step(xp, sigma, sigma_next, eta_)
    t, t_next = -_log(xp, sigma), -_log(xp, down)
    h = t_next - t
    s = t + 0.5 * h
    return dict(sigma=sigma, sigma_next=sigma_next, down=down, dt=down - sigma,
                sigma_s=xp.exp(-s), u_x=xp.exp(-s) / xp.exp(-t), u_d=-xp.expm1(-0.5 * h),
                x_x=xp.exp(-t_next) / xp.exp(-t), x_d=-xp.expm1(-h),
                noise=xp.where(sigma_next > 0, s_noise_ * up, 0.0))

  table = stepping.tables(p, make, p.sigmas[:-1], p.sigmas[1:])
  inputs = p.inputs(**table)
  noise_fn = _noise_fn(p, noise_sampler, key, stochastic)

  def step(x, s, finish):
    denoised = p.denoise(x, s['sigma'])

    def second():
      u = s['u_x'] * x + s['u_d'] * denoised
      return s['x_x'] * x + s['x_d'] * p.denoise(u, s['sigma_s'])

    x = finish(second, x + (x - denoised) / s['sigma'] * s['dt'], s['down'])
    if noise_fn is not None:
      x = x + noise_fn(s['i'], 0, s['sigma'], s['sigma_next']) * s['noise']
    return x

  return p.unflatten(stepping.scan_steps(step, p.x, inputs, table['down']))


def dpmpp_sde(denoise_fn: DenoiseFn, x, sigmas, *, key=None, eta: float = 1.0,
              s_noise: float = 1.0, r: float = 0.5,
              noise_sampler: Union[str, brownian.NoiseFn] = 'brownian'):
  """Stochastic DPM-Solver++ (k-diffusion's `sample_dpmpp_sde`); 2N − 1 denoiser calls.

  With λ = −log σ, h = λ_{i+1} − λ_i and the intermediate λ_s = λ_i + r·h, each stage is an
  ancestral DPM-Solver++(1) step from σ_i, to σ_down of (σ_i → σ_s) and of (σ_i → σ_{i+1}):
    u = (σ'_down/σ_i)·x − (σ'_down/σ_i − 1)·D_i + S_noise·σ'_up·n₁,   D_s = D(u; σ_s),
    x ← (σ_down/σ_i)·x − (σ_down/σ_i − 1)·((1 − 1/(2r))·D_i + 1/(2r)·D_s) + S_noise·σ_up·n₂.
  With η = 0 it is DPM-Solver++(2S) with the intermediate point at r. A step landing on σ = 0 is
  an Euler step.

  Args:
    denoise_fn, x, sigmas, key, eta, s_noise: as for `euler_ancestral`.
    r: where the intermediate point sits in λ (0 < r <= 1; ½ is the midpoint).
    noise_sampler: 'brownian' (default, as in k-diffusion), 'gaussian' or a `brownian.NoiseFn`.

  Returns:
    The samples [B, ...].
  """
  p = stepping.setup(denoise_fn, x, sigmas, eta, s_noise, r)
  eta_, s_noise_, r_ = p.params
  stochastic = stepping.adds_noise(eta, s_noise)

  def make(xp, sigma, sigma_next):
    t, t_next = -_log(xp, sigma), -_log(xp, sigma_next)
    h = t_next - t
    sigma_s = xp.exp(-(t + h * r_))
    down_1, up_1 = stepping.ancestral_step(xp, xp.exp(-t), sigma_s, eta_)
    down_2, up_2 = stepping.ancestral_step(xp, xp.exp(-t), xp.exp(-t_next), eta_)
    s_1, t_2 = -_log(xp, down_1), -_log(xp, down_2)
    return dict(sigma=sigma, sigma_next=sigma_next, sigma_s=sigma_s, dt=sigma_next - sigma,
                u_x=xp.exp(-s_1) / xp.exp(-t), u_d=-xp.expm1(t - s_1), u_n=s_noise_ * up_1,
                x_x=xp.exp(-t_2) / xp.exp(-t), x_d=-xp.expm1(t - t_2), x_n=s_noise_ * up_2,
                fac=xp.broadcast_to(1.0 / (2.0 * r_), sigma.shape))

  inputs = p.inputs(**stepping.tables(p, make, p.sigmas[:-1], p.sigmas[1:]))
  noise_fn = _noise_fn(p, noise_sampler, key, stochastic)

  def step(x, s, finish):
    denoised = p.denoise(x, s['sigma'])

    def second():
      u = s['u_x'] * x + s['u_d'] * denoised
      if noise_fn is not None:
        u = u + noise_fn(s['i'], 0, s['sigma'], s['sigma_s']) * s['u_n']
      denoised_s = p.denoise(u, s['sigma_s'])
      mixed = (1.0 - s['fac']) * denoised + s['fac'] * denoised_s
      x_next = s['x_x'] * x + s['x_d'] * mixed
      if noise_fn is not None:
        x_next = x_next + noise_fn(s['i'], 1, s['sigma'], s['sigma_next']) * s['x_n']
      return x_next

    return finish(second, x + (x - denoised) / s['sigma'] * s['dt'], s['sigma_next'])

  return p.unflatten(stepping.scan_steps(step, p.x, inputs, p.sigmas[1:]))


def _multistep_h(xp, sigmas):
  """h_i = λ_{i+1} − λ_i [N] and h_{i−1}, h_{i−2} (1 before the grid; unused there)."""
  lam = -_log(xp, sigmas)
  h = lam[1:] - lam[:-1]
  one = xp.ones(1, sigmas.dtype)
  h_1 = xp.concatenate([one, h[:-1]])
  h_2 = xp.concatenate([one, h_1[:-1]])
  return h, h_1, h_2


def dpmpp_2m(denoise_fn: DenoiseFn, x, sigmas, *, key=None):
  """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2; REFERENCE-2 §2); N denoiser calls.

  x_{i+1} = (σ_{i+1}/σ_i)·x_i − (e^{−h_i} − 1)·D', with D' = D_i on the first step and on a step
  to σ = 0, else D' = (1 + 1/(2r))·D_i − 1/(2r)·D_{i−1}, r = h_{i−1}/h_i.

  Args:
    denoise_fn, x, sigmas: as for `euler_ancestral`.
    key: unused (deterministic); accepted for the common calling convention.

  Returns:
    The samples [B, ...].
  """
  del key
  p = stepping.setup(denoise_fn, x, sigmas)

  def make(xp, sigmas):
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    h, h_1, _ = _multistep_h(xp, sigmas)
    ratio = sigma_next / sigma
    c_d = -xp.expm1(-h)
    second = (xp.arange(h.shape[0]) > 0) & (sigma_next > 0)
    w = xp.where(second, 0.5 * h / h_1, 0.0)  # 1/(2r)
    return dict(sigma=sigma, x_x=ratio, x_d=c_d * (1.0 + w), x_old=-c_d * w)

  inputs = p.inputs(**stepping.tables(p, make, p.sigmas))

  def step(carry, s, finish):
    x, history = carry  # D_i, D_{i−1} (`stepping.ring`)
    denoised = p.denoise(x, s['sigma'])
    history = stepping.ring_push(history, denoised, s['i'])
    denoised, old = (stepping.ring_get(history, s['i'], j) for j in (0, 1))
    return s['x_x'] * x + s['x_d'] * denoised + s['x_old'] * old, history

  carry = (p.x, stepping.ring(p.x, 2))
  return p.unflatten(stepping.scan_steps(step, carry, inputs)[0])


SDE_SOLVER_TYPES = ('midpoint', 'heun')


def dpmpp_2m_sde(denoise_fn: DenoiseFn, x, sigmas, *, key=None, eta: float = 1.0,
                 s_noise: float = 1.0, solver_type: str = 'midpoint',
                 noise_sampler: Union[str, brownian.NoiseFn] = 'brownian'):
  """DPM-Solver++(2M) SDE (k-diffusion's `sample_dpmpp_2m_sde`); N denoiser calls.

  The data-prediction SDE solver of Lu et al. 2022b (§5, SDE-DPM-Solver++2M) with η scaling the
  noise: with ηh = η·h_i, φ = 1 − e^{−h_i−ηh},
    x_{i+1} = (σ_{i+1}/σ_i)e^{−ηh}·x_i + φ·D_i + c·(D_i − D_{i−1})/r
              + S_noise·σ_{i+1}·sqrt(1 − e^{−2ηh})·n_i,
  r = h_{i−1}/h_i, c = φ/2 ('midpoint') or c = 1 − φ/(h_i + ηh) ('heun'); no correction on the
  first step. A step landing on σ = 0 returns D_i.

  Args:
    denoise_fn, x, sigmas, key, s_noise: as for `euler_ancestral`.
    eta: η >= 0; 0 gives a deterministic 2M variant (the PF-ODE).
    solver_type: 'midpoint' or 'heun', the correction's form.
    noise_sampler: 'brownian' (default, as in k-diffusion), 'gaussian' or a `brownian.NoiseFn`.

  Returns:
    The samples [B, ...].
  """
  if solver_type not in SDE_SOLVER_TYPES:
    raise ValueError(f'Unknown solver_type {solver_type!r}; known: {", ".join(SDE_SOLVER_TYPES)}.')
  p, eta_, s_noise_, stochastic = stepping.setup_ancestral(denoise_fn, x, sigmas, eta, s_noise)

  def make(xp, sigmas):
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    h, h_1, _ = _multistep_h(xp, sigmas)
    eta_h = eta_ * h
    landing = sigma_next > 0
    phi = -xp.expm1(-h - eta_h)
    x_x = xp.where(landing, sigma_next / sigma * xp.exp(-eta_h), 0.0)
    x_d = xp.where(landing, phi, 1.0)
    if solver_type == 'heun':
      corr = phi / (-h - eta_h) + 1.0
    else:
      corr = 0.5 * phi
    corr = xp.where((xp.arange(h.shape[0]) > 0) & landing, corr * h / h_1, 0.0)  # × 1/r
    n = xp.where(landing, sigma_next * xp.sqrt(-xp.expm1(-2.0 * eta_h)) * s_noise_, 0.0)
    return dict(sigma=sigma, sigma_next=sigma_next, x_x=x_x, x_d=x_d + corr, x_old=-corr,
                noise=n)

  inputs = p.inputs(**stepping.tables(p, make, p.sigmas))
  noise_fn = _noise_fn(p, noise_sampler, key, stochastic)

  def step(carry, s, finish):
    x, history = carry  # D_i, D_{i−1} (`stepping.ring`)
    denoised = p.denoise(x, s['sigma'])
    history = stepping.ring_push(history, denoised, s['i'])
    denoised, old = (stepping.ring_get(history, s['i'], j) for j in (0, 1))
    x = s['x_x'] * x + s['x_d'] * denoised + s['x_old'] * old
    if noise_fn is not None:
      x = x + noise_fn(s['i'], 0, s['sigma'], s['sigma_next']) * s['noise']
    return x, history

  carry = (p.x, stepping.ring(p.x, 2))
  return p.unflatten(stepping.scan_steps(step, carry, inputs)[0])


def dpmpp_3m_sde(denoise_fn: DenoiseFn, x, sigmas, *, key=None, eta: float = 1.0,
                 s_noise: float = 1.0,
                 noise_sampler: Union[str, brownian.NoiseFn] = 'brownian'):
  """DPM-Solver++(3M) SDE (k-diffusion's `sample_dpmpp_3m_sde`); N denoiser calls.

  With ĥ = (1 + η)h_i, φ₂ = (e^{−ĥ} − 1)/ĥ + 1, φ₃ = φ₂/ĥ − ½ and the divided differences of the
  last three denoised images on r₀ = h_{i−1}/h_i, r₁ = h_{i−2}/h_i,
    d₁₀ = (D_i − D_{i−1})/r₀,  d₁₁ = (D_{i−1} − D_{i−2})/r₁,
    d₁ = d₁₀ + (d₁₀ − d₁₁)·r₀/(r₀ + r₁),  d₂ = (d₁₀ − d₁₁)/(r₀ + r₁),
    x_{i+1} = e^{−ĥ}·x_i + (1 − e^{−ĥ})·D_i + φ₂·d₁ − φ₃·d₂ + S_noise·σ_{i+1}sqrt(1 − e^{−2ηh})·n,
  of second order on step 1 (φ₂·d₁₀ only) and first order on step 0. A step landing on σ = 0
  returns D_i.

  Args:
    denoise_fn, x, sigmas, key, s_noise: as for `euler_ancestral`.
    eta: η >= 0; 0 gives the deterministic third-order multistep solver of the PF-ODE.
    noise_sampler: 'brownian' (default, as in k-diffusion), 'gaussian' or a `brownian.NoiseFn`.

  Returns:
    The samples [B, ...].
  """
  p, eta_, s_noise_, stochastic = stepping.setup_ancestral(denoise_fn, x, sigmas, eta, s_noise)

  def make(xp, sigmas):
    sigma, sigma_next = sigmas[:-1], sigmas[1:]
    h, h_1, h_2 = _multistep_h(xp, sigmas)
    index = xp.arange(h.shape[0])
    landing = sigma_next > 0
    h_eta = h * (eta_ + 1.0)
    phi_2 = xp.expm1(-h_eta) / h_eta + 1.0
    phi_3 = phi_2 / h_eta - 0.5
    r0, r1 = h_1 / h, h_2 / h
    # Third order: φ₂d₁ − φ₃d₂ = α·d₁₀ + β·d₁₁, expanded on D_i, D_{i−1}, D_{i−2}.
    q, w = r0 / (r0 + r1), 1.0 / (r0 + r1)
    alpha = phi_2 * (1.0 + q) - phi_3 * w
    beta = -phi_2 * q + phi_3 * w
    third = (index >= 2) & landing
    second = (index == 1) & landing
    d0 = xp.where(third, alpha / r0, xp.where(second, phi_2 / r0, 0.0))
    d1 = xp.where(third, -alpha / r0 + beta / r1, xp.where(second, -phi_2 / r0, 0.0))
    d2 = xp.where(third, -beta / r1, 0.0)
    x_x = xp.where(landing, xp.exp(-h_eta), 0.0)
    x_d = xp.where(landing, -xp.expm1(-h_eta), 1.0)
    n = xp.where(landing, sigma_next * xp.sqrt(-xp.expm1(-2.0 * h * eta_)) * s_noise_, 0.0)
    return dict(sigma=sigma, sigma_next=sigma_next, x_x=x_x, x_d=x_d + d0, x_1=d1, x_2=d2,
                noise=n)

  inputs = p.inputs(**stepping.tables(p, make, p.sigmas))
  noise_fn = _noise_fn(p, noise_sampler, key, stochastic)

  def step(carry, s, finish):
    x, history = carry  # D_i, D_{i−1}, D_{i−2} (`stepping.ring`)
    denoised = p.denoise(x, s['sigma'])
    history = stepping.ring_push(history, denoised, s['i'])
    denoised, old_1, old_2 = (stepping.ring_get(history, s['i'], j) for j in range(3))
    x = s['x_x'] * x + s['x_d'] * denoised + s['x_1'] * old_1 + s['x_2'] * old_2
    if noise_fn is not None:
      x = x + noise_fn(s['i'], 0, s['sigma'], s['sigma_next']) * s['noise']
    return x, history

  carry = (p.x, stepping.ring(p.x, 3))
  return p.unflatten(stepping.scan_steps(step, carry, inputs)[0])


def _register(name: str, solve, **defaults) -> None:
  """Registers `solve` as sampler `name`, with `defaults` for options not given."""
  registry.add('sampler', name, stepping.registry_form(solve, name, **defaults))


_register('euler_ancestral', euler_ancestral)
_register('lms', lms)
_register('dpm_2', dpm_2)
_register('dpm_2_ancestral', dpm_2_ancestral)
_register('dpmpp_2s_ancestral', dpmpp_2s_ancestral)
_register('dpmpp_sde', dpmpp_sde)
_register('dpmpp_2m', dpmpp_2m)
_register('dpmpp_2m_sde', dpmpp_2m_sde)
_register('dpmpp_2m_sde_heun', dpmpp_2m_sde, solver_type='heun')
_register('dpmpp_3m_sde', dpmpp_3m_sde)

__all__ = ['dpm_2', 'dpm_2_ancestral', 'dpmpp_2m', 'dpmpp_2m_sde', 'dpmpp_2s_ancestral',
           'dpmpp_3m_sde', 'dpmpp_sde', 'euler_ancestral', 'lms', 'lms_coefficients']
