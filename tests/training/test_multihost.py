"""A real two-host run launched as SLURM launches one, equal to one process; cluster detection.

Two processes (2 fake CPU devices each, gloo collectives) get only the variables `srun` sets
(SLURM_JOB_ID, SLURM_NTASKS=2, SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NODELIST=localhost) and
join through `parallel.initialize_distributed()`'s detection. They train the `tiny` config with
the global batch split across them, save a checkpoint, restore it, train on, and sample. The
result must equal a single-process run on 4 devices; each process must have read its own half of
every global batch; only process 0 may write the run's files (one process's metrics, its lock,
its samples). The processes block on every step (the train loop reads its metrics each step) and
are SIGKILLed if they outlive a hard deadline: a multi-process CPU hang ignores SIGTERM.
"""

import json
import os
import random
import re
import socket

import forkserver
import jax
import numpy as np
import pytest

from configs import edm as edm_configs
from diffjax import parallel, runs, sampling
from diffjax.training import loop

STEPS, FIRST = 4, 2
DEADLINE_S = 900  # a safety net against hangs; a cold run takes ~30 s on an idle machine
SLURM_PORTS = 61440  # jax.distributed's SLURM port: 61440 + SLURM_JOB_ID % 4096


def _slurm_job_id() -> int:
  """A SLURM_JOB_ID whose coordinator port (as jax.distributed derives it) is free here."""
  rng = random.Random()
  for _ in range(200):
    port = SLURM_PORTS + rng.randrange(4096)
    try:
      with socket.socket(socket.AF_INET6) as s:  # jax's coordinator binds [::]:port
        s.bind(('::', port))
      with socket.socket() as s:
        s.bind(('127.0.0.1', port))
    except OSError:
      continue
    return 4096 * rng.randrange(1, 1000) + port - SLURM_PORTS
  raise RuntimeError('no free port in 61440-65535')


def _slurm_env(job_id: int, task: int, **extra) -> dict:
  env = forkserver.child_env(XLA_FLAGS='', SLURM_JOB_ID=job_id, SLURM_NTASKS=2,
                             SLURM_PROCID=task, SLURM_LOCALID=task, SLURM_STEP_NODELIST='localhost',
                             **extra)
  for k in [k for k in env if k.startswith(('DIFFJAX_COORDINATOR', 'DIFFJAX_NUM_PROCESSES',
                                            'DIFFJAX_PROCESS_ID', 'JAX_COORDINATOR', 'OMPI_'))]:
    del env[k]
  return env


def _config():
  c = edm_configs.get_config('tiny')
  c.train.batch_size = 8
  c.train.total_images = 8 * STEPS
  c.train.checkpoint_every = STEPS  # the reference: one run, its final checkpoint
  c.train.log_every = 1
  c.train.num_preview = 0  # (the workers draw one preview, in their second call)
  c.sample.num_steps = 2
  return c


def test_two_processes_train_like_one(data_dir, tmp_path):
  workdir, out = str(tmp_path / 'run2'), str(tmp_path / 'out')
  server = forkserver.get()
  # No XLA_FLAGS device count: each worker asks for 2 CPU devices itself.
  job = _slurm_job_id()
  workers = [server.spawn('tests/multihost_worker.py',
                          [f'--process_id={i}', f'--workdir={workdir}', f'--out={out}',
                           f'--steps={STEPS}', f'--first_steps={FIRST}',
                           f'--dump_after={DEADLINE_S - 30}'],
                          env=_slurm_env(job, i, TFDS_DATA_DIR=data_dir)) for i in (0, 1)]
  try:
    # The same run in one process on 4 devices, and its samples, meanwhile (process 1 mostly
    # waits for process 0's compiles, so a core is free).
    reference = loop.train(_config(), str(tmp_path / 'run1'), progress=False)
    one_process = sampling.sample_run(str(tmp_path / 'run1'), '0-3', batch_size=4)['images']
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
    # One line per process, from the join.
    assert re.findall(r'^process \d of \d.*$', w.stdout, re.M) == [
        f'process {i} of 2 (SLURM): 2 local of 4 devices (cpu)'], w.stdout

  reports = [json.load(open(os.path.join(out, f'process_{i}.json'))) for i in (0, 1)]
  for i, r in enumerate(reports):
    assert (r['process_index'], r['process_count'], r['local_devices'], r['devices']) == (i, 2, 2, 4)
    assert r['step'] == STEPS
    # A workdir held by a live run was refused on both processes (process 0 took the lock).
    assert re.fullmatch(rf'The workdir {re.escape(workdir)} is in use by another run \(another '
                        rf'run on host .*, pid {workers[0].pid}, since .*\); wait for it .*',
                        r['refused'] or ''), r['refused']

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
  # (where Orbax has each process take part in saving): metrics.jsonl has one process's rows, the
  # workdir lock and the samples are process 0's.
  written = [set(r['writes']) for r in reports]
  assert {'config.json', 'metrics.jsonl', os.path.join('samples', 'latest.png'), runs.lock.LOCK_FILE,
          os.path.join('samples', 'cli', 'samples.npz')} <= {
      re.sub(r'(^|/)\.tmp-\d+-', r'\1', w).split('.tmp-')[0] for w in written[0]}
  assert not [w for w in written[1] if not w.startswith('checkpoints' + os.sep)], written[1]
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows] == list(range(1, STEPS + 1))
  assert not os.path.exists(os.path.join(workdir, runs.lock.LOCK_FILE))  # released at the end

  # The samples (process 0's, sample.py's path) match a one-process sample of the reference run:
  # the same seeds, the same parameters up to float rounding.
  assert not os.path.exists(os.path.join(out, 'samples_1.npy'))
  got = np.load(os.path.join(out, 'samples_0.npy'))
  assert got.shape == one_process.shape == (4, 8, 8, 1)
  assert np.abs(got.astype(int) - one_process).max() <= 1  # uint8 levels
  np.testing.assert_array_equal(np.load(os.path.join(workdir, 'samples', 'cli', 'samples.npz'))[
      'images'], got)


