"""Per-sample randomness for samplers: one key per image, independent streams per use.

Every sampler in diffjax draws its noise from *per-sample* keys: a typed key array [B] made with
`jax.random.key` (one key per integer seed, `seed_keys`). Image b then depends only on key b — never
on the batch size, the batch composition or the device count — so seeds 0–7 in one batch give the
same images as seeds 0–3 and 4–7 in two.

Each use of a sample's key gets its own stream by `fold_in`, so the initial latents and the noise
injected at step i never share random bits:

    latents:          normal(fold_in(key_b, LATENT_STREAM), shape)
    churn, step i:    normal(fold_in(fold_in(key_b, CHURN_STREAM), i), shape)

Samplers added later (ancestral, predictor–corrector, …) take a stream number of their own.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Stream numbers folded into a sample's key, one per use of randomness.
LATENT_STREAM = 0
CHURN_STREAM = 1
ANCESTRAL_STREAM = 2
CORRECTOR_STREAM = 3
RENOISE_STREAM = 4  # the re-noise step of the N-step stochastic sampler (samplers.distilled)
SOFT_STREAM = 5  # the step noise η of the Soft Diffusion samplers (samplers.momentum)
PREDICTOR_STREAM = 6  # the predictor noise of the SDE predictor-corrector sampler (samplers.sde)
PROBE_STREAM = 7  # Hutchinson–Skilling probes of the PF-ODE likelihood (likelihood)
DEQUANTIZE_STREAM = 8  # uniform dequantization noise of the PF-ODE likelihood (likelihood)
SOLVER_STREAM = 9  # step noise of the k-diffusion family (ancestral, SDE; samplers.kdiffusion)


def seed_keys(seeds: Sequence[int] | np.ndarray) -> jax.Array:
  """One independent typed PRNG key per integer seed.

  Args:
    seeds: integer seeds [B] (taken modulo 2**32, as EDM's generate.py does).

  Returns:
    typed key array [B] (`jax.random.key` keys).
  """
  seeds = np.asarray(seeds, np.int64).reshape(-1) % (1 << 32)
  return jax.vmap(jax.random.key)(jnp.asarray(seeds.astype(np.uint32)))


def as_keys(key, batch: int) -> jax.Array:
  """Normalizes a `key` argument to per-sample typed keys [batch].

  Accepted forms (per-sample keys are the preferred one: they make each image depend on its own
  seed only):
    * typed keys [B] from `jax.random.key` / `seed_keys`: used as they are;
    * one typed key []: split into `batch` keys (then images do depend on the batch layout);
    * raw uint32 key data [B, 2] or [2] (legacy `jax.random.PRNGKey`): wrapped, then as above.

  Raises:
    ValueError: if the keys do not match the batch size.
  """
  key = key_array(key)
  if key.ndim == 0:
    return jax.random.split(key, batch)
  if key.shape != (batch,):
    raise ValueError(f'Expected one PRNG key per sample (shape [{batch}]) or a single key, got '
                     f'keys of shape {key.shape}; make them with samplers.seed_keys(seeds).')
  return key


def stream(keys: jax.Array, stream_id: int) -> jax.Array:
  """The keys [B] of one stream (`fold_in(key_b, stream_id)` for every sample)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, stream_id))(keys)


def normal(keys: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Standard normals [B, *shape], sample b drawn from keys[b] alone."""
  return jax.vmap(lambda k: jax.random.normal(k, tuple(shape), dtype))(keys)


def step_normal(stream_keys: jax.Array, step, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Standard normals [B, *shape] for sampler step `step` (an int or a traced int scalar).

  Args:
    stream_keys: keys [B] of one stream (see `stream`).
    step: the step index i; noise at different steps is independent.
    shape: per-sample shape, e.g. (H, W, C).
  """
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), tuple(shape), dtype))(
      stream_keys)


def latents(keys, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Initial standard-normal latents [B, *shape], one sample per key.

  Args:
    keys: per-sample keys [B] (see `as_keys` for the accepted forms; a single key needs `shape`
      to carry no batch, so pass per-sample keys).
    shape: per-sample shape, e.g. (H, W, C).
    dtype: floating dtype of the result.

  Returns:
    [B, *shape] standard normals; multiply by σ(t_0)·s(t_0) to start a sampler.
  """
  keys = key_array(keys)
  if keys.ndim != 1:
    raise ValueError(f'latents() needs per-sample keys [B], got keys of shape {keys.shape}.')
  return normal(stream(keys, LATENT_STREAM), shape, dtype)


def key_array(key) -> jax.Array:
  """`key` as a typed key array (raw uint32 key data [..., 2] is wrapped)."""
  key = key if isinstance(key, jax.Array) else jnp.asarray(key)
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
  return key
