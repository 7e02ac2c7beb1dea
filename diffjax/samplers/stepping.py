"""What every σ-grid solver shares: the flattened state, per-step coefficient tables, one scan.

The solvers of `kdiffusion`, `unipc` and `deis` walk a decreasing σ-grid σ_0 > … > σ_N (normally
σ_N = 0) and write each step as a linear combination of the state and a few denoiser outputs,

    x_{i+1} = a_i·x_i + Σ_k b_{i,k}·D_{i−k} + c_i·n_i,

whose scalar coefficients depend on the grid alone. So a solver is two parts:

  * its *tables*: the coefficients of every step, computed before the loop, vectorized over the
    steps. When the grid and the solver's parameters are known now (the normal case: a grid from
    `schedules`), they are computed in float64 numpy, so the only float32 rounding is in the array
    arithmetic of the loop; on a traced grid (sigmas passed into a jitted function) they are
    computed with jnp in the state's dtype. Each table function takes the array module `xp`.
  * its *step*: the array work of one step inside one `lax.scan`, the denoiser calls included.

Solvers whose step makes a second denoiser call skip it where the step lands on σ = 0 (the
derivative there would divide by σ = 0), as `ode.integrate` does for Heun, and for the same reason
never branch inside the scan body: `scan_steps` picks the step's ending from the grid.

The state is kept flat, [B, D], as in `ode.integrate` (XLA:CPU vectorizes the minor axis; an NHWC
image's minor axis is its 1–3 channels); the denoiser still sees images.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax import registry
from diffjax.precond import Preconditioning
from diffjax.processes import schedules
from diffjax.samplers import ode

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def concrete(*values) -> Optional[tuple]:
  """The values as float64 numpy arrays when all are known now, else None (some are traced)."""
  try:
    return tuple(np.asarray(v, np.float64) for v in values)
  except Exception:  # noqa: BLE001 - a tracer (TracerArrayConversionError and kin).
    return None


def equals(value, target: float) -> bool:
  """True only when `value` is concretely `target` (a traced value never is)."""
  got = concrete(value)
  return got is not None and got[0].shape == () and float(got[0]) == target


@dataclasses.dataclass(frozen=True)
class Problem:
  """A solver's view of its inputs: the flat state, the grid, its parameters and the denoiser.

  Attributes:
    x: the state [B, D], in x's dtype promoted to at least float32 (the ODE accumulates small
      updates, so a bf16 network still gets a float32 state).
    image_shape: the state's shape as given, [B, ...].
    sigmas: the grid [N + 1]: float64 numpy when it and `params` are known now, else jnp.
    params: the solver's scalar parameters (eta, s_noise, …) in the same array module.
    xp: numpy or jax.numpy, for the tables.
    denoise_fn: D(x [B, ...], σ [B]) -> [B, ...].
  """
  x: jax.Array
  image_shape: tuple
  sigmas: Any
  params: tuple
  xp: Any
  denoise_fn: DenoiseFn

  @property
  def num_steps(self) -> int:
    return self.sigmas.shape[0] - 1

  @property
  def dtype(self):
    return self.x.dtype

  def denoise(self, z: jax.Array, sigma: jax.Array) -> jax.Array:
    """D(z; σ) on the flat state: z [B, D], σ a scalar -> [B, D]."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, z.dtype), z.shape[:1])
    return self.denoise_fn(z.reshape(self.image_shape), sigma).reshape(z.shape)

  def unflatten(self, z: jax.Array) -> jax.Array:
    return z.reshape(self.image_shape)

  def inputs(self, **tables) -> dict:
    """The per-step tables [N] as jnp arrays of the state's dtype, plus the step index 'i'."""
    out = {k: jnp.asarray(v, self.dtype) for k, v in tables.items()}
    out['i'] = jnp.arange(self.num_steps, dtype=jnp.int32)
    return out


def setup(denoise_fn: DenoiseFn, x, sigmas, *params) -> Problem:
  """Checks and flattens a solver's inputs (see `Problem`).

  Raises:
    ValueError: if the grid is not a vector of at least two noise levels.
  """
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  known = concrete(sigmas, *params)
  if known is not None:
    grid, params, xp = known[0], known[1:], np
  else:
    grid = jnp.asarray(sigmas, x.dtype)
    params = tuple(jnp.asarray(p, x.dtype) for p in params)
    xp = jnp
  if grid.ndim != 1 or grid.shape[0] < 2:
    raise ValueError(f'The σ-grid must be a vector of N + 1 >= 2 noise levels, got shape '
                     f'{grid.shape}.')
  return Problem(x.reshape(x.shape[0], -1), tuple(x.shape), grid, params, xp, denoise_fn)