# ------------------------------------------------------------------------------------------------
# Which launches are clusters, and a coordinator that cannot be reached.
# ------------------------------------------------------------------------------------------------

_SLURM = {'SLURM_JOB_ID': '12', 'SLURM_NTASKS': '2', 'SLURM_PROCID': '1', 'SLURM_LOCALID': '1',
          'SLURM_STEP_NODELIST': 'node[003-015],gpu7'}


@pytest.mark.parametrize('env, cluster', [
    ({}, None),
    (_SLURM, 'SLURM'),
    ({**_SLURM, 'SLURM_NTASKS': '1'}, None),                  # one task: runs alone
    ({k: v for k, v in _SLURM.items() if k != 'SLURM_STEP_NODELIST'}, None),  # sbatch, no srun
    ({'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.0.0.1:34911', 'OMPI_COMM_WORLD_SIZE': '4',
      'OMPI_COMM_WORLD_RANK': '2'}, 'Open MPI'),
    ({**_SLURM, 'OMPI_MCA_orte_hnp_uri': '1.0;tcp://10.0.0.1:1', 'OMPI_COMM_WORLD_SIZE': '1'},
     None),                                                   # mpirun -n 1 inside a SLURM job
    ({'TPU_WORKER_HOSTNAMES': 'tpu-0,tpu-1', 'TPU_WORKER_ID': '1'}, 'Cloud TPU'),  # GKE
    ({'TPU_WORKER_HOSTNAMES': 'tpu-0', 'TPU_WORKER_ID': '0'}, None),
])
def test_cluster_detection(env, cluster, monkeypatch):
  monkeypatch.setattr(parallel, '_has_libtpu', lambda: True)  # as on a TPU VM
  assert parallel.detect_cluster(env) == cluster


def test_tpu_variables_without_libtpu_are_no_cluster(monkeypatch):
  monkeypatch.setattr(parallel, '_has_libtpu', lambda: False)
  assert parallel.detect_cluster({'TPU_WORKER_HOSTNAMES': 'a,b'}) is None


def test_diffjax_variables_win_over_detection(monkeypatch):
  for k, v in _SLURM.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setenv('DIFFJAX_NUM_PROCESSES', '1')
  parallel.initialize_distributed()  # runs alone: no join is tried
  assert jax.process_count() == 1
  monkeypatch.setenv('DIFFJAX_NUM_PROCESSES', '2')
  with pytest.raises(parallel.ClusterJoinError, match=r'^Set DIFFJAX_COORDINATOR=HOST:PORT, '
                     r'DIFFJAX_NUM_PROCESSES=N and DIFFJAX_PROCESS_ID=i .* together'):
    parallel.initialize_distributed()


def test_open_mpi_5_without_a_coordinator_uri_is_refused_not_run_alone():
  with pytest.raises(parallel.ClusterJoinError, match=r'Open MPI launch of 4 processes .*'
                     r'set DIFFJAX_COORDINATOR=HOST:PORT'):
    parallel.detect_cluster({'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_COMM_WORLD_RANK': '0'})


def test_slurm_coordinator_is_the_first_node_with_the_job_port():
  assert parallel._slurm_coordinator(_SLURM) == f'node003:{SLURM_PORTS + 12}'
  assert parallel._slurm_coordinator({**_SLURM, 'SLURM_STEP_NODELIST': 'a1,a2',
                                      'JAX_COORDINATOR_PORT': '1234'}) == 'a1:1234'


def test_unreachable_coordinator_is_one_sentence(tmp_path):
  # Task 1 of a SLURM run whose task 0 never starts: no coordinator on the job's port.
  job = _slurm_job_id()
  workdir = tmp_path / 'run'
  child = forkserver.get().run(
      'train.py', ['--config=configs/edm.py:tiny', f'--workdir={workdir}', '--no_progress'],
      env=_slurm_env(job, 1, DIFFJAX_JOIN_TIMEOUT=1), timeout=120)
  assert child.rc == 2, child.stderr[-3000:]
  last = child.stderr.strip().splitlines()[-1]
  assert re.fullmatch(
      rf'error: Could not join the SLURM run as process 1 of 2: its coordinator localhost:'
      rf'{SLURM_PORTS + job % 4096} did not answer within 1 s; start every process of the run '
      r'\(e\.g\. with srun or mpirun\), .*\.', last), last
  assert 'Traceback' not in child.stderr and not workdir.exists()
