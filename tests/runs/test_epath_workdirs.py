"""Workdirs through etils.epath: a gs://bucket/run workdir is kept as given, not made a local path.

Local runs are trained through an `epath.Path` workdir and read back through a `str` one. A
gs:// workdir is simulated with `etils.epath.testing.mock_epath`, which routes `gs://bucket/...`
to a temporary folder through epath's own backend interface (so the code under test sees a
non-local epath path, as on GCS, with no network): config.json, metrics.jsonl, the preview PNGs
and the heartbeat-only lock are checked there. Orbax on real GCS is not simulated (its array
data goes through TensorStore's own GCS driver).
"""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from epath_gs import mock_gs
from etils import epath
from PIL import Image

from configs import edm as edm_configs
from diffjax import images as images_lib
from diffjax import runs
from diffjax.runs import checkpoint as ckpt_lib
from diffjax.runs import files
from diffjax.runs import lock as lock_lib
from diffjax.training import loop


def test_a_workdir_url_is_kept_as_given(tmp_path, monkeypatch):
  url = 'gs://bucket/run'
  assert os.path.abspath(url) != url  # what os.path would have made of it
  assert os.fspath(files.path(url)) == url
  assert ckpt_lib.Checkpointer(url + '/checkpoints').directory == url + '/checkpoints'
  lock = lock_lib.WorkdirLock(url)
  assert (lock.workdir, lock.path) == (url, url + '/diffjax.lock')
  monkeypatch.chdir(tmp_path)  # a relative local path is made absolute, as before
  assert os.fspath(files.path('run')) == os.path.join(str(tmp_path), 'run')
  assert os.fspath(files.path(epath.Path('run'))) == os.path.join(str(tmp_path), 'run')


def test_a_local_run_through_epath_and_str_workdirs(data_dir, tmp_path):
  c = edm_configs.get_config('tiny')
  c.train.batch_size = 8
  c.train.total_images = 16
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.train.num_preview = 0  # previews are written through epath below (a compile less here)
  workdir = epath.Path(tmp_path) / 'run'
  loop.train(c, workdir, progress=False)

  as_str = str(workdir)
  assert runs.read_config(as_str).to_dict() == runs.read_config(workdir).to_dict() == c.to_dict()
  assert [json.loads(line)['step'] for line in open(os.path.join(as_str, 'metrics.jsonl'))] == [1, 2]
  run = runs.load(as_str)  # the checkpoint (and its integrity record) read back through a str
  assert run.step == 2
  # ... and the same step through an epath directory.
  tree = {'w': np.arange(6, dtype=np.float32)}
  for directory in (epath.Path(tmp_path) / 'c', str(tmp_path / 'c')):
    c2 = ckpt_lib.Checkpointer(directory, async_save=False)
    try:
      if not c2.steps():
        c2.save(1, tree)
      restored, step = c2.restore(ckpt_lib.abstract_like(tree))
    finally:
      c2.close()
    assert step == 1
    np.testing.assert_array_equal(restored['w'], tree['w'])


@pytest.fixture
def gs(tmp_path):
  """gs://bucket/... routed to tmp_path/bucket/... through epath's backend (no network)."""
  with mock_gs(tmp_path) as local:
    yield local


def test_config_metrics_and_previews_on_a_gs_workdir(gs, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorboardX', None)  # its GCS writer would go online
  url = 'gs://bucket/run'
  c = edm_configs.get_config('tiny')
  runs.save_config(c, url)
  assert runs.read_config(url).to_dict() == c.to_dict()
  assert os.listdir(gs(url)) == ['config.json']  # written whole: no tmp file left beside it

  writer = loop._MetricWriter(url, True)
  for step in (1, 2, 3):
    writer.write(step, {'loss': float(step)})
  writer.close()
  # A resume from step 2 keeps the rows up to it, then goes on (rewritten whole: no append).
  writer = loop._MetricWriter(url, True, start_step=2)
  writer.write(3, {'loss': 30.0})
  writer.close()
  rows = [json.loads(line) for line in open(os.path.join(gs(url), 'metrics.jsonl'))]
  assert rows == [{'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 2.0}, {'step': 3, 'loss': 30.0}]

  grid = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  loop._save_png(grid, files.path(url) / 'samples' / 'latest.png')
  png = np.asarray(Image.open(os.path.join(gs(url), 'samples', 'latest.png')))
  np.testing.assert_array_equal(png, images_lib.make_grid(grid))  # PNG is lossless


def _dead_pid():
  p = subprocess.Popen(['true'])
  p.wait()
  return p.pid


def test_the_lock_on_a_gs_workdir_is_heartbeat_only(gs, monkeypatch, caplog):
  monkeypatch.setattr(lock_lib, 'VERIFY_S', 0.01)
  url = 'gs://bucket/run'
  path = os.path.join(gs(url), 'diffjax.lock')
  os.makedirs(gs(url))
  # This host, a dead pid, a fresh heartbeat: on a local disk the lock would be taken over; on
  # a store shared by many machines the pid means nothing, so the holder counts as live.
  record = {'host': socket.gethostname(), 'pid': _dead_pid(), 'since': time.time() - 600,
            'beat': time.time() - 5, 'command': 'train.py', 'token': 'other'}
  with open(path, 'w') as f:
    json.dump(record, f)
  with pytest.raises(runs.WorkdirLocked, match='in use by another run .*train.py'):
    lock_lib.WorkdirLock(url, stale_s=60).acquire()
  assert json.load(open(path))['token'] == 'other'  # the holder's lock is untouched

  # Its heartbeat older than stale_s: taken over with a warning, and our heartbeat goes on.
  record['beat'] = time.time() - 61
  with open(path, 'w') as f:
    json.dump(record, f)
  with caplog.at_level(logging.WARNING, logger=lock_lib.__name__):
    lock = lock_lib.WorkdirLock(url, stale_s=60, heartbeat_s=0.05).acquire()
  assert 'heartbeat-only' in caplog.text and 'Taking over the lock' in caplog.text
  try:
    first = json.load(open(path))
    assert first['token'] == lock._token
    time.sleep(0.3)
    assert json.load(open(path))['beat'] > first['beat']
    with pytest.raises(runs.WorkdirLocked):  # a second run, while it beats, is refused
      lock_lib.WorkdirLock(url, stale_s=60).acquire()
  finally:
    lock.release()
  assert not os.path.exists(path)
