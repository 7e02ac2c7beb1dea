"""The train loop: parts from the config, a jitted sharded step, Orbax checkpoints, logs, previews.

The workdir is the run: rerunning the same command resumes from the newest checkpoint that
restores, with the same data order and the same per-step randomness (`fold_in(key, step)`), so an
interrupted run ends where an uninterrupted one would. A non-finite loss stops the run naming the
step range and keeps the last good checkpoint; SIGTERM/SIGINT save a checkpoint and exit cleanly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from diffjax import build
from diffjax import images as images_lib
from diffjax import sampling
from diffjax.training import checkpoint as ckpt_lib
from diffjax.training import parallel
from diffjax.training import state as state_lib
from diffjax.training import step as step_lib

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
  """The loss or a gradient became non-finite."""


def total_steps(config) -> int:
  """Training length in steps from config.train.total_images (EDM counts images, not steps)."""
  return int(math.ceil(config.train.total_images / config.train.batch_size))


class _StopFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps (then saves and exits)."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread: signals can't be caught here.
        pass
    return self

  def _handle(self, signum, frame):
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _MetricWriter:
  """Scalars to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._tb = None
    if enabled:
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:  # TensorBoard logging is optional.
        self._tb = None

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def _make_preview(config, denoiser, spec, mesh):
  """A function params -> uint8 preview grid images, sampling fixed seeds with config.sample."""
  n = int(config.train.num_preview)
  if n <= 0:
    return None
  classes = build.num_classes(config, spec)
  sampler = build.sampler_fn(config, denoiser.precond)
  sample_fn = sampling.make_sample_fn(denoiser, sampler, (spec.resolution,) * 2 + (spec.channels,),
                                      classes)
  seeds = list(range(n))
  labels = sampling.default_labels(seeds, classes)

  def preview(params):
    x = sampling.generate(sample_fn, params, seeds, labels, batch_size=n, mesh=mesh)
    return images_lib.to_uint8(x)

  return preview


