"""Orbax checkpoints of the train state that cannot lie: fingerprinted, verified, never lost.

A thin layer over `orbax.checkpoint.CheckpointManager` (async saves) that adds what Orbax lacks
(measured with Orbax 0.12: a damaged latest step raises on restore, and flipped bytes restore
*silently* with wrong values):

* **Fingerprints.** A save first copies the (replicated) state to host memory once — Orbax would
  copy it anyway, and handing it host arrays is also far cheaper than letting it slice device
  arrays — and hashes that copy: a 64-bit fingerprint per array, a sum modulo 2^32 of a bijective
  mix of each element's bits and position, so it is deterministic, independent of sharding, and
  changes whenever any single element does. The step is saved as two Orbax items committed
  together by one atomic rename of the step directory: `state`, the arrays, and `integrity`, a JSON
  record of their fingerprints.
* **Verified restore.** A step is used only if it restores *and* its arrays match its fingerprints.
  Otherwise one warning line names it and the next older step is tried. A training run moves the
  unusable newer steps aside into `damaged/` (kept for inspection, and out of Orbax's way: it
  refuses to save a step number at or below its latest one). If no step is usable,
  `NoCheckpointError` says so, instead of a run starting from scratch over them.
* **Verified before anything is deleted.** Orbax's own keep-N collection is off: it deletes old
  steps as soon as a newer one is *committed*, even if that one later proves unreadable. Here old
  steps are deleted only while one of the newest `max_to_keep` is verified — read back and checked
  against its fingerprints (done when a deletion needs it, and for the step a run stops at).
  Deletion renames the step into `.trash/` first (atomic), so a kill mid-delete never leaves a
  half-deleted step where a restore could pick it up.
* **Kill-safe.** A hard kill at any moment leaves at worst an uncommitted
  `<step>.orbax-checkpoint-tmp-*` directory (never restored; removed before the next save) or a
  `.trash/` entry (removed likewise); committed steps are only ever renamed, never rewritten.

Multi-host: only process 0 writes the (replicated) arrays, renames and deletes; every process takes
part in Orbax's save/restore barriers and verifies what it read, and the verdicts are combined so
all processes take the same branch. The state must be fully replicated (data parallelism); an
FSDP-sharded state would need device-side saving and fingerprints.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from diffjax import parallel
from diffjax.runs import files

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


class StepExistsError(CheckpointSaveError):
  """The step being saved is already on disk: another run is writing the same directory."""


class IntegrityError(ValueError):
  """A restored step does not match the fingerprints recorded when it was saved."""


# ------------------------------------------------------------------------------------------------
# Fingerprints.
# ------------------------------------------------------------------------------------------------


_CHUNK = 1 << 22  # elements hashed at a time: bounds the temporaries for very large arrays


def _fmix32(h: np.ndarray) -> np.ndarray:
  """MurmurHash3's 32-bit finalizer, in place: a bijection of uint32 that mixes every input bit."""
  h ^= h >> np.uint32(16)
  h *= np.uint32(0x85EBCA6B)
  h ^= h >> np.uint32(13)
  h *= np.uint32(0xC2B2AE35)
  h ^= h >> np.uint32(16)
  return h


def _words(x: np.ndarray) -> np.ndarray:
  """The bits of an array as a flat uint32 vector (one word per element, two for 8-byte dtypes)."""
  x = np.ascontiguousarray(x).reshape(-1)
  if x.dtype == np.bool_:
    return x.astype(np.uint32)
  size = x.dtype.itemsize
  if size in (1, 2):
    return x.view(np.uint8 if size == 1 else np.uint16).astype(np.uint32)
  if size in (4, 8):
    return x.view(np.uint32)
  raise TypeError(f'Cannot fingerprint arrays of dtype {x.dtype}.')


