"""DPM-Solver-fast and DPM-Solver-12/23 (adaptive) of Lu et al. 2022a (arXiv 2206.00927), in σ-space.

Both step in λ = −log σ (k-diffusion's t) with the noise prediction ε = (x − D)/σ and the
single-step DPM-Solver-k updates of the paper's Algorithms 1–2 (h = λ_{next} − λ, σ(λ) = e^{−λ}):

  DPM-Solver-1:  x' = x − σ(λ+h)·(e^h − 1)·ε(x, λ)                                  (= DDIM)
  DPM-Solver-2:  u = x − σ(λ+r₁h)(e^{r₁h} − 1)ε,
                 x' = x − σ(λ+h)(e^h − 1)ε − σ(λ+h)/(2r₁)·(e^h − 1)·(ε(u, λ+r₁h) − ε)
  DPM-Solver-3:  u₁ as above with r₁ = ⅓, u₂ = x − σ(s₂)(e^{r₂h} − 1)ε − σ(s₂)(r₂/r₁)((e^{r₂h} −
                 1)/(r₂h) − 1)(ε₁ − ε) with r₂ = ⅔, s₂ = λ + r₂h,
                 x' = x − σ(λ+h)(e^h − 1)ε − σ(λ+h)/r₂·((e^h − 1)/h − 1)·(ε(u₂, s₂) − ε)

`dpm_fast` spends a fixed budget of evaluations on a grid uniform in λ with orders 3, …, 3 and
a last one or two of lower order (the paper's §3.4 "DPM-Solver-fast"); `dpm_adaptive` picks its
own steps, pairing orders (1, 2) or (2, 3) that share evaluations for an error estimate and a
PI step-size controller (§3.4, App. B; k-diffusion's `PIDStepSizeController`). The step rules are
k-diffusion's `DPMSolver`, checked against it in tests/samplers/test_kdiffusion.py.

Both take a σ-grid in the calling convention of `ode.heun` but use only its ends: they walk from
σ_0 to the smallest positive σ of the grid and, when the grid ends in 0, finish with the
denoised image at that σ (one more evaluation; k-diffusion stops at σ_min).
"""

from __future__ import annotations

import math
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax import registry
from diffjax.samplers import brownian, stepping

DenoiseFn = stepping.DenoiseFn


def _ends(sigmas) -> tuple[float, float, bool]:
  """(σ_max, σ_min, whether the grid ends in 0) of a grid known now."""
  known = stepping.concrete(sigmas)
  if known is None:
    raise ValueError('DPM-Solver-fast and -adaptive plan their steps from the grid\'s ends, so the '
                     'σ-grid must be known when the sampler is traced (not an argument of jit).')
  grid = known[0]
  positive = grid[grid > 0]
  if grid.ndim != 1 or grid.shape[0] < 2 or positive.size == 0:
    raise ValueError(f'The σ-grid must be a vector of N + 1 >= 2 levels with one above 0, got '
                     f'{grid}.')
  return float(grid[0]), float(positive.min()), bool(grid[-1] == 0)


class _Solver:
  """The DPM-Solver-k steps on a problem, in λ; every λ argument is a scalar or a [B] vector."""

  def __init__(self, problem: stepping.Problem):
    self.p = problem

  def sigma(self, lam):
    return jnp.exp(-lam)

  def _col(self, v):  # a per-sample [B] (or scalar) coefficient against the flat state [B, D]
    v = jnp.asarray(v, self.p.dtype)
    return v[:, None] if v.ndim == 1 else v

  def eps(self, x, lam):
    sigma = self.sigma(lam)
    return (x - self.p.denoise(x, sigma)) / self._col(sigma)

  def step_1(self, x, lam, lam_next, eps):
    h = lam_next - lam
    return x - self._col(self.sigma(lam_next) * jnp.expm1(h)) * eps

  def step_2(self, x, lam, lam_next, eps, r1=0.5):
    """(x', ε at λ + r₁h)."""
    c = self._col
    h = lam_next - lam
    s1 = lam + r1 * h
    u1 = x - c(self.sigma(s1) * jnp.expm1(r1 * h)) * eps
    eps_r1 = self.eps(u1, s1)
    phi = self.sigma(lam_next) * jnp.expm1(h)
    return x - c(phi) * eps - c(phi / (2 * r1)) * (eps_r1 - eps), eps_r1

  def step_3(self, x, lam, lam_next, eps, eps_r1=None, r1=1 / 3, r2=2 / 3):
    """(x', ε at λ + r₁h); eps_r1 may be given (shared with a DPM-Solver-2 step of r₁)."""
    c = self._col
    h = lam_next - lam
    s1, s2 = lam + r1 * h, lam + r2 * h
    if eps_r1 is None:
      u1 = x - c(self.sigma(s1) * jnp.expm1(r1 * h)) * eps
      eps_r1 = self.eps(u1, s1)
    u2 = (x - c(self.sigma(s2) * jnp.expm1(r2 * h)) * eps
          - c(self.sigma(s2) * (r2 / r1) * (jnp.expm1(r2 * h) / (r2 * h) - 1)) * (eps_r1 - eps))
    eps_r2 = self.eps(u2, s2)
    x3 = (x - c(self.sigma(lam_next) * jnp.expm1(h)) * eps
          - c(self.sigma(lam_next) / r2 * (jnp.expm1(h) / h - 1)) * (eps_r2 - eps))
    return x3, eps_r1


