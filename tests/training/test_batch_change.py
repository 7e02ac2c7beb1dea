"""A resume with another batch size goes on in images seen: kimg, the lr ramp and decay, the EMA
ramps, the training length and the data position follow n_img (runs.progress), checked against
n_img counted by hand; runs without the progress record (older runs) resume too."""

import json
import math
import os

import epath_gs
import jax
import jax.numpy as jnp
import numpy as np
import optax
import saved_runs

from configs import edm as edm_configs
from diffjax import build, data, ema, runs
from diffjax import state as state_lib
from diffjax.runs import progress
from diffjax.training import distill, loop
from diffjax.training import step as step_lib

LR, RAMP, DECAY, HALFLIFE, RATIO = 2e-3, 100.0, 30.0, 50.0, 0.5


def tiny_config(batch_size, total_images=60):
  c = edm_configs.get_config('tiny')
  c.train.batch_size = batch_size
  c.train.total_images = total_images
  c.train.checkpoint_every = 100  # saves at the end of each call only
  c.train.log_every = 1
  c.train.num_preview = 0
  c.optim.lr, c.optim.lr_rampup_images, c.optim.lr_decay_images = LR, RAMP, DECAY
  c.train.ema_halflife_images, c.train.ema_rampup_ratio = HALFLIFE, RATIO
  return c


def closed_form(n_before, batch):
  """lr (EDM ramp, EDM2 decay) and EDM's EMA β of a step that starts after n_before images."""
  lr = LR * min(n_before / RAMP, 1.0) / math.sqrt(max(n_before / DECAY, 1.0))
  halflife = min(HALFLIFE, RATIO * n_before)
  return lr, (0.5**(batch / halflife) if halflife > 0 else 0.0)


