"""Exact likelihood through the probability-flow ODE (Song et al. 2021, §4.3 and App. D.2).

The PF-ODE dx/dt = f̃(x, t) (Eq. 13; EDM's σ-space ODE with the SDE's σ(t), s(t)) is a continuous
normalizing flow, so with the instantaneous change of variables (Chen et al. 2018)

    log p_ε(x_ε) = log p_T(x_T) + ∫_ε^T ∇·f̃(x_t, t) dt                                    (App. D.2)

where x_t solves the ODE from x_ε = x upward to T = 1. The integral is carried as one more state
variable and both are integrated together by diffrax (adaptive Tsit5 / Dopri5; score_sde uses RK45
at rtol = atol = 1e-5). The divergence is either

  * exact: the trace of the Jacobian from D forward-mode products with the basis vectors (tests and
    small images; cost ∝ D), or
  * Hutchinson–Skilling: ∇·f̃ ≈ vᵀ(∂f̃/∂x)v with one probe v per sample, fixed along the trajectory,
    Rademacher (±1) or Gaussian — one jvp per evaluation, unbiased.

Per-sample independence: the divergence products use tangents of the whole batch at once, which is
exact because a denoiser in eval mode treats samples independently (no batch statistics).

Data are first dequantized uniformly, x = 2(u + U)/256 − 1 for pixel values u ∈ {0..255} and
U ~ U[0, 1)^D, so the density of x on [−1, 1)^D bounds the discrete data's probability. Bits per
dimension on the 8-bit scale: v = u + U = 128(x + 1) lives on [0, 256)^D, p_v(v) = p_x(x)/128^D, so

    bpd = −log₂ p_v(v)/D = −log p_x(x)/(D ln 2) + log₂ 128 = −log p_x(x)/(D ln 2) + 7.

(score_sde computes the same offset as log₂(d inverse_scaler/dx) + 8 = log₂ ½ + 8 = 7 for centred
data; a model that is uniform on [−1, 1)^D gets exactly 8 bits/dim.) The ODE starts from the data at
t = ε (ε = 1e-5 as in score_sde), i.e. the data are taken as a sample of p_ε.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffjax.processes import sde as sde_lib
from diffjax.samplers import noise, ode
from diffjax.samplers import sde as sde_samplers

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]

DIVERGENCES = ('hutchinson', 'exact')
PROBES = ('rademacher', 'gaussian')
BPD_OFFSET = 7.0   # log₂(256/2): the [−1, 1) data scale → the [0, 256) 8-bit scale


def bits_per_dim(log_likelihood, num_dims: int, offset: float = BPD_OFFSET) -> jax.Array:
  """bpd = −log p(x)/(D ln 2) + offset (module docstring; 7 for data in [−1, 1])."""
  return -jnp.asarray(log_likelihood) / (num_dims * math.log(2.0)) + offset


def dequantize(images, keys) -> jax.Array:
  """Uniform dequantization x = 2(u + U)/256 − 1 of 8-bit images, U ~ U[0, 1) per pixel.

  Args:
    images: uint8 [B, H, W, C], or float images u/127.5 − 1 in [−1, 1] (what the input pipeline
      yields; u is recovered exactly by rounding).
    keys: per-sample keys [B] (`samplers.seed_keys`); the noise of image b depends on keys[b]
      alone (stream `noise.DEQUANTIZE_STREAM`).

  Returns:
    float32 [B, H, W, C] in [−1, 1).
  """
  images = jnp.asarray(images)
  if jnp.issubdtype(images.dtype, jnp.integer):
    u = images.astype(jnp.float32)
  else:
    u = jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0.0, 255.0)
  keys = noise.stream(noise.as_keys(keys, images.shape[0]), noise.DEQUANTIZE_STREAM)
  uniform = jax.vmap(lambda k: jax.random.uniform(k, images.shape[1:], jnp.float32))(keys)
  return (u + uniform) / 128.0 - 1.0


def probes(keys, shape, kind: str = 'rademacher') -> jax.Array:
  """Hutchinson probes [B, *shape]: ±1 (Rademacher) or N(0, 1), one per sample's key."""
  if kind not in PROBES:
    raise ValueError(f'Unknown Hutchinson probe {kind!r}; known probes: {", ".join(PROBES)}.')
  keys = noise.stream(keys, noise.PROBE_STREAM)
  if kind == 'rademacher':
    draw = lambda k: jax.random.rademacher(k, tuple(shape), jnp.float32)
  else:
    draw = lambda k: jax.random.normal(k, tuple(shape), jnp.float32)
  return jax.vmap(draw)(keys)


