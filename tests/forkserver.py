"""Real subprocesses for tests, started in milliseconds instead of seconds.

Starting `python train.py` costs 5-10 s here, almost all of it importing JAX, Flax, Orbax and TFDS.
The tests that kill, interrupt or feed bad input to the entry points need dozens of such processes,
so they go through a fork server: one helper process imports those modules once, *without*
initializing any JAX backend, and forks a child per request. Each child is a real, separate OS
process: it gets its own argv, environment, working directory and stdout/stderr files, runs the
script as `__main__` exactly as `python SCRIPT ARGS...` would (an uncaught exception prints a
traceback and exits 1), and can be SIGKILLed or SIGTERMed by pid. Because the backend is created in
the child, XLA_FLAGS and jax.distributed settings chosen per child take effect.

Run as a script it is the server (protocol: JSON lines; requests on stdin, events on stdout).
Imported, `get()` returns the shared client, started on first use and stopped at exit.

Tests can make a child's file system misbehave with `fault=` (see `_install_fault`): a full disk
(ENOSPC) or a read-only one (EROFS) under a directory, as the OS would report them.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------------------
# Server side.
# ------------------------------------------------------------------------------------------------


def _preload() -> None:
  """Imports what the entry points import, leaving the JAX backend uninitialized."""
  sys.path.insert(0, ROOT)
  import absl.app  # noqa: F401
  import absl.flags  # noqa: F401
  import flax.linen  # noqa: F401
  import jax  # noqa: F401
  import jax.numpy  # noqa: F401
  import ml_collections.config_flags  # noqa: F401
  import optax  # noqa: F401
  import orbax.checkpoint  # noqa: F401
  import tensorflow_datasets  # noqa: F401
  import tqdm  # noqa: F401

  import diffjax.build  # noqa: F401
  import diffjax.cli  # noqa: F401
  import diffjax.data  # noqa: F401
  import diffjax.sampling  # noqa: F401
  import diffjax.training.loop  # noqa: F401
  try:
    import tensorboardX  # noqa: F401

    import diffjax.evaluation  # noqa: F401
  except ImportError:  # Optional: the child imports it itself.
    pass
  from jax._src import xla_bridge
  if getattr(xla_bridge, '_backends', None):
    raise RuntimeError('the fork server must not initialize a JAX backend before forking')


def _install_fault(spec: str) -> None:
  """Makes writes under a directory fail like a full ('enospc:DIR') or read-only ('erofs:DIR') disk.

  Patched at the Python file API (open for writing, mkdir, rename/replace) and Orbax's path layer,
  which is where the library's own writes and Orbax's metadata and commit writes go.
  """
  import builtins
  import pathlib

  kind, directory = spec.split(':', 1)
  directory = os.path.abspath(directory)
  code = {'enospc': errno.ENOSPC, 'erofs': errno.EROFS}[kind]

  def blocked(path) -> bool:
    try:
      path = os.path.abspath(os.fspath(path))
    except TypeError:
      return False
    return path == directory or path.startswith(directory + os.sep)

  def fail(path):
    raise OSError(code, os.strerror(code), os.fspath(path))

  real_open = builtins.open

  def open_(file, mode='r', *args, **kwargs):
    if any(c in mode for c in 'wax+') and blocked(file):
      fail(file)
    return real_open(file, mode, *args, **kwargs)

  builtins.open = open_
  # A full disk still lets directories be made here; a read-only one refuses everything.
  names = ('rename', 'replace') if kind == 'enospc' else ('mkdir', 'makedirs', 'rename', 'replace')
  for name in names:
    real = getattr(os, name)

    def wrapped(path, *args, _real=real, **kwargs):
      if blocked(path):
        fail(path)
      return _real(path, *args, **kwargs)

    setattr(os, name, wrapped)
  for name in ('write_text', 'write_bytes', 'touch', 'rename', 'replace') + names[:0]:
    real = getattr(pathlib.Path, name)

    def method(self, *args, _real=real, **kwargs):
      if blocked(self):
        fail(self)
      return _real(self, *args, **kwargs)

    setattr(pathlib.Path, name, method)


def _child(request: dict) -> None:
  """Runs in the forked child: becomes `python SCRIPT ARGV...` and never returns."""
  code = 1
  try:
    os.setpgid(0, 0)  # Own process group: a test can signal it (and any helpers) as one.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(request.get('cwd') or ROOT)
    os.environ.clear()
    os.environ.update(request['env'])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request['stdout']), (2, request['stderr'])):
      out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
      os.dup2(out, fd)
      os.close(out)
    sys.stdout = open(1, 'w', buffering=1, closefd=False)
    sys.stderr = open(2, 'w', buffering=1, closefd=False)
    script = os.path.abspath(request['script'])
    sys.argv = [script] + list(request['argv'])
    sys.path[0] = os.path.dirname(script)
    if request.get('fault'):
      _install_fault(request['fault'])
    import runpy
    try:
      runpy.run_path(script, run_name='__main__')
      code = 0
    except SystemExit as e:
      if e.code is None:
        code = 0
      elif isinstance(e.code, int):
        code = e.code
      else:
        print(e.code, file=sys.stderr)
        code = 1
    except BaseException:  # noqa: BLE001 - as the interpreter does: traceback, exit 1.
      import traceback
      traceback.print_exc()
      code = 1
    import atexit as atexit_
    atexit_._run_exitfuncs()
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code)


def serve() -> None:
  """The server loop: fork on each request, report pids and exit codes (single-threaded)."""
  _preload()
  out = sys.stdout
  print(json.dumps({'event': 'ready'}), file=out, flush=True)
  children = {}
  buffer = b''
  stdin = sys.stdin.fileno()
  while True:
    readable, _, _ = select.select([stdin], [], [], 0.02)
    if readable:
      chunk = os.read(stdin, 65536)
      if not chunk:
        break
      buffer += chunk
      while b'\n' in buffer:
        line, buffer = buffer.split(b'\n', 1)
        request = json.loads(line)
        out.flush()
        pid = os.fork()
        if pid == 0:
          _child(request)
        children[pid] = request['id']
        print(json.dumps({'event': 'started', 'id': request['id'], 'pid': pid}), file=out,
              flush=True)
    while children:
      try:
        pid, status = os.waitpid(-1, os.WNOHANG)
      except ChildProcessError:
        break
      if pid == 0:
        break
      rc = os.waitstatus_to_exitcode(status)
      print(json.dumps({'event': 'exited', 'id': children.pop(pid), 'pid': pid, 'rc': rc}),
            file=out, flush=True)
  for pid in children:
    try:
      os.killpg(pid, signal.SIGKILL)
    except OSError:
      pass


# ------------------------------------------------------------------------------------------------
# Client side.
# ------------------------------------------------------------------------------------------------


class Child:
  """A process started by the server."""

  def __init__(self, server: 'Server', rid: int, stdout: str, stderr: str):
    self._server, self.id = server, rid
    self.stdout_path, self.stderr_path = stdout, stderr
    self.pid: Optional[int] = None
    self.rc: Optional[int] = None
    self._started = threading.Event()
    self._exited = threading.Event()

  def wait_started(self, timeout: float = 60) -> int:
    if not self._started.wait(timeout):
      raise TimeoutError('the fork server did not start the child')
    return self.pid

  def wait(self, timeout: float = 300) -> int:
    """Waits for the exit; SIGKILLs the child (and raises) after `timeout` seconds."""
    if not self._exited.wait(timeout):
      self.kill()
      self._exited.wait(30)
      raise TimeoutError(f'child {self.pid} did not finish in {timeout} s; killed it.\n'
                         f'{self.stderr[-3000:]}')
    return self.rc

  def poll(self) -> Optional[int]:
    return self.rc if self._exited.is_set() else None

  def signal(self, sig: int) -> None:
    pid = self.wait_started()
    if self.poll() is None:
      try:
        os.kill(pid, sig)
      except ProcessLookupError:
        pass

  def kill(self) -> None:
    """SIGKILL to the child's whole process group."""
    pid = self.wait_started()
    if self.poll() is None:
      try:
        os.killpg(pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        try:
          os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
          pass

  @property
  def stdout(self) -> str:
    with open(self.stdout_path, errors='replace') as f:
      return f.read()

  @property
  def stderr(self) -> str:
    with open(self.stderr_path, errors='replace') as f:
      return f.read()


class Server:
  """Client of a fork server process (see the module docstring)."""

  def __init__(self, env: Optional[dict] = None):
    import tempfile
    self._dir = tempfile.mkdtemp(prefix='diffjax-forkserver-')
    env = dict(os.environ if env is None else env)
    env['PYTHONPATH'] = os.pathsep.join([ROOT] + [p for p in [env.get('PYTHONPATH')] if p])
    self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=open(os.path.join(self._dir, 'server.log'), 'wb'))
    self._children: dict[int, Child] = {}
    self._next = 0
    self._lock = threading.Lock()
    self._ready = threading.Event()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self._proc.stdout:
      event = json.loads(line)
      if event['event'] == 'ready':
        self._ready.set()
        continue
      child = self._children[event['id']]
      if event['event'] == 'started':
        child.pid = event['pid']
        child._started.set()
      elif event['event'] == 'exited':
        child.rc = event['rc']
        child._exited.set()

  def spawn(self, script: str, argv, *, env: Optional[dict] = None, cwd: Optional[str] = None,
            fault: Optional[str] = None) -> Child:
    """Starts `python SCRIPT ARGV...` (as a fork); `env` replaces the whole environment."""
    if not self._ready.wait(120):
      raise RuntimeError('the fork server did not start: ' + open(
          os.path.join(self._dir, 'server.log'), errors='replace').read()[-3000:])
    with self._lock:
      rid, self._next = self._next, self._next + 1
    child = Child(self, rid, os.path.join(self._dir, f'{rid}.out'),
                  os.path.join(self._dir, f'{rid}.err'))
    self._children[rid] = child
    for path in (child.stdout_path, child.stderr_path):  # readable before the child opens them
      open(path, 'w').close()
    request = {'id': rid, 'script': os.path.join(ROOT, script), 'argv': [str(a) for a in argv],
               'env': dict(os.environ if env is None else env), 'cwd': cwd or ROOT,
               'stdout': child.stdout_path, 'stderr': child.stderr_path, 'fault': fault}
    with self._lock:
      self._proc.stdin.write((json.dumps(request) + '\n').encode())
      self._proc.stdin.flush()
    child.wait_started()
    return child

  def run(self, script: str, argv, timeout: float = 300, **kwargs) -> Child:
    child = self.spawn(script, argv, **kwargs)
    child.wait(timeout)
    return child

  def close(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.close()
      try:
        self._proc.wait(10)
      except subprocess.TimeoutExpired:
        self._proc.kill()


_SERVER: Optional[Server] = None


def get() -> Server:
  """The shared server of this test session (started on first use)."""
  global _SERVER
  if _SERVER is None:
    _SERVER = Server()
    atexit.register(_SERVER.close)
  return _SERVER


def child_env(**extra) -> dict:
  """The environment for entry-point children: tests' fake devices, quiet logs, shared caches."""
  env = dict(os.environ)
  env.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  env.setdefault('CUDA_VISIBLE_DEVICES', '')
  env.setdefault('DIFFJAX_CACHE', os.environ.get(
      'DIFFJAX_TEST_CACHE', os.path.join(ROOT, '.jax_cache')))
  env.update({k: str(v) for k, v in extra.items()})
  return env


def wait_for(predicate, timeout: float, interval: float = 0.005, child: Optional[Child] = None):
  """Polls `predicate()` until it returns a true value (returned) or `timeout` passes (None).

  Stops early when `child` exits.
  """
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    if child is not None and child.poll() is not None:
      return predicate()
    time.sleep(interval)
  return None


if __name__ == '__main__':
  serve()
