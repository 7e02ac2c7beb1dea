"""One run per workdir: a live holder refuses a second run, a dead one's lock is taken over.

The in-process cases write lock records as another process or host would leave them; the last
case runs real train.py processes: a second run on a live run's workdir is refused in one
sentence naming the holder and touches nothing, and after the first run is SIGKILLed the next one
takes its lock over and resumes its checkpoints.
"""

import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import forkserver
import pytest

from configs import distill as distill_configs
from diffjax import runs
from diffjax.runs import lock as lock_lib
from diffjax.training import distill

HOST = re.escape(socket.gethostname())


def _write_record(workdir, **record):
  """A lock file as another run would have left it."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, lock_lib.LOCK_FILE)
  with open(path, 'w') as f:
    json.dump({'since': time.time() - 3600, 'command': 'train.py', 'token': 'theirs', **record}, f)
  return path


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait()
  return child.pid


def test_a_live_holder_refuses_a_second_run_naming_it(tmp_path):
  workdir = str(tmp_path / 'run')
  with lock_lib.WorkdirLock(workdir, 'train.py') as held:
    before = open(held.path).read()
    with pytest.raises(runs.WorkdirLocked) as e:
      lock_lib.WorkdirLock(workdir, 'distill.py').acquire()
    assert re.fullmatch(
        rf'The workdir {re.escape(workdir)} is in use by another run \(train\.py on host {HOST}, '
        rf'pid {os.getpid()}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d, last heartbeat \d+ s ago\); '
        r'wait for it to finish or stop it, or pass another --workdir\.', str(e.value)), e.value
    assert open(held.path).read() == before                  # the holder's record is untouched
    assert os.listdir(workdir) == [lock_lib.LOCK_FILE]
  assert not os.path.exists(workdir)  # released; the workdir it made (empty) is gone again
  lock_lib.WorkdirLock(workdir).acquire().release()


@pytest.mark.parametrize('record, reason', [
    (lambda: {'host': socket.gethostname(), 'pid': _dead_pid()}, r'pid \d+ is no longer running'),
    # A live pid that started at another time: the pid was reused by another program.
    (lambda: {'host': socket.gethostname(), 'pid': os.getppid(), 'start': 1},
     r'pid \d+ is now another program'),
    (lambda: {'host': socket.gethostname(), 'pid': os.getpid(), 'boot': 'an-earlier-boot'},
     'this host has restarted since'),
])
def test_a_lock_of_a_dead_run_on_this_host_is_taken_over(tmp_path, caplog, record, reason):
  workdir = str(tmp_path / 'run')
  os.makedirs(os.path.join(workdir, 'checkpoints', '5'))
  path = _write_record(workdir, **record())
  with caplog.at_level(logging.WARNING, logger=lock_lib.__name__):
    held = lock_lib.WorkdirLock(workdir).acquire()
  try:
    assert json.load(open(path))['pid'] == os.getpid()
    warning, = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(rf'Taking over the lock of {re.escape(workdir)} left by a run that is gone '
                        rf'\(train\.py on host {HOST}, pid \d+, since .*; {reason}\)\.', warning), \
        warning
  finally:
    held.release()
  assert sorted(os.listdir(workdir)) == ['checkpoints']  # released; the run's files stay


def test_another_hosts_lock_counts_until_its_heartbeat_is_stale(tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  path = _write_record(workdir, host='tpu-host-7', pid=4242)
  with pytest.raises(runs.WorkdirLocked, match=r'train\.py on host tpu-host-7, pid 4242, since'):
    lock_lib.WorkdirLock(workdir, stale_s=60).acquire()
  old = time.time() - 61
  os.utime(path, (old, old))
  with caplog.at_level(logging.WARNING, logger=lock_lib.__name__):
    held = lock_lib.WorkdirLock(workdir, stale_s=60).acquire()
  held.release()
  assert 'its heartbeat stopped 61 s ago' in caplog.text
  assert not os.path.exists(path)


def test_heartbeat_refreshes_and_release_keeps_a_lock_taken_over_by_another(tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  held = lock_lib.WorkdirLock(workdir, heartbeat_s=0.02).acquire()
  old = time.time() - 1000
  os.utime(held.path, (old, old))
  assert forkserver.wait_for(lambda: held.holder()['heartbeat'] < 100, 10)
  # Another run took the lock over (as if this one had looked dead): release leaves it alone.
  _write_record(workdir, host='elsewhere', pid=1)
  with caplog.at_level(logging.WARNING, logger=lock_lib.__name__):
    assert forkserver.wait_for(lambda: 'another run has taken it over' in caplog.text, 10)
    held.release()
  assert json.load(open(held.path))['host'] == 'elsewhere'


def test_without_hard_links_exclusive_creation_still_admits_one_run(tmp_path, monkeypatch):
  def no_link(src, dst):
    raise PermissionError(errno.EPERM, 'Operation not permitted')
  monkeypatch.setattr(lock_lib.os, 'link', no_link)
  workdir = str(tmp_path / 'run')
  with lock_lib.WorkdirLock(workdir, 'train.py') as held:
    assert json.load(open(held.path))['pid'] == os.getpid()
    with pytest.raises(runs.WorkdirLocked, match=rf'train\.py on host {HOST}, pid {os.getpid()}'):
      lock_lib.WorkdirLock(workdir).acquire()
    assert os.listdir(workdir) == [lock_lib.LOCK_FILE]  # no temporary file left
  # A lock file with no record yet is being written (young) or foreign (old: taken over).
  path = os.path.join(workdir, lock_lib.LOCK_FILE)
  os.makedirs(workdir)
  open(path, 'w').close()
  with pytest.raises(runs.WorkdirLocked):
    lock_lib.WorkdirLock(workdir).acquire()
  os.utime(path, (time.time() - 60, time.time() - 60))
  lock_lib.WorkdirLock(workdir).acquire().release()


def test_distill_refuses_a_held_workdir_before_writing(tmp_path):
  workdir = str(tmp_path / 'distill')
  with lock_lib.WorkdirLock(workdir, 'distill.py'):
    with pytest.raises(runs.WorkdirLocked, match='is in use by another run'):
      distill.run(distill_configs.get_config('digits'), workdir, progress=False)
    assert os.listdir(workdir) == [lock_lib.LOCK_FILE]


def test_second_train_py_is_refused_and_a_killed_ones_lock_is_taken_over(data_dir, tmp_path):
  steps = 6  # the first run is frozen at its first checkpoint, then killed
  workdir = str(tmp_path / 'run')
  argv = ['--config=configs/edm.py:tiny', f'--workdir={workdir}', '--config.train.batch_size=8',
          f'--config.train.total_images={8 * steps}', '--config.train.checkpoint_every=2',
          '--config.train.log_every=1', '--config.train.num_preview=0']
  server, env = forkserver.get(), forkserver.child_env(TFDS_DATA_DIR=data_dir)
  first = server.spawn('train.py', argv, env=env)
  try:
    lock_path = os.path.join(workdir, lock_lib.LOCK_FILE)

    def checkpointed():
      return os.path.exists(lock_path) and os.path.isdir(os.path.join(workdir, 'checkpoints', '2'))

    assert forkserver.wait_for(checkpointed, 120, child=first), first.stderr[-3000:]
    # Frozen (alive, holding the lock), so that nothing in the workdir changes but the second run.
    first.signal(signal.SIGSTOP)
    time.sleep(0.2)
    before = _snapshot(workdir)
    second = server.run('train.py', argv, env=env, timeout=120)
    assert second.rc == 2, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf'error: The workdir {re.escape(workdir)} is in use by another run '
                        rf'\(train\.py on host {HOST}, pid {first.pid}, since .*, last heartbeat '
                        r'.*\); wait for it to finish or stop it, or pass another --workdir\.',
                        last), last
    assert _snapshot(workdir) == before  # not one byte or timestamp changed
    first.signal(signal.SIGCONT)
    first.kill()  # a hard kill: its lock stays behind
    first.wait(60)
  finally:
    first.kill()
  assert os.path.exists(lock_path)
  # The next run takes the lock over and resumes (--max_steps=2: it restores the first run's
  # newest checkpoint and stops there; test_reliability's kill loop trains on after takeovers).
  third = server.run('train.py', argv + ['--max_steps=2'], env=env, timeout=300)
  assert third.rc == 0, third.stderr[-3000:]
  assert re.search(rf'Taking over the lock of {re.escape(workdir)} left by a run that is gone '
                   rf'\(train\.py on host {HOST}, pid {first.pid}, .*; pid {first.pid} is no '
                   r'longer running\)', third.stderr), third.stderr[-3000:]
  assert re.search(r'Resuming from step [2-6] of', third.stdout), third.stdout
  assert f'Done: {workdir}' in third.stdout
  assert not [n for n in os.listdir(workdir) if lock_lib.LOCK_FILE in n]  # released at exit


def _snapshot(root):
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      path = os.path.join(d, f)
      st = os.stat(path)
      out[os.path.relpath(path, root)] = (open(path, 'rb').read(), st.st_mtime_ns, st.st_size)
  return out