def array_fingerprint(x) -> str:
  """64-bit fingerprint of one array's values (16 hex digits).

  Two sums mod 2^32 over elements k of fmix32(w_k ^ fmix32(2k+1)) and fmix32(w_k + fmix32(2k+c)),
  with w_k the element's bits: for a fixed position each term is a bijection of the bits, so any
  change of one element changes both sums; integer sums don't depend on summation order.
  """
  w = _words(np.asarray(x))
  a = b = np.uint32(0)
  with np.errstate(over='ignore'):
    for lo in range(0, max(len(w), 1), _CHUNK):
      chunk = w[lo:lo + _CHUNK]
      pos = np.arange(lo, lo + len(chunk), dtype=np.uint32) * np.uint32(2)
      a += np.sum(_fmix32(chunk ^ _fmix32(pos + np.uint32(1))), dtype=np.uint32)
      b += np.sum(_fmix32(chunk + _fmix32(pos + np.uint32(0x9E3779B9))), dtype=np.uint32)
    a ^= np.uint32(len(w) % 2**32)
  return f'{int(a):08x}{int(b):08x}'


def fingerprints(host_tree: Any) -> Dict[str, str]:
  """Per-array fingerprints of a pytree of host arrays: {'params/Conv_0/kernel': 16 hex digits}."""
  return {name: array_fingerprint(x)
          for name, x in zip(_leaf_names(host_tree), jax.tree.leaves(host_tree))}


