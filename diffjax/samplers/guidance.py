"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022).

    D^w(x; σ) = (1 + w)·D(x; σ, c) − w·D(x; σ, ∅)

w = 0 is the plain conditional model. Because the combination is linear it is the same in x̂-, ε- or
v-space (nothing is clipped here), so wrapping the denoiser makes every σ-space sampler guided.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def _guidance_weight(w, x: jax.Array) -> jax.Array:
  """w as a scalar or a per-example weight [B] broadcastable against x [B, ...]."""
  w = jnp.asarray(w, x.dtype)
  if w.ndim == 0:
    return w
  if w.shape != x.shape[:1]:
    raise ValueError(f'The guidance weight must be a scalar or one weight per sample '
                     f'[{x.shape[0]}], got shape {w.shape}.')
  return w.reshape(w.shape + (1,) * (x.ndim - 1))


def combine(d_cond: jax.Array, d_uncond: jax.Array, w) -> jax.Array:
  """(1 + w)·D_c − w·D_u for denoised batches [B, ...] and w scalar or [B]."""
  w = _guidance_weight(w, d_cond)
  return (1.0 + w) * d_cond - w * d_uncond


def guided(denoise_cond: DenoiseFn, denoise_uncond: DenoiseFn, w) -> DenoiseFn:
  """A guided denoiser from a conditional and an unconditional one (two network calls per step).

  Args:
    denoise_cond: D(x [B, ...], σ [B]; c) -> [B, ...], conditioned on the labels.
    denoise_uncond: D(x, σ; ∅) -> [B, ...], the same model with the null label.
    w: guidance weight, a scalar or one per sample [B].

  Returns:
    denoise_fn(x [B, ...], σ [B]) -> (1 + w)·D_c − w·D_u [B, ...].
  """

  def denoise_fn(x, sigma):
    return combine(denoise_cond(x, sigma), denoise_uncond(x, sigma), w)

  return denoise_fn


def guided_batched(denoise_with_labels: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                   class_labels: jax.Array, w) -> DenoiseFn:
  """Guidance with one network call of batch 2B: the conditional and null-label halves together.

  The null label ∅ is the all-zero one-hot vector (how a CFG model is trained to see "no label").
  One call of twice the batch keeps the accelerator busier than two calls of B.

  Args:
    denoise_with_labels: D(x [2B, ...], σ [2B], labels [2B, label_dim]) -> [2B, ...].
    class_labels: one-hot labels [B, label_dim] of the samples being generated.
    w: guidance weight, a scalar or one per sample [B].

  Returns:
    denoise_fn(x [B, ...], σ [B]) -> (1 + w)·D_c − w·D_u [B, ...].
  """
  class_labels = jnp.asarray(class_labels)
  labels = jnp.concatenate([class_labels, jnp.zeros_like(class_labels)], axis=0)

  def denoise_fn(x, sigma):
    batch = x.shape[0]
    if labels.shape[0] != 2 * batch:
      raise ValueError(f'guided_batched got {class_labels.shape[0]} class labels for a batch of '
                       f'{batch}; pass one label per sample.')
    sigma = jnp.broadcast_to(jnp.asarray(sigma), (batch,))
    denoised = denoise_with_labels(jnp.concatenate([x, x], axis=0),
                                   jnp.concatenate([sigma, sigma], axis=0), labels)
    return combine(denoised[:batch], denoised[batch:], w)

  return denoise_fn
