"""Guidance as a denoiser wrapper: classifier-free guidance, its limited interval, autoguidance.

Classifier-free guidance (Ho & Salimans 2022), in diffjax's weight w:

    D^w(x; σ) = (1 + w)·D(x; σ, c) − w·D(x; σ, ∅)

w = 0 is the plain conditional model. Because the combination is linear it is the same in x̂-, ε- or
v-space (nothing is clipped here), so wrapping the denoiser makes every σ-space sampler guided.

Guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves
sample and distribution quality in diffusion models", §3): guidance is applied only at noise levels
σ ∈ (σ_lo, σ_hi] (the paper's convention: open below, closed above) and the denoiser is exactly the
conditional one elsewhere, w(σ) = w·1[σ_lo < σ ≤ σ_hi]. For EDM2-XXL on ImageNet-512 they report
about (0.28, 5.42]. Their released sampler picks guidance per Heun *step* by step index; here the
test is per *evaluation*, on the σ the denoiser is called at (so a Heun correction evaluated at
σ_{i+1} is guided by where σ_{i+1} lies), which is the paper's definition and works with every
solver of any grid.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):
D_g(x; σ) = D_0(x; σ) + g·(D_1(x; σ) − D_0(x; σ)) with D_1 the main model, D_0 a weaker one of the
same task and conditioning (smaller and/or shorter trained), g = 1 no guidance. That is the CFG
combination above with D_c = D_1, D_u = D_0 and w = g − 1: `guided(main, guide, g - 1)`. (EDM2's
generate_images.py writes both as `gnet(x).lerp(net(x), g)`; its published g = 2.05 for
EDM2-XXL's autoguidance is w = 1.05 here.)
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
Interval = Optional[Tuple[float, float]]


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
  """(1 + w)·D_c − w·D_u for denoised batches [B, ...] and w scalar or [B].

  Computed as D_c + w·(D_c − D_u): the same in exact arithmetic, and exactly D_c in float when
  w = 0 or when the two denoisers agree (a model guided by itself is not guided at all).
  """
  w = _guidance_weight(w, d_cond)
  return d_cond + w * (d_cond - d_uncond)


def check_interval(sigma_interval: Interval) -> Interval:
  """(σ_lo, σ_hi) as two floats with 0 <= σ_lo < σ_hi, or None.

  Raises:
    ValueError: one sentence on the expected form.
  """
  if sigma_interval is None:
    return None
  try:
    lo, hi = (float(v) for v in sigma_interval)
  except (TypeError, ValueError):
    raise ValueError(f'The guidance interval must be two noise levels (σ_lo, σ_hi), got '
                     f'{sigma_interval!r}; e.g. (0.28, 5.42).') from None
  if not 0.0 <= lo < hi:
    raise ValueError(f'The guidance interval ({lo:g}, {hi:g}] must have 0 <= σ_lo < σ_hi; e.g. '
                     '(0.28, 5.42).')
  return lo, hi


def inside(sigma: jax.Array, sigma_interval: Interval) -> jax.Array:
  """Whether each σ [B] lies in the guidance interval (σ_lo, σ_hi] (all True without one)."""
  sigma = jnp.asarray(sigma)
  if sigma_interval is None:
    return jnp.ones(sigma.shape, bool)
  lo, hi = sigma_interval
  return (sigma > lo) & (sigma <= hi)


def _select(d_guided: jax.Array, d_cond: jax.Array, sigma: jax.Array,
            sigma_interval: Interval) -> jax.Array:
  """The guided result inside the interval and exactly D_c outside, per sample (a select, not
  w = 0: (1 + 0)·D_c − 0·D_u would be NaN where D_u is not finite)."""
  if sigma_interval is None:
    return d_guided
  keep = inside(jnp.broadcast_to(jnp.asarray(sigma), d_cond.shape[:1]), sigma_interval)
  return jnp.where(keep.reshape(keep.shape + (1,) * (d_cond.ndim - 1)), d_guided, d_cond)


def guided(denoise_cond: DenoiseFn, denoise_uncond: DenoiseFn, w, *,
           sigma_interval: Interval = None, skip_outside: bool = False) -> DenoiseFn:
  """A guided denoiser from a conditional and an unconditional (or a weaker) one.

  With `sigma_interval=(σ_lo, σ_hi)` guidance applies only where σ_lo < σ ≤ σ_hi, per sample
  (`jnp.where` on each sample's σ, no Python branch on a traced σ), and the result elsewhere is
  exactly denoise_cond's. Both denoisers are still evaluated on every call: outside the interval
  the unconditional call is wasted work, as it must be inside a sampler's `lax.scan` on a traced
  σ without a branch. `skip_outside=True` instead puts a `lax.cond` around the unconditional call
  that skips it when no sample of the batch is inside: worth it with a real network (outside
  the interval a step costs one evaluation instead of two), but a cond inside a scan body has a
  fixed cost (Heun measured 22 µs per NFE with one against 5.5 without, benchmarks/NOTES.md
  item 5 of session 4), so it is not the default.

  Autoguidance is this with the weaker model as `denoise_uncond` and w = g − 1 (module docstring).

  Args:
    denoise_cond: D(x [B, ...], σ [B]; c) -> [B, ...], conditioned on the labels.
    denoise_uncond: D(x, σ; ∅) -> [B, ...], the same model with the null label (or the guide).
    w: guidance weight, a scalar or one per sample [B].
    sigma_interval: (σ_lo, σ_hi), or None to guide at every σ.
    skip_outside: skip the unconditional call with a lax.cond when the whole batch is outside.

  Returns:
    denoise_fn(x [B, ...], σ [B]) -> (1 + w)·D_c − w·D_u [B, ...] (D_c outside the interval).
  """
  sigma_interval = check_interval(sigma_interval)

  def denoise_fn(x, sigma):
    d_cond = denoise_cond(x, sigma)

    def with_uncond():
      return _select(combine(d_cond, denoise_uncond(x, sigma), w), d_cond, sigma, sigma_interval)

    if skip_outside and sigma_interval is not None:
      any_inside = jnp.any(inside(jnp.broadcast_to(jnp.asarray(sigma), x.shape[:1]),
                                  sigma_interval))
      return lax.cond(any_inside, with_uncond, lambda: d_cond)
    return with_uncond()

  return denoise_fn


def guided_batched(denoise_with_labels: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                   class_labels: jax.Array, w, *, sigma_interval: Interval = None,
                   skip_outside: bool = False) -> DenoiseFn:
  """Guidance with one network call of batch 2B: the conditional and null-label halves together.

  The null label ∅ is the all-zero one-hot vector (how a CFG model is trained to see "no label").
  One call of twice the batch keeps the accelerator busier than two calls of B. With
  `sigma_interval` the result outside (σ_lo, σ_hi] is exactly the conditional half, per sample;
  `skip_outside` as for `guided` (there it calls the network on the B conditional inputs alone
  when no sample is inside).

  Args:
    denoise_with_labels: D(x [2B, ...], σ [2B], labels [2B, label_dim]) -> [2B, ...].
    class_labels: one-hot labels [B, label_dim] of the samples being generated.
    w: guidance weight, a scalar or one per sample [B].
    sigma_interval: (σ_lo, σ_hi), or None to guide at every σ.
    skip_outside: see `guided`.

  Returns:
    denoise_fn(x [B, ...], σ [B]) -> (1 + w)·D_c − w·D_u [B, ...] (D_c outside the interval).
  """
  sigma_interval = check_interval(sigma_interval)
  class_labels = jnp.asarray(class_labels)
  labels = jnp.concatenate([class_labels, jnp.zeros_like(class_labels)], axis=0)

  def denoise_fn(x, sigma):
    batch = x.shape[0]
    if labels.shape[0] != 2 * batch:
      raise ValueError(f'guided_batched got {class_labels.shape[0]} class labels for a batch of '
                       f'{batch}; pass one label per sample.')
    sigma = jnp.broadcast_to(jnp.asarray(sigma), (batch,))

    def both():
      denoised = denoise_with_labels(jnp.concatenate([x, x], axis=0),
                                     jnp.concatenate([sigma, sigma], axis=0), labels)
      d_cond = denoised[:batch]
      return _select(combine(d_cond, denoised[batch:], w), d_cond, sigma, sigma_interval)

    if skip_outside and sigma_interval is not None:
      return lax.cond(jnp.any(inside(sigma, sigma_interval)), both,
                      lambda: denoise_with_labels(x, sigma, class_labels))
    return both()

  return denoise_fn
