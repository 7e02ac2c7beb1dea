"""Checkpoints that cannot lie and runs that cannot be lost.

Damaged checkpoints (flipped bytes, truncated or deleted files) are detected and skipped for the
newest good step; a run with every checkpoint damaged refuses to start over them; a new step that
fails verification never costs the last good one; a run SIGKILLed again and again — during steps,
start-up and async saves — and stopped by SIGTERM/SIGINT ends exactly where an uninterrupted run
does, data order included; a divergence can be skipped.
"""

import glob
import logging
import os
import random
import re
import shutil
import signal

import forkserver
import jax
import numpy as np
import pytest

from configs import edm as edm_configs
from diffjax import runs
from diffjax.runs import checkpoint as ckpt_lib
from diffjax.training import loop

STEPS = 30  # length of the reference run (and of the killed one)


def tiny_config(steps: int = STEPS, **train):
  c = edm_configs.get_config('tiny')
  c.train.batch_size = 8
  c.train.total_images = 8 * steps
  c.train.checkpoint_every = 1
  c.train.log_every = 1
  c.train.num_preview = 0
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
  """An uninterrupted run of STEPS steps that keeps every checkpoint: (workdir, final state)."""
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  state = loop.train(tiny_config(keep_checkpoints=STEPS + 1), workdir, progress=False)
  return workdir, jax.device_get(state)


@pytest.fixture
def run3(reference, tmp_path):
  """A copy of the reference run cut back to checkpoints 1, 2, 3."""
  workdir = str(tmp_path / 'run3')
  shutil.copytree(reference[0], workdir)
  for step in range(4, STEPS + 1):
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  return workdir


def _ckpt(workdir, *parts):
  return os.path.join(workdir, 'checkpoints', *map(str, parts))


def _committed(workdir):
  root = _ckpt(workdir)
  return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def _largest_data_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', '*'), recursive=True)
           if os.path.isfile(f) and os.path.basename(f) not in ('_METADATA', '_sharding',
                                                               'commit_success.txt')]
  return max(files, key=os.path.getsize)


def _flip(path):
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 0x5A
  open(path, 'wb').write(bytes(data))


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


DAMAGES = {
    'flip_bytes': lambda d: _flip(_largest_data_file(d)),
    'truncate_data': lambda d: _truncate(_largest_data_file(d)),
    'delete_data': lambda d: os.remove(_largest_data_file(d)),
    'delete_fingerprints': lambda d: shutil.rmtree(os.path.join(d, ckpt_lib.INTEGRITY_ITEM)),
    'delete_metadata': lambda d: os.remove(os.path.join(d, 'state', '_METADATA')),
}


