"""Train state, optimizer, learning-rate ramp and EMA, all in units that survive batch changes.

EDM (App. F.1) measures training length, the learning-rate warm-up and the EMA half-life in
*images*, so that changing the batch size keeps the schedule; EDM2's inverse-square-root decay
(§2.5) is measured in images too. The state holds no RNG: each step's key is
`fold_in(base_key, step)`.

float16 training (`--config.train.compute_dtype=float16`) adds dynamic loss scaling
(Micikevicius et al. 2018, "Mixed precision training" §3.2) as the outermost optimizer link,
`dynamic_loss_scale`: its state, the scale S and the count of finite steps since S last changed,
is part of `opt_state`, so it is checkpointed and resumed with everything else.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

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


def images_seen(step, batch_size: int, step0: int = 0, images_at_step0: float = 0.0):
  """n_img = images_at_step0 + (step − step0)·batch: images seen before step `step` (float32).

  With the defaults n_img = step·batch. A run resumed with another batch size passes the start of
  the segment it is in (`runs.progress`): step0 and the images seen by then.
  """
  steps = jnp.asarray(step, jnp.float32) - float(step0)
  # Never below 0: optax's update count, which the lr schedule reads, lags the step by the skipped
  # updates and may start before a resumed segment's step0.
  return jnp.maximum(steps * batch_size + float(images_at_step0), 0.0)


def learning_rate(step, base_lr: float, rampup_images: float, batch_size: int,
                  decay_images: float = 0.0, *, step0: int = 0, images_at_step0: float = 0.0):
  """lr = base_lr · min(n_img / rampup_images, 1) / sqrt(max(n_img / decay_images, 1)).

  n_img = `images_seen(step, batch_size, step0, images_at_step0)` is the number of images seen
  before the step (step·batch by default). The ramp is EDM's; the inverse-square-root decay is
  EDM2's (§2.5, lr = α_ref / sqrt(max(t/t_ref, 1)) with t_ref in batches; here t_ref·batch images,
  so the decay stays put when the batch size changes).

  Args:
    step: optimizer steps taken (int or a traced scalar).
    base_lr: α_ref, the learning rate after the ramp and before the decay.
    rampup_images: images over which lr rises linearly from 0 (0 = no ramp).
    batch_size: global batch size.
    decay_images: t_ref in images (EDM2 ImageNet-64: 35k batches of 2048); 0 = no decay.
    step0, images_at_step0: a step of the current batch size's segment and the images seen
      before it (a resume with another batch size; see `images_seen`).
  """
  nimg = images_seen(step, batch_size, step0, images_at_step0)
  lr = base_lr * jnp.minimum(nimg / max(rampup_images, 1e-8), 1.0)
  if decay_images > 0:
    lr = lr / jnp.sqrt(jnp.maximum(nimg / decay_images, 1.0))
  return lr


def project_updates(project: Callable[[Any], Any]) -> optax.GradientTransformation:
  """An optimizer link that projects the *updated* params: u ← project(w + u) − w.

  Chained last, it makes `optax.apply_updates(w, u)` store project(w + u) (up to one rounding), so
  the params stay on the constraint set at every step. EDM2's forced weight normalization
  (`models.edm2.project_params`) is such a projection.

  Args:
    project: params -> params of the same structure, pure and jittable.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('project_updates needs the params: call tx.update(grads, state, params).')
    target = project(jax.tree.map(lambda w, u: w + u, params, updates))
    return jax.tree.map(lambda t, w: t - w, target, params), state

  return optax.GradientTransformation(init, update)


def make_optimizer(base_lr: float, batch_size: int, rampup_images: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_clip: float = 0.0, weight_decay: float = 0.0, decay_images: float = 0.0,
                   project: Optional[Callable[[Any], Any]] = None, step0: int = 0,
                   images_at_step0: float = 0.0) -> optax.GradientTransformation:
  """Adam (EDM: lr 1e-3, β = (0.9, 0.999), eps 1e-8) with the image-based warm-up.

  Args:
    base_lr: learning rate after the ramp.
    batch_size: global batch size (images per step).
    rampup_images: images over which lr rises linearly from 0 (EDM: 10 Mimg).
    b1, b2, eps: Adam hyperparameters (EDM2: β2 = 0.99).
    grad_clip: clip the global gradient norm to this value (0 disables).
    weight_decay: decoupled weight decay (AdamW) when > 0.
    decay_images: EDM2's lr / sqrt(max(n_img/decay_images, 1)) decay; 0 disables it.
    project: params -> params applied to the updated params after every step (see
      `project_updates`; EDM2's forced weight normalization); None adds nothing, so the optimizer
      state of every other model keeps its structure.
    step0, images_at_step0: where the schedule's n_img starts (see `images_seen`); the schedule
      reads optax's update count, which lags the step by the updates skipped as non-finite.
  """
  schedule = lambda step: learning_rate(step, base_lr, rampup_images, batch_size, decay_images,
                                        step0=step0, images_at_step0=images_at_step0)
  parts = []
  if grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  if weight_decay > 0:
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  else:
    parts.append(optax.adam(schedule, b1=b1, b2=b2, eps=eps))
  if project is not None:
    parts.append(project_updates(project))
  return optax.chain(*parts)


