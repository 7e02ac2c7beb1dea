"""The step noise of the stochastic σ-grid solvers: independent per step, or one Brownian path.

A noise sampler is a function `noise_fn(i, stage, sigma, sigma_next) -> [B, D]` of standard
normals for stage `stage` (0 or 1) of step i, which moves the state from σ to σ_next (k-diffusion's
`noise_sampler(sigma, sigma_next)`, with the step and stage made explicit so that independent
noise can be derived from keys). Two kinds, both per sample (image b depends on keys[b] alone, so
not on the batch size or the device count):

  * 'gaussian': fresh normals for every (step, stage), `fold_in(fold_in(fold_in(key_b,
    SOLVER_STREAM), stage), i)`. The noise of one step is independent of the grid's other steps,
    so two grids of one seed share no noise: a finer grid gives another sample, not a better one.
  * 'brownian': increments of one Brownian path W(σ) per sample, a diffrax `VirtualBrownianTree`
    on [0, σ_0] keyed by `fold_in(key_b, SOLVER_STREAM)`, normalized to unit variance:
    (W(σ) − W(σ_next))/sqrt(σ − σ_next). Every grid of one seed reads the same path, so the
    solution of an SDE solver converges as the grid is refined (k-diffusion's
    `BrownianTreeNoiseSampler` over torchsde; the time is σ, its default transform). Two stages
    of a step that start at the same σ see overlapping, hence correlated, increments, as there.

The tree resolves the path to σ_0·2⁻²⁴ (≈ 5e-6 at σ_0 = 80, finer than the σ-steps of Karras
grids up to a few hundred steps); below that diffrax draws the Brownian bridge afresh. Each
evaluation descends 24 levels, twice per increment: on this machine an increment for 2048 samples
of 3 numbers took 24 ms (a hand-written fixed-depth tree that descended to both ends at once was
no faster to compile and ran 2× slower, so diffrax's is used).
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import diffrax
import jax
import jax.numpy as jnp

from diffjax.samplers import noise

NoiseFn = Callable[[jax.Array, int, jax.Array, jax.Array], jax.Array]
KINDS = ('gaussian', 'brownian')

TREE_LEVELS = 24  # the path's resolution: σ_0·2⁻²⁴


def gaussian(keys: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> NoiseFn:
  """Independent standard normals per (step, stage, sample).

  Args:
    keys: per-sample typed keys [B].
    shape: the per-sample shape of a draw, e.g. (D,).
    dtype: the draws' dtype.
  """
  stream_keys = noise.stream(keys, noise.SOLVER_STREAM)

  def fn(i, stage, sigma, sigma_next):
    del sigma, sigma_next
    return noise.step_normal(noise.stream(stream_keys, stage), i, shape, dtype)

  return fn


def brownian_tree(keys: jax.Array, shape: Sequence[int], sigma_max, dtype=jnp.float32) -> NoiseFn:
  """Unit-variance increments of one Brownian path W(σ), σ ∈ [0, sigma_max], per sample.

  Args:
    keys: per-sample typed keys [B].
    shape: the per-sample shape, e.g. (D,).
    sigma_max: the top of the path, σ_0 of the grid (a scalar, may be traced).
    dtype: the draws' dtype.
  """
  stream_keys = noise.stream(keys, noise.SOLVER_STREAM)
  top = jnp.asarray(sigma_max, dtype)
  struct = jax.ShapeDtypeStruct(tuple(shape), dtype)

  def increment(key, lo, hi):
    tree = diffrax.VirtualBrownianTree(jnp.zeros((), dtype), top, tol=top * 2.0**-TREE_LEVELS,
                                       shape=struct, key=key)
    return tree.evaluate(lo, hi)

  def fn(i, stage, sigma, sigma_next):
    del i, stage
    hi = jnp.clip(jnp.maximum(sigma, sigma_next), 0.0, top).astype(dtype)
    lo = jnp.clip(jnp.minimum(sigma, sigma_next), 0.0, top).astype(dtype)
    w = jax.vmap(increment, in_axes=(0, None, None))(stream_keys, lo, hi)
    # A step of zero length has zero noise (its coefficient is 0 too); no 0/0.
    return w / jnp.sqrt(jnp.maximum(hi - lo, jnp.finfo(dtype).tiny))

  return fn


def make(kind: Union[str, NoiseFn], keys, batch: int, shape: Sequence[int], sigma_max,
         dtype=jnp.float32) -> NoiseFn:
  """The noise sampler `kind` ('gaussian', 'brownian' or a NoiseFn, used as it is).

  Args:
    kind: see the module docstring.
    keys: per-sample keys [B] (see `noise.as_keys` for the accepted forms); unused for a NoiseFn.
    batch: B.
    shape: per-sample shape of a draw.
    sigma_max: σ_0 of the grid (the Brownian path's top).
    dtype: the draws' dtype.

  Raises:
    ValueError: on an unknown kind, or keys missing for a key-derived kind.
  """
  if callable(kind):
    return kind
  if kind not in KINDS:
    raise ValueError(f'Unknown noise sampler {kind!r}; known: {", ".join(KINDS)} or a function '
                     '(i, stage, sigma, sigma_next) -> noise.')
  if keys is None:
    raise ValueError('A stochastic solver needs PRNG keys: pass key=samplers.seed_keys(seeds), '
                     'one per sample (or eta=0 for its deterministic form).')
  keys = noise.as_keys(keys, batch)
  if kind == 'gaussian':
    return gaussian(keys, shape, dtype)
  return brownian_tree(keys, shape, sigma_max, dtype)