def setup_ancestral(denoise_fn: DenoiseFn, x, sigmas, eta, s_noise):
  """`setup` for a solver with eta and s_noise: (problem, eta, s_noise as the problem's constants,
  whether it draws noise at all; see `adds_noise`)."""
  problem = setup(denoise_fn, x, sigmas, eta, s_noise)
  eta_, s_noise_ = problem.params
  return problem, eta_, s_noise_, adds_noise(eta, s_noise)


def adds_noise(eta, s_noise) -> bool:
  """Whether an ancestral/SDE solver draws noise: not when eta or s_noise is exactly 0 at trace time
  (the solver is then its deterministic counterpart and needs no key)."""
  return not (equals(eta, 0.0) or equals(s_noise, 0.0))


def tables(problem: Problem, fn: Callable, *args):
  """fn(xp, *args): the tables, with numpy's warnings about log(0) and 1/0 silenced.

  The tables are evaluated on every step at once, the last included, where σ_{N} = 0 makes some
  entries infinite or NaN; each solver selects those away with `xp.where`.
  """
  with np.errstate(all='ignore'):
    return fn(problem.xp, *args)


def ancestral_step(xp, sigma_from, sigma_to, eta):
  """(σ_down, σ_up) of an ancestral step from σ_from to σ_to (k-diffusion's split).

  σ_up = min(σ_to, η·sqrt(σ_to²(σ_from² − σ_to²)/σ_from²)), σ_down = sqrt(σ_to² − σ_up²): a
  deterministic step to σ_down followed by fresh noise of std σ_up lands at σ_to, and with η = 1
  its noise is the DDPM posterior's (Ho et al. 2020, Eq. 7, in σ-space). Elementwise.
  """
  sigma_up = xp.minimum(sigma_to, eta * xp.sqrt(
      xp.maximum(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2, 0.0)))
  sigma_down = xp.sqrt(xp.maximum(sigma_to**2 - sigma_up**2, 0.0))
  return sigma_down, sigma_up


def lagrange_monomials(nodes: list, j: int) -> list:
  """Monomial coefficients [c_0, …, c_{p−1}] of the Lagrange basis polynomial ℓ_j on `nodes`.

  ℓ_j(t) = Π_{m≠j} (t − z_m)/(z_j − z_m) = Σ_k c_k t^k, elementwise over arrays of nodes (one
  polynomial per step). The same coefficients solve the transposed Vandermonde system
  Σ_j ρ_j z_j^k = b_k as ρ_j = Σ_k c_{j,k} b_k (Σ_j ℓ_j(t) z_j^k = t^k for k < p).
  """
  coeffs = [1.0]
  denom = 1.0
  for m, z in enumerate(nodes):
    if m == j:
      continue
    # (Σ_k c_k t^k)(t − z): the new c_k = c_{k−1} − z·c_k.
    coeffs = [(coeffs[k - 1] if k > 0 else 0.0) - (z * coeffs[k] if k < len(coeffs) else 0.0)
              for k in range(len(coeffs) + 1)]
    denom = denom * (nodes[j] - z)
  return [c / denom for c in coeffs]


def select_order(xp, order, per_order: list):
  """per_order[p − 1] where order == p, elementwise (order [N] ints, per_order arrays [N])."""
  out = per_order[0]
  for p in range(2, len(per_order) + 1):
    out = xp.where(order == p, per_order[p - 1], out)
  return out


def step_orders(xp, num_steps: int, order: int, lower_order_final: bool):
  """The order [N] of each step of a multistep solver of `order`.

  Step i has only i past evaluations, so its order is min(order, i + 1) (the warm-up); with
  lower_order_final the last steps drop too, min(…, N − i), as diffusers' multistep schedulers do
  (they stabilize the few-step case, where the last steps are the longest in λ).
  """
  index = np.arange(num_steps)
  orders = np.minimum(order, index + 1)
  if lower_order_final:
    orders = np.minimum(orders, num_steps - index)
  return xp.asarray(orders)


