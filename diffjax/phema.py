"""Post-hoc EMA: a run with any EMA length, reconstructed after training (EDM2 §3, Algorithm 3).

    python -m diffjax.phema --workdir=W --std=0.07 [--step=N] --out=W2

A run trained with `config.train.phema_stds` (the edm2 configs: σ_rel 0.05 and 0.10) tracks those
power-function EMAs in its train state, so every checkpoint in W/checkpoints is a snapshot of them
at its step: integrity-checked like every checkpoint (the edm2 configs keep them all). This module
reads the snapshots up to step N (default: the newest), solves for the weights of the least-squares
combination that best matches the power-function profile (N·batch images, σ_rel = --std)
(`ema.posthoc_coefficients`), sums the snapshots with them in float64, and writes W2: W's config
(without post-hoc tracking) and one checkpoint at step N whose EMA params are the reconstruction
and whose params and optimizer state are W's at step N. W2 samples and evaluates like any other
run (`sample.py --workdir=W2`, `evaluate.py ... --workdir=W2`, `diffjax.load(W2)`).

The module sits on the top layer beside `cli` (it is an entry point of its own; `cli` and it do not
import each other).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, List, Optional

import jax
import numpy as np

from diffjax import build, runs
from diffjax import ema as ema_lib
from diffjax import state as state_lib
from diffjax.runs import checkpoint as ckpt_lib
from diffjax.runs import progress
from diffjax.training import loop as loop_lib
from diffjax.training import step as step_lib


@dataclasses.dataclass
class Reconstruction:
  """A post-hoc EMA reconstruction.

  Attributes:
    config: the source run's config.
    step: the step reconstructed at (the snapshots used are those at steps ≤ step).
    std: the reconstructed σ_rel.
    state: the source run's TrainState at `step`, its EMA replaced by the reconstruction and its
      extra by the objective's own (no tracked profiles).
    snapshots: (step, σ_rel, coefficient) of every snapshot profile used.
  """
  config: Any
  step: int
  std: float
  state: Any
  snapshots: List[tuple]


def _parts(config):
  spec = build.dataset_spec(config)
  denoiser = build.build_denoiser(config, spec)
  tx = build.build_optimizer(config)
  objective = build.build_objective(config, spec, denoiser)
  return spec, denoiser, tx, objective


def reconstruct(workdir: str, std: float, step: Optional[int] = None) -> Reconstruction:
  """Reconstructs the power-function EMA σ_rel = `std` of `workdir` at `step`.

  Args:
    workdir: a run trained with config.train.phema_stds.
    std: target σ_rel ∈ (0, 0.2887).
    step: a checkpoint step of the run; None = the newest.

  Raises:
    ValueError: the run tracks no post-hoc EMA, or σ_rel is out of range.
    checkpoint.NoCheckpointError: no (such) checkpoint, or one that does not verify.
  """
  ema_lib.std_to_exp(std)  # One sentence on a σ_rel out of range, before any work.
  config = runs.read_config(workdir)
  stds = loop_lib.phema_stds(config)
  if not stds:
    raise ValueError(f'{workdir} tracks no post-hoc EMA (config.train.phema_stds is empty); train '
                     'with configs/edm2.py, or set --config.train.phema_stds=0.05,0.10.')
  spec, denoiser, tx, objective = _parts(config)

  def make_state():
    params = build.init_params(denoiser.network, spec, jax.random.key(0))
    return state_lib.create_train_state(params, tx, step_lib.initial_extra(objective, params, stds))

  abstract = jax.eval_shape(make_state)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, runs.CHECKPOINT_DIR), async_save=False)
  try:
    steps = checkpointer.steps()
    if step is None:
      if not steps:
        raise ckpt_lib.NoCheckpointError(f'No checkpoint in {workdir}; train first (train.py).')
      step = steps[-1]
    elif step not in steps:
      raise ckpt_lib.NoCheckpointError(
          f'There is no checkpoint step {step} in {workdir} (steps: '
          f'{", ".join(map(str, steps)) or "none"}); pass one of them, or no --step.')
    used = [s for s in steps if 0 < s <= step]
    # Snapshot times in images seen (runs.progress: the batch size may have changed on a resume).
    segments = progress.read_segments(workdir, int(config.train.batch_size))
    keys = [ema_lib.profile_key(s) for s in stds]
    times = np.repeat([float(progress.images_at(segments, s)) for s in used], len(stds))
    coefs = ema_lib.posthoc_coefficients(times, np.tile(stds, len(used)),
                                         float(progress.images_at(segments, step)), std)[:, 0]
    total, last, snapshots = None, None, []
    for i, s in enumerate(used):
      # Each snapshot is restored, verified against its fingerprints and folded in, one at a time.
      state, _ = checkpointer.restore(abstract, s)
      for j, key in enumerate(keys):
        c = coefs[i * len(keys) + j]
        snapshots.append((s, stds[j], float(c)))
        part = jax.tree.map(lambda a, c=c: c * np.asarray(a, np.float64),
                            state.extra[step_lib.PHEMA][key])
        total = part if total is None else jax.tree.map(np.add, total, part)
      last = state
  finally:
    checkpointer.close()
  ema_params = jax.tree.map(lambda t, a: np.asarray(t, np.asarray(a).dtype), total, last.params)
  state = last.replace(ema_params=ema_params, extra=last.extra[step_lib.OBJECTIVE])
  return Reconstruction(config=config, step=step, std=float(std), state=state,
                        snapshots=snapshots)


def write_run(rec: Reconstruction, out: str, source: str = '') -> str:
  """Writes the reconstruction as a run in `out`: config.json and one verified checkpoint.

  Raises:
    ValueError: `out` already holds a run (it is not overwritten).
  """
  if os.path.exists(os.path.join(out, runs.CONFIG_FILE)) or os.path.isdir(
      os.path.join(out, runs.CHECKPOINT_DIR)):
    raise ValueError(f'--out {out} already holds a run; pass a new directory.')
  config = rec.config.copy_and_resolve_references()
  config.train.phema_stds = []  # A plain run: its EMA is the reconstruction, nothing is tracked.
  config.phema = {'source': os.path.abspath(source) if source else '', 'std': rec.std,
                  'step': rec.step}
  checkpointer = ckpt_lib.Checkpointer(os.path.join(out, runs.CHECKPOINT_DIR), async_save=False)
  try:
    checkpointer.save(rec.step, jax.device_put(rec.state))
  finally:
    checkpointer.close()  # Waits for the save and verifies it.
  runs.save_config(config, out)
  return out


def main(argv=None) -> int:
  """The command line: `python -m diffjax.phema --workdir=W --std=0.07 [--step=N] --out=W2`."""
  import argparse
  parser = argparse.ArgumentParser(prog='python -m diffjax.phema',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a run trained with train.phema_stds')
  parser.add_argument('--std', type=float, required=True, help='target σ_rel, e.g. 0.07')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: newest)')
  parser.add_argument('--out', required=True, help='directory of the reconstructed run')
  args = parser.parse_args(argv)
  try:
    rec = reconstruct(args.workdir, args.std, args.step)
    write_run(rec, args.out, source=args.workdir)
  except (ValueError, FileNotFoundError, OSError) as e:
    print(f'Error: {e}', file=sys.stderr)
    return 1
  weights = ', '.join(f'{s}@{std:.3f}: {c:+.3f}' for s, std, c in rec.snapshots)
  print(f'Wrote {args.out}: σ_rel {rec.std:.3f} at step {rec.step} from {len(rec.snapshots)} '
        f'snapshot profiles ({weights}).', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