def ema_beta(step, batch_size: int, halflife_images: float, rampup_ratio: float | None = 0.05,
             *, step0: int = 0, images_at_step0: float = 0.0):
  """EMA decay per step: β = 0.5^(batch / max(h, 1e-8)), h = min(half-life, ratio·n_img) (EDM).

  The ramp-up shortens the half-life early in training (n_img = images seen before this step,
  `images_seen(step, batch_size, step0, images_at_step0)`), so the average does not remember the
  random initialization; at step 0, β = 0.
  """
  halflife = jnp.asarray(halflife_images, jnp.float32)
  if rampup_ratio is not None and rampup_ratio > 0:
    nimg = images_seen(step, batch_size, step0, images_at_step0)
    halflife = jnp.minimum(halflife, nimg * rampup_ratio)
  return 0.5**(batch_size / jnp.maximum(halflife, 1e-8))


def update_ema(ema_params, params, beta):
  """ema ← β·ema + (1 − β)·params, leaf by leaf."""
  return jax.tree.map(lambda e, p: beta * e + (1.0 - beta) * p, ema_params, params)


class LossScaleState(NamedTuple):
  """State of `dynamic_loss_scale`, found in `TrainState.opt_state`.

  Attributes:
    scale: float32 scalar S; the train step differentiates S·loss and divides the gradient by S.
    good_steps: int32 scalar, finite steps since S last changed.
    inner: the wrapped optimizer's state.
  """
  scale: jax.Array
  good_steps: jax.Array
  inner: Any


def loss_scale(opt_state: Any) -> Optional[jax.Array]:
  """The loss scale S of an optimizer state made by `dynamic_loss_scale`, or None if it has none."""
  return opt_state.scale if isinstance(opt_state, LossScaleState) else None


def _tree_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def dynamic_loss_scale(tx: optax.GradientTransformation, init_scale: float = 2.0**15,
                       period: int = 2000, factor: float = 2.0,
                       min_scale: float = 1.0) -> optax.GradientTransformation:
  """Dynamic loss scaling for float16 training around the optimizer `tx`.

  The train step multiplies the loss by S before differentiating (so that small float16
  gradients do not flush to zero) and divides the gradients by S again; this link receives those
  unscaled gradients. When any of them is non-finite (the scaled backward pass overflowed) the
  update is zero, the inner state is left as it was and S halves; after `period` finite steps in a
  row S doubles (Micikevicius et al. 2018 §3.2).

  Args:
    tx: the optimizer whose updates are skipped on overflow.
    init_scale: S at step 0 (2^15, as NVIDIA's apex and JMP start).
    period: finite steps in a row after which S grows by `factor`.
    factor: growth and shrink factor of S.
    min_scale: S never goes below this.
  """
  if period < 1 or factor <= 1 or init_scale <= 0:
    raise ValueError(f'Loss scaling needs period >= 1, factor > 1 and init_scale > 0, got '
                     f'{period}, {factor}, {init_scale}; fix --config.train.loss_scale_*.')

  def init(params):
    return LossScaleState(scale=jnp.asarray(init_scale, jnp.float32),
                          good_steps=jnp.zeros((), jnp.int32), inner=tx.init(params))

  def update(grads, state, params=None):
    finite = _tree_finite(grads)
    # On overflow the inner optimizer sees zeros (its output is discarded): NaNs never reach it.
    safe = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, inner = tx.update(safe, state.inner, params)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    inner = jax.tree.map(lambda new, old: jnp.where(finite, new, old), inner, state.inner)
    good = jnp.where(finite, state.good_steps + 1, 0)
    grow = good >= period
    scale = jnp.where(finite, jnp.where(grow, state.scale * factor, state.scale),
                      jnp.maximum(state.scale / factor, min_scale))
    return updates, LossScaleState(scale=scale.astype(jnp.float32),
                                   good_steps=jnp.where(grow, 0, good).astype(jnp.int32),
                                   inner=inner)

  return optax.GradientTransformation(init, update)
