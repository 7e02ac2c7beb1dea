"""Faults of a training run that must stop it with one sentence: a checkpoint directory that
becomes unwritable mid-run, a resume with a config its checkpoints do not fit, most steps skipped
as non-finite, and a run length of zero or less."""

import errno
import json
import os
import time

import pytest

from configs import edm as edm_configs
from diffjax import runs
from diffjax.runs import checkpoint as ckpt_lib
from diffjax.training import loop


def tiny_config(steps, **train):
  c = edm_configs.get_config('tiny')
  c.train.batch_size = 8
  c.train.total_images = 8 * steps
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.train.num_preview = 0
  for k, v in train.items():
    c.train[k] = v
  return c


def _logged_steps(workdir):
  return [json.loads(line)['step'] for line in open(os.path.join(workdir, 'metrics.jsonl'))]


def test_unwritable_checkpoints_mid_run_stop_at_the_first_failed_save(data_dir, tmp_path,
                                                                      monkeypatch):
  workdir = str(tmp_path / 'run')
  probe, calls = ckpt_lib.Checkpointer._probe, []

  def failing_probe(self):  # the directory turns read-only after the first save (simulated)
    calls.append(1)
    if len(calls) > 1:
      raise PermissionError(errno.EACCES, 'Permission denied', self.directory)
    probe(self)

  monkeypatch.setattr(ckpt_lib.Checkpointer, '_probe', failing_probe)
  t = time.time()
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    loop.train(tiny_config(4, checkpoint_every=1), workdir, progress=False)
  elapsed = time.time() - t
  monkeypatch.undo()
  message = str(e.value)
  assert 'Could not write checkpoint step 2' in message and 'not writable' in message
  assert 'rerun the same command: it resumes from step 1, the newest verified checkpoint' in message
  assert _logged_steps(workdir) == [1, 2]  # stopped there, not at the end of the run
  assert runs.load(workdir).step == 1  # intact and loadable
  assert elapsed < 60, elapsed

  # Fault 2 on the same run: a resume whose config the checkpoints don't fit is refused, with the
  # keys, before anything is written; fields that may change on resume are accepted.
  changed = tiny_config(4, checkpoint_every=1)
  changed.loss.kwargs.p_mean = -1.0
  changed.train.batch_size = 16  # may change: the run goes on in images (test_batch_change.py)
  before = sorted(os.listdir(workdir))
  with pytest.raises(ValueError, match=r'differs from the one .* in loss\.kwargs\.p_mean; '
                                       r'.*--allow_config_change'):
    loop.train(changed, workdir, progress=False)
  assert sorted(os.listdir(workdir)) == before
  free = tiny_config(20, log_every=5, checkpoint_every=7, keep_checkpoints=5)
  free.sample.num_steps = 9
  free.optim.lr = 1e-4
  free.data.data_dir = data_dir
  assert loop.config_changes(runs.read_config(workdir), free) == []
  state = loop.train(free, workdir, max_steps=1, progress=False)  # restores; nothing to train
  assert int(state.step) == 1
  loop.train(changed, workdir, max_steps=1, progress=False, allow_config_change=True)


def test_mostly_skipped_steps_do_not_end_in_done(data_dir, tmp_path, monkeypatch):
  config = tiny_config(4, skip_nonfinite=True)
  config.optim.lr = float('nan')
  monkeypatch.setattr(loop, 'MAX_CONSECUTIVE_SKIPS', 3)
  with pytest.raises(loop.TrainingDiverged,
                     match=r'Steps 1 to 3 were all non-finite and skipped .*lower learning rate'):
    loop.train(config, str(tmp_path / 'run'), progress=False)


@pytest.mark.parametrize('total_images,max_steps,says', [
    (0, None, 'total_images must be positive'),
    (-8, None, 'total_images must be positive'),
    (80, -5, '--max_steps must be 0 or more'),
])
def test_empty_run_lengths_are_refused_up_front(tmp_path, total_images, max_steps, says):
  config = tiny_config(1, total_images=total_images)
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match=says):
    loop.train(config, workdir, max_steps=max_steps, progress=False)
  assert not os.path.exists(workdir)


def test_a_stop_during_start_up_says_nothing_was_saved(data_dir, tmp_path, monkeypatch):
  import signal

  from diffjax import data
  make_iterator = data.make_iterator

  def preempted(*args, **kwargs):  # SIGTERM while the run starts (before its first step)
    os.kill(os.getpid(), signal.SIGTERM)
    return make_iterator(*args, **kwargs)

  monkeypatch.setattr(data, 'make_iterator', preempted)
  workdir = str(tmp_path / 'run')
  with pytest.raises(loop.TrainingInterrupted, match=r'^Caught SIGTERM before the first step: '
                     r'nothing was saved; rerun the same command to start the run\.$'):
    loop.train(tiny_config(4), workdir, progress=False)
  assert not os.path.exists(os.path.join(workdir, runs.CHECKPOINT_DIR, '0'))
  assert not os.path.exists(os.path.join(workdir, runs.CONFIG_FILE))