def _snapshot(root):
  """{relative path: bytes} of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _params_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------
# Fingerprints and verified garbage collection.
# ------------------------------------------------------------------------------------------------


def test_fingerprint_changes_with_any_single_element():
  import ml_dtypes
  rng = np.random.default_rng(0)
  arrays = [rng.normal(size=(7, 5)).astype(np.float32),
            rng.normal(size=(33,)).astype(ml_dtypes.bfloat16),
            rng.integers(-9, 9, size=(4, 4)).astype(np.int32),
            rng.integers(0, 2, size=(10,)).astype(bool),
            rng.integers(0, 255, size=(3, 3, 3)).astype(np.uint8),
            np.float32(3.5)]
  for a in arrays:
    fp = ckpt_lib.array_fingerprint(a)
    assert ckpt_lib.array_fingerprint(a.copy()) == fp  # deterministic
    for _ in range(5):
      b = np.array(a, copy=True).reshape(-1)
      k = rng.integers(b.size)
      raw = b.view(np.uint8 if b.dtype.itemsize == 1 else f'u{b.dtype.itemsize}')
      raw[k] ^= 1 if b.dtype == bool else 1 << int(rng.integers(8 * b.dtype.itemsize))
      assert ckpt_lib.array_fingerprint(b.reshape(np.shape(a))) != fp, (a.dtype, k)
  # Swapping two elements changes it too (positions are part of the hash).
  a = np.arange(10, dtype=np.float32)
  assert ckpt_lib.array_fingerprint(a[::-1].copy()) != ckpt_lib.array_fingerprint(a)
  # The same values give the same fingerprint wherever they came from (host, replicated devices).
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('data',))
  x = jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  assert ckpt_lib.fingerprints({'w': jax.device_get(x)}) == {'w': ckpt_lib.array_fingerprint(a)}


def test_new_step_that_fails_verification_never_costs_the_last_good_one(tmp_path, monkeypatch,
                                                                       caplog):
  directory = str(tmp_path / 'ckpt')
  tree = {'w': np.arange(6, dtype=np.float32), 'n': np.int32(1)}
  c = ckpt_lib.Checkpointer(directory, max_to_keep=1, async_save=True)
  c.save(1, tree)
  c.close()  # the last step of a run is verified at once
  assert _committed_dir(directory) == [1]

  # Step 2 is committed with data that does not match its fingerprints (as if corrupted on the
  # way to disk). With max_to_keep=1, Orbax's own collection would now delete step 1.
  real = ckpt_lib.fingerprints
  monkeypatch.setattr(ckpt_lib, 'fingerprints', lambda host: {
      k: '0' * 16 for k in real(host)})
  c = ckpt_lib.Checkpointer(directory, max_to_keep=1, async_save=True)
  c.save(2, {'w': tree['w'] + 1, 'n': np.int32(2)})
  monkeypatch.setattr(ckpt_lib, 'fingerprints', real)
  with caplog.at_level(logging.WARNING):
    c.close()
  assert 'Checkpoint step 2' in caplog.text and 'failed verification' in caplog.text
  assert _committed_dir(directory) == [1]  # the good step survived
  assert os.path.isdir(os.path.join(directory, ckpt_lib.DAMAGED_DIR, '2'))

  # A good newer step, once verified, does replace it.
  c = ckpt_lib.Checkpointer(directory, max_to_keep=1, async_save=True)
  c.save(3, {'w': tree['w'] + 2, 'n': np.int32(3)})
  c.close()
  assert _committed_dir(directory) == [3]
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), tree)
  restored, step = ckpt_lib.Checkpointer(directory).restore(abstract)
  assert step == 3 and np.asarray(restored['w']).tolist() == (tree['w'] + 2).tolist()


def _committed_dir(directory):
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def test_leftovers_of_a_hard_kill_are_ignored_then_cleaned(run3):
  root = _ckpt(run3)
  os.makedirs(os.path.join(root, '4.orbax-checkpoint-tmp-1234', 'state'))  # killed mid-save
  os.makedirs(os.path.join(root, ckpt_lib.TRASH_DIR, '1-99-1'))  # killed mid-delete
  c = ckpt_lib.Checkpointer(root)
  assert c.steps() == [1, 2, 3]
  tree = {'w': np.zeros(3, np.float32)}
  c.save(10, tree)
  c.close()
  names = os.listdir(root)
  assert not any(ckpt_lib.TMP_MARKER in n for n in names) and ckpt_lib.TRASH_DIR not in names


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints in a training run.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(damage, run3, reference, capsys,
                                                                 caplog):
  DAMAGES[damage](_ckpt(run3, 3))
  config = tiny_config()
  with caplog.at_level(logging.WARNING):
    loop.train(config, run3, max_steps=2, progress=False)  # restores, nothing to train
  warnings = [r.getMessage() for r in caplog.records if 'Skipping checkpoint step 3' in r.getMessage()]
  assert len(warnings) == 1 and 'trying an older one' in warnings[0]
  if damage == 'flip_bytes':  # Orbax restores these without complaint: only fingerprints catch it
    assert 'does not match the fingerprint' in warnings[0]
  out = capsys.readouterr().out
  assert f'Resuming from step 2 of {run3} (step(s) 3 could not be used and were moved to ' \
         'checkpoints/damaged/).' in out
  assert _committed(run3) == [1, 2]
  assert os.path.isdir(_ckpt(run3, 'damaged', 3))
  if damage == 'flip_bytes':
    # The run goes on from step 2, saves step 3 again, and matches the undamaged run.
    state = loop.train(config, run3, max_steps=3, progress=False)
    expected = runs.load(reference[0], step=3)
    _params_close(state.params, expected.params)
    assert runs.load(run3).step == 3


def test_every_checkpoint_damaged_stops_instead_of_training_from_scratch(run3):
  for step in (1, 2, 3):
    _truncate(_largest_data_file(_ckpt(run3, step)))
  before = _snapshot(run3)
  with pytest.raises(ckpt_lib.NoCheckpointError,
                     match=r'could be restored \(tried step\(s\) 3, 2, 1\).*move the directory '
                           'aside to train from scratch'):
    loop.train(tiny_config(), run3, progress=False)
  assert _snapshot(run3) == before  # nothing moved, rewritten or added


# lr = nan, as in test_training: the same compiled steps (one XLA compile for both files).


def test_divergence_names_the_steps_and_keeps_the_checkpoint(run3):
  config = tiny_config()
  config.optim.lr = float('nan')
  with pytest.raises(loop.TrainingDiverged) as e:
    loop.train(config, run3, max_steps=5, progress=False)
  message = str(e.value)
  assert 'between step 3 and step 4' in message and 'last good checkpoint is step 3' in message
  assert 'Rerun the same command with a lower learning rate (e.g. --config.optim.lr=1e-4) to ' \
         'resume from it' in message and '--config.train.skip_nonfinite=True' in message
  assert _committed(run3) == [1, 2, 3]
  good = runs.load(run3)
  assert good.step == 3 and all(np.isfinite(x).all() for x in jax.tree.leaves(good.params))


def test_skip_nonfinite_keeps_the_last_good_state(run3, caplog):
  config = tiny_config(skip_nonfinite=True)
  config.optim.lr = float('nan')
  # Both steps skipped: more than half, so the run ends in an error (exit != 0), not "Done".
  with caplog.at_level(logging.WARNING), pytest.raises(
      loop.TrainingDiverged, match=r'2 of the 2 steps from step 4 to 5 were non-finite'):
    loop.train(config, run3, max_steps=5, progress=False)
  assert 'Skipped a non-finite update at step 4' in caplog.text
  assert 'Skipped a non-finite update at step 5' in caplog.text
  state = runs.load(run3)  # step 5 was saved: the last finite update's params
  assert state.step == 5
  good = runs.load(run3, step=3)
  _params_close(state.params, good.params, rtol=0, atol=0)
  _params_close(state.ema_params, good.ema_params, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Kill loop: SIGKILL at random moments (mid-save included), SIGTERM and SIGINT; rerun each time.
# ------------------------------------------------------------------------------------------------


def _progress(child):
  """The newest step in the child's progress bar (its own output: nothing stale)."""
  return max((int(m) for m in re.findall(rf'(\d+)/{STEPS}\b', child.stderr)), default=-1)


