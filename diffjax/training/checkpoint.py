"""Orbax checkpoints of the train state that cannot lie: fingerprinted, verified, never lost.

A thin layer over `orbax.checkpoint.CheckpointManager` (async saves, keep-N) that adds what Orbax
lacks (measured with Orbax 0.12: a damaged latest step raises on restore, and flipped bytes restore
*silently* with wrong values):

* **Fingerprints.** Every step is saved as two Orbax items committed together (one atomic rename
  of the step directory): `state`, the pytree, and `integrity`, a JSON record of a 64-bit
  fingerprint per array. Fingerprints are computed on device by one jitted integer reduction over
  each array's bits (a few elementwise ops per element; no extra host copy). The reduction is a
  sum modulo 2^32 of a bijective mix of (value bits, position), so it does not depend on how the
  array is sharded or in which order the devices reduce, and any change of a single element
  always changes it.
* **Verified restore.** A step is used only if it restores *and* its arrays match its fingerprints.
  Otherwise one warning line names it and the next older step is tried. A training run moves the
  unusable newer steps aside into `damaged/` (kept for inspection, out of Orbax's way: Orbax refuses
  to save a step number at or below its latest one). If no step is usable, `NoCheckpointError`
  says so instead of letting a run start from scratch over them.
* **Verified before anything is deleted.** Orbax's own keep-N collection is off: it would delete
  good old steps as soon as a newer one is *committed*, even if that one later proves unreadable.
  Here each committed step is read back and checked against its fingerprints (at the next save or
  at `wait()`/`close()`), and an older step is deleted only when a newer verified step is kept.
  Deletion renames the step into `.trash/` first (atomic), so a kill mid-delete never leaves a
  half-deleted step where a restore could pick it.
* **Kill-safe.** A hard kill leaves at worst an uncommitted `*.orbax-checkpoint-tmp-*` directory
  (ignored by restore, removed before the next save) or a `.trash/` entry (removed likewise).

Only process 0 renames and deletes; every process takes part in saving, restoring and verifying
(Orbax and the fingerprint reduction are collective), and their verdicts are combined so all agree.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

STATE_ITEM = 'state'
INTEGRITY_ITEM = 'integrity'
DAMAGED_DIR = 'damaged'  # unusable steps moved aside by a resuming run
TRASH_DIR = '.trash'     # steps being deleted (renamed here first, then removed)
TMP_MARKER = '.orbax-checkpoint-tmp'
INTEGRITY_FORMAT = 1


class NoCheckpointError(FileNotFoundError):
  """A workdir has no checkpoint that can be restored."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (full or read-only disk, lost permissions, ...)."""


class IntegrityError(ValueError):
  """A restored step does not match the fingerprints recorded when it was saved."""


# ------------------------------------------------------------------------------------------------
# Fingerprints.
# ------------------------------------------------------------------------------------------------