# ------------------------------------------------------------------------------------------------
# A multistep solver's history: a ring of images written in place.
#
# Carrying the last k denoiser outputs as k separate arrays rotated through the scan carry
# ((D_i, D_{i−1}) ← (D_{i−1}, D_{i−2})) makes XLA:CPU copy every carried image every step: each
# output slot of the loop is written while another slot it reads is still live, so copy insertion
# duplicates all of them (3 copies of a 196 kB image per step for DPM-Solver++(2M), 7 for LMS-4 and
# UniPC; 2M's overhead per NFE fell from 34–71 to 9–16 µs on the trivial-denoiser benchmark). One
# [k, B, D] buffer that the step first writes D_i into (slot i mod k, which held D_{i−k}, no longer
# needed) and then reads from by index has no such cycle: the write is an in-place
# dynamic-update-slice and nothing is copied (benchmarks/NOTES.md, 2026-12-07b;
# tests/samplers/test_solver_loop_copies.py). Slots not yet written hold zeros, as the rotated
# tuples did, and the solvers read D_i back from the ring too: the samples are bitwise those of the
# rotated form.


def ring(x: jax.Array, size: int) -> jax.Array:
  """An empty history of `size` images like x: zeros [size, *x.shape]."""
  return jnp.zeros((size,) + x.shape, x.dtype)


def ring_push(history: jax.Array, value: jax.Array, i) -> jax.Array:
  """The history with step i's value in slot i mod size (over the value of step i − size).

  Push before reading step i's combination, so that the loop never holds two versions of the
  buffer (see above).
  """
  return lax.dynamic_update_index_in_dim(history, value.astype(history.dtype),
                                         i % history.shape[0], 0)


def ring_get(history: jax.Array, i, j: int) -> jax.Array:
  """The value pushed at step i − j (0 <= j < size; zeros before step 0)."""
  return lax.dynamic_index_in_dim(history, (i - j) % history.shape[0], 0, keepdims=False)


# ------------------------------------------------------------------------------------------------
# One scan over the steps, with the second denoiser call paid only where a step needs it.


def _take_second(second, first, level):
  return second()


def _take_first(second, first, level):  # the step lands on σ = 0
  return first


def _select_second(second, first, level):  # both paid, no branch: a scan body never has one
  return jax.tree.map(lambda a, b: jnp.where(level > 0, a, b), second(), first)


def _branch_second(second, first, level):  # outside the scan only: the last step
  return lax.cond(level > 0, second, lambda: first)


def _finishes(levels) -> tuple[Callable, Callable]:
  """(how steps before the last end, how the last ends) given each step's target level."""
  known = concrete(levels)
  if known is None:
    return _select_second, _branch_second
  levels = known[0]
  if np.all(levels > 0):
    return _take_second, _take_second
  if levels[-1] == 0 and np.all(levels[:-1] > 0):
    return _take_second, _take_first
  return _select_second, _branch_second


def scan_steps(step: Callable, carry, inputs: dict, levels=None):
  """Runs the solver's steps in one `lax.scan` and returns the final carry.

  Args:
    step: step(carry, inputs_i, finish) -> carry. A two-evaluation solver ends its step with
      `finish(second, first, level)`: `second` a thunk computing the step with its second
      denoiser call, `first` the step without it (its first-order result), `level` the σ it
      steps to; the second call is paid only where level > 0. One-evaluation solvers ignore it.
    carry: the initial carry (a pytree of arrays).
    inputs: per-step arrays [N] (see `Problem.inputs`).
    levels: [N] the σ each step steps to, numpy when known now; None for one-evaluation solvers.

  On a grid known now every step but a final one landing on 0 takes its second call; on a traced
  grid the steps before the last select between the two (a `lax.cond` inside a scan body costs
  about 4× the per-NFE overhead, `ode.integrate`), and only the last step, outside the loop,
  branches. A one-evaluation solver is one scan over all N steps.
  """
  if levels is None:
    return lax.scan(lambda c, xs: (step(c, xs, None), None), carry, inputs)[0]
  body_finish, last_finish = _finishes(levels)
  num_steps = inputs['i'].shape[0]
  head = jax.tree.map(lambda a: a[:-1], inputs)
  last = jax.tree.map(lambda a: a[-1], inputs)
  if num_steps > 1:
    carry = lax.scan(lambda c, xs: (step(c, xs, body_finish), None), carry, head)[0]
  return step(carry, last, last_finish)


# ------------------------------------------------------------------------------------------------
# The registry form: sampler(denoise_fn, latents, keys, *, precond, num_steps, **options).