def train(config, workdir: str, *, max_steps: Optional[int] = None, progress: bool = True,
          objective=None, init_params: Optional[Callable[[], Any]] = None,
          denoiser=None) -> Any:
  """Trains (or resumes) the run in `workdir` and returns the final TrainState.

  Args:
    config: the run's ConfigDict (configs/*.py get_config()).
    workdir: the run's directory: config.json, checkpoints/, metrics.jsonl, samples/.
    max_steps: stop after this global step even if the run is longer (tests, staged runs).
    progress: show a progress bar.
    objective: a `step.Objective` to train instead of config.loss's (e.g. a distillation target
      that closes over a teacher).
    init_params: () -> initial params, instead of a fresh init (e.g. a student that starts from
      its teacher). Ignored when the workdir already has a checkpoint (the run resumes).
    denoiser: the preconditioned network, instead of the one config.model/precond build.

  Raises:
    TrainingDiverged: on a non-finite loss or gradient (unless config.train.skip_nonfinite).
  """
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh()
  batch_size = int(config.train.batch_size)
  parallel.check_batch_size(batch_size, mesh)

  from diffjax import data  # TensorFlow loads here, not at import time.
  spec = build.dataset_spec(config)
  denoiser = denoiser or build.build_denoiser(config, spec)
  objective = step_lib.as_objective(objective or build.build_objective(config, spec, denoiser))
  tx = build.build_optimizer(config)
  if is_main:
    build.save_config(config, workdir)

  rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  key_init, key_train = jax.random.split(jax.random.key(int(config.seed)))

  def make_state():
    params = (init_params() if init_params is not None else
              build.init_params(denoiser.network, spec, key_init))
    return state_lib.create_train_state(params, tx, objective.init_extra())

  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, build.CHECKPOINT_DIR),
                                       max_to_keep=int(config.train.keep_checkpoints))
  if checkpointer.steps():
    abstract = ckpt_lib.abstract_like(jax.eval_shape(make_state), rep)
    state, start = checkpointer.restore(abstract)
    if is_main:
      print(f'Resuming from step {start} of {workdir}.', flush=True)
  elif init_params is not None:
    # Given params (e.g. a teacher's) are placed as they are, not baked into a jitted init.
    state = state_lib.create_train_state(init_params(), tx, objective.init_extra())
    state, start = jax.device_put(state, rep), 0
  else:
    state, start = jax.jit(make_state, out_shardings=rep)(), 0

  last = total_steps(config) if max_steps is None else min(max_steps, total_steps(config))
  o = config.optim
  train_step = step_lib.make_train_step(
      objective, tx, batch_size=batch_size,
      ema_halflife_images=config.train.ema_halflife_images,
      ema_rampup_ratio=config.train.ema_rampup_ratio,
      skip_nonfinite=bool(config.train.skip_nonfinite),
      lr_fn=lambda s: state_lib.learning_rate(s, o.lr, o.lr_rampup_images, batch_size))
  jitted_step = jax.jit(train_step, in_shardings=(rep, shard, rep), out_shardings=(rep, rep),
                        donate_argnums=(0,))
  preview = _make_preview(config, denoiser, spec, mesh)
  iterator = data.make_iterator(
      config.data.name, split='train', global_batch_size=batch_size, seed=int(config.seed),
      start_step=start, data_dir=config.data.data_dir or None, x_flip=bool(config.data.x_flip))

  writer = _MetricWriter(workdir, is_main)
  bar = None
  if progress and is_main:
    from tqdm import tqdm
    bar = tqdm(total=last, initial=start, unit='step', dynamic_ncols=True)

  def save(step: int, force: bool = False) -> None:
    checkpointer.save(step, state, force=force)

  def write_preview(step: int) -> None:
    if preview is None:
      return
    grid = preview(state.ema_params)
    if is_main:
      path = images_lib.save_grid(grid, os.path.join(workdir, 'samples', f'step_{step:08d}.png'))
      images_lib.save_grid(grid, os.path.join(workdir, 'samples', 'latest.png'))
      log.info('Wrote %s', path)

  step = start
  last_good = start
  window = {'loss': [], 'grad_norm': []}
  t_window, n_window = time.time(), 0
  try:
    with _StopFlag() as stop:
      while step < last:
        batch = parallel.shard_batch(next(iterator), mesh)
        state, metrics = jitted_step(state, batch, key_train)
        step += 1
        # Reading the metrics every step bounds the dispatch queue (multi-device CPU runs deadlock
        # when many collective steps are queued) and catches a divergence at the exact step.
        m = jax.device_get(metrics)
        if not bool(m['finite']):
          if not config.train.skip_nonfinite:
            good = checkpointer.latest_step()
            raise TrainingDiverged(
                f'The loss or a gradient became non-finite between step {last_good} and step '
                f'{step}; the last good checkpoint is step {good}. Rerun the same command with a '
                f'lower learning rate (e.g. --config.optim.lr={o.lr / 2:g}) to resume from it, or '
                'set --config.train.skip_nonfinite=True to skip such steps.')
          log.warning('Skipped a non-finite update at step %d.', step)
        else:
          last_good = step
          window['loss'].append(float(m['loss']))
          window['grad_norm'].append(float(m['grad_norm']))
        n_window += 1
        if bar is not None:
          bar.update(1)
        if step % config.train.log_every == 0 or step == last:
          elapsed = max(time.time() - t_window, 1e-9)
          scalars = {k: float(np.mean(v)) for k, v in window.items() if v}
          scalars.update(img_per_s=n_window * batch_size / elapsed, lr=float(m.get('lr', 0.0)),
                         kimg=step * batch_size / 1e3)
          writer.write(step, scalars)
          if bar is not None:
            bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}",
                            img_s=f"{scalars['img_per_s']:.0f}")
          window = {'loss': [], 'grad_norm': []}
          t_window, n_window = time.time(), 0
        if step % config.train.checkpoint_every == 0 or step == last:
          save(step)
        if config.train.sample_every and step % config.train.sample_every == 0 and step != last:
          write_preview(step)
        if stop.signal is not None:
          save(step, force=True)
          checkpointer.wait()
          if is_main:
            print(f'Caught {stop.signal}: saved step {step} to {checkpointer.directory}; rerun the '
                  'same command to resume from it.', flush=True)
          return state
    if step > start or preview is not None:
      write_preview(step)
    return state
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    checkpointer.close()