def _fmix32(h):
  """MurmurHash3's 32-bit finalizer: a bijection of uint32 that mixes every input bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x) -> jax.Array:
  """The bits of an array as a flat uint32 vector (one word per element, two for 8-byte dtypes)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.reshape(-1).astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  if size in (1, 2):
    unsigned = jnp.uint8 if size == 1 else jnp.uint16
    return jax.lax.bitcast_convert_type(x, unsigned).reshape(-1).astype(jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  raise TypeError(f'Cannot fingerprint arrays of dtype {x.dtype}.')


def _leaf_fingerprint(x) -> jax.Array:
  """uint32 [2]: two sums mod 2^32 of per-element mixes of (bits, position)."""
  w = _words(x)
  i = jnp.arange(w.shape[0], dtype=jnp.uint32)
  # For a fixed position each term is a bijection of the element's bits, so changing one element
  # always changes the sum; integer addition makes the result independent of reduction order.
  a = jnp.sum(_fmix32(w ^ _fmix32(i * jnp.uint32(2) + jnp.uint32(1))), dtype=jnp.uint32)
  b = jnp.sum(_fmix32(w + _fmix32(i * jnp.uint32(2) + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)
  return jnp.stack([a ^ jnp.uint32(w.shape[0] % 2**32), b])


@jax.jit
def _fingerprint_leaves(leaves):
  if not leaves:
    return jnp.zeros((0, 2), jnp.uint32)
  return jnp.stack([_leaf_fingerprint(x) for x in leaves])


def _key_name(key) -> str:
  for attr in ('name', 'key', 'idx'):  # GetAttrKey, DictKey, SequenceKey / FlattenedIndexKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_names(tree) -> List[str]:
  """'params/Conv_0/kernel'-style paths: the same whether a level is a dataclass, dict or list."""
  return ['/'.join(_key_name(k) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def fingerprints(tree: Any) -> Dict[str, str]:
  """Per-array fingerprints of a pytree: {key path: 16 hex digits}.

  Deterministic, and the same for the same values however they are sharded or placed.
  """
  leaves = jax.tree.leaves(tree)
  words = np.asarray(jax.device_get(_fingerprint_leaves(leaves)))
  return {name: f'{int(w[0]):08x}{int(w[1]):08x}' for name, w in zip(_leaf_names(tree), words)}


def _mismatches(expected: Dict[str, str], actual: Dict[str, str]) -> List[str]:
  names = sorted(set(expected) | set(actual))
  return [n for n in names if expected.get(n) != actual.get(n)]


# ------------------------------------------------------------------------------------------------
# Multi-process helpers (no-ops for one process).
# ------------------------------------------------------------------------------------------------


def _all_agree(ok: bool) -> bool:
  """True only if `ok` holds on every process (so all take the same branch)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray([ok], np.int32))))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _first_line(e: BaseException) -> str:
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return text if len(text) <= 200 else text[:197] + '...'


# ------------------------------------------------------------------------------------------------
# The checkpointer.
# ------------------------------------------------------------------------------------------------


class Checkpointer:
  """Saves, verifies and restores one pytree per step under `directory`.

  Args:
    directory: where step folders are written (created by the first save).
    max_to_keep: how many recent steps to keep (older ones go only once a newer one is verified).
    async_save: write in a background thread (the step loop goes on).
  """

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.max_to_keep = max(1, int(max_to_keep))
    self._async = async_save
    self._manager = None
    self._verified: set[int] = set()   # steps read back (or restored) and matched here
    self._pending: list[tuple[int, Any]] = []  # committed or in-flight, not yet verified
    self._cleaned = False
    self.skipped: list[int] = []  # unusable steps passed over by the last restore()
    self._is_main = jax.process_index() == 0

  # -- Orbax ------------------------------------------------------------------------------------

  def _get_manager(self, create: bool = False):
    if self._manager is None:
      if not os.path.isdir(self.directory):
        if not create:
          return None
        if self._is_main:
          os.makedirs(self.directory, exist_ok=True)
        _barrier('diffjax_checkpoint_mkdir')
      # Explicit item handlers: a damaged step (an item directory gone) must not break the
      # manager for every other step. max_to_keep=None: deletion is ours (after verification).
      self._manager = ocp.CheckpointManager(
          self.directory,
          item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                         INTEGRITY_ITEM: ocp.JsonCheckpointHandler()},
          options=ocp.CheckpointManagerOptions(
              max_to_keep=None, enable_async_checkpointing=self._async, create=False))
    return self._manager

  def steps(self) -> list[int]:
    """Committed steps, oldest first."""
    manager = self._get_manager()
    if manager is None:
      return []
    manager.reload()
    return sorted(manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # -- Saving -----------------------------------------------------------------------------------

  def _remove_leftovers(self) -> None:
    """Removes what a hard kill can leave: uncommitted tmp steps and half-deleted trash."""
    if not self._is_main or not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if TMP_MARKER in name or name == TRASH_DIR:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def save(self, step: int, tree: Any, force: bool = False) -> bool:
    """Starts saving `tree` as `step`; returns False if that step exists already.

    Waits for the previous save to commit, verifies it and collects old steps first.

    Raises:
      CheckpointSaveError: the step (or the previous one) could not be written.
    """
    del force  # Every call saves (the loop decides when); kept for callers of the old API.
    # Fingerprinted before Orbax sees the arrays (the loop blocks every step, so this waits for
    # nothing); a failure here is a bug, not an I/O error, so it is not reworded below.
    record = {'format': INTEGRITY_FORMAT, 'step': int(step), 'fingerprints': fingerprints(tree)}
    abstract = abstract_like(tree, keep_sharding=True)
    try:
      manager = self._get_manager(create=True)
      if not self._cleaned:
        self._remove_leftovers()
        self._cleaned = True
      self._settle()
      if step in self.steps():
        return False
      saved = manager.save(step, force=True, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardSave(tree), INTEGRITY_ITEM: ocp.args.JsonSave(record)}))
    except CheckpointSaveError:
      raise
    except Exception as e:  # Orbax wraps I/O errors in many types; all mean "not written".
      raise self._save_error(step, e) from e
    if saved:
      self._pending.append((step, abstract))
    return bool(saved)

  def _save_error(self, step: int, e: BaseException) -> CheckpointSaveError:
    good = sorted(self._verified)
    where = (f'the last verified checkpoint is step {good[-1]}' if good else
             'no checkpoint of this run was verified yet')
    return CheckpointSaveError(
        f'Could not write checkpoint step {step} to {self.directory} ({_first_line(e)}); {where}. '
        'Free disk space or fix the permissions, then rerun the same command to resume.')

  def wait(self) -> None:
    """Blocks until pending saves are committed, then verifies them and collects old steps.

    Raises:
      CheckpointSaveError: a pending save failed.
    """
    try:
      self._settle()
    except CheckpointSaveError:
      raise
    except Exception as e:  # An async write that failed surfaces here.
      step = self._pending[-1][0] if self._pending else -1
      self._pending = []
      raise self._save_error(step, e) from e

  def _settle(self) -> None:
    if self._manager is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      step = self._pending[-1][0] if self._pending else -1
      self._pending = []
      raise self._save_error(step, e) from e
    if not self._pending:
      return
    # Every process must see the same committed steps before verifying (a collective).
    _barrier('diffjax_checkpoint_settle')
    pending, self._pending = self._pending, []
    committed = set(self.steps())
    for step, abstract in pending:
      if step not in committed:
        log.warning('Checkpoint step %d was not committed to %s.', step, self.directory)
        continue
      try:
        self._restore_verified(step, abstract)
      except Exception as e:  # noqa: BLE001 - any failure means the step can't be trusted.
        log.warning('Checkpoint step %d in %s failed verification right after saving (%s); it is '
                    'moved to %s/ and older checkpoints are kept.', step, self.directory,
                    _first_line(e), DAMAGED_DIR)
        self._move_aside([step])
        continue
      self._verified.add(step)
    self._collect_garbage()

  def _collect_garbage(self) -> None:
    """Keeps the newest `max_to_keep` steps, and every step newer than the newest verified one.

    A step is deleted only if a newer *verified* step stays, so a new step that turns out to be
    unreadable never costs the last good one. Process 0 decides and deletes; the others wait.
    """
    if self._is_main:
      steps = self.steps()
      verified = [s for s in steps if s in self._verified]
      newest_good = verified[-1] if verified else None
      doomed = []
      if newest_good is not None:
        keep = set(steps[-self.max_to_keep:]) | {s for s in steps if s >= newest_good}
        doomed = [s for s in steps if s not in keep]
      if doomed:
        trash = os.path.join(self.directory, TRASH_DIR)
        os.makedirs(trash, exist_ok=True)
      for s in doomed:
        # Rename first (atomic): a kill mid-delete must never leave a half-deleted step that a
        # restore could pick.
        target = os.path.join(trash, f'{s}-{os.getpid()}-{time.time_ns()}')
        os.rename(self._step_dir(s), target)
        shutil.rmtree(target, ignore_errors=True)
      if doomed:
        try:
          os.rmdir(os.path.join(self.directory, TRASH_DIR))
        except OSError:  # Not empty: a removal failed; the next run's first save retries.
          pass
    _barrier('diffjax_checkpoint_gc')
    self._verified &= set(self.steps())

  def _move_aside(self, steps: List[int]) -> None:
    """Moves unusable steps into damaged/ (process 0), so the run can save those steps again."""
    if self._is_main:
      damaged = os.path.join(self.directory, DAMAGED_DIR)
      os.makedirs(damaged, exist_ok=True)
      for s in steps:
        target = os.path.join(damaged, str(s))
        n = 1
        while os.path.exists(target):
          target, n = os.path.join(damaged, f'{s}.{n}'), n + 1
        if os.path.isdir(self._step_dir(s)):
          os.rename(self._step_dir(s), target)
    _barrier('diffjax_checkpoint_move_aside')
    if self._manager is not None:
      self._manager.reload()

  # -- Restoring --------------------------------------------------------------------------------

  def _restore_verified(self, step: int, abstract_tree: Any) -> Any:
    """Restores `step` and checks it against its fingerprints (raises if either fails)."""
    manager = self._get_manager()
    ok, error, tree = True, None, None
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardRestore(abstract_tree),
          INTEGRITY_ITEM: ocp.args.JsonRestore()}))
      tree, record = restored[STATE_ITEM], restored[INTEGRITY_ITEM]
      if not isinstance(record, dict) or 'fingerprints' not in record:
        raise IntegrityError('its integrity record is missing or unreadable')
      bad = _mismatches(record['fingerprints'], fingerprints(tree))
      if bad:
        more = f' and {len(bad) - 1} more' if len(bad) > 1 else ''
        raise IntegrityError(f'the data of {bad[0]}{more} does not match the '
                             'fingerprints recorded when it was saved')
    except Exception as e:  # noqa: BLE001 - reported by the caller.
      ok, error = False, e
    if not _all_agree(ok):
      raise error or IntegrityError('another process could not restore it')
    return tree

  def restore(self, abstract_tree: Any, step: Optional[int] = None,
              move_aside: bool = False) -> Tuple[Any, int]:
    """Restores `step`, or the newest step that restores and verifies, onto `abstract_tree`.

    Args:
      abstract_tree: ShapeDtypeStructs (with shardings) of the tree to restore.
      step: a specific step; None: the newest usable one.
      move_aside: move unusable steps newer than the restored one into damaged/ (a training run
        does this so it can save those step numbers again; readers leave the directory as is).

    Raises:
      NoCheckpointError: when no step restores and verifies.
    """
    steps = self.steps()
    if step is not None and step not in steps:
      known = ', '.join(map(str, steps)) or 'none'
      raise NoCheckpointError(f'There is no checkpoint step {step} in {self.directory} (steps: '
                              f'{known}); pass one of them, or omit the step for the newest.')
    candidates = [step] if step is not None else list(reversed(steps))
    if not candidates:
      raise NoCheckpointError(f'No checkpoint in {self.directory}; train first (train.py).')
    failed = self.skipped = []
    for i, s in enumerate(candidates):
      try:
        tree = self._restore_verified(s, abstract_tree)
      except Exception as e:  # noqa: BLE001 - damaged steps are skipped, not fatal.
        older = 'trying an older one' if i + 1 < len(candidates) else 'no older one is left'
        log.warning('Skipping checkpoint step %d in %s: %s; %s.', s, self.directory,
                    _first_line(e), older)
        failed.append(s)
        continue
      if failed and move_aside:
        self._move_aside(failed)
      self._verified.add(s)
      return tree, s
    listed = ', '.join(map(str, failed))
    raise NoCheckpointError(
        f'No checkpoint in {self.directory} could be restored (tried step(s) {listed}): they are '
        'damaged or belong to a different model or optimizer config. Rerun with the config they '
        'were trained with, or move the directory aside to train from scratch.')

  def saved_structure(self, step: Optional[int] = None) -> Any:
    """The saved tree of `step` (default: the newest) as ShapeDtypeStructs, read from metadata.

    For restoring parts whose shapes the config cannot rebuild (e.g. a teacher kept in
    TrainState.extra). Dataclass levels come back as dicts. None if it cannot be read.
    """
    try:
      steps = self.steps()
      step = steps[-1] if step is None and steps else step
      if step is None:
        return None
      metadata = self._get_manager().item_metadata(step)[STATE_ITEM]
      tree = getattr(metadata, 'tree', metadata)
      return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                          is_leaf=lambda m: hasattr(m, 'shape') and hasattr(m, 'dtype'))
    except Exception:  # noqa: BLE001 - a damaged step: the caller's own structure is used.
      return None

  def close(self) -> None:
    """Waits for pending saves, verifies them and collects old steps."""
    try:
      self.wait()
    finally:
      if self._manager is not None:
        self._manager.close()
        self._manager = None


def abstract_like(tree: Any, sharding=None, keep_sharding: bool = False) -> Any:
  """ShapeDtypeStructs of `tree` for Orbax restore targets.

  Args:
    tree: arrays (or ShapeDtypeStructs).
    sharding: the sharding every leaf gets.
    keep_sharding: use each leaf's own sharding instead.
  """
  def one(x):
    s = getattr(x, 'sharding', None) if keep_sharding else sharding
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return jax.tree.map(one, tree)