def _tmp_steps(workdir):
  root = _ckpt(workdir)
  if not os.path.isdir(root):
    return []
  return [n for n in os.listdir(root) if ckpt_lib.TMP_MARKER in n]


def test_kills_and_signals_end_where_an_uninterrupted_run_does(reference, data_dir, tmp_path):
  workdir = str(tmp_path / 'killed')
  argv = ['--config=configs/edm.py:tiny', f'--workdir={workdir}', '--config.train.batch_size=8',
          f'--config.train.total_images={8 * STEPS}', '--config.train.checkpoint_every=1',
          '--config.train.keep_checkpoints=2', '--config.train.log_every=1',
          '--config.train.num_preview=0']
  server, env = forkserver.get(), forkserver.child_env(TFDS_DATA_DIR=data_dir)
  rng = random.Random(8)
  # Every kind of interruption, each more than once where it matters (saves are where a kill does
  # damage); eight restarts keep the test affordable (each restart compiles the step).
  plan = ['save', 'step', 'startup', 'save', 'SIGTERM', 'step', 'SIGINT', 'save']
  kills, mid_save, history = 0, 0, []
  for action in plan:
    resume = max(_committed(workdir), default=0)
    child = server.spawn('train.py', argv, env=env)
    if action == 'startup':
      forkserver.wait_for(lambda: False, rng.uniform(0.3, 3.0), child=child)
    elif action == 'save':  # a save of a new step has begun: its tmp directory exists
      forkserver.wait_for(lambda r=resume: [n for n in _tmp_steps(workdir)
                                            if int(n.split('.')[0]) > r], 120, child=child)
    else:  # the progress bar shows a step (or a few) past the resume point
      target = resume + 1 + rng.randrange(3)
      forkserver.wait_for(lambda c=child, t=target: _progress(c) >= t, 120, child=child)
      forkserver.wait_for(lambda: False, rng.uniform(0, 0.2), child=child)
    assert child.poll() is None, f'{action}: the run ended early:\n{child.stderr[-3000:]}'
    if action.startswith('SIG'):
      child.signal(getattr(signal, action))
      assert child.wait(120) == 0, child.stderr[-3000:]
      m = re.search(rf'Caught {action} at step (\d+): saved checkpoint step (\d+) in '
                    r'\S+; rerun the same command to resume from step (\d+)\.', child.stdout)
      assert m and m.group(1) == m.group(2) == m.group(3), child.stdout + child.stderr[-3000:]
      assert max(_committed(workdir)) == int(m.group(1))
    else:
      child.kill()
      assert child.wait(60) == -signal.SIGKILL
      kills += 1
      mid_save += action == 'save' and bool(_tmp_steps(workdir))
    history.append((action, resume, max(_committed(workdir), default=0)))
  print(f'kill loop: {kills} SIGKILLs ({mid_save} mid-save) and 2 signals: '
        + ', '.join(f'{a}@{r}->{c}' for a, r, c in history))
  assert kills >= 6 and mid_save >= 2, history
  assert history[-1][2] < STEPS, history  # the last run still has steps to do

  final = server.run('train.py', argv, env=env, timeout=300)
  assert final.rc == 0, final.stderr[-3000:]
  assert 'Resuming from step' in final.stdout and f'Done: {workdir}' in final.stdout
  assert 'Traceback' not in final.stderr

  # The final parameters equal the uninterrupted run's, and every step was logged once, with the
  # same loss as the uninterrupted run's: the same batches in the same order.
  run = runs.load(workdir)
  assert run.step == STEPS
  ref_state = reference[1]
  _params_close(run.params, ref_state.params)
  _params_close(run.ema_params, ref_state.ema_params)
  import json
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  ref_rows = [json.loads(line) for line in open(os.path.join(reference[0], 'metrics.jsonl'))]
  assert [r['step'] for r in rows] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r['loss'] for r in rows], [r['loss'] for r in ref_rows], rtol=1e-5)
  # Nothing left over: two verified checkpoints, no temporary or trash directories.
  assert _committed(workdir) == [STEPS - 1, STEPS]
  assert not _tmp_steps(workdir) and not os.path.exists(_ckpt(workdir, ckpt_lib.TRASH_DIR))
