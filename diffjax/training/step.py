"""The pure training step: one optimizer update of a denoiser under any objective.

`make_train_step` closes over an `Objective` and the optimizer and returns
`train_step(state, batch, base_key) -> (state, metrics)`, a pure function of arrays that the loop
jits with the mesh's shardings. Every paper's loss is an `Objective`: the EDM family
(`denoising_objective`), iDDPM's hybrid/VLB losses (whose importance sampler keeps a loss history in
`TrainState.extra`), distillation targets and Soft Score Matching. Randomness comes from `fold_in(base_key, step)`, so a resumed run
draws exactly the noise the uninterrupted run would have drawn.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from diffjax import losses as losses_lib
from diffjax.precond import Denoiser
from diffjax.training import state as state_lib


def all_finite(tree) -> jax.Array:
  """True when every leaf of the pytree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class Objective(NamedTuple):
  """A training objective.

  Attributes:
    loss: (params, batch, key, extra) -> (scalar loss, aux); `extra` is the objective's own
      training state (e.g. a loss history), aux any pytree of arrays.
    init_extra: () -> the initial extra state (a pytree of arrays; {} when there is none). It is
      part of TrainState, so it is checkpointed and resumed with the params.
    update_extra: (extra, aux) -> extra after each step; aux comes from the whole global batch, so
      the result is identical on every device and host.
  """
  loss: Callable
  init_extra: Callable[[], Any] = dict
  update_extra: Callable[[Any, Any], Any] = lambda extra, aux: extra


def as_objective(objective) -> Objective:
  """Accepts an Objective or a plain `loss_fn(params, batch, key) -> (loss, aux)`."""
  if isinstance(objective, Objective):
    return objective
  return Objective(loss=lambda params, batch, key, extra: objective(params, batch, key))


def denoising_objective(denoiser: Denoiser, loss: losses_lib.DenoisingLoss, *,
                        num_classes: int = 0, augment_fn: Optional[Callable] = None) -> Objective:
  """The EDM-family objective (EDM Eq. 8 with the loss's p(σ) and λ(σ)).

  Args:
    denoiser: the preconditioned network.
    loss: σ distribution and weighting.
    num_classes: > 0 feeds one-hot class labels to the network.
    augment_fn: (key, images [B,H,W,C]) -> (images, augment_labels [B, A]) or None.
  """

  def loss_fn(params, batch, key, extra):
    del extra  # The EDM family keeps no state between steps.
    key_aug, key_loss, key_dropout = jax.random.split(key, 3)
    y = batch['image']
    class_labels = None
    if num_classes > 0:
      class_labels = jax.nn.one_hot(batch['label'], num_classes, dtype=jnp.float32)
    augment_labels = None
    if augment_fn is not None:
      y, augment_labels = augment_fn(key_aug, y)

    def denoise(x, sigma):
      return denoiser(params, x, sigma, class_labels, augment_labels, train=True,
                      rngs={'dropout': key_dropout})

    return losses_lib.denoising_loss(denoise, loss, y, key_loss)

  return Objective(loss=loss_fn)


def make_train_step(objective, tx: optax.GradientTransformation, *, batch_size: int,
                    ema_halflife_images: float, ema_rampup_ratio: Optional[float] = 0.05,
                    skip_nonfinite: bool = False, lr_fn: Optional[Callable] = None) -> Callable:
  """Builds the pure train step around any objective.

  Args:
    objective: an `Objective` (or a plain `loss_fn(params, batch, key)`), e.g.
      `denoising_objective(...)`. Every paper's loss plugs in here.
    tx: the optimizer.
    batch_size: global batch size, for the image-based EMA.
    ema_halflife_images, ema_rampup_ratio: EMA half-life in images and its ramp-up ratio.
    skip_nonfinite: when a loss, gradient or updated parameter is non-finite, leave the state
      unchanged (besides the step counter) instead of applying the update.
    lr_fn: step -> learning rate, only reported in the metrics.

  Returns:
    train_step(state, batch, base_key) -> (new_state, metrics); metrics are scalars: loss,
    grad_norm, finite, ema_beta (and lr).
  """

  objective = as_objective(objective)

  def train_step(state: state_lib.TrainState, batch, base_key):
    key = jax.random.fold_in(base_key, state.step)
    (value, aux), grads = jax.value_and_grad(objective.loss, has_aux=True)(
        state.params, batch, key, state.extra)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    beta = state_lib.ema_beta(state.step, batch_size, ema_halflife_images, ema_rampup_ratio)
    ema_params = state_lib.update_ema(state.ema_params, params, beta)
    # Params are checked too: a finite gradient with a bad learning rate can still poison them.
    finite = jnp.isfinite(value) & all_finite(grads) & all_finite(params)
    extra = objective.update_extra(state.extra, aux)
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                              opt_state=opt_state, extra=extra)
    if skip_nonfinite:
      keep_old = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_state = new_state.replace(
          params=keep_old(params, state.params), ema_params=keep_old(ema_params, state.ema_params),
          opt_state=keep_old(opt_state, state.opt_state), extra=keep_old(extra, state.extra))
    metrics = {
        'loss': value,
        'grad_norm': optax.global_norm(grads),
        'finite': finite,
        'ema_beta': beta,
    }
    if lr_fn is not None:
      metrics['lr'] = lr_fn(state.step)
    return new_state, metrics

  return train_step