def fast_orders(nfe: int) -> list[int]:
  """The orders of DPM-Solver-fast's steps for `nfe` evaluations (Lu et al. 2022a, §3.4).

  m = ⌊nfe/3⌋ + 1 steps: order 3 but the last one or two, [3, …, 3, 2, 1] when 3 divides nfe,
  else [3, …, 3, nfe mod 3].
  """
  if nfe < 1:
    raise ValueError(f'DPM-Solver-fast needs at least one evaluation, got {nfe}.')
  m = nfe // 3 + 1
  return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


def dpm_fast(denoise_fn: DenoiseFn, x, sigmas, *, key=None, eta: float = 0.0,
             s_noise: float = 1.0, noise_sampler: Union[str, brownian.NoiseFn] = 'gaussian'):
  """DPM-Solver-fast from σ_0 to the grid's last positive σ, with N (or N − 1) evaluations.

  The budget is the grid's N steps: N evaluations when it ends above 0 (k-diffusion's
  `sample_dpm_fast(n=N)`), or N − 1 and a final denoising when it ends in 0. The steps are
  uniform in λ between the ends (the grid's inner levels are not used). With η > 0 each step
  goes to the σ_down of its ancestral split and adds noise S_noise·σ_up (as k-diffusion).

  Args:
    denoise_fn: D(x [B, ...], σ [B]) -> [B, ...].
    x: the initial state at sigmas[0], [B, ...].
    sigmas: a decreasing σ-grid [N + 1] (only its ends and length are used).
    key: per-sample keys [B]; needed when η > 0.
    eta, s_noise, noise_sampler: the ancestral noise (see `kdiffusion.euler_ancestral`).

  Returns:
    The samples [B, ...] (at σ = 0 when the grid ends in 0, else at its last σ).
  """
  sigma_max, sigma_min, to_zero = _ends(sigmas)
  p = stepping.setup(denoise_fn, x, sigmas, eta, s_noise)
  eta_, s_noise_ = p.params
  nfe = p.num_steps - 1 if to_zero else p.num_steps
  if nfe < 1:
    raise ValueError('DPM-Solver-fast to σ = 0 needs a grid of at least 2 steps.')
  stochastic = stepping.adds_noise(eta, s_noise)
  noise_fn = None
  if stochastic:
    noise_fn = brownian.make(noise_sampler, key, p.x.shape[0], p.x.shape[1:], sigma_max, p.dtype)
  orders = fast_orders(nfe)
  lam_end = -math.log(sigma_min)
  lams = np.linspace(-math.log(sigma_max), lam_end, len(orders) + 1)

  def make(xp, lam, lam_next):
    sigma, sigma_next = xp.exp(-lam), xp.exp(-lam_next)
    down, _ = stepping.ancestral_step(xp, sigma, sigma_next, eta_)
    target = xp.minimum(lam_end, -xp.log(down))
    up = xp.sqrt(xp.maximum(sigma_next**2 - xp.exp(-target)**2, 0.0))
    return dict(lam=lam, target=target, sigma=sigma, sigma_next=sigma_next, noise=s_noise_ * up)

  table = stepping.tables(p, make, p.xp.asarray(lams[:-1]), p.xp.asarray(lams[1:]))
  solver = _Solver(p)

  def step(x, s, order):
    eps = solver.eps(x, s['lam'])
    if order == 1:
      x = solver.step_1(x, s['lam'], s['target'], eps)
    elif order == 2:
      x = solver.step_2(x, s['lam'], s['target'], eps)[0]
    else:
      x = solver.step_3(x, s['lam'], s['target'], eps)[0]
    if noise_fn is not None:
      x = x + noise_fn(s['i'], 0, s['sigma'], s['sigma_next']) * s['noise']
    return x

  inputs = {k: jnp.asarray(v, p.dtype) for k, v in table.items()}
  inputs['i'] = jnp.arange(len(orders), dtype=jnp.int32)
  num_third = orders.count(3)
  x = p.x
  if num_third:  # one scan over the third-order steps, the lower-order tail after it
    head = jax.tree.map(lambda a: a[:num_third], inputs)
    x = lax.scan(lambda c, s: (step(c, s, 3), None), x, head)[0]
  for k in range(num_third, len(orders)):
    x = step(x, {name: a[k] for name, a in inputs.items()}, orders[k])
  if to_zero:
    x = p.denoise(x, sigma_min)
  return p.unflatten(x)


