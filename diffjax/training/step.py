"""The pure training step: one optimizer update of a denoiser under any objective.

`make_train_step` closes over an `Objective` and the optimizer and returns
`train_step(state, batch, base_key) -> (state, metrics)`, a pure function of arrays that the loop
jits with the mesh's shardings. Every paper's loss is an `Objective`: the EDM family
(`denoising_objective`), iDDPM's hybrid/VLB losses (whose importance sampler keeps a loss history in
`TrainState.extra`), distillation targets and Soft Score Matching. Randomness comes from
`fold_in(base_key, step)`, so a resumed run draws exactly the noise the uninterrupted run would
have drawn.

Post-hoc EMA (EDM2 §3): with `phema_stds`, the step also tracks one power-function EMA of the
params per σ_rel (`ema.power_function_beta`). They live in `TrainState.extra` as
`{'objective': <the objective's own extra>, 'phema': {ema.profile_key(σ_rel): params}}` (build it
with `initial_extra`), so they are checkpointed, verified and resumed with the rest of the state,
and `runs.load`, which restores `extra` as saved, reads such runs unchanged. Every checkpoint of
such a run is a post-hoc EMA snapshot (`python -m diffjax.phema`).

EDM2's forced weight normalization is not here but in `tx`: `build.build_optimizer` ends the
optimizer chain with `state.project_updates(network.project_params)`, so `tx.update` below returns
updates that land the stored weights on unit norm.

Mixed precision: the network computes in its `dtype` (build passes config.train.compute_dtype)
while params, optimizer state and EMA stay float32 and the loss comes out of a float32 reduction.
In float16 the optimizer is wrapped in `state.dynamic_loss_scale`; the step then differentiates
S·loss, divides the gradients by S and lets that link skip the update (and halve S) on overflow.
An overflowed gradient is then routine, not a divergence: `finite` looks at the loss and params.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from diffjax import ema as ema_lib
from diffjax import state as state_lib
from diffjax.objectives import base as objectives_base

PHEMA = 'phema'
OBJECTIVE = 'objective'


def initial_extra(objective, params, phema_stds: Sequence[float] = ()) -> Any:
  """TrainState.extra at step 0: the objective's own, plus the power-function EMAs if tracked.

  Args:
    objective: the Objective (its `init_extra()` is the objective's part).
    params: the initial params (every tracked EMA starts at them; the first step's β is 0).
    phema_stds: σ_rel of the profiles to track (EDM2: 0.05, 0.10); () tracks none and returns
      the objective's extra as it is, so runs without post-hoc EMA keep their state layout.
  """
  objective = objectives_base.as_objective(objective)
  if not phema_stds:
    return objective.init_extra()
  ema_lib.std_to_exp(phema_stds)  # Fails early, in one sentence, on a σ_rel out of range.
  return {OBJECTIVE: objective.init_extra(),
          PHEMA: {ema_lib.profile_key(s): jax.tree.map(jnp.copy, params) for s in phema_stds}}


def all_finite(tree) -> jax.Array:
  """True when every leaf of the pytree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(objective, tx: optax.GradientTransformation, *, batch_size: int,
                    ema_halflife_images: float, ema_rampup_ratio: Optional[float] = 0.05,
                    skip_nonfinite: bool = False, lr_fn: Optional[Callable] = None,
                    phema_stds: Sequence[float] = (), step0: int = 0,
                    images_at_step0: float = 0.0) -> Callable:
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
    phema_stds: σ_rel of the power-function EMAs to track in `state.extra` (see `initial_extra`,
      which must have built the state's extra with the same values).
    step0, images_at_step0: images seen are n_img = images_at_step0 + (step − step0)·batch_size
      (`state.images_seen`; by default step·batch_size). A run resumed with another batch size
      passes the start of its segment (`runs.progress`), so that the EMA ramp and the post-hoc
      EMA profiles go on in images; lr_fn gets the same from the loop.

  Returns:
    train_step(state, batch, base_key) -> (new_state, metrics); metrics are scalars: loss,
    grad_norm, finite, ema_beta (and lr; with loss scaling also loss_scale, the S this step
    used, and grads_finite).
  """

  objective = objectives_base.as_objective(objective)
  phema_keys = [ema_lib.profile_key(s) for s in phema_stds]

  def train_step(state: state_lib.TrainState, batch, base_key):
    key = jax.random.fold_in(base_key, state.step)
    obj_extra = state.extra[OBJECTIVE] if phema_stds else state.extra
    scale = state_lib.loss_scale(state.opt_state)
    if scale is None:
      (value, aux), grads = jax.value_and_grad(objective.loss, has_aux=True)(
          state.params, batch, key, obj_extra)
    else:
      def scaled_loss(params):
        v, a = objective.loss(params, batch, key, obj_extra)
        return v * scale, (v, a)
      (_, (value, aux)), grads = jax.value_and_grad(scaled_loss, has_aux=True)(state.params)
      grads = jax.tree.map(lambda g: g / scale, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    beta = state_lib.ema_beta(state.step, batch_size, ema_halflife_images, ema_rampup_ratio,
                              step0=step0, images_at_step0=images_at_step0)
    ema_params = state_lib.update_ema(state.ema_params, params, beta)
    # Params are checked too: a finite gradient with a bad learning rate can still poison them.
    finite = jnp.isfinite(value) & all_finite(params)
    if scale is None:  # With loss scaling, a non-finite gradient only skips the update.
      finite = finite & all_finite(grads)
    extra = objective.update_extra(obj_extra, aux)
    if phema_stds:
      # EDM2 Eq. 127 with t = images seen after this step: β = 0 at the first step.
      t_next = state_lib.images_seen(state.step + 1, batch_size, step0, images_at_step0)
      extra = {OBJECTIVE: extra, PHEMA: {
          k: state_lib.update_ema(state.extra[PHEMA][k], params,
                                  ema_lib.power_function_beta(s, t_next, float(batch_size)))
          for k, s in zip(phema_keys, phema_stds)}}
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
    if scale is not None:
      metrics['loss_scale'] = scale
      metrics['grads_finite'] = all_finite(grads)
    return new_state, metrics

  return train_step
