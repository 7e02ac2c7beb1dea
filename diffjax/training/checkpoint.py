"""Orbax checkpoints of the train state, with fallback to the newest step that restores.

A thin layer over `orbax.checkpoint.CheckpointManager` (async saves, keep-N). Orbax raises when the
latest step is damaged (a deleted or truncated file); restoring here then warns in one line and
falls back to the next older step instead of losing the run.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class NoCheckpointError(FileNotFoundError):
  """A workdir has no checkpoint that can be restored."""


class Checkpointer:
  """Saves and restores one pytree per step under `directory`.

  Args:
    directory: where step folders are written (created if missing).
    max_to_keep: how many recent steps to keep.
    async_save: write in a background thread (the step loop goes on).
  """

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True))

  def steps(self) -> list[int]:
    """Committed steps, oldest first."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, tree: Any, force: bool = False) -> bool:
    """Starts saving `tree` as `step` (returns False if that step exists already)."""
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.StandardSave(tree), force=force)

  def wait(self) -> None:
    """Blocks until pending async saves are committed."""
    self._manager.wait_until_finished()

  def restore(self, abstract_tree: Any, step: Optional[int] = None) -> Tuple[Any, int]:
    """Restores `step`, or the newest step that restores, onto `abstract_tree`'s shapes/shardings.

    Raises:
      NoCheckpointError: when no step restores.
    """
    candidates = [step] if step is not None else list(reversed(self.steps()))
    if not candidates:
      raise NoCheckpointError(f'No checkpoint in {self.directory}; train first (train.py).')
    errors = []
    for s in candidates:
      try:
        return self._manager.restore(s, args=ocp.args.StandardRestore(abstract_tree)), s
      except Exception as e:  # Orbax raises many types for damaged files; all mean "skip it".
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.warning('Checkpoint step %d in %s could not be restored (%s); trying an older one.',
                    s, self.directory, first_line[:200])
        errors.append(s)
    raise NoCheckpointError(
        f'None of the checkpoints {errors} in {self.directory} could be restored; they may be '
        'damaged or from a different model. Move the directory aside to train from scratch.')

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, sharding=None) -> Any:
  """ShapeDtypeStructs of `tree` (with `sharding`, if given) for Orbax restore targets."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
