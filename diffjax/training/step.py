"""The pure training step: one optimizer update of a denoiser under any objective.

`make_train_step` closes over an `Objective` and the optimizer and returns
`train_step(state, batch, base_key) -> (state, metrics)`, a pure function of arrays that the loop
jits with the mesh's shardings. Every paper's loss is an `Objective`: the EDM family
(`denoising_objective`), iDDPM's hybrid/VLB losses (whose importance sampler keeps a loss history in
`TrainState.extra`), distillation targets and Soft Score Matching. Randomness comes from `fold_in(base_key, step)`, so a resumed run
draws exactly the noise the uninterrupted run would have drawn.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from diffjax import state as state_lib
from diffjax.objectives import base as objectives_base


def all_finite(tree) -> jax.Array:
  """True when every leaf of the pytree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


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

  objective = objectives_base.as_objective(objective)

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
