"""sample.py resumes: SIGKILLed at a random moment and rerun, it ends bitwise as an uninterrupted run.

Real sample.py processes (fork server) on a tiny run: an uninterrupted reference, and a run killed
once some batches are in OUT/shards/ (a random number of them, plus a random fraction of a batch:
mid-batch or mid-write). The rerun must say how many samples it found, sample only the rest, and
assemble samples.npz and grid.png equal byte for byte to the reference's.
"""

import os
import random
import re
import signal

import forkserver
import numpy as np
import pytest
import saved_runs

from configs import edm as edm_configs
from diffjax import sampling

SEEDS, BATCH = 160, 8  # 20 batches


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A run of the tiny config saved at its initialization: any weights do, the test compares two
  samplings of them (and no train step is compiled)."""
  return saved_runs.save_initialized_run(
      edm_configs.get_config('tiny'), str(tmp_path_factory.mktemp('sample') / 'run'))


def _argv(workdir, out):
  return [f'--workdir={workdir}', f'--seeds=0-{SEEDS - 1}', f'--batch={BATCH}', '--steps=4',
          f'--out={out}']


def _shards(out):
  directory = os.path.join(out, sampling.SHARD_DIR)
  return sorted(n for n in os.listdir(directory) if n.startswith('shard-')) if os.path.isdir(
      directory) else []


def test_killed_sample_py_resumes_to_the_uninterrupted_result(run_dir, tmp_path):
  server, env = forkserver.get(), forkserver.child_env()
  ref_out, out = str(tmp_path / 'reference'), str(tmp_path / 'killed')
  reference = server.spawn('sample.py', _argv(run_dir, ref_out), env=env)
  killed = server.spawn('sample.py', _argv(run_dir, out), env=env)  # meanwhile: start-up is serial
  rng = random.Random()
  batches, delay = rng.randint(1, 12), rng.uniform(0.0, 0.1)
  try:
    assert forkserver.wait_for(lambda: len(_shards(out)) >= batches, 180, child=killed), \
        killed.stderr[-3000:]
    forkserver.wait_for(lambda: False, delay, child=killed)
    killed.kill()
    assert killed.wait(60) == -signal.SIGKILL, killed.stderr[-3000:]
    assert reference.wait(180) == 0, reference.stderr[-3000:]
  finally:
    killed.kill()
    reference.kill()
  done = len(_shards(out))
  print(f'killed after {batches} batches + {delay:.3f} s: {done} of {SEEDS // BATCH} were done')
  assert 0 < done < SEEDS // BATCH and not os.path.exists(os.path.join(out, 'samples.npz'))

  rerun = server.run('sample.py', _argv(run_dir, out), env=env, timeout=180)
  assert rerun.rc == 0, rerun.stderr[-3000:]
  found = done * BATCH
  assert re.search(rf'^Found {found} of {SEEDS} samples already done in '
                   rf'{re.escape(os.path.join(out, sampling.SHARD_DIR))}; sampling the other '
                   rf'{SEEDS - found}\.$', rerun.stdout, re.M), rerun.stdout
  left = SEEDS // BATCH - done
  assert f' {left}/{left} ' in rerun.stderr  # the progress bar: only the missing batches
  ref, got = np.load(os.path.join(ref_out, 'samples.npz')), np.load(os.path.join(out, 'samples.npz'))
  assert sorted(got.files) == ['arr_0', 'arr_1', 'images', 'labels', 'seeds']
  assert got['images'].shape == (SEEDS, 8, 8, 1) and got['images'].dtype == np.uint8
  for name in ('images', 'seeds', 'labels', 'arr_0', 'arr_1'):
    np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
  # openai's evaluator reads the same samples as `arr_0` and their class labels as `arr_1`.
  np.testing.assert_array_equal(got['arr_0'], got['images'])
  np.testing.assert_array_equal(got['arr_1'], got['labels'])
  assert got['seeds'].tolist() == list(range(SEEDS))
  assert open(os.path.join(out, 'grid.png'), 'rb').read() == open(
      os.path.join(ref_out, 'grid.png'), 'rb').read()
  assert _shards(out) == _shards(ref_out)
  assert not [n for n in os.listdir(os.path.join(out, sampling.SHARD_DIR)) if '.tmp-' in n]

  # Other settings never mix with these shards: refused before anything is sampled.
  with pytest.raises(ValueError, match=r'holds samples made with other settings \(num_steps\); '
                                       r'pass another --out, or delete .* to start over\.'):
    sampling.sample_run(run_dir, f'0-{SEEDS - 1}', out=out, batch_size=BATCH, num_steps=5)


def test_an_out_that_is_a_file_fails_before_sampling(run_dir, tmp_path):
  path = tmp_path / 'out.png'
  path.write_bytes(b'')
  with pytest.raises(ValueError, match=r'--out .* is a file; pass a directory'):
    sampling.sample_run(run_dir, '0-3', out=str(path))
