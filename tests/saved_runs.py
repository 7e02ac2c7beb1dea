"""A run on disk without training: a config saved with its initial state as checkpoint step 1.

Tests that compare two samplings or evaluations of the same weights need a run, not a trained
one; this skips compiling a train step.
"""

import os

import jax
import jax.numpy as jnp
import optax

from diffjax import build, runs
from diffjax import state as state_lib


def save_initialized_run(config, workdir: str, *, counters_at_step: bool = False) -> str:
  """Writes `config` and its initialized TrainState (step 1) into `workdir`; returns workdir.

  counters_at_step: also set the state's and the optimizer's step counters to 1, as a run that
    trained one step has them (for resume tests; sampling reads the weights only).
  """
  spec = build.dataset_spec(config)
  denoiser = build.build_denoiser(config, spec)
  objective = build.build_objective(config, spec, denoiser)
  state = jax.jit(lambda: state_lib.create_train_state(
      build.init_params(denoiser.network, spec, jax.random.key(0)), build.build_optimizer(config),
      objective.init_extra()))()
  if counters_at_step:
    one = jnp.ones((), jnp.int32)
    state = state.replace(step=one, opt_state=optax.tree_utils.tree_set(state.opt_state, count=one))
  runs.save_config(config, workdir)
  checkpointer = runs.checkpoint.Checkpointer(os.path.join(workdir, runs.CHECKPOINT_DIR))
  checkpointer.save(1, state)
  checkpointer.close()
  return workdir
