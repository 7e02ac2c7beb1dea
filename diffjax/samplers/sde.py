"""Score SDE samplers (Song et al. 2021, arXiv 2011.13456): predictor-corrector and the PF-ODE.

Both talk to the model only through `denoise_fn(x̃, σ)`; the SDE (`diffjax.processes.sde`) supplies σ(t), s(t),
drift and diffusion, and the score in the SDE's scaled coordinates x = s·x̃ is
∇_x log p_t(x) = (D(x/s; σ) − x/s)/(s·σ²).

Predictor-corrector (§4.2; Algorithms 2–3 of App. G, `predictor_corrector`). Times t_i = 1 + i/(N−1)(ε − 1)
for i < N, then t_N = 0; σ_N = 0 and s_N = 1 (the data). With N = 1000 and ε = 1e-3 every step is
exactly −1/N, as in score_sde. Each step i runs the corrector at t_i, then the predictor t_i → t_{i+1}:

  predictors
    euler_maruyama:     x_mean = x − [f(x, t_i) − g(t_i)²·score]·Δt,   x = x_mean + g(t_i)·sqrt(Δt)·z
                        (Eq. 6 reversed, Δt = t_i − t_{i+1})
    reverse_diffusion:  x_mean = x − f_i + G_i²·score,   x = x_mean + G_i·z                     (App. E)
                        with the forward step x_i = a·x_{i+1} + G_i·z, f_i = (a − 1)x of
                        `diffjax.processes.sde.transition`: DDPM's for VP, SMLD's for VE.
    ancestral:          x̃ = x/s_i, D = D(x̃; σ_i), the posterior q(x̃_{i+1} | x̃_i, x̃_0 = D):
                        x_mean = s_{i+1}[D + (σ_{i+1}/σ_i)²(x̃ − D)],
                        x = x_mean + s_{i+1}·σ_{i+1}·sqrt(1 − σ_{i+1}²/σ_i²)·z                (App. F)
                        (ancestral_variance='transition' uses G_i instead: score_sde's VP choice)
    none
  correctors
    langevin:           ε_i = 2α_i(r·‖z‖/‖score‖)², x_mean = x + ε_i·score, x = x_mean + sqrt(2ε_i)·z
                        (Alg. 4–5; r = snr; α_i = (s_i/s_{i+1})² = 1 − β_i for VP, 1 for VE)
    none
The last step returns the noise-free x_mean of the final predictor ("denoising", score_sde's
noise_removal): for reverse_diffusion and ancestral that is D(x̃; σ_{N−1}), the posterior mean.

The Langevin norms ‖z‖ and ‖score‖ are per-sample L2 norms averaged over the batch — and over devices:
called under `jax.jit` with the batch sharded over a mesh (as `sampling.generate` does), `jnp.mean`
over the batch axis is a mean over the *global* batch, which XLA computes with a cross-device
all-reduce, so no `pmean`/`shard_map` is needed. This is the one place where an image depends on the
rest of its batch (through the shared step size), as in the paper; every other random draw comes from
the sample's own key (`samplers.noise` streams PREDICTOR_STREAM and CORRECTOR_STREAM, folded with the
step index), so image b depends on seed b alone when the corrector is 'none'.

Probability-flow ODE (Eq. 13, `probability_flow`): dx/dt = f(x, t) − ½g(t)²·∇log p_t(x), which by
(★) of `diffjax.processes.sde` is EDM's σ-space ODE (`samplers.ode.ode_derivative`) with the SDE's σ(t), s(t).
It is integrated from t = 1 to ε with diffrax (adaptive Tsit5 or Dopri5, rtol/atol; score_sde uses
scipy's RK45 at 1e-5) or with EDM's fixed-step Euler/Heun (`samplers.ode.integrate`) on the uniform
time grid, then (denoise=True) x = D(x/s(ε); σ(ε)). The batch is integrated as one system with shared
step sizes, but the error norm is the *largest per-sample* RMS error, so every sample meets the
tolerance on its own; samples therefore agree with a one-at-a-time solve within the tolerance.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax import registry
from diffjax.precond import Preconditioning
from diffjax.precond import sde as precond_sde
from diffjax.processes import sde as sde_lib
from diffjax.samplers import noise, ode

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

PREDICTORS = ('euler_maruyama', 'reverse_diffusion', 'ancestral', 'none')
CORRECTORS = ('langevin', 'none')
ANCESTRAL_VARIANCES = ('posterior', 'transition')
ODE_SOLVERS = ('tsit5', 'dopri5', 'heun', 'euler')


def _check(what: str, value: str, known) -> None:
  if value not in known:
    raise ValueError(f'Unknown {what} {value!r}; known {what}s: {", ".join(known)}.')


def time_grid(sde: sde_lib.SDE, num_steps: int, epsilon: Optional[float] = None):
  """The PC sampler's grid: t_i = 1 + i/(N−1)(ε − 1) for i < N, t_N = 0.

  Returns:
    (t, sigma, s), float32 [N + 1] each, with sigma[N] = 0 and s[N] = 1 (the data).
  """
  if int(num_steps) != num_steps or num_steps < 1:
    raise ValueError(f'The number of sampling steps must be a positive integer, got {num_steps!r}.')
  epsilon = sde.sampling_epsilon if epsilon is None else float(epsilon)
  t = jnp.linspace(sde.T, epsilon, int(num_steps), dtype=jnp.float32)
  zero = jnp.zeros([1], jnp.float32)
  return (jnp.concatenate([t, zero]), jnp.concatenate([sde.sigma(t), zero]),
          jnp.concatenate([sde.s(t), jnp.ones([1], jnp.float32)]))


def _per_sample_norm(x):
  return jnp.sqrt(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=-1))


def predictor_corrector(denoise_fn: DenoiseFn, latents: jax.Array, keys, *, sde: sde_lib.SDE,
                        num_steps: int, predictor: str = 'reverse_diffusion',
                        corrector: str = 'langevin', snr: float = 0.16,
                        n_corrector_steps: int = 1, epsilon: Optional[float] = None,
                        denoise: bool = True,
                        ancestral_variance: str = 'posterior') -> jax.Array:
  """Predictor-corrector sampling of the reverse-time SDE (module docstring); one `lax.scan`.

  Args:
    denoise_fn: D(x̃ [B, ...], σ [B]) -> [B, ...].
    latents: standard-normal latents [B, ...]; x_T = latents·prior_std.
    keys: per-sample keys [B] (`samplers.seed_keys`), or one key split over the batch.
    sde: the forward SDE.
    num_steps: N predictor steps (score_sde: 1000).
    predictor: 'euler_maruyama', 'reverse_diffusion', 'ancestral' or 'none'.
    corrector: 'langevin' or 'none'.
    snr: the Langevin corrector's signal-to-noise ratio r (0.16 VE CIFAR-10, 0.01 VP).
    n_corrector_steps: corrector steps per predictor step (unrolled; keep it small).
    epsilon: the last time t_{N−1}; None uses the SDE's (1e-3 VP / sub-VP, 1e-5 VE).
    denoise: return the last predictor's noise-free mean (True) or its noisy state.
    ancestral_variance: 'posterior' (the posterior's σ̃²) or 'transition' (G², score_sde's VP
      ancestral step).

  Returns:
    Samples [B, ...] in data space (s_N = 1). NFE = N·(1 + n_corrector_steps) (the 'none' parts
    cost nothing).
  """
  _check('predictor', predictor, PREDICTORS)
  _check('corrector', corrector, CORRECTORS)
  _check('ancestral variance', ancestral_variance, ANCESTRAL_VARIANCES)
  latents = jnp.asarray(latents)
  x = sde.prior_sample(latents.astype(jnp.promote_types(latents.dtype, jnp.float32)))
  batch, shape = x.shape[0], x.shape[1:]
  keys = noise.as_keys(keys, batch)
  predictor_keys = noise.stream(keys, noise.PREDICTOR_STREAM)
  corrector_keys = noise.stream(keys, noise.CORRECTOR_STREAM)
  t, sigma, s = time_grid(sde, num_steps, epsilon)
  n_corr = int(n_corrector_steps) if corrector != 'none' else 0

  def evaluate(x, sigma_i, s_i):
    """(score ∇_x log p, D, x̃) at the grid point (σ_i, s_i)."""
    x_tilde = x / s_i
    d = denoise_fn(x_tilde, jnp.broadcast_to(sigma_i, (batch,)).astype(x.dtype))
    return (d - x_tilde) / (s_i * sigma_i**2), d, x_tilde

  def correct(x, i, sigma_i, s_i, alpha):
    for j in range(n_corr):
      score = evaluate(x, sigma_i, s_i)[0]
      z = noise.step_normal(corrector_keys, i * n_corr + j, shape, x.dtype)
      # Batch (and, under a sharded jit, device) averages of the per-sample norms (Alg. 4).
      grad_norm = jnp.mean(_per_sample_norm(score))
      noise_norm = jnp.mean(_per_sample_norm(z))
      # A vanishing score (e.g. D − x̃ below float32 resolution at tiny σ) carries no
      # information: skip the step rather than take an infinite one.
      step_size = jnp.where(grad_norm > 0,
                            2.0 * alpha * (snr * noise_norm / jnp.maximum(grad_norm, 1e-30))**2,
                            0.0)
      x = x + step_size * score + jnp.sqrt(2.0 * step_size) * z
    return x

  def predict(x, i, t_i, t_next, sigma_i, sigma_next, s_i, s_next):
    if predictor == 'none':
      return x, x
    z = noise.step_normal(predictor_keys, i, shape, x.dtype)
    score, d, x_tilde = evaluate(x, sigma_i, s_i)
    if predictor == 'euler_maruyama':
      dt = t_i - t_next                                   # > 0: the reverse SDE runs backwards
      drift, g = sde.sde(x, t_i)
      x_mean = x - (drift - g**2 * score) * dt
      return x_mean + g * jnp.sqrt(dt) * z, x_mean
    a, g2 = sde_lib.transition(sigma_i, s_i, sigma_next, s_next)
    if predictor == 'reverse_diffusion':
      x_mean = x - (a - 1.0) * x + g2 * score
      return x_mean + jnp.sqrt(g2) * z, x_mean
    # Ancestral: the posterior of the forward chain given x̃_0 = D (exact for Gaussian steps).
    ratio = (sigma_next / sigma_i)**2
    x_mean = s_next * (d + ratio * (x_tilde - d))
    if ancestral_variance == 'posterior':
      std = s_next * sigma_next * jnp.sqrt(1.0 - ratio)
    else:
      std = jnp.sqrt(g2)
    return x_mean + std * z, x_mean

  def step(carry, inputs):
    x, _ = carry
    i, t_i, t_next, sigma_i, sigma_next, s_i, s_next = inputs
    if n_corr:
      x = correct(x, i, sigma_i, s_i, (s_i / s_next)**2)
    return predict(x, i, t_i, t_next, sigma_i, sigma_next, s_i, s_next), None

  n = t.shape[0] - 1
  inputs = (jnp.arange(n, dtype=jnp.int32), t[:-1], t[1:], sigma[:-1], sigma[1:], s[:-1], s[1:])
  (x, x_mean), _ = lax.scan(step, (x, x), inputs)
  return x_mean if denoise else x


def _max_sample_rms(tree) -> jax.Array:
  """The largest per-sample RMS over a pytree of arrays with a common leading batch axis."""
  leaves = jax.tree.leaves(tree)
  batch = leaves[0].shape[0] if leaves[0].ndim else 1
  flat = jnp.concatenate([jnp.reshape(leaf, (batch, -1)) for leaf in leaves], axis=-1)
  return jnp.max(jnp.sqrt(jnp.mean(jnp.square(flat), axis=-1)))


def solve_ode(vector_field: Callable, y0, t0: float, t1: float, *, solver: str = 'tsit5',
              rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096):
  """Integrates dy/dt = vector_field(t, y) from t0 to t1 with diffrax's adaptive Tsit5 / Dopri5.

  Args:
    vector_field: (t scalar, y pytree with leading batch axis) -> dy/dt (same structure).
    y0: the initial state.
    t0, t1: the limits (t1 < t0 integrates backwards).
    solver: 'tsit5' or 'dopri5' (5th order, embedded 4th-order error estimate; 6 new evaluations
      per step).
    rtol, atol: tolerances; the error norm is the largest per-sample RMS of the scaled error.
    max_steps: the solve fails past this many steps.

  Returns:
    (y1, stats) with stats = {'num_steps', 'num_accepted_steps', 'num_rejected_steps', 'success'};
    y1 is NaN when the solve failed.
  """
  import diffrax
  _check('adaptive ODE solver', solver, ('tsit5', 'dopri5'))
  term = diffrax.ODETerm(lambda t, y, args: vector_field(t, y))
  method = diffrax.Tsit5() if solver == 'tsit5' else diffrax.Dopri5()
  controller = diffrax.PIDController(rtol=rtol, atol=atol, norm=_max_sample_rms)
  # throw=False: diffrax's error check is a host callback that would gather a sharded state onto
  # one device; a failed solve (e.g. past max_steps) returns NaN instead, which callers report.
  sol = diffrax.diffeqsolve(term, method, t0=t0, t1=t1, dt0=None, y0=y0,
                            stepsize_controller=controller, max_steps=max_steps,
                            saveat=diffrax.SaveAt(t1=True), throw=False)
  ok = sol.result == diffrax.RESULTS.successful
  y1 = jax.tree.map(lambda leaf: jnp.where(ok, leaf[0], jnp.nan), sol.ys)
  stats = {k: sol.stats[k] for k in ('num_steps', 'num_accepted_steps', 'num_rejected_steps')}
  stats['success'] = ok
  return y1, stats


def probability_flow(denoise_fn: DenoiseFn, latents: jax.Array, keys=None, *, sde: sde_lib.SDE,
                     solver: str = 'tsit5', num_steps: Optional[int] = None, rtol: float = 1e-5,
                     atol: float = 1e-5, epsilon: Optional[float] = None, denoise: bool = True,
                     max_steps: int = 4096, return_stats: bool = False):
  """Samples by integrating the probability-flow ODE (Eq. 13) from t = 1 to ε.

  Args:
    denoise_fn: D(x̃ [B, ...], σ [B]) -> [B, ...].
    latents: standard-normal latents [B, ...]; x_T = latents·prior_std.
    keys: unused (the ODE is deterministic); accepted for the common sampler signature.
    sde: the forward SDE.
    solver: 'tsit5' or 'dopri5' (adaptive, diffrax), or 'euler' / 'heun' (fixed steps).
    num_steps: steps of a fixed-step solver on t_i = 1 + i/N·(ε − 1), i = 0..N (Heun: 2N NFE);
      ignored by the adaptive ones.
    rtol, atol: tolerances of the adaptive solvers (score_sde: 1e-5 both).
    epsilon: the last time; None uses the SDE's sampling ε.
    denoise: finish with D(x/s(ε); σ(ε)) (one more evaluation), the posterior mean at ε.
    max_steps: adaptive solvers give up (returning NaN) past this many steps.
    return_stats: also return {'num_steps', ...} (adaptive) / {'num_steps'} (fixed).

  Returns:
    Samples [B, ...] (and the stats when return_stats).
  """
  del keys
  _check('ODE solver', solver, ODE_SOLVERS)
  latents = jnp.asarray(latents)
  x = sde.prior_sample(latents.astype(jnp.promote_types(latents.dtype, jnp.float32)))
  epsilon = sde.sampling_epsilon if epsilon is None else float(epsilon)
  schedule, scaling = sde.schedule(), sde.scaling()
  if solver in ('tsit5', 'dopri5'):
    x, stats = solve_ode(lambda t, y: ode.ode_derivative(denoise_fn, y, t, schedule, scaling),
                         x, sde.T, epsilon, solver=solver, rtol=rtol, atol=atol,
                         max_steps=max_steps)
  else:
    if num_steps is None:
      raise ValueError(f'The fixed-step {solver} solver needs num_steps.')
    # A NumPy grid is known at trace time, so ode.integrate's loop needs no run-time branch.
    t_steps = np.linspace(float(sde.T), epsilon, int(num_steps) + 1)
    x = ode.integrate(denoise_fn, x, t_steps, schedule=schedule, scaling=scaling, solver=solver)
    stats = {'num_steps': jnp.asarray(int(num_steps))}
  if denoise:
    eps = jnp.asarray(epsilon, x.dtype)
    sigma = jnp.broadcast_to(sde.sigma(eps), x.shape[:1]).astype(x.dtype)
    x = denoise_fn(x / sde.s(eps), sigma)
  return (x, stats) if return_stats else x


# ------------------------------------------------------------------------------------------------
# Registry forms: sampler(denoise_fn, latents, keys, *, precond, num_steps, **options).


def _pc_sampler(denoise_fn, latents, keys=None, *, precond: Optional[Preconditioning],
                num_steps: int, sde: Any = None, **options) -> jax.Array:
  """Predictor-corrector sampler; the SDE comes from `sde` (name or SDE) or the preconditioning.

  Options: predictor, corrector, snr, n_corrector_steps, epsilon, denoise, ancestral_variance (see
  `predictor_corrector`).
  """
  if keys is None:
    raise ValueError('The predictor-corrector sampler is stochastic: pass per-sample keys '
                     '(samplers.seed_keys(seeds)).')
  return predictor_corrector(denoise_fn, latents, keys, sde=precond_sde.resolve_sde(sde, precond),
                             num_steps=num_steps, **options)


def _pf_ode_sampler(denoise_fn, latents, keys=None, *, precond: Optional[Preconditioning],
                    num_steps: int, sde: Any = None, **options) -> jax.Array:
  """Probability-flow ODE sampler; options: solver, rtol, atol, epsilon, denoise, max_steps (see
  `probability_flow`; num_steps is used by the fixed-step solvers only)."""
  return probability_flow(denoise_fn, latents, keys, sde=precond_sde.resolve_sde(sde, precond),
                          num_steps=num_steps, **options)


registry.add('sampler', 'pc', _pc_sampler)
registry.add('sampler', 'pf_ode', _pf_ode_sampler)
