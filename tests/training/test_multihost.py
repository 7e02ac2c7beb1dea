"""A real two-host run: two processes, jax.distributed over loopback, equal to one process.

Two processes (2 fake CPU devices each, gloo collectives) train the `tiny` config with the global
batch split across them, save a checkpoint, restore it and train on. The result must equal a
single-process run on 4 devices; each process must have read its own half of every global batch;
only process 0 may write the run's files. The processes block on every step (the train loop
reads its metrics each step) and are SIGKILLed if they outlive a hard deadline: a multi-process
CPU hang ignores SIGTERM.
"""

import json
import os
import socket

import forkserver
import jax
import numpy as np
import pytest

from configs import edm as edm_configs
from diffjax import runs
from diffjax.training import loop

STEPS, FIRST = 4, 2
DEADLINE_S = 900  # a safety net against hangs; a cold run takes ~30 s on an idle machine


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _config():
  c = edm_configs.get_config('tiny')
  c.train.batch_size = 8
  c.train.total_images = 8 * STEPS
  c.train.checkpoint_every = FIRST
  c.train.log_every = 1
  c.train.num_preview = 4
  c.sample.num_steps = 2
  return c


def test_two_processes_train_like_one(data_dir, tmp_path):
  workdir, out = str(tmp_path / 'run2'), str(tmp_path / 'out')
  server = forkserver.get()
  # No XLA_FLAGS device count: each worker asks for 2 CPU devices itself.
  env = forkserver.child_env(TFDS_DATA_DIR=data_dir, XLA_FLAGS='')
  port = _free_port()
  workers = [server.spawn('tests/multihost_worker.py',
                          [f'--process_id={i}', '--num_processes=2', f'--port={port}',
                           f'--workdir={workdir}', f'--out={out}', f'--steps={STEPS}',
                           f'--first_steps={FIRST}', f'--dump_after={DEADLINE_S - 30}'],
                          env=env) for i in (0, 1)]
  try:
    # The same run in one process on 4 devices, meanwhile (process 1 mostly waits for process 0's
    # compiles, so a core is free).
    reference = loop.train(_config(), str(tmp_path / 'run1'), progress=False)
    for w in workers:
      w.wait(DEADLINE_S)  # SIGKILLs the worker's process group past the deadline
  except TimeoutError:
    pytest.fail('the two-process run hung; stacks:\n' + '\n'.join(
        f'--- process {i}:\n{w.stderr[-6000:]}' for i, w in enumerate(workers)))
  finally:
    for w in workers:
      w.kill()
  for i, w in enumerate(workers):
    assert w.rc == 0, f'process {i}:\n{w.stderr[-4000:]}'

  reports = [json.load(open(os.path.join(out, f'process_{i}.json'))) for i in (0, 1)]
  for i, r in enumerate(reports):
    assert (r['process_index'], r['process_count'], r['local_devices'], r['devices']) == (i, 2, 2, 4)
    assert r['step'] == STEPS

  ref_params = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
                jax.tree_util.tree_flatten_with_path(jax.device_get(reference.params))[0]}
  for i in (0, 1):
    got = np.load(os.path.join(out, f'params_{i}.npz'))
    assert sorted(got.files) == sorted(ref_params)
    for name, value in ref_params.items():
      np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-5, err_msg=name)

  # The checkpoint the two processes wrote restores in one process, to the same parameters.
  run = runs.load(workdir)
  assert run.step == STEPS
  for (k, v) in jax.tree_util.tree_flatten_with_path(jax.device_get(run.params))[0]:
    np.testing.assert_allclose(np.asarray(v), ref_params[jax.tree_util.keystr(k)], rtol=1e-4,
                               atol=1e-5)

  # Per-process data: process k got rows [4k, 4k + 4) of every global batch, and the second call
  # resumed the data at the restored step.
  from diffjax import data
  it = data.make_iterator('digits', global_batch_size=8, seed=0, data_dir=data_dir,
                          process_index=0, process_count=1)
  global_batches = [next(it) for _ in range(STEPS)]
  it.close()
  for i, r in enumerate(reports):
    assert [b['step'] for b in r['batches']] == list(range(STEPS))
    assert {b['process_index'] for b in r['batches']} == {i}
    for b in r['batches']:
      expected = global_batches[b['step']]
      assert b['labels'] == expected['label'][4 * i:4 * i + 4].tolist()
      np.testing.assert_allclose(b['pixel_sum'], expected['image'][4 * i:4 * i + 4].sum(),
                                 rtol=1e-6)

  # Only process 0 writes the run's files; process 1 writes nothing outside the checkpoints
  # (where Orbax has each process take part in saving).
  written = [set(r['writes']) for r in reports]
  assert {'config.json', 'metrics.jsonl', os.path.join('samples', 'latest.png')} <= {
      w for w in written[0] if not w.startswith('checkpoints')} | {
      w.split('.tmp-')[0] for w in written[0]}
  assert not [w for w in written[1] if not w.startswith('checkpoints' + os.sep)], written[1]