def dpm_adaptive(denoise_fn: DenoiseFn, x, sigmas, *, key=None, order: int = 3,
                 rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                 pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
                 accept_safety: float = 0.81, max_attempts: int = 1000):
  """DPM-Solver-12 / -23 with adaptive steps (Lu et al. 2022a, §3.4 and App. B), per sample.

  Each attempt from λ to λ + h computes a low- and a high-order solution that share
  evaluations (orders 1 and 2, 2 evaluations; or 2 with r₁ = ⅓ and 3, 3 evaluations), measures
  E = ‖(x_low − x_high)/δ‖/sqrt(D) with δ = max(atol, rtol·max(|x_low|, |x_prev|)), and lets the
  PID controller of k-diffusion (limiter 1 + atan(f − 1)) scale h; the attempt is accepted when
  the factor is at least accept_safety. Every sample adapts on its own — k-diffusion takes E
  over the whole batch, so its steps depend on the batch; here a sample's result equals
  k-diffusion's on that sample alone, and depends on its own latents only. The loop is one
  `lax.while_loop` over attempts, running until every sample has arrived.

  Args:
    denoise_fn, x: as for `dpm_fast`.
    sigmas: a decreasing σ-grid; only σ_0, its smallest positive σ and whether it ends in 0
      are used.
    key: unused (deterministic; η > 0 is not offered here).
    order: 2 or 3, the higher of the pair.
    rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety: k-diffusion's defaults.
    max_attempts: a cap on the attempts per sample (the loop ends there even if not arrived).

  Returns:
    The samples [B, ...].
  """
  del key
  if order not in (2, 3):
    raise ValueError(f'The adaptive DPM-Solver order must be 2 or 3, got {order}.')
  sigma_max, sigma_min, to_zero = _ends(sigmas)
  p = stepping.setup(denoise_fn, x, sigmas)
  solver = _Solver(p)
  dtype = p.dtype
  batch, dim = p.x.shape
  lam_start, lam_end = -math.log(sigma_max), -math.log(sigma_min)
  b1 = (pcoeff + icoeff + dcoeff) / order
  b2 = -(pcoeff + 2 * dcoeff) / order
  b3 = dcoeff / order
  col = solver._col

  def body(state):
    lam, x, x_prev, h, errs, started, attempts = state
    active = (lam < lam_end - 1e-5) & (attempts < max_attempts)
    target = jnp.minimum(lam_end, lam + h)
    # Arrived samples step by a dummy h (their results are discarded by the selects below).
    target = jnp.where(active, target, lam + 1.0)
    eps = solver.eps(x, lam)
    if order == 2:
      x_low = solver.step_1(x, lam, target, eps)
      x_high = solver.step_2(x, lam, target, eps)[0]
    else:
      x_low, eps_r1 = solver.step_2(x, lam, target, eps, r1=1 / 3)
      x_high = solver.step_3(x, lam, target, eps, eps_r1=eps_r1)[0]
    delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(x_prev)))
    error = jnp.sqrt(jnp.sum(((x_low - x_high) / delta)**2, axis=1)) / math.sqrt(dim)
    inv = 1.0 / (error + 1e-8)
    e0 = inv
    e1 = jnp.where(started, errs[:, 1], inv)
    e2 = jnp.where(started, errs[:, 2], inv)
    factor = 1.0 + jnp.arctan(e0**b1 * e1**b2 * e2**b3 - 1.0)
    accept = (factor >= accept_safety) & active
    errs = jnp.stack([e0, jnp.where(accept, e0, e1), jnp.where(accept, e1, e2)], axis=1)
    errs = jnp.where(active[:, None], errs, state[4])
    h = jnp.where(active, h * factor, h)
    x_prev = jnp.where(col(accept), x_low, x_prev)
    x = jnp.where(col(accept), x_high, x)
    lam = jnp.where(accept, target, lam)
    return lam, x, x_prev, h, errs, started | active, attempts + active.astype(jnp.int32)

  def cond(state):
    lam, attempts = state[0], state[6]
    return jnp.any((lam < lam_end - 1e-5) & (attempts < max_attempts))

  state = (jnp.full([batch], lam_start, dtype), p.x, p.x, jnp.full([batch], h_init, dtype),
           jnp.ones([batch, 3], dtype), jnp.zeros([batch], bool), jnp.zeros([batch], jnp.int32))
  x = lax.while_loop(cond, body, state)[1]
  if to_zero:
    x = p.denoise(x, sigma_min)
  return p.unflatten(x)


registry.add('sampler', 'dpm_fast', stepping.registry_form(dpm_fast, 'dpm_fast'))
registry.add('sampler', 'dpm_adaptive', stepping.registry_form(dpm_adaptive, 'dpm_adaptive'))
