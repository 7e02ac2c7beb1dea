"""UniPC: the unified predictor–corrector of Zhao et al. 2023 (arXiv 2302.04867), in σ-space.

With data prediction D and λ = −log σ (the VE form of the paper's log-SNR λ = log(α/σ_vp)), a
step from σ_i to σ_{i+1}, h = λ_{i+1} − λ_i, of order p uses the p − 1 earlier evaluations through
their divided differences D1_k = (D_{i−k} − D_i)/r_k, r_k = (λ_{i−k} − λ_i)/h:

  UniP-p (predictor, Alg. 2):
    x̃_{i+1} = (σ_{i+1}/σ_i)·x_i − (e^{−h} − 1)·D_i − B(h)·Σ_{k<p} ρ^p_k·D1_k
  UniC-p (corrector, Alg. 1), once D̃_{i+1} = D(x̃_{i+1}; σ_{i+1}) is known:
    x_{i+1} = (σ_{i+1}/σ_i)·x_i − (e^{−h} − 1)·D_i − B(h)·(Σ_{k<p} ρ^c_k·D1_k + ρ^c_p·(D̃_{i+1} − D_i))

with B(h) = −h ('bh1', the paper's B₁(h) = h in its sign convention) or e^{−h} − 1 ('bh2'), and ρ
solving R_p·ρ = g, R_p = [r_j^{k−1}] (k, j = 1..p, r_p = 1), g_k = k!·ψ_k/B(h), ψ_1 = (e^{−h} −
1)/(−h) − 1, ψ_{k+1} = ψ_k/(−h) − 1/(k+1)! (the φ_{k+1} of the paper). The predictor solves the
system without its last row and column; UniP-2 and UniC-1 take ρ = ½, as the authors' code does.
The corrector is free: the next step reuses D̃_{i+1}, evaluated before correction, so UniPC-p
costs one denoiser call per step and reaches order p + 1 (the corrector is skipped after the
last step, as there is no later call to reuse).

The step rules and order schedule are those of the authors' code and diffusers'
`UniPCMultistepScheduler` (warm-up min(p, i + 1), `lower_order_final`), checked against the latter
on an exact denoiser in tests/samplers/test_unipc_deis.py. A step that lands on σ = 0 is first
order, x = D (higher orders are infinite there: r_k = 0).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from diffjax import registry
from diffjax.samplers import stepping

DenoiseFn = stepping.DenoiseFn
SOLVER_TYPES = ('bh1', 'bh2')
MAX_ORDER = 3


def unipc_tables(xp, sigmas, order: int, solver_type: str, lower_order_final: bool,
                 corrector: bool) -> dict:
  """The predictor's and corrector's coefficients of every step, as linear combinations.

  Returns:
    dict of [N] arrays. Predictor of step j: x̃_{j+1} = p_x·x_j + p_0·D_j + p_1·D_{j−1} +
    p_2·D_{j−2}. Corrector at the start of step j (of step j − 1's result): x_j = c_pred·x̃_j +
    c_x·x_{j−1} + c_new·D̃_j + c_0·D_{j−1} + c_1·D_{j−2} + c_2·D_{j−3} (c_pred = 1 and the
    rest 0 on step 0, or without the corrector). 'sigma' [N] is σ_j.
  """
  n = sigmas.shape[0] - 1
  sigma, sigma_next = sigmas[:-1], sigmas[1:]
  lam = -xp.log(sigmas)
  # λ before the grid's start: distinct finite values; the orders that would use them are 0.
  pad = lam[0] - 1.0 - xp.arange(MAX_ORDER - 1, dtype=lam.dtype)
  lam_past = xp.concatenate([pad[::-1], lam[:-1]])  # lam_past[MAX_ORDER − 1 + i − k] = λ_{i−k}
  lam_i = lam[:-1]
  h = lam[1:] - lam_i
  r = [(lam_past[MAX_ORDER - 1 - k:MAX_ORDER - 1 - k + n] - lam_i) / h
       for k in range(1, MAX_ORDER)]  # r_1, r_2 [N]
  hh = -h
  h_phi_1 = xp.expm1(hh)
  b_h = hh if solver_type == 'bh1' else xp.expm1(hh)
  g, psi = [], h_phi_1 / hh - 1.0
  for k in range(1, MAX_ORDER + 1):
    g.append(psi * math.factorial(k) / b_h)
    psi = psi / hh - 1.0 / math.factorial(k + 1)

  orders = stepping.step_orders(xp, n, order, lower_order_final)
  orders = xp.where(sigma_next > 0, orders, 1)
  zero = xp.zeros_like(h)
  x_ratio = xp.where(sigma_next > 0, sigma_next / sigma, 0.0)
  first = -h_phi_1  # weight of D_i in the first-order (DDIM) step

  # Predictor UniP-p: ρ on the p − 1 past points; Σ ρ_k D1_k = Σ ρ_k (D_{i−k} − D_i)/r_k.
  def predictor(p):
    if p == 1:
      rho = []
    elif p == 2:
      rho = [0.5 + zero]
    else:
      nodes = r[:p - 1]
      rho = [sum(c * g[k] for k, c in enumerate(stepping.lagrange_monomials(nodes, j)))
             for j in range(p - 1)]
    past = [-b_h * rho[k] / r[k] for k in range(len(rho))]
    return [first - sum(past, zero)] + past + [zero] * (MAX_ORDER - 1 - len(past))

  # Corrector UniC-p: ρ on the p − 1 past points and the new one (r_p = 1).
  def corrector_row(p):
    if p == 1:
      rho = [0.5 + zero]
    else:
      nodes = r[:p - 1] + [1.0 + zero]
      rho = [sum(c * g[k] for k, c in enumerate(stepping.lagrange_monomials(nodes, j)))
             for j in range(p)]
    past = [-b_h * rho[k] / r[k] for k in range(p - 1)]
    new = -b_h * rho[p - 1]
    return [first - sum(past, zero) - new, new] + past + [zero] * (MAX_ORDER - p)

  pred = [predictor(p) for p in range(1, MAX_ORDER + 1)]
  pred = [stepping.select_order(xp, orders, [row[k] for row in pred]) for k in range(MAX_ORDER)]
  corr = [corrector_row(p) for p in range(1, MAX_ORDER + 1)]
  corr = [stepping.select_order(xp, orders, [row[k] for row in corr])
          for k in range(MAX_ORDER + 1)]

  # Step j corrects step j − 1's result: shift the corrector rows by one step.
  def shift(a, first_value):
    return xp.concatenate([xp.full(1, first_value, a.dtype), a[:-1]])

  out = dict(sigma=sigma, p_x=x_ratio, p_0=pred[0], p_1=pred[1], p_2=pred[2])
  if corrector:  # the last step's row (infinite for a step to 0) falls off the shift
    out.update(c_pred=shift(zero, 1.0), c_x=shift(x_ratio, 0.0), c_new=shift(corr[1], 0.0),
               c_0=shift(corr[0], 0.0), c_1=shift(corr[2], 0.0), c_2=shift(corr[3], 0.0))
  else:
    out.update(c_pred=1.0 + zero, c_x=zero, c_new=zero, c_0=zero, c_1=zero, c_2=zero)
  return out


def unipc(denoise_fn: DenoiseFn, x, sigmas, *, key=None, order: int = 3,
          solver_type: str = 'bh2', lower_order_final: bool = True, corrector: bool = True):
  """UniPC-p sampler (Zhao et al. 2023) on a σ-grid; N denoiser calls.

  Args:
    denoise_fn: D(x [B, ...], σ [B]) -> [B, ...].
    x: the initial state at sigmas[0] (latents·sigmas[0]), [B, ...].
    sigmas: decreasing noise levels [N + 1] ending in 0 (e.g. `schedules.karras`).
    key: unused (deterministic); accepted for the common calling convention.
    order: p ∈ {1, 2, 3}, the predictor's order (the corrector adds one).
    solver_type: 'bh1' (B(h) = h; the paper's choice for unconditional sampling at very few
      steps) or 'bh2' (B(h) = e^h − 1; diffusers' default, for guided sampling).
    lower_order_final: lower the order of the last steps (min(p, N − i)), as diffusers does.
    corrector: apply UniC (False: UniP alone, order p).

  Returns:
    The samples [B, ...].
  """
  del key
  order = int(order)
  if not 1 <= order <= MAX_ORDER:
    raise ValueError(f'The UniPC order must be 1, 2 or 3, got {order}.')
  if solver_type not in SOLVER_TYPES:
    raise ValueError(f'Unknown UniPC solver_type {solver_type!r}; known: '
                     f'{", ".join(SOLVER_TYPES)}.')
  p = stepping.setup(denoise_fn, x, sigmas)
  inputs = p.inputs(**stepping.tables(p, unipc_tables, p.sigmas, order, solver_type,
                                      lower_order_final, corrector))
  # The D̃'s live in a ring (`stepping.ring`): rotated through the carry, XLA:CPU copied each of
  # them every step. x̃ and x_{i−1} are both fresh outputs of the step, which needs no copy.

  def step(carry, s, finish):
    x_pred, x_prev, history = carry
    denoised = p.denoise(x_pred, s['sigma'])
    history = stepping.ring_push(history, denoised, s['i'])
    denoised, d_1, d_2, d_3 = (stepping.ring_get(history, s['i'], j) for j in range(4))
    # UniC on the previous step's result, with the evaluation at its predicted point.
    x = (s['c_pred'] * x_pred + s['c_x'] * x_prev + s['c_new'] * denoised + s['c_0'] * d_1
         + s['c_1'] * d_2 + s['c_2'] * d_3)
    x_next = s['p_x'] * x + s['p_0'] * denoised + s['p_1'] * d_1 + s['p_2'] * d_2
    return x_next, x, history

  carry = (p.x, jnp.zeros_like(p.x), stepping.ring(p.x, MAX_ORDER + 1))
  return p.unflatten(stepping.scan_steps(step, carry, inputs)[0])


registry.add('sampler', 'unipc', stepping.registry_form(unipc, 'unipc'))
registry.add('sampler', 'unipc_bh1', stepping.registry_form(unipc, 'unipc_bh1', solver_type='bh1'))