def test_resume_with_another_batch_size_goes_on_in_images(data_dir, tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / 'run')
  # A run at step 1 as runs from before progress.json left it: config.json and checkpoint 1 (its
  # initial state stands for a trained one, which spares the test a second compiled step).
  saved_runs.save_initialized_run(tiny_config(8), workdir, counters_at_step=True)  # 8 images seen, no progress.json
  starts = []
  make_iterator = data.make_iterator

  def recording(*args, **kwargs):
    starts.append(kwargs['start_step'])
    return make_iterator(*args, **kwargs)

  monkeypatch.setattr(data, 'make_iterator', recording)
  # The length of a (distillation) stage resumed at batch 16: 1 + ceil((60 − 8) / 16) steps.
  assert distill.stage_steps(tiny_config(16), workdir) == 5
  state = loop.train(tiny_config(16), workdir, progress=False)
  out = capsys.readouterr().out
  assert (f'Resuming from step 1 of {workdir} (0.008 kimg) with batch size 16 instead of 8; '
          'kimg, the lr and EMA schedules and the data go on in images, to step 5 (0.06 kimg).'
          ) in out, out

  assert int(state.step) == 1 + math.ceil((60 - 8) / 16) == 5
  assert progress.read_segments(workdir) == [(0, 8), (1, 16)]
  assert starts == [8 // 16]  # the data goes on at image 8, in batch 0 of 16 (8 shown again)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == [2, 3, 4, 5]
  for r in rows:
    s = r['step']
    n_before = 8 + (s - 2) * 16  # images seen before step s, by hand
    lr, beta = closed_form(float(n_before), 16)
    np.testing.assert_allclose(r['kimg'], (n_before + 16) / 1e3, rtol=1e-12, err_msg=f'step {s}')
    np.testing.assert_allclose(r['lr'], lr, rtol=1e-5, err_msg=f'step {s}')
    np.testing.assert_allclose(r['ema_beta'], beta, rtol=1e-5, err_msg=f'step {s}')


def test_segments_count_images_and_drop_those_after_the_restored_step(tmp_path):
  segments = [(0, 8), (3, 16), (5, 4)]
  assert [progress.images_at(segments, s) for s in (0, 1, 3, 4, 5, 7)] == [0, 8, 24, 40, 56, 64]
  # A checkpoint older than the record's last segment (newer ones moved aside): those go.
  assert progress.continue_from(segments, 3, 8) == [(0, 8)]
  assert progress.continue_from(segments, 4, 8) == [(0, 8), (3, 16), (4, 8)]
  assert progress.continue_from(segments, 4, 16) == [(0, 8), (3, 16)]
  assert progress.continue_from([], 0, 32) == [(0, 32)]
  workdir = str(tmp_path / 'run')
  assert progress.read_segments(workdir) == [] and progress.read_segments(workdir, 4) == [(0, 4)]
  runs.save_config(tiny_config(8), workdir)  # a run from before the record: config.json's batch
  assert progress.read_segments(workdir, 4) == [(0, 8)]
  progress.write_segments(workdir, segments)
  assert progress.read_segments(workdir) == segments and progress.images_seen(workdir, 6) == 60
  # 60 images at step 6 of 8 + 16 + 4 + 4 batches; resumed with 32: ceil(40 / 32) more steps.
  assert loop.resumed_total_steps(tiny_config(32, 100), workdir, 6) == 6 + 2
  assert loop.resumed_total_steps(tiny_config(32, 50), workdir, 6) == 6  # already past the end
  with epath_gs.mock_gs(tmp_path / 'gs') as local:  # an object store: written whole, no tmp file
    progress.write_segments('gs://bucket/run', segments)
    assert progress.read_segments('gs://bucket/run') == segments
    assert os.listdir(local('gs://bucket/run')) == [progress.PROGRESS_FILE]
  (tmp_path / 'run' / progress.PROGRESS_FILE).write_text('{"segments": [[0, 8]]}')
  try:
    progress.read_segments(workdir)
    raise AssertionError('a damaged record must be refused')
  except ValueError as e:
    assert 'is not a progress record' in str(e) and 'delete it' in str(e)


def test_train_step_and_optimizer_count_images_from_the_segment_start():
  """EMA β, post-hoc EMA β and the optimizer's applied lr at step 5 of a segment that started at
  step 3 with 24 images seen, at batch 16: n_img = 24 + 2·16 = 56 before the step."""
  params = {'w': jnp.ones((3,))}
  loss = lambda p, batch, key: (jnp.sum((p['w'] - batch['x'])**2), {})
  train_step = jax.jit(step_lib.make_train_step(
      loss, optax.sgd(0.1), batch_size=16, ema_halflife_images=HALFLIFE, ema_rampup_ratio=0.2,
      phema_stds=(0.1,), step0=3, images_at_step0=24,
      lr_fn=lambda s: state_lib.learning_rate(s, LR, RAMP, 16, DECAY, step0=3,
                                              images_at_step0=24)))
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = state_lib.create_train_state(params, optax.sgd(0.1),
                                       {step_lib.OBJECTIVE: {}, step_lib.PHEMA: {
                                           ema.profile_key(0.1): zeros}})
  state = state.replace(step=jnp.asarray(5, jnp.int32), ema_params=zeros)
  new, m = train_step(state, {'x': jnp.zeros((3,))}, jax.random.key(0))
  np.testing.assert_allclose(m['ema_beta'], 0.5**(16 / min(HALFLIFE, 0.2 * 56)), rtol=1e-6)
  np.testing.assert_allclose(m['lr'], LR * min(56 / RAMP, 1) / math.sqrt(56 / DECAY), rtol=1e-6)
  # The power-function profile's β after the step that brings n_img to 72 (EDM2 Eq. 127).
  gamma = ema.std_to_exp(0.1)
  beta = (1 - 16 / 72)**(gamma + 1)
  np.testing.assert_allclose(new.extra[step_lib.PHEMA][ema.profile_key(0.1)]['w'],
                             (1 - beta) * new.params['w'], rtol=1e-5)

  # The lr Adam applies: its update at count c divided by a constant-lr-1 Adam's, same state.
  c16 = tiny_config(16)
  resumed = build.build_optimizer(c16, step0=3, images_at_step0=24)
  unit = state_lib.make_optimizer(1.0, 16, b1=c16.optim.b1, b2=c16.optim.b2, eps=c16.optim.eps,
                                  grad_clip=c16.optim.grad_clip)
  grads = {'w': jnp.asarray([0.5, -1.0, 2.0])}
  for count in (3, 5):
    opt_state = optax.tree_utils.tree_set(resumed.init(params), count=jnp.asarray(count))
    u, _ = resumed.update(grads, opt_state, params)
    ref, _ = unit.update(grads, optax.tree_utils.tree_set(unit.init(params),
                                                          count=jnp.asarray(count)), params)
    n = 24 + (count - 3) * 16
    np.testing.assert_allclose(u['w'] / ref['w'],
                               LR * min(n / RAMP, 1) / math.sqrt(max(n / DECAY, 1)), rtol=1e-5)
