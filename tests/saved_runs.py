"""A run on disk without training: a config saved with its initial state as checkpoint step 1.

Tests that compare two samplings or evaluations of the same weights need a run, not a trained
one; this skips compiling a train step.
"""

import os

import jax

from diffjax import build, runs
from diffjax import state as state_lib


def save_initialized_run(config, workdir: str) -> str:
  """Writes `config` and its initialized TrainState (step 1) into `workdir`; returns workdir."""
  spec = build.dataset_spec(config)
  denoiser = build.build_denoiser(config, spec)
  objective = build.build_objective(config, spec, denoiser)
  state = jax.jit(lambda: state_lib.create_train_state(
      build.init_params(denoiser.network, spec, jax.random.key(0)), build.build_optimizer(config),
      objective.init_extra()))()
  runs.save_config(config, workdir)
  checkpointer = runs.checkpoint.Checkpointer(os.path.join(workdir, runs.CHECKPOINT_DIR))
  checkpointer.save(1, state)
  checkpointer.close()
  return workdir