def _key_name(key) -> str:
  for attr in ('name', 'key', 'idx'):  # GetAttrKey, DictKey, SequenceKey / FlattenedIndexKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_names(tree) -> List[str]:
  """'params/Conv_0/kernel'-style paths: the same whether a level is a dataclass, dict or list."""
  return ['/'.join(_key_name(k) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _mismatches(expected: Dict[str, str], actual: Dict[str, str]) -> List[str]:
  names = sorted(set(expected) | set(actual))
  return [n for n in names if expected.get(n) != actual.get(n)]


# ------------------------------------------------------------------------------------------------
# Multi-process helpers (no-ops for one process).
# ------------------------------------------------------------------------------------------------


# Multi-host coordination goes through the jax.distributed key-value store, not device
# collectives: a process that is still compiling or writing may arrive minutes late, which a
# store barrier waits for, while CPU (gloo) collectives give up after 30 s.
_SYNC_TIMEOUT_MS = 30 * 60 * 1000
_sync_ids = itertools.count()  # every process makes the same sequence of calls


def _client():
  return parallel.distributed_client()


def _all_agree(ok: bool) -> bool:
  """True only if `ok` holds on every process (so all take the same branch)."""
  if jax.process_count() == 1:
    return ok
  key = f'diffjax_checkpoint_agree_{next(_sync_ids)}'
  _client().key_value_set(f'{key}/{jax.process_index()}', '1' if ok else '0')
  return all(_client().blocking_key_value_get(f'{key}/{i}', _SYNC_TIMEOUT_MS) == '1'
             for i in range(jax.process_count()))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    _client().wait_at_barrier(f'{name}_{next(_sync_ids)}', _SYNC_TIMEOUT_MS)


def _errno(e: BaseException) -> Optional[int]:
  """The errno of the first OSError in an exception's cause/context chain (Orbax wraps them)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno:
      return e.errno
    e = e.__cause__ or e.__context__
  return None


def _first_line(e: BaseException) -> str:
  text = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(':')
  return text if len(text) <= 200 else text[:197] + '...'


# ------------------------------------------------------------------------------------------------
# The checkpointer.
# ------------------------------------------------------------------------------------------------


class Checkpointer:
  """Saves, verifies and restores one pytree per step under `directory`.

  Args:
    directory: where step folders are written (created by the first save): a local path or a
      URL such as gs://bucket/run/checkpoints (through etils.epath, which Orbax takes natively).
    max_to_keep: how many recent steps to keep (an older one goes only once a newer one is
      verified).
    async_save: write in a background thread (the step loop goes on).
  """

  def __init__(self, directory: files.PathLike, max_to_keep: int = 3, async_save: bool = True):
    self._path = files.path(directory)
    self.directory = os.fspath(self._path)  # str, for messages
    self.max_to_keep = max(1, int(max_to_keep))
    self.skipped: list[int] = []  # unusable steps passed over by the last restore()
    self._async = async_save
    self._manager = None
    self._verified: set[int] = set()   # steps read back (or restored) and matched here
    self._pending: list[tuple[int, Any]] = []  # (step, abstract host tree) not yet verified
    self._cleaned = False
    self._failed = False
    self._seen_dir = False   # the directory existed at a save: gone later means it vanished
    self._abstract = None    # structure of the last tree saved (to verify a step in an error)
    self._is_main = jax.process_index() == 0

  # -- Orbax ------------------------------------------------------------------------------------

  def _get_manager(self, create: bool = False):
    if self._manager is None:
      if create:
        # Every process passes the barrier (whether or not it saw the directory missing: process
        # 0 may already have made it), and none goes on before it exists.
        if self._is_main:
          self._path.mkdir(parents=True, exist_ok=True)
        _barrier('diffjax_checkpoint_mkdir')
      elif not self._path.is_dir():
        return None
      # Explicit item handlers: a damaged step (an item directory gone) must not break the
      # manager for the other steps. max_to_keep=None: deletion is ours, after verification.
      self._manager = ocp.CheckpointManager(
          self._path,
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

  def _step_dir(self, step: int):
    return self._path / str(step)

  # -- Saving -----------------------------------------------------------------------------------

  def _remove_leftovers(self) -> None:
    """Removes what a hard kill can leave: uncommitted tmp steps and half-deleted trash."""
    if not self._is_main or not self._path.is_dir():
      return
    for entry in self._path.iterdir():
      if TMP_MARKER in entry.name or entry.name == TRASH_DIR:
        files.remove_tree(entry)

  def save(self, step: int, tree: Any, force: bool = False) -> bool:
    """Starts saving `tree` as `step` (returns True once the save is under way).

    First waits for the previous save to commit, verifies it and collects old steps, then checks
    synchronously that the directory is still there and writable: a save Orbax starts into a
    directory that cannot be written leaves background threads waiting minutes for each other.

    Raises:
      StepExistsError: the step is on disk already (another run writes this directory).
      CheckpointSaveError: this step (or the previous one) could not be written; the message says
        why (directory gone, permissions, disk full) and names the newest good step.
    """
    del force  # Every call saves (the loop decides when); kept for callers of the old API.
    if self._failed:
      raise CheckpointSaveError('An earlier checkpoint save failed; see the error above.')
    # One device-to-host copy, fingerprinted and handed to Orbax as is. Outside the try below: a
    # failure here is not an I/O error.
    host = jax.device_get(tree)
    record = {'format': INTEGRITY_FORMAT, 'step': int(step), 'fingerprints': fingerprints(host)}
    try:
      if self._is_main and self._seen_dir and not self._path.is_dir():
        raise FileNotFoundError(errno.ENOENT, 'No such directory', self.directory)
      manager = self._get_manager(create=True)
      self._seen_dir = True
      if not self._cleaned:
        self._remove_leftovers()
        self._cleaned = True
      self._settle()
      if step in self.steps():
        self._failed = True
        raise StepExistsError(
            f'Checkpoint step {step} already exists in {self.directory}: another run is writing '
            f'this directory ({self._last_good()}); stop the other run, or pass another '
            '--workdir.')
      if self._is_main:
        self._probe()
      saved = manager.save(step, force=True, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardSave(host), INTEGRITY_ITEM: ocp.args.JsonSave(record)}))
    except CheckpointSaveError:
      raise
    except Exception as e:  # Orbax wraps I/O errors in many types; all mean "not written".
      raise self._save_error(step, e) from e
    if saved:
      self._pending.append((step, jax.tree.map(_host_abstract, host)))
      self._abstract = self._pending[-1][1]
    return bool(saved)

  def _probe(self) -> None:
    """Writes and removes a small file: raises the OSError a save into the directory would meet."""
    path = self._path / f'.write-probe-{os.getpid()}'
    with path.open('wb') as f:
      f.write(b'\0' * 4096)
      f.flush()
      if files.is_local(path):  # an object store commits on close
        os.fsync(f.fileno())
    path.unlink()

  def _last_good(self) -> str:
    """What a rerun does: 'it resumes from step N, …' (verified, read back now if need be) or not."""
    try:
      on_disk = self.steps() if self._path.is_dir() else []
    except Exception:  # noqa: BLE001 - the directory is unreadable.
      on_disk = []
    good = sorted(self._verified.intersection(on_disk))
    newer = [s for s in on_disk if not good or s > good[-1]]
    if newer and self._abstract is not None and jax.process_count() == 1:
      try:  # A committed step not yet read back: check it now, so the message can be trusted.
        self._read_verified(newer[-1], self._abstract)
        good.append(newer[-1])
      except Exception:  # noqa: BLE001 - not usable: the older verified one is named.
        pass
    if good:
      return f'it resumes from step {good[-1]}, the newest verified checkpoint'
    if not on_disk:
      return 'no checkpoint of this run is left there, so it starts over'
    return 'no checkpoint of this run was verified yet; it resumes from the newest usable one'

  def _save_error(self, step: int, e: BaseException) -> CheckpointSaveError:
    self._failed = True
    self._pending = []
    code = _errno(e)
    if code == errno.ENOSPC or code == errno.EDQUOT:
      what, fix = 'the disk is full', 'free disk space'
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
      what, fix = ('the directory is not writable (permissions, a read-only or immutable file '
                   'system)'), 'make it writable'
    elif code in (errno.ENOENT, errno.ENOTDIR) or not self._path.is_dir():
      what, fix = ('the directory has vanished (deleted, moved or unmounted)',
                   'restore it or pass another --workdir')
    else:
      what, fix = _first_line(e), 'fix the cause'
    return CheckpointSaveError(
        f'Could not write checkpoint step {step} to {self.directory}: {what} '
        f'({_first_line(e)}). {fix[0].upper()}{fix[1:]}, then rerun the same command: '
        f'{self._last_good()}.')

  def poll(self) -> None:
    """Raises at once if the save in flight has failed (cheap; the loop calls it every step).

    Raises:
      CheckpointSaveError: the save in flight failed.
    """
    if self._failed or self._manager is None or not self._pending:
      return
    if not self._manager.is_saving_in_progress():
      self._settle()

  def wait(self) -> None:
    """Blocks until pending saves are committed, verifies the newest and collects old steps.

    Raises:
      CheckpointSaveError: a pending save failed.
    """
    if not self._failed:
      self._settle(final=True)

  def _settle(self, final: bool = False) -> None:
    """Waits for the save in flight; verifies what must be verified; deletes what may go.

    Verifying means reading a step back, so it is done when needed rather than after every save:
    when old steps are due for deletion and none of the steps that stay is verified (then the
    newest is read back), and at the end (`final`: the step a run stops at is checked at once).
    """
    if self._manager is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # An async write that failed surfaces here.
      raise self._save_error(self._pending[-1][0] if self._pending else -1, e) from e
    if not self._pending:
      return
    # Every process must see the same committed steps before reading any (a collective).
    _barrier('diffjax_checkpoint_settle')
    pending, self._pending = self._pending, []
    steps = self.steps()
    keep = steps[-self.max_to_keep:]
    if final or (len(steps) > len(keep) and not self._verified.intersection(keep)):
      for step, abstract in reversed(pending):  # The newest committed one that verifies.
        if step not in steps:
          log.warning('Checkpoint step %d was not committed to %s.', step, self.directory)
          continue
        try:
          self._read_verified(step, abstract)
        except Exception as e:  # noqa: BLE001 - any failure means the step can't be trusted.
          log.warning('Checkpoint step %d in %s failed verification right after saving (%s); it '
                      'is moved to %s/ and older checkpoints are kept.', step, self.directory,
                      _first_line(e), DAMAGED_DIR)
          self._move_aside([step])
          continue
        self._verified.add(step)
        break
    self._collect_garbage()

  def _collect_garbage(self) -> None:
    """Deletes all but the newest `max_to_keep` steps — only if one of those is verified.

    So a new step that turns out to be unreadable never costs the last good one. Process 0
    deletes; the others wait.
    """
    if self._is_main:
      steps = self.steps()
      keep = steps[-self.max_to_keep:]
      doomed = steps[:-len(keep)] if self._verified.intersection(keep) else []
      trash = self._path / TRASH_DIR
      for s in doomed:
        trash.mkdir(parents=True, exist_ok=True)
        # Rename first (atomic): a kill mid-delete must never leave a half-deleted step that a
        # restore could pick up.
        target = trash / f'{s}-{os.getpid()}-{time.time_ns()}'
        self._step_dir(s).rename(target)
        files.remove_tree(target)
      if doomed:
        try:
          trash.rmdir()
        except OSError:  # Not empty: a removal failed; the next run's first save retries.
          pass
    _barrier('diffjax_checkpoint_gc')
    self._verified &= set(self.steps())

  def _move_aside(self, steps: List[int]) -> None:
    """Moves unusable steps into damaged/ (process 0), so the run can save those steps again."""
    if self._is_main:
      damaged = self._path / DAMAGED_DIR
      damaged.mkdir(parents=True, exist_ok=True)
      for s in steps:
        target, n = damaged / str(s), 1
        while target.exists():
          target, n = damaged / f'{s}.{n}', n + 1
        if self._step_dir(s).is_dir():
          self._step_dir(s).rename(target)
    _barrier('diffjax_checkpoint_move_aside')
    if self._manager is not None:
      self._manager.reload()

  # -- Restoring --------------------------------------------------------------------------------

  def _read_verified(self, step: int, abstract_tree: Any) -> Any:
    """Reads `step` into host memory and checks it against its fingerprints (raises if not).

    Every process reads and checks; the step counts as good only if it is good everywhere.
    """
    manager = self._get_manager()
    ok, error, host = True, None, None
    try:
      # Host arrays as targets: Orbax restores numpy arrays (np.empty touches no memory).
      target = jax.tree.map(lambda a: np.empty(a.shape, a.dtype), abstract_tree)
      restored = manager.restore(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardRestore(target), INTEGRITY_ITEM: ocp.args.JsonRestore()}))
      host, record = restored[STATE_ITEM], restored[INTEGRITY_ITEM]
      if not isinstance(record, dict) or not isinstance(record.get('fingerprints'), dict):
        raise IntegrityError('its integrity record is missing or unreadable')
      bad = _mismatches(record['fingerprints'], fingerprints(host))
      if bad:
        more = f' (and {len(bad) - 1} more arrays)' if len(bad) > 1 else ''
        raise IntegrityError(f'the data of {bad[0]}{more} does not match the fingerprint '
                             'recorded when it was saved')
    except Exception as e:  # noqa: BLE001 - reported by the caller.
      ok, error = False, e
    if not _all_agree(ok):
      raise error or IntegrityError('another process could not read or verify it')
    return host

  def restore(self, abstract_tree: Any, step: Optional[int] = None,
              move_aside: bool = False) -> Tuple[Any, int]:
    """Restores `step`, or the newest step that restores and verifies, onto `abstract_tree`.

    Args:
      abstract_tree: ShapeDtypeStructs of the tree to restore; leaves with a sharding are placed
        with it, the others on the default device.
      step: a specific step; None: the newest usable one.
      move_aside: move unusable steps newer than the restored one into damaged/ (a training run
        does this so it can save those step numbers again; readers leave the directory as is).

    Returns:
      (tree, step).

    Raises:
      NoCheckpointError: when no step restores and verifies.
    """
    steps = self.steps()
    if step is not None and step not in steps:
      known = ', '.join(map(str, steps)) or 'none'
      raise NoCheckpointError(f'There is no checkpoint step {step} in {self.directory} (steps: '
                              f'{known}); pass one of them, or no step for the newest.')
    candidates = [step] if step is not None else list(reversed(steps))
    if not candidates:
      raise NoCheckpointError(f'No checkpoint in {self.directory}; train first (train.py).')
    failed = self.skipped = []
    for i, s in enumerate(candidates):
      try:
        host = self._read_verified(s, abstract_tree)
      except Exception as e:  # noqa: BLE001 - damaged steps are skipped, not fatal.
        older = 'trying an older one' if i + 1 < len(candidates) else 'no older one is left'
        log.warning('Skipping checkpoint step %d in %s: %s; %s.', s, self.directory,
                    _first_line(e), older)
        failed.append(s)
        continue
      if failed and move_aside:
        self._move_aside(failed)
      self._verified.add(s)
      return jax.tree.map(_place, host, abstract_tree), s
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
        manager, self._manager = self._manager, None
        try:
          manager.close()
        except Exception:  # noqa: BLE001 - a failed save was reported already.
          if not self._failed:
            raise


def _host_abstract(x) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)


def _place(host: np.ndarray, abstract) -> jax.Array:
  """A host array on the abstract leaf's sharding (every process holds the full value)."""
  sharding = getattr(abstract, 'sharding', None)
  if sharding is None:
    return jax.device_put(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


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
