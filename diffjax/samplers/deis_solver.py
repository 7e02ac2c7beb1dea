"""DEIS: the diffusion exponential integrator sampler of Zhang & Chen 2023 (arXiv 2204.13902).

DEIS integrates the PF-ODE in ρ = σ_vp/α (EDM's σ), where it reads dx/dρ = ε(x, ρ) with the
noise prediction ε = (x − D)/σ and x the unscaled state (their Eq. 14: DDIM is its Euler step).
Its multistep form fits a polynomial through the last p noise predictions and integrates it
exactly over the step:

    x_{i+1} = x_i + Σ_{j<p} C_{i,j}·ε_{i−j},   C_{i,j} = ∫_{σ_i}^{σ_{i+1}} ℓ_{i,j}(log ρ) dρ,

with ℓ_{i,j} the Lagrange basis polynomials in log ρ on the nodes log σ_i, …, log σ_{i−p+1}
(the "log-ρ" variant, diffusers' `DEISMultistepScheduler`; polynomials in ρ itself are `lms`).
The integral is closed-form: with v = log(ρ/σ_i), ∫ P(v) dρ = ρ·Σ_m (−1)^m P^{(m)}(v), which is
0 at ρ = 0, so a step may land on σ = 0. The order schedule (warm-up min(p, i + 1),
`lower_order_final`) is diffusers'; tests/samplers/test_unipc_deis.py checks this against it.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from diffjax import registry
from diffjax.samplers import stepping

DenoiseFn = stepping.DenoiseFn
MAX_ORDER = 3


def deis_coefficients(xp, sigmas, order: int, lower_order_final: bool):
  """C_{i,j} [N, order] of the log-ρ DEIS multistep method (column j weighs ε_{i−j}).

  Computed in v = log ρ − log σ_i, whose nodes v_k = log(σ_{i−k}/σ_i) are O(h): the polynomial
  coefficients stay O(1/h^k) instead of carrying log σ_i's magnitude.
  """
  n = sigmas.shape[0] - 1
  sigma, sigma_next = sigmas[:-1], sigmas[1:]
  log_sigma = xp.log(sigma)
  # Past nodes before the grid's start: distinct finite values (their orders are never used).
  pad = log_sigma[0] + 1.0 + xp.arange(order, dtype=log_sigma.dtype)
  past = xp.concatenate([pad[::-1], log_sigma])
  nodes = [past[order - k:order - k + n] - log_sigma for k in range(order)]  # v_{i−k}
  # v at the step's end; log 0 = −inf, where ρ·Q(v) is 0.
  landing = sigma_next > 0
  v_end = xp.log(xp.where(landing, sigma_next, 1.0)) - log_sigma

  def antiderivative(coeffs, v, rho):
    """ρ·Σ_m (−1)^m P^{(m)}(v) for P = Σ_k coeffs[k] v^k."""
    total = 0.0
    for k, c in enumerate(coeffs):
      # d^m/dv^m v^k = k!/(k−m)! v^{k−m}.
      total = total + c * sum((-1)**m * math.perm(k, m) * v**(k - m) for m in range(k + 1))
    return rho * total

  orders = stepping.step_orders(xp, n, order, lower_order_final)
  columns = []
  for j in range(order):
    per_order = []
    for p in range(1, order + 1):
      if j >= p:
        per_order.append(xp.zeros_like(sigma))
        continue
      coeffs = stepping.lagrange_monomials(nodes[:p], j)
      end = xp.where(landing, antiderivative(coeffs, v_end, sigma_next), 0.0)
      per_order.append(end - antiderivative(coeffs, xp.zeros_like(sigma), sigma))
    columns.append(stepping.select_order(xp, orders, per_order))
  return xp.stack(columns, axis=1)


def deis(denoise_fn: DenoiseFn, x, sigmas, *, key=None, order: int = 3,
         lower_order_final: bool = True):
  """DEIS multistep sampler (log-ρ AB, Zhang & Chen 2023) of `order` on a σ-grid; N calls.

  Args:
    denoise_fn: D(x [B, ...], σ [B]) -> [B, ...].
    x: the initial state at sigmas[0] (latents·sigmas[0]), [B, ...].
    sigmas: decreasing noise levels [N + 1] ending in 0 (e.g. `schedules.karras`).
    key: unused (deterministic); accepted for the common calling convention.
    order: p ∈ {1, 2, 3}; 1 is DDIM.
    lower_order_final: lower the order of the last steps (min(p, N − i)).

  Returns:
    The samples [B, ...].
  """
  del key
  order = int(order)
  if not 1 <= order <= MAX_ORDER:
    raise ValueError(f'The DEIS order must be 1, 2 or 3, got {order}.')
  p = stepping.setup(denoise_fn, x, sigmas)
  coeffs = stepping.tables(p, deis_coefficients, p.sigmas, order, lower_order_final)
  inputs = p.inputs(sigma=p.sigmas[:-1])
  inputs['c'] = jnp.asarray(coeffs, p.dtype)

  def step(carry, s, finish):
    x, history = carry  # ε_i, …, ε_{i−order+1} once ε_i is pushed (`stepping.ring`)
    eps = (x - p.denoise(x, s['sigma'])) / s['sigma']
    history = stepping.ring_push(history, eps, s['i'])
    x = x + sum(s['c'][j] * stepping.ring_get(history, s['i'], j) for j in range(order))
    return x, history

  carry = (p.x, stepping.ring(p.x, order))
  return p.unflatten(stepping.scan_steps(step, carry, inputs)[0])


registry.add('sampler', 'deis', stepping.registry_form(deis, 'deis'))