def sigma_grid_for(precond: Optional[Preconditioning], num_steps: int, grid: Optional[str] = None,
                   sigma_min: float = schedules.EDM_SIGMA_MIN,
                   sigma_max: float = schedules.EDM_SIGMA_MAX,
                   rho: Optional[float] = None) -> np.ndarray:
  """The σ-grid a registered sampler walks on a network.

  Without `grid`, EDM's Karras grid clamped to the network (`ode.edm_grid_for`, ρ = 7 unless
  given). With a registered discretization name ('karras', 'exponential', 'polyexponential', 'vp',
  'linear_logsnr', …), that grid between sigma_min and sigma_max clamped to the network's range,
  its levels snapped with precond.round_sigma as `edm_grid_for` does.

  Returns:
    float64 [num_steps + 1], decreasing, last entry 0.

  Raises:
    registry.UnknownNameError: on an unknown grid name (the message lists the known ones).
    ValueError: when rho is given to a grid that has no ρ.
  """
  if precond is None:  # a bare denoiser: any σ > 0
    precond = Preconditioning('none', None, 0.0, float('inf'))
  if grid is None:
    return ode.edm_grid_for(precond, num_steps, sigma_min, sigma_max,
                            schedules.EDM_RHO if rho is None else rho)
  fn = registry.get('discretization', grid)
  kwargs = dict(sigma_min=max(sigma_min, precond.sigma_min),
                sigma_max=min(sigma_max, precond.sigma_max))
  if rho is not None:
    if 'rho' not in inspect.signature(fn).parameters:
      raise ValueError(f'The {grid!r} σ-grid has no ρ; leave rho out or pick karras or '
                       f'polyexponential.')
    kwargs['rho'] = rho
  levels = np.asarray(fn(num_steps, **kwargs), np.float64)[:-1]
  with jax.ensure_compile_time_eval():  # a constant of the sampler, even inside a trace
    levels = np.asarray(precond.round_sigma(levels), np.float64)
  return np.append(levels, 0.0)


def distinct_levels(sigmas: np.ndarray) -> np.ndarray:
  """The grid without repeated levels (each run of equal σ kept once).

  A discrete model's round_sigma snaps a fine grid's low levels onto the same entry of its σ
  table (the DDPM CIFAR-10 run's default grid repeats levels from 128 steps, iDDPM's
  polyexponential from 18): a zero-length step h = 0, which a multistep solver's ratios
  h_{i−1}/h_i and Lagrange nodes turn into NaN, and a wasted evaluation for any solver.
  """
  sigmas = np.asarray(sigmas, np.float64)
  keep = np.concatenate([[True], sigmas[1:] != sigmas[:-1]])
  return sigmas[keep]


def registry_form(solve: Callable, name: str, **defaults) -> Callable:
  """The registry form of a σ-grid solver `solve(denoise_fn, x, sigmas, key=, **options)`.

  The returned sampler(denoise_fn, latents, keys, *, precond, num_steps, grid=None,
  sigma_min=0.002, sigma_max=80, rho=None, **options) builds the grid with `sigma_grid_for`,
  starts at latents·σ_0 and passes the options, over `defaults` (a variant's fixed choices, e.g.
  solver_type='heun'), on to `solve`. Levels the network's round_sigma made equal are walked once
  (`distinct_levels`): on a discrete model a fine grid can take fewer steps than asked.
  """

  def sampler(denoise_fn, latents: jax.Array, keys=None, *, precond: Optional[Preconditioning],
              num_steps: int, grid: Optional[str] = None,
              sigma_min: float = schedules.EDM_SIGMA_MIN,
              sigma_max: float = schedules.EDM_SIGMA_MAX, rho: Optional[float] = None,
              **options) -> jax.Array:
    sigmas = distinct_levels(sigma_grid_for(precond, num_steps, grid, sigma_min, sigma_max, rho))
    x = latents * jnp.asarray(sigmas[0], latents.dtype)
    return solve(denoise_fn, x, sigmas, key=keys, **{**defaults, **options})

  sampler.__name__ = f'{name}_sampler'
  sampler.__doc__ = (
      f'`{solve.__module__}.{solve.__name__}` on a σ-grid for the network (registry form).\n\n'
      '  Args: denoise_fn, latents [B, ...] standard normal, keys [B] or None; precond, num_steps;\n'
      '  grid (a discretization name; default the Karras grid), sigma_min, sigma_max, rho; the\n'
      f'  solver\'s options (see {solve.__name__}).\n')
  return sampler
