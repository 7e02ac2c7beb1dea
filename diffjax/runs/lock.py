"""One run per workdir: a lock file that names its holder and is taken over when the holder is gone.

Two runs writing one workdir corrupt it (interleaved metrics, one run's save breaking the other's).
`train.py` and `distill.py` therefore hold `WORKDIR/diffjax.lock` while they run. It is a JSON
record of the holder (host, pid, when it started, the command) whose modification time is the
holder's heartbeat, refreshed by a background thread.

* A second run refuses, in one sentence naming the holder, before it writes anything.
* A lock left by a run that is gone is taken over with a warning: on this host, when its pid no
  longer runs (or runs another program: the pid's start time and the boot are recorded too); on
  another host, whose processes cannot be seen from here, when its heartbeat is older than
  `stale_s`.
* The lock is created atomically (written aside, then hard-linked into place, which fails if one
  exists; exclusive creation where the file system has no hard links), so of two runs starting at
  once exactly one gets it, and a reader never sees half a record. Taking over a stale lock renames
  it aside first, which only one of several runs can do.
* It is released (deleted, if still ours) when the run ends, also by an exception or a signal.

Multi-host runs take it on process 0 only (`hold`); the other processes learn the verdict through
the key-value store, so a refused run stops on every process.

A workdir that is a URL (gs://bucket/run, through `etils.epath`) is on an object store seen from
many machines, where a pid means nothing and there are no hard links, exclusive creation or
settable modification times. There the lock is heartbeat-only: the record carries its own
heartbeat time ('beat', rewritten every `heartbeat_s`), a lock is taken over only when that is
older than `stale_s` (whatever its host and pid say), and creation is write-then-verify (written
if absent, read back after `VERIFY_S`: of two runs starting together the one whose record was
overwritten refuses). Two runs that start within the same instant may still both pass, so the
acquiring run logs a warning saying so; the lock still stops every later second run.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Iterator, Optional

from diffjax import parallel
from diffjax.runs import files

log = logging.getLogger(__name__)

LOCK_FILE = 'diffjax.lock'
HEARTBEAT_S = 15.0   # how often a holder refreshes its heartbeat
STALE_S = 120.0      # a lock from another host with no heartbeat for this long is taken over
_FILL_S = 10.0       # a lock younger than this with no readable record yet is being written
VERIFY_S = 2.0       # on an object store: how long a new lock settles before it is read back
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK)


class WorkdirLocked(OSError):
  """The workdir is held by another live run."""


def _boot_id() -> str:
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:  # Not Linux: the pid check alone decides.
    return ''


def _start_ticks(pid: int) -> Optional[int]:
  """When `pid` started (clock ticks since boot, /proc/PID/stat field 22); None if unknown."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      stat = f.read()
  except OSError:
    return None
  try:  # The command name (field 2) is in parentheses and may contain spaces.
    return int(stat[stat.rindex(')') + 2:].split()[19])
  except (ValueError, IndexError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's process: it exists.
    return True
  except OSError:
    return False
  return True


def _command() -> str:
  """What this process runs, for a refused run's message: 'train.py', 'pytest', 'python'."""
  path = sys.argv[0] if sys.argv and sys.argv[0] else 'python'
  name = os.path.basename(path)
  return os.path.basename(os.path.dirname(path)) if name == '__main__.py' else name


def _when(t: float) -> str:
  return datetime.datetime.fromtimestamp(t).strftime('%Y-%m-%d %H:%M:%S')


def _ago(seconds: float) -> str:
  seconds = max(0.0, seconds)
  if seconds < 120:
    return f'{seconds:.0f} s ago'
  if seconds < 7200:
    return f'{seconds / 60:.0f} min ago'
  return f'{seconds / 3600:.1f} h ago'


class WorkdirLock:
  """The lock of one workdir (see the module docstring).

  Args:
    workdir: the run's directory (created if missing; removed again at release if the lock was
      all that was in it, so a run that fails to start leaves no empty workdir behind): a local
      path, or a URL such as gs://bucket/run (heartbeat-only, see the module docstring).
    command: what holds it, for the message a refused run prints (e.g. 'train.py').
    heartbeat_s: how often the heartbeat is refreshed.
    stale_s: a lock from another host whose heartbeat is older than this is taken over.
  """

  def __init__(self, workdir: str, command: str = '', *, heartbeat_s: float = HEARTBEAT_S,
               stale_s: float = STALE_S):
    self._root = files.path(workdir)
    self._local = files.is_local(self._root)
    self.workdir = os.fspath(self._root)  # str, for messages
    self._file = self._root / LOCK_FILE
    self.path = os.fspath(self._file)
    self.command = command or _command()
    self.heartbeat_s = float(heartbeat_s)
    self.stale_s = float(stale_s)
    self._token = None
    self._created_workdir = False
    self._held = {}  # our record, rewritten as the heartbeat on an object store
    self._stop = threading.Event()
    self._thread = None

  # -- Reading the holder -----------------------------------------------------------------------

  def holder(self) -> Optional[dict]:
    """The current holder's record plus 'heartbeat' (its age in seconds), or None if unlocked.

    A record that cannot be read is {} plus its age: being written if young (see `_try_create`),
    else not a diffjax lock, which counts as a holder that is gone.
    """
    try:
      text = self._file.read_text()
      age = time.time() - os.stat(self.path).st_mtime if self._local else None
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
      if not isinstance(record, dict):
        raise ValueError
    except ValueError:
      record = {}
    if age is None:  # An object store: the record's own heartbeat time (0 s if it has none).
      beat = record.get('beat', record.get('since'))
      age = time.time() - beat if isinstance(beat, (int, float)) else 0.0
    record['heartbeat'] = age
    return record

  def _gone(self, record: dict) -> Optional[str]:
    """Why the holder of `record` is gone (a reason for the warning), or None if it may be alive."""
    pid = record.get('pid')
    if not isinstance(pid, int) or 'host' not in record:
      # Being written (see `_try_create`), or not a diffjax lock.
      return 'its record is unreadable' if record['heartbeat'] > _FILL_S else None
    if self._local and record['host'] == socket.gethostname():
      if record.get('boot') and _boot_id() and record['boot'] != _boot_id():
        return 'this host has restarted since'
      if not _pid_alive(pid):
        return f'pid {pid} is no longer running'
      started = _start_ticks(pid)
      if record.get('start') is not None and started is not None and started != record['start']:
        return f'pid {pid} is now another program'
      return None
    if record['heartbeat'] > self.stale_s:
      return f'its heartbeat stopped {_ago(record["heartbeat"])}'
    return None

  def _describe(self, record: dict) -> str:
    since = record.get('since')
    what = (f'{record.get("command") or "a run"} on host {record.get("host", "?")}, '
            f'pid {record.get("pid", "?")}')
    if isinstance(since, (int, float)):
      what += f', since {_when(since)}'
    return what + f', last heartbeat {_ago(record.get("heartbeat", 0.0))}'

  # -- Taking and releasing ---------------------------------------------------------------------

  def _record(self) -> dict:
    pid = os.getpid()
    now = time.time()
    return {'host': socket.gethostname(), 'pid': pid, 'start': _start_ticks(pid),
            'boot': _boot_id(), 'since': now, 'beat': now, 'command': self.command,
            'token': self._token}

  def _try_create(self) -> bool:
    """Creates the lock file whole, atomically; False if one exists."""
    if not self._local:
      return self._try_create_remote()
    text = json.dumps(self._record())
    tmp = os.path.join(self.workdir, f'.{LOCK_FILE}.tmp-{os.getpid()}-{self._token}')
    with open(tmp, 'w') as f:
      f.write(text)
    try:
      os.link(tmp, self.path)  # fails if the lock exists: exactly one of several runs wins
      return True
    except FileExistsError:
      return False
    except OSError as e:
      if e.errno not in _NO_HARD_LINKS:
        raise
    finally:
      os.unlink(tmp)
    # A file system without hard links: exclusive creation is as atomic, but a reader may see
    # the file before its record is written (`_gone` gives such a young lock time to fill).
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True

  def _try_create_remote(self) -> bool:
    """Write-then-verify on an object store (one object write is whole, but not exclusive)."""
    if self._file.exists():
      return False
    self._held = self._record()
    self._file.write_text(json.dumps(self._held))
    time.sleep(VERIFY_S)  # a run that wrote just after us has overwritten our record by now
    return self._ours()

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock, taking over one left by a run that is gone.

    Raises:
      WorkdirLocked: a live run holds the workdir (nothing was written).
      ValueError: the workdir is a file.
    """
    if self._root.exists() and not self._root.is_dir():
      raise ValueError(f'--workdir {self.workdir} is a file, not a directory; pass a directory '
                       '(new or of an earlier run).')
    self._token = uuid.uuid4().hex
    if not self._local:
      log.warning('The workdir %s is not on a local file system: its lock is heartbeat-only (a '
                  'lock is taken over once its heartbeat is %.0f s old, whatever its pid), and '
                  'two runs started at the same instant may both get it; start one run per '
                  'workdir.', self.workdir, self.stale_s)
    try:
      if not self._root.is_dir():
        self._root.mkdir(parents=True, exist_ok=True)
        self._created_workdir = self._local  # an object store has no empty directory to remove
      return self._acquire()
    except WorkdirLocked:
      self._token = None
      self._remove_created_workdir()
      raise
    except OSError as e:
      self._token = None
      self._remove_created_workdir()
      raise OSError(f'Cannot write to {self.workdir} ({e.strerror or e}); pass a --workdir on a '
                    'writable disk with free space.') from e

  def _acquire(self) -> 'WorkdirLock':
    for _ in range(5):  # a few rounds: another run may take or release it meanwhile
      if self._try_create():
        self._remove_leftovers()
        self._start_heartbeat()
        return self
      record = self.holder()
      if record is None:
        continue  # released meanwhile
      reason = self._gone(record)
      if reason is None:
        raise WorkdirLocked(
            f'The workdir {self.workdir} is in use by another run ({self._describe(record)}); '
            'wait for it to finish or stop it, or pass another --workdir.')
      if not self._local:  # No atomic rename there: removed, then retaken by write-then-verify.
        self._file.unlink(missing_ok=True)
        log.warning('Taking over the lock of %s left by a run that is gone (%s; %s).',
                    self.workdir, self._describe(record), reason)
        continue
      # Renamed aside, not deleted: of several runs taking over at once only one can rename it,
      # and a lock taken meanwhile by a live run is checked again before it could be lost.
      aside = f'{self.path}.stale-{os.getpid()}-{self._token}'
      try:
        os.rename(self.path, aside)
      except FileNotFoundError:
        continue
      try:
        with open(aside) as f:
          moved = json.load(f)
      except (OSError, ValueError):
        moved = {}
      if isinstance(moved, dict) and moved.get('token') != record.get('token'):
        # Not the record judged stale: a live run took the lock in between. Put it back.
        try:
          os.link(aside, self.path)
        except FileExistsError:
          pass
        os.unlink(aside)
        continue
      os.unlink(aside)
      log.warning('Taking over the lock of %s left by a run that is gone (%s; %s).',
                  self.workdir, self._describe(record), reason)
    raise WorkdirLocked(f'Could not take the lock of the workdir {self.workdir}: other runs keep '
                        'taking it; make sure only one run uses this --workdir.')

  def _remove_leftovers(self) -> None:
    """Removes records a kill left mid-write or mid-takeover (old enough not to be in use)."""
    if not self._local:  # nothing is written aside there
      return
    for name in os.listdir(self.workdir):
      if name.startswith((f'.{LOCK_FILE}.tmp-', f'{LOCK_FILE}.stale-')):
        path = os.path.join(self.workdir, name)
        try:
          if time.time() - os.stat(path).st_mtime > 60:
            os.unlink(path)
        except OSError:
          pass

  def _start_heartbeat(self) -> None:
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name='diffjax-workdir-lock', daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    warned = False
    while not self._stop.wait(self.heartbeat_s):
      try:
        if self._ours():
          if self._local:
            os.utime(self.path)
          else:  # No settable mtime on an object store: the record carries its heartbeat.
            self._file.write_text(json.dumps(dict(self._held, beat=time.time())))
          continue
        problem = 'another run has taken it over'
      except OSError as e:
        problem = e.strerror or str(e)
      if not warned:  # The run goes on; its own writes will report a lost directory.
        log.warning('Cannot refresh the lock of %s (%s).', self.workdir, problem)
        warned = True

  def _ours(self) -> bool:
    record = self.holder()
    return bool(record) and self._token is not None and record.get('token') == self._token

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock if it is still this one's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._token is None:
      return
    try:
      if self._ours():
        self._file.unlink()
    except OSError as e:
      log.warning('Could not remove the lock %s (%s); the next run takes it over.', self.path,
                  e.strerror or e)
    self._token = None
    self._remove_created_workdir()

  def _remove_created_workdir(self) -> None:
    if self._created_workdir:
      self._created_workdir = False
      try:
        os.rmdir(self.workdir)  # only if empty: a run that wrote nothing leaves nothing
      except OSError:
        pass

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def hold(workdir: str, command: str = '', **kwargs) -> Iterator[Optional[WorkdirLock]]:
  """Holds the workdir's lock for the block; on process 0 only in a multi-host run.

  Every process calls it at the same point. Process 0 takes the lock and shares the verdict, so
  that a refused run raises on every process (not only on the one that could not take it).

  Args:
    workdir: the run's directory.
    command: what holds it ('train.py', 'distill.py').
    **kwargs: `WorkdirLock`'s heartbeat_s and stale_s.

  Yields:
    The lock on process 0, None elsewhere.

  Raises:
    WorkdirLocked: a live run holds the workdir.
  """
  taken = {}

  def take() -> str:
    taken['lock'] = WorkdirLock(workdir, command, **kwargs).acquire()
    return 'ok'

  parallel.on_main(take, errors=(WorkdirLocked, ValueError, OSError))
  lock = taken.get('lock')
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
