"""Train state, optimizer, learning-rate ramp and EMA, all in units that survive batch changes.

EDM (App. F.1) measures training length, the learning-rate warm-up and the EMA half-life in
*images*, so that changing the batch size keeps the schedule. The state holds no RNG: each step's
key is `fold_in(base_key, step)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  """Everything a training step changes.

  Attributes:
    step: int32 scalar, number of optimizer steps taken.
    params: network parameters.
    ema_params: exponential moving average of params (what is sampled from).
    opt_state: optimizer state.
    extra: the objective's own state (e.g. iDDPM's loss history for importance sampling), a
      pytree of arrays; {} for most objectives.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  extra: Any = struct.field(default_factory=dict)


def create_train_state(params: Any, tx: optax.GradientTransformation,
                       extra: Any = None) -> TrainState:
  """Step 0: EMA equals the initial params."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    extra={} if extra is None else extra)


def learning_rate(step, base_lr: float, rampup_images: float, batch_size: int):
  """lr = base_lr · min(n_img / rampup_images, 1) with n_img = step·batch images seen (EDM)."""
  nimg = jnp.asarray(step, jnp.float32) * batch_size
  return base_lr * jnp.minimum(nimg / max(rampup_images, 1e-8), 1.0)


def make_optimizer(base_lr: float, batch_size: int, rampup_images: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_clip: float = 0.0, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Adam (EDM: lr 1e-3, β = (0.9, 0.999), eps 1e-8) with the image-based warm-up.

  Args:
    base_lr: learning rate after the ramp.
    batch_size: global batch size (images per step).
    rampup_images: images over which lr rises linearly from 0 (EDM: 10 Mimg).
    b1, b2, eps: Adam hyperparameters.
    grad_clip: clip the global gradient norm to this value (0 disables).
    weight_decay: decoupled weight decay (AdamW) when > 0.
  """
  schedule = lambda step: learning_rate(step, base_lr, rampup_images, batch_size)
  parts = []
  if grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  if weight_decay > 0:
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  else:
    parts.append(optax.adam(schedule, b1=b1, b2=b2, eps=eps))
  return optax.chain(*parts)


def ema_beta(step, batch_size: int, halflife_images: float, rampup_ratio: float | None = 0.05):
  """EMA decay per step: β = 0.5^(batch / max(h, 1e-8)), h = min(half-life, ratio·n_img) (EDM).

  The ramp-up shortens the half-life early in training (n_img = images seen before this step),
  so the average does not remember the random initialization; at step 0, β = 0.
  """
  halflife = jnp.asarray(halflife_images, jnp.float32)
  if rampup_ratio is not None and rampup_ratio > 0:
    nimg = jnp.asarray(step, jnp.float32) * batch_size
    halflife = jnp.minimum(halflife, nimg * rampup_ratio)
  return 0.5**(batch_size / jnp.maximum(halflife, 1e-8))


def update_ema(ema_params, params, beta):
  """ema ← β·ema + (1 − β)·params, leaf by leaf."""
  return jax.tree.map(lambda e, p: beta * e + (1.0 - beta) * p, ema_params, params)