def log_likelihood(denoise_fn: DenoiseFn, x: jax.Array, *, sde: sde_lib.SDE, keys=None,
                   divergence: str = 'hutchinson', probe: str = 'rademacher',
                   epsilon: float = sde_lib.TRAIN_EPSILON, solver: str = 'tsit5',
                   rtol: float = 1e-5, atol: float = 1e-5,
                   max_steps: int = 4096) -> tuple[jax.Array, dict]:
  """log p(x) [B] of continuous data under the PF-ODE model (App. D.2), in nats.

  Args:
    denoise_fn: D(x̃ [B, ...], σ [B]) -> [B, ...]; must treat samples independently.
    x: data at t = ε [B, ...] (already dequantized), in the SDE's scaled coordinates.
    sde: the forward SDE.
    keys: per-sample keys [B] for the probes (Hutchinson only).
    divergence: 'hutchinson' or 'exact'.
    probe: 'rademacher' or 'gaussian' (Hutchinson only).
    epsilon: the lower time limit ε.
    solver, rtol, atol, max_steps: the adaptive solver (`samplers.sde.solve_ode`).

  Returns:
    (log p [B], info) with info = {'prior_logp' [B], 'delta_logp' [B] (the divergence integral),
    'z' [B, ...] (x_T), 'num_steps' (solver steps; each costs 6 evaluations of f̃ and its
    divergence)}.
  """
  if divergence not in DIVERGENCES:
    raise ValueError(f'Unknown divergence {divergence!r}; known: {", ".join(DIVERGENCES)}.')
  x = jnp.asarray(x, jnp.float32)
  batch, shape = x.shape[0], x.shape[1:]
  dims = math.prod(shape)
  schedule, scaling = sde.schedule(), sde.scaling()

  if divergence == 'hutchinson':
    if keys is None:
      raise ValueError('The Hutchinson estimate needs per-sample keys (samplers.seed_keys).')
    v = probes(noise.as_keys(keys, batch), shape, probe)
  else:
    # Basis tangents e_i [D, 1, *shape], the same in every sample (samples are independent).
    basis = jnp.eye(dims, dtype=jnp.float32).reshape((dims, 1) + tuple(shape))

  def vector_field(t, state):
    y, _ = state
    f = lambda y: ode.ode_derivative(denoise_fn, y, t, schedule, scaling)
    if divergence == 'hutchinson':
      dy, jv = jax.jvp(f, (y,), (v,))
      div = jnp.sum((jv * v).reshape(batch, -1), axis=-1)
    else:
      dy, f_lin = jax.linearize(f, y)
      columns = jax.vmap(lambda e: f_lin(jnp.broadcast_to(e, y.shape)))(basis)   # [D, B, ...]
      div = jnp.einsum('ibi->b', columns.reshape(dims, batch, dims))
    return dy, div

  (z, delta_logp), stats = sde_samplers.solve_ode(
      vector_field, (x, jnp.zeros([batch], jnp.float32)), float(epsilon), sde.T, solver=solver,
      rtol=rtol, atol=atol, max_steps=max_steps)
  prior_logp = sde.prior_logp(z)
  info = {'prior_logp': prior_logp, 'delta_logp': delta_logp, 'z': z,
          'num_steps': stats['num_steps']}
  return prior_logp + delta_logp, info


def bpd(denoise_fn: DenoiseFn, images, keys, *, sde: sde_lib.SDE, dequantize_data: bool = True,
        **kwargs: Any) -> tuple[jax.Array, dict]:
  """Bits/dim [B] of 8-bit images under the PF-ODE model (uniform dequantization, +7 offset).

  Args:
    denoise_fn: D(x̃, σ); bind class labels for a conditional model (then this is −log p(x | c)).
    images: uint8 [B, H, W, C] or pipeline floats in [−1, 1].
    keys: per-sample keys [B]: dequantization noise and probes (independent streams).
    sde: the forward SDE.
    dequantize_data: add uniform noise (False: images are taken as continuous points).
    **kwargs: `log_likelihood` options (divergence, probe, epsilon, solver, rtol, atol, max_steps).

  Returns:
    (bpd [B], info of `log_likelihood` plus 'log_likelihood' [B]).
  """
  images = jnp.asarray(images)
  if dequantize_data:
    x = dequantize(images, keys)
  else:
    x = images.astype(jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
      x = x / 127.5 - 1.0
  logp, info = log_likelihood(denoise_fn, x, sde=sde, keys=keys, **kwargs)
  info['log_likelihood'] = logp
  return bits_per_dim(logp, math.prod(x.shape[1:])), info

