"""Deterministic and stochastic ODE samplers of EDM (Karras et al. 2022, Algorithms 1–2, Table 1).

One integrator, `integrate`, walks a time grid t_0 > … > t_{N−1} > t_N = 0 down the probability-flow
ODE of a noise schedule σ(t) and a signal scaling s(t) (EDM Eq. 4 with scaling, REFERENCE §1.1):

    dx/dt = [σ'(t)/σ(t) + s'(t)/s(t)]·x − σ'(t)·s(t)/σ(t)·D(x/s(t); σ(t)),

with Euler or Heun's 2nd-order Runge–Kutta step (parameter α, EDM App. D.2) and the stochastic
"churn" of Algorithm 2: before step i the noise level is raised from σ(t_i) to σ(t̂_i) = (1 + γ_i)σ(t_i)
by adding fresh noise, γ_i = min(S_churn/N, √2 − 1) while S_tmin ≤ σ(t_i) ≤ S_tmax, else 0.

The whole loop is one `lax.scan` over the N steps. Heun's correction is skipped on the step that lands
on t = 0 (its derivative would divide by σ = 0), so a Heun run costs 2N − 1 denoiser evaluations.

Everything else is a thin wrapper:
  * `euler`, `heun`: the public σ-space API (σ(t) = t, s = 1) on a given σ-grid;
  * `generalized`: EDM's generalized sampler — discretization {vp, ve, iddpm, edm} × schedule
    {vp, ve, linear} × scaling {vp, none} × solver {euler, heun}, which expresses every sampler of
    EDM's Table 1 and Fig. 2;
  * `edm_grid_for`: the Karras grid clamped to what a preconditioned network supports.

Latents and keys come from `diffjax.samplers.noise` (`seed_keys`, `latents`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax.precond import Preconditioning
from diffjax.processes import schedules
from diffjax.samplers import noise

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

SOLVERS = ('euler', 'heun')
DISCRETIZATIONS = ('vp', 've', 'iddpm', 'edm')
SCHEDULES = ('vp', 've', 'linear')
SCALINGS = ('vp', 'none')

# The largest churn EDM allows: γ = √2 − 1 at most doubles the variance of the added noise.
_MAX_GAMMA = math.sqrt(2.0) - 1.0


def _identity(sigma):
  return sigma


def _equals(value, target: float) -> bool:
  """True only when `value` is concretely `target` (a traced value never is)."""
  try:
    return float(value) == target
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False


def _per_example(c: jax.Array, x: jax.Array) -> jax.Array:
  """Broadcasts a scalar σ to the per-example vector [B] a denoiser takes."""
  return jnp.broadcast_to(c, x.shape[:1])


def ode_derivative(denoise_fn: DenoiseFn, x: jax.Array, t: jax.Array, schedule: schedules.Schedule,
                   scaling: schedules.Scaling) -> jax.Array:
  """dx/dt of the probability-flow ODE with scaling (EDM Eq. 4 / REFERENCE §1.1).

  Args:
    denoise_fn: D(x [B, ...], σ [B]) -> [B, ...].
    x: the scaled state x = s(t)·(y + σ(t)n), [B, ...].
    t: the time, a scalar.
    schedule, scaling: σ(t) and s(t).

  Returns:
    [B, ...]: [σ'/σ + s'/s]·x − σ'·s/σ·D(x/s; σ).
  """
  sigma, sigma_deriv = schedule.sigma(t), schedule.sigma_deriv(t)
  s, s_deriv = scaling.s(t), scaling.s_deriv(t)
  denoised = denoise_fn(x / s, _per_example(sigma, x))
  return (sigma_deriv / sigma + s_deriv / s) * x - sigma_deriv * s / sigma * denoised


def integrate(denoise_fn: DenoiseFn, x: jax.Array, t_steps, *,
              schedule: Optional[schedules.Schedule] = None,
              scaling: Optional[schedules.Scaling] = None, solver: str = 'heun',
              alpha: float = 1.0, keys=None, s_churn: float = 0.0, s_tmin: float = 0.0,
              s_tmax: float = float('inf'), s_noise: float = 1.0,
              round_sigma: Optional[Callable] = None) -> jax.Array:
  """The one ODE integrator behind every sampler in this module (EDM Alg. 2, generalized).

  For i = 0..N−1, with t̂ = σ⁻¹(round_sigma((1 + γ_i)σ(t_i))) and h = t_{i+1} − t̂:
    x̂ = s(t̂)/s(t_i)·x_i + sqrt(σ(t̂)² − σ(t_i)²)·s(t̂)·S_noise·ε_i        (churn)
    d_cur = f(x̂, t̂);  Euler: x_{i+1} = x̂ + h·d_cur
    Heun (t_{i+1} > 0): x' = x̂ + αh·d_cur, d_prime = f(x', t̂ + αh),
                        x_{i+1} = x̂ + h·[(1 − 1/(2α))·d_cur + 1/(2α)·d_prime]
  where f is `ode_derivative`. Steps landing on t = 0 take the Euler update, so a grid ending in 0
  costs N (Euler) or 2N − 1 (Heun) denoiser calls.

  Args:
    denoise_fn: D(x [B, ...], σ [B]) -> [B, ...]; called on x/s(t).
    x: the initial state at t_steps[0], already scaled: latents·σ(t_0)·s(t_0), [B, ...]; the
      state is kept in x's dtype promoted to at least float32.
    t_steps: decreasing times [N + 1], normally ending in 0 (cast to the state's dtype).
    schedule: σ(t); the linear σ(t) = t when None.
    scaling: s(t); s = 1 when None.
    solver: 'euler' or 'heun'.
    alpha: α of the 2nd-order Runge–Kutta step (1 = Heun's method, 0.5 = midpoint; EDM App. D.2).
    keys: per-sample PRNG keys [B] (see `noise.as_keys` for the accepted forms); needed only when
      s_churn > 0. Churn noise for sample b at step i depends on keys[b] and i alone.
    s_churn, s_tmin, s_tmax, s_noise: EDM's stochasticity parameters (Alg. 2); S_tmin/S_tmax bound
      σ(t_i), not t_i.
    round_sigma: σ -> the nearest σ the network supports (a discrete model's grid), or None.

  Returns:
    The final state x_N [B, ...] (at t_N, the data when t_N = 0).

  Raises:
    ValueError: on an unknown solver, a grid of fewer than two times, or churn without keys.
  """
  if solver not in SOLVERS:
    raise ValueError(f'Unknown ODE solver {solver!r}; known solvers: {", ".join(SOLVERS)}.')
  schedule = schedules.linear_schedule() if schedule is None else schedule
  scaling = schedules.no_scaling() if scaling is None else scaling
  round_sigma = _identity if round_sigma is None else round_sigma
  # The state is at least float32 even for a bf16 network: the ODE accumulates small updates.
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  # Kept as given: inside a trace, even converting a constant grid stages it out (_heun_finishes).
  t_steps_given = t_steps
  t_steps = jnp.asarray(t_steps, x.dtype)
  if t_steps.ndim != 1 or t_steps.shape[0] < 2:
    raise ValueError(f'The time grid must be a vector of N + 1 >= 2 times, got shape '
                     f'{t_steps.shape}.')
  num_steps = t_steps.shape[0] - 1
  stochastic = not _equals(s_churn, 0.0)
  if stochastic and keys is None:
    raise ValueError('Stochastic sampling (s_churn > 0) needs PRNG keys: pass '
                     'key=samplers.seed_keys(seeds), one per sample.')
  churn_keys = None
  if stochastic:
    churn_keys = noise.stream(noise.as_keys(keys, x.shape[0]), noise.CHURN_STREAM)
  # EDM Alg. 2: the churn is spread over the N steps and capped so t̂ ≤ √2·t.
  gamma_max = jnp.minimum(s_churn / num_steps, _MAX_GAMMA)

  # The steps' arithmetic runs on the state flattened to [B, D]: XLA:CPU vectorizes a fused loop
  # along its minor axis, and an NHWC image's minor axis is its 1–3 channels. The denoiser still
  # sees images (the reshapes are free). With the scalar Heun weights below, per-NFE overhead at
  # 16×32×32×3 fell from 5.2 to 4.1 µs (benchmarks/NOTES.md).
  image_shape = x.shape
  x = x.reshape(image_shape[0], -1)

  def denoise_flat(z, sigma):
    return denoise_fn(z.reshape(image_shape), sigma).reshape(z.shape)

  def f(x, t):
    return ode_derivative(denoise_flat, x, t, schedule, scaling)

  def step(x_cur, inputs, finish: Callable):
    i, t_cur, t_next = inputs
    sigma_cur = schedule.sigma(t_cur)

    # Increase the noise level temporarily (churn); with γ = 0 this is the identity.
    if stochastic:
      in_range = (s_tmin <= sigma_cur) & (sigma_cur <= s_tmax)
      gamma = jnp.where(in_range, gamma_max, 0.0).astype(x_cur.dtype)
    else:
      gamma = 0.0
    t_hat = schedule.sigma_inv(round_sigma(sigma_cur + gamma * sigma_cur))
    x_hat = scaling.s(t_hat) / scaling.s(t_cur) * x_cur
    if stochastic:
      eps = noise.step_normal(churn_keys, i, image_shape[1:], x_cur.dtype).reshape(x_cur.shape)
      # σ̂² − σ² as (σ̂ − σ)(σ̂ + σ): exactly 0 when γ = 0 (a fused a·a − b·b is not), and clipped
      # at 0 because round_sigma may snap σ̂ slightly below σ.
      sigma_hat = schedule.sigma(t_hat)
      added_std = jnp.sqrt(jnp.maximum((sigma_hat - sigma_cur) * (sigma_hat + sigma_cur), 0.0))
      x_hat = x_hat + added_std * scaling.s(t_hat) * s_noise * eps

    # Euler step.
    h = t_next - t_hat
    d_cur = f(x_hat, t_hat)
    x_euler = (x_hat + h * d_cur).astype(x_cur.dtype)
    if solver == 'euler':
      return x_euler, None

    # Heun's 2nd-order correction, except on a step that lands on t = 0 where σ = 0.
    def corrected():
      # With α = 1 the correction is evaluated exactly on the grid point t_{i+1}.
      t_prime = t_next if _equals(alpha, 1.0) else t_hat + alpha * h
      x_prime = x_hat + alpha * h * d_cur
      d_prime = f(x_prime, t_prime)
      weight = 1.0 / (2.0 * alpha)
      # Scalar weights first: one multiply per element fewer than h·((1 − w)·d_cur + w·d_prime).
      return (x_hat + (h * (1.0 - weight)) * d_cur + (h * weight) * d_prime).astype(x_cur.dtype)

    return finish(corrected, x_euler, t_next), None

  # A lax.cond inside the scan body splits the step into separate computations and costs 4× the
  # per-NFE overhead (22 against 5.5 µs at 16×32×32×3, benchmarks/NOTES.md), so the body never
  # has one: on a grid known now, every step but a final one landing on 0 is corrected; on a traced
  # grid (sigmas passed into a jitted function), the steps before the last select between Euler and
  # Heun (t_{i+1} > 0 on any decreasing grid but the last, so the select normally keeps Heun), and
  # only the last step, outside the loop, decides whether to pay the 2nd evaluation.
  body_finish, last_finish = _heun_finishes(t_steps_given)
  inputs = (jnp.arange(num_steps, dtype=jnp.int32), t_steps[:-1], t_steps[1:])
  head = jax.tree.map(lambda a: a[:-1], inputs)
  last = jax.tree.map(lambda a: a[-1], inputs)
  if num_steps > 1:
    x = lax.scan(functools.partial(step, finish=body_finish), x, head)[0]
  return step(x, last, finish=last_finish)[0].reshape(image_shape)


# How a Heun step ends, given its 2nd-order result as a thunk, its Euler result and t_{i+1}.
def _take_heun(corrected, x_euler, t_next):
  return corrected()


def _take_euler(corrected, x_euler, t_next):  # the step lands on t = 0, where σ = 0
  return x_euler


def _select_heun_unless_zero(corrected, x_euler, t_next):  # both evaluations paid, no branch
  return jnp.where(t_next > 0, corrected(), x_euler)


def _branch_heun_unless_zero(corrected, x_euler, t_next):  # the 2nd evaluation skipped at t = 0
  return lax.cond(t_next > 0, corrected, lambda: x_euler)


def _heun_finishes(t_steps) -> tuple[Callable, Callable]:
  """(how the steps before the last end, how the last ends) for this grid, known now or traced."""
  try:
    t = np.asarray(t_steps)
  except Exception:  # noqa: BLE001 - a tracer: decided per step at run time.
    return _select_heun_unless_zero, _branch_heun_unless_zero
  if np.all(t[1:] > 0):
    return _take_heun, _take_heun
  if t[-1] == 0 and np.all(t[1:-1] > 0):
    return _take_heun, _take_euler
  return _select_heun_unless_zero, _branch_heun_unless_zero


def euler(denoise_fn: DenoiseFn, x: jax.Array, sigmas, *, key=None, s_churn: float = 0.0,
          s_tmin: float = 0.0, s_tmax: float = float('inf'), s_noise: float = 1.0,
          round_sigma: Optional[Callable] = None) -> jax.Array:
  """Euler sampler on a σ-grid (EDM Alg. 2 without the 2nd-order correction); N denoiser calls.

  The arguments and the result are `heun`'s.
  """
  return integrate(denoise_fn, x, sigmas, solver='euler', keys=key, s_churn=s_churn,
                   s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, round_sigma=round_sigma)


def heun(denoise_fn: DenoiseFn, x: jax.Array, sigmas, *, key=None, s_churn: float = 0.0,
         s_tmin: float = 0.0, s_tmax: float = float('inf'), s_noise: float = 1.0,
         round_sigma: Optional[Callable] = None) -> jax.Array:
  """EDM's Heun sampler on a σ-grid (Alg. 1, and Alg. 2 with churn); 2N − 1 denoiser calls.

  Args:
    denoise_fn: D(x [B, ...], σ [B]) -> [B, ...].
    x: the initial state at sigmas[0], i.e. latents·sigmas[0], [B, ...].
    sigmas: decreasing noise levels [N + 1] ending in 0 (e.g. `schedules.karras`).
    key: per-sample keys [B] (preferred: `seed_keys(seeds)`), or one key split over the batch;
      needed only when s_churn > 0.
    s_churn, s_tmin, s_tmax, s_noise: stochasticity (EDM Alg. 2); 0 churn is the deterministic ODE.
    round_sigma: snaps the raised σ̂ to the network's grid (discrete models), or None.

  Returns:
    The samples x_N [B, ...].
  """
  return integrate(denoise_fn, x, sigmas, solver='heun', keys=key, s_churn=s_churn,
                   s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, round_sigma=round_sigma)


def edm_grid_for(precond: Preconditioning, num_steps: int, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
  """EDM's σ-grid for a network: Karras levels inside the network's σ range, snapped to its grid.

  As EDM's sampler does: σ_min and σ_max are clamped to [precond.sigma_min, precond.sigma_max], the
  N Karras levels (EDM Eq. 5) are rounded with precond.round_sigma, and σ_N = 0 is appended.

  Returns:
    float64 [num_steps + 1], decreasing, last entry 0.
  """
  sigma_min = max(sigma_min, precond.sigma_min)
  sigma_max = min(sigma_max, precond.sigma_max)
  levels = schedules.karras(num_steps, sigma_min, sigma_max, rho)[:-1]
  # Evaluated now even inside a jit trace: the grid is a constant of the sampler.
  with jax.ensure_compile_time_eval():
    levels = np.asarray(precond.round_sigma(levels), np.float64)
  return np.append(levels, 0.0)


# ------------------------------------------------------------------------------------------------
# EDM's generalized sampler.


class OdeSetup(NamedTuple):
  """What the generalized sampler integrates over: times t [N + 1], σ(t), s(t) and round_sigma."""
  t_steps: jax.Array
  schedule: schedules.Schedule
  scaling: schedules.Scaling
  round_sigma: Callable


def _default_sigma_range(discretization: str, epsilon_s: float) -> tuple[float, float]:
  """The σ range a discretization covers by default (EDM's generalized sampler).

  VP uses the Table 1 schedule (β_d = 19.9, β_min = 0.1) between t = ε_s and t = 1. (EDM's
  released generate.py evaluates this default with β_d = 19.1 — NVlabs/edm issue #5 — which
  starts the VP grid at σ ≈ 124.6 instead of 152.2; pass sigma_min/sigma_max to reproduce it.)
  """
  if discretization == 'vp':
    # In float64 numpy: the grid is a constant and its ends should not carry float32 rounding.
    t = np.array([epsilon_s, 1.0])
    sigma = np.sqrt(np.expm1(0.5 * schedules.VP_BETA_D * t**2 + schedules.VP_BETA_MIN * t))
    return float(sigma[0]), float(sigma[1])
  return {'ve': (schedules.VE_SIGMA_MIN, schedules.VE_SIGMA_MAX), 'iddpm': (0.002, 81.0),
          'edm': (schedules.EDM_SIGMA_MIN, schedules.EDM_SIGMA_MAX)}[discretization]


def _check_choice(what: str, value: str, known: tuple[str, ...]) -> None:
  if value not in known:
    raise ValueError(f'Unknown {what} {value!r}; known {what}s: {", ".join(known)}.')


def generalized_setup(num_steps: int, *, discretization: str = 'edm', schedule: str = 'linear',
                      scaling: str = 'none', sigma_min: Optional[float] = None,
                      sigma_max: Optional[float] = None, rho: float = 7.0,
                      epsilon_s: float = schedules.VP_EPSILON_S,
                      precond: Optional[Preconditioning] = None,
                      round_sigma: Optional[Callable] = None, dtype=jnp.float32) -> OdeSetup:
  """The time grid, σ(t) and s(t) of EDM's generalized sampler.

  1. σ range: the discretization's default (`_default_sigma_range`) unless given, clamped to
     precond's supported range.
  2. VP β_d, β_min are refitted to that range (`schedules.vp_betas_for_range`); they define both
     the VP discretization and the VP schedule σ(t).
  3. σ-grid σ_0..σ_{N−1} from `schedules.sigma_grid(discretization)`, then
     t_i = σ⁻¹(round_sigma(σ_i)) and t_N = 0.

  Args:
    num_steps: N.
    discretization: 'vp' | 've' | 'iddpm' | 'edm' (EDM Table 1, "time steps").
    schedule: σ(t): 'vp' | 've' | 'linear'.
    scaling: s(t): 'vp' | 'none'.
    sigma_min, sigma_max: σ range of the grid; None for the discretization's default.
    rho: ρ of the 'edm' discretization.
    epsilon_s: the VP discretization's last time ε_s.
    precond: the network's preconditioning: its σ range clamps the grid and its round_sigma is
      used unless `round_sigma` is given.
    round_sigma: σ -> nearest supported σ, overriding precond's.
    dtype: dtype of the returned times.

  Returns:
    OdeSetup(t_steps [N + 1] decreasing to 0, schedule, scaling, round_sigma).
  """
  _check_choice('discretization', discretization, DISCRETIZATIONS)
  _check_choice('schedule', schedule, SCHEDULES)
  _check_choice('scaling', scaling, SCALINGS)
  default_min, default_max = _default_sigma_range(discretization, epsilon_s)
  sigma_min = default_min if sigma_min is None else sigma_min
  sigma_max = default_max if sigma_max is None else sigma_max
  if precond is not None:
    sigma_min = max(sigma_min, precond.sigma_min)
    sigma_max = min(sigma_max, precond.sigma_max)
    round_sigma = precond.round_sigma if round_sigma is None else round_sigma
  round_sigma = _identity if round_sigma is None else round_sigma
  beta_d, beta_min = schedules.vp_betas_for_range(sigma_min, sigma_max, epsilon_s)

  grid_kwargs = dict(sigma_min=sigma_min, sigma_max=sigma_max)
  if discretization == 'vp':
    grid_kwargs['epsilon_s'] = epsilon_s
  elif discretization == 'edm':
    grid_kwargs['rho'] = rho
  sigma_steps = schedules.sigma_grid(discretization, num_steps, **grid_kwargs)[:-1]

  sigma_fn = {
      'vp': lambda: schedules.vp_schedule(beta_d, beta_min),
      've': schedules.ve_schedule,
      'linear': schedules.linear_schedule,
  }[schedule]()
  scaling_fn = schedules.get_scaling(scaling, sigma_fn)
  t_steps = sigma_fn.sigma_inv(round_sigma(jnp.asarray(sigma_steps, dtype)))
  t_steps = jnp.concatenate([jnp.asarray(t_steps, dtype), jnp.zeros([1], dtype)])
  return OdeSetup(t_steps, sigma_fn, scaling_fn, round_sigma)


def generalized(denoise_fn: DenoiseFn, latents: jax.Array, *, num_steps: int,
                discretization: str = 'edm', schedule: str = 'linear', scaling: str = 'none',
                solver: str = 'heun', alpha: float = 1.0, sigma_min: Optional[float] = None,
                sigma_max: Optional[float] = None, rho: float = 7.0, keys=None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float('inf'),
                s_noise: float = 1.0, round_sigma: Optional[Callable] = None,
                epsilon_s: float = schedules.VP_EPSILON_S,
                precond: Optional[Preconditioning] = None) -> jax.Array:
  """EDM's generalized sampler: any discretization × σ(t) × s(t) × solver (EDM §3, Table 1).

  The recipes of EDM Fig. 2 (REFERENCE §1.3), e.g. for a VP network:
    original DDPM++ sampler:  discretization='vp', schedule='vp', scaling='vp', solver='euler',
                              num_steps=512;
    + Heun & our t_i:         discretization='edm', schedule='vp', scaling='vp', num_steps=128;
    + our σ(t) & s(t):        discretization='edm', schedule='linear', scaling='none', num_steps=18;
    iDDPM/DDIM baseline:      discretization='iddpm', schedule='linear', scaling='none', 'euler'.

  Args:
    denoise_fn: D(x [B, ...], σ [B]) -> [B, ...].
    latents: standard-normal latents [B, ...]; the start is latents·σ(t_0)·s(t_0).
    num_steps: N.
    discretization, schedule, scaling, sigma_min, sigma_max, rho, epsilon_s, precond,
      round_sigma: see `generalized_setup`.
    solver, alpha: 'euler' or 'heun' and the Runge–Kutta α (see `integrate`).
    keys: per-sample keys [B]; needed when s_churn > 0.
    s_churn, s_tmin, s_tmax, s_noise: stochasticity (EDM Alg. 2); S_tmin/S_tmax bound σ(t_i).

  Returns:
    The samples [B, ...].
  """
  latents = jnp.asarray(latents)
  setup = generalized_setup(num_steps, discretization=discretization, schedule=schedule,
                            scaling=scaling, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                            epsilon_s=epsilon_s, precond=precond, round_sigma=round_sigma,
                            dtype=jnp.promote_types(latents.dtype, jnp.float32))
  t_0 = setup.t_steps[0]
  x = latents * (setup.schedule.sigma(t_0) * setup.scaling.s(t_0))
  return integrate(denoise_fn, x, setup.t_steps, schedule=setup.schedule, scaling=setup.scaling,
                   solver=solver, alpha=alpha, keys=keys, s_churn=s_churn, s_tmin=s_tmin,
                   s_tmax=s_tmax, s_noise=s_noise, round_sigma=setup.round_sigma)
