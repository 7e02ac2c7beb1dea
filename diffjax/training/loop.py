"""The train loop: parts from the config, a jitted sharded step, Orbax checkpoints, logs, previews.

The workdir is the run: rerunning the same command resumes from the newest checkpoint that
restores and verifies (see `checkpoint`), with the same data order and the same per-step randomness
(`fold_in(key, step)`), so an interrupted run ends where an uninterrupted one would — also after a
hard kill at any moment, mid-save included. A non-finite loss stops the run naming the step range
and keeps the last good checkpoint; SIGTERM/SIGINT finish the step, save a checkpoint and raise
`TrainingInterrupted` (the entry point exits 0 saying where the run resumes). Nothing in the workdir
is written before the run has restored its state and opened its data, so a run that fails to start
(bad config, missing data, damaged checkpoints) leaves the workdir as it was — but for the workdir
lock (`runs.lock`), taken before the run's files are read and removed when the run ends, which
makes a second run on a live run's workdir stop without touching it.
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

from diffjax import build, parallel, runs, sampling
from diffjax import images as images_lib
from diffjax import state as state_lib
from diffjax.objectives import base as objectives_base
from diffjax.runs import checkpoint as ckpt_lib
from diffjax.runs import files
from diffjax.runs import progress as progress_lib
from diffjax.training import step as step_lib

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
  """The loss or a gradient became non-finite."""


class TrainingInterrupted(Exception):
  """SIGTERM/SIGINT stopped the run after saving a checkpoint; rerunning resumes from it.

  Attributes:
    state: the TrainState at the saved step.
    step: the step the run resumes from.
  """

  def __init__(self, message: str, state=None, step: Optional[int] = None):
    super().__init__(message)
    self.state = state
    self.step = step


MAX_CONSECUTIVE_SKIPS = 10  # skip_nonfinite: this many non-finite steps in a row stop the run

# What a checkpoint depends on: a resume whose config differs here is refused (listing the keys)
# unless allow_config_change. Everything else (total_images, logging, sampling, checkpoint
# cadence, optim.lr, data.data_dir) may change on resume, train.batch_size too: the run's position
# is counted in images seen (`runs.progress`), which drive kimg, the lr ramp and decay, the EMA
# ramps, the training length and the data position, so they all go on where they were.
RESUME_FIXED = ('model', 'precond', 'loss', 'data', 'augment', 'distill', 'seed',
                'train.ema_halflife_images', 'train.ema_rampup_ratio',
                'train.phema_stds', 'optim.grad_clip', 'optim.weight_decay')
RESUME_FREE = ('data.data_dir', 'data.skip_bad_images', 'distill.teacher_workdir')


def _flat(tree, prefix=''):
  out = {}
  for k, v in (tree.items() if isinstance(tree, dict) else ()):
    name = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flat(v, name + '.'))
    else:
      out[name] = list(v) if isinstance(v, tuple) else v
  return out


def config_changes(saved, config) -> list:
  """The keys under RESUME_FIXED whose values differ between a run's config.json and `config`.

  Returns:
    ['model.preset', ...], sorted; numbers compare by value (2560 == 2560.0).
  """
  a = _flat(json.loads(saved.to_json_best_effort()))
  b = _flat(json.loads(config.to_json_best_effort()))
  fixed = lambda k: (any(k == f or k.startswith(f + '.') for f in RESUME_FIXED)
                     and not any(k == f or k.startswith(f + '.') for f in RESUME_FREE))
  return sorted(k for k in set(a) | set(b) if fixed(k) and a.get(k) != b.get(k))


def _check_resume_config(config, workdir: str, allow: bool) -> None:
  try:
    saved = runs.read_config(workdir)
  except (FileNotFoundError, ValueError):  # No config.json: nothing to compare with.
    return
  changed = config_changes(saved, config)
  if not changed:
    return
  shown = ', '.join(changed[:8]) + (f' and {len(changed) - 8} more' if len(changed) > 8 else '')
  if not allow:
    raise ValueError(
        f'The config differs from the one the checkpoints in {workdir} were trained with, in '
        f'{shown}; rerun with that config to resume, pass another --workdir for a new run, or '
        'pass --allow_config_change to resume with the new one anyway.')
  log.warning('Resuming %s with a changed config (%s), as --allow_config_change asks.', workdir,
              shown)


def total_steps(config, segments=None) -> int:
  """Training length in steps from config.train.total_images (EDM counts images, not steps).

  ceil(total_images / batch); with the run's `runs.progress` segments (the last one at
  config.train.batch_size from step0 on): step0 + ceil((total_images − n_img(step0)) / batch).
  """
  if not segments:
    return int(math.ceil(config.train.total_images / config.train.batch_size))
  step0, batch = segments[-1]
  left = float(config.train.total_images) - progress_lib.images_at(segments, step0)
  return int(step0) + max(0, int(math.ceil(left / batch)))


def resumed_total_steps(config, workdir: str, step: int) -> int:
  """`total_steps` of the run in `workdir` resumed at checkpoint `step` with `config`'s batch size.

  The batch size may differ from the one(s) the run was trained with (`runs.progress`).
  """
  batch = int(config.train.batch_size)
  if not step:
    return total_steps(config)
  segments = progress_lib.read_segments(workdir, batch)
  return total_steps(config, progress_lib.continue_from(segments, step, batch))


def phema_stds(config) -> tuple:
  """σ_rel of the post-hoc EMA profiles the run tracks (config.train.phema_stds; EDM2 runs)."""
  return tuple(float(s) for s in (config.train.get('phema_stds') or ()))


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
    if self.signal is not None:
      # A second signal while the first is being handled (e.g. Ctrl-C twice): stop at once. The
      # checkpoints are kill-safe, so this loses at most the steps since the last one.
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _MetricWriter:
  """Scalars to metrics.jsonl and TensorBoard (process 0 only).

  A local metrics.jsonl is appended to; an object store (gs://) has no append, so there the
  object is rewritten whole at each write (log rows are small; a reader always sees whole rows).
  """

  def __init__(self, workdir: files.PathLike, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    self._tb = None
    if enabled:
      path = files.path(workdir) / 'metrics.jsonl'
      rows = _trim_metrics(path, start_step)
      self._remote = None if files.is_local(path) else (path, rows)
      self._jsonl = path.open('a') if self._remote is None else None
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.fspath(files.path(workdir) / 'tensorboard'))
      except ImportError:  # TensorBoard logging is optional.
        self._tb = None
      except Exception as e:  # noqa: BLE001 - e.g. no writer for this URL scheme: optional too.
        log.warning('No TensorBoard logs in %s (%s); metrics.jsonl is written.', workdir, e)
        self._tb = None

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    line = json.dumps({'step': step, **scalars}) + '\n'
    if self._remote is not None:
      path, rows = self._remote
      rows.append(line)
      path.write_text(''.join(rows))
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def _trim_metrics(path, start_step: int) -> list:
  """Keeps only the rows of metrics.jsonl up to the step the run resumes from; returns them.

  An interrupted run logged steps after its last checkpoint (which the resumed run repeats), and a
  hard kill can leave half a line; both would corrupt the log. Rewritten atomically.

  Args:
    path: the epath.Path of metrics.jsonl (local or remote).
    start_step: the step the run resumes from (0 for a new run).
  """
  if not path.exists():
    return []
  lines = path.read_text().splitlines(keepends=True)
  keep = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:  # A line cut short by a kill.
      continue
    if isinstance(row, dict) and int(row.get('step', 0)) <= start_step:
      keep.append(json.dumps(row) + '\n')
  if not (len(keep) == len(lines) and all(a == b for a, b in zip(keep, lines))):
    files.write_atomic(path, ''.join(keep))
  return keep


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
          denoiser=None, allow_config_change: bool = False) -> Any:
  """Trains (or resumes) the run in `workdir` and returns the final TrainState.

  Args:
    config: the run's ConfigDict (configs/*.py get_config()).
    workdir: the run's directory: config.json, checkpoints/, metrics.jsonl, samples/.
    max_steps: stop after this global step even if the run is longer (tests, staged runs).
    progress: show a progress bar.
    objective: a `objectives.base.Objective` to train instead of config.loss's (e.g. a distillation target
      that closes over a teacher).
    init_params: () -> initial params, instead of a fresh init (e.g. a student that starts from
      its teacher). Ignored when the workdir already has a checkpoint (the run resumes).
    denoiser: the preconditioned network, instead of the one config.model/precond build.
    allow_config_change: resume even if the config differs from the run's config.json in what
      its checkpoints depend on (`RESUME_FIXED`); otherwise such a resume is refused.

  Raises:
    TrainingDiverged: on a non-finite loss or gradient; with config.train.skip_nonfinite, after
      MAX_CONSECUTIVE_SKIPS skipped steps in a row, or at the end (checkpoint saved) when more
      than half of this run's steps were skipped.
    TrainingInterrupted: after SIGTERM/SIGINT, once the checkpoint to resume from is saved.
    checkpoint.NoCheckpointError: the workdir has checkpoints but none restores and verifies
      (the run does not start from scratch over them).
    checkpoint.CheckpointSaveError: a checkpoint could not be written (e.g. a full disk).
    runs.WorkdirLocked: another live run holds the workdir (`runs.lock`).
  """
  with _StopFlag() as stop:  # From the start: a SIGTERM during start-up also exits cleanly.
    return _train(config, workdir, stop, max_steps=max_steps, progress=progress,
                  objective=objective, init_params=init_params, denoiser=denoiser,
                  allow_config_change=allow_config_change)


def _save_png(grid: np.ndarray, path) -> str:
  """Writes uint8 images [N, H, W, C] as one PNG grid at `path` (an epath.Path; local or URL)."""
  from PIL import Image  # Pillow is only needed when a grid is written.
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    Image.fromarray(images_lib.make_grid(grid)).save(f, format='PNG')
  return os.fspath(path)


def _unwritable(workdir: str, e: OSError) -> OSError:
  return OSError(f'Cannot write to {workdir} ({e.strerror or e}); pass a --workdir on a writable '
                 'disk with free space.')


def _lower_lr(lr: float) -> str:
  """A learning rate to suggest after a divergence."""
  return f'{lr / 2:g}' if math.isfinite(lr) and lr > 0 else '1e-4'


def _train(config, workdir, stop, *, max_steps, progress, objective, init_params, denoiser,
           allow_config_change):
  is_main = jax.process_index() == 0
  root = files.path(workdir)  # a local path or gs://… (os.path would mangle a URL)
  if root.exists() and not root.is_dir():
    raise ValueError(f'--workdir {workdir} is a file, not a directory; pass a directory (new or '
                     'of an earlier run).')
  mesh = parallel.make_mesh()
  batch_size = int(config.train.batch_size)
  if batch_size <= 0:
    raise ValueError(f'The batch size must be positive, got {batch_size}; set '
                     '--config.train.batch_size to a positive multiple of the device count.')
  parallel.check_batch_size(batch_size, mesh)
  if not float(config.train.total_images) > 0:
    raise ValueError(f'config.train.total_images must be positive, got '
                     f'{config.train.total_images}; set --config.train.total_images to the number '
                     'of training images to show.')
  if max_steps is not None and max_steps < 0:
    raise ValueError(f'--max_steps must be 0 or more, got {max_steps}; leave it out to train the '
                     'whole run.')
  for name in ('checkpoint_every', 'log_every', 'keep_checkpoints'):
    if int(config.train[name]) <= 0:
      raise ValueError(f'config.train.{name} must be positive, got {config.train[name]}; set '
                       f'--config.train.{name} to 1 or more.')

  spec = build.dataset_spec(config)
  denoiser = denoiser or build.build_denoiser(config, spec)
  objective = objectives_base.as_objective(objective or build.build_objective(config, spec, denoiser))
  tx = build.build_optimizer(config)
  # config.sample draws the previews and is what sample.py uses: a sampler that does not fit the
  # model (or an option it does not take) fails now, not after the whole run.
  build.sampler_fn(config, denoiser.precond)

  key_init, key_train = jax.random.split(jax.random.key(int(config.seed)))

  def make_state():
    params = (init_params() if init_params is not None else
              build.init_params(denoiser.network, spec, key_init))
    return state_lib.create_train_state(params, tx,
                                        step_lib.initial_extra(objective, params,
                                                               phema_stds(config)))

  # The network is traced (not compiled) once here, so that a config it cannot take fails before
  # the workdir lock: a bad config says what is wrong whether or not another run is live.
  jax.eval_shape(make_state)
  # Then the workdir lock (`runs.lock`), before the run's files are read or written: a second run
  # on a live run's workdir stops here and touches nothing.
  with runs.lock.hold(workdir):
    checkpointer = ckpt_lib.Checkpointer(files.path(workdir) / runs.CHECKPOINT_DIR,
                                         max_to_keep=int(config.train.keep_checkpoints))
    resources = {}
    try:
      state = _run(config, workdir, stop, checkpointer, resources, is_main=is_main, mesh=mesh,
                   spec=spec, denoiser=denoiser, objective=objective, tx=tx,
                   make_state=make_state, key_train=key_train, max_steps=max_steps,
                   progress=progress, init_params=init_params,
                   allow_config_change=allow_config_change)
    except BaseException:
      _close(checkpointer, resources, quiet=True)  # Don't mask the error already propagating.
      raise
    _close(checkpointer, resources, quiet=False)
  return state


def _close(checkpointer, resources: dict, quiet: bool) -> None:
  """Closes the progress bar, metric writer and data; waits for, verifies and collects saves."""
  for name in ('bar', 'writer', 'iterator'):
    if resources.get(name) is not None:
      resources[name].close()
  try:
    checkpointer.close()
  except Exception as e:  # noqa: BLE001
    if not quiet:
      raise
    log.warning('Closing the checkpoints failed too: %s', ckpt_lib._first_line(e))


def _run(config, workdir, stop, checkpointer, resources, *, is_main, mesh, spec, denoiser,
         objective, tx, make_state, key_train, max_steps, progress, init_params,
         allow_config_change=False):
  """The body of `train`: restore, then step, log, save and preview until done or stopped."""
  batch_size = int(config.train.batch_size)
  rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  from diffjax import data  # Lazy: tensorflow_datasets loads only when data is read.
  skipped = ''
  if checkpointer.steps():
    _check_resume_config(config, workdir, allow_config_change)
    abstract = ckpt_lib.abstract_like(jax.eval_shape(make_state), rep)
    # Unusable newer steps are moved aside (to checkpoints/damaged/) so they can be redone.
    state, start = checkpointer.restore(abstract, move_aside=True)
    if checkpointer.skipped:
      skipped = (f' (step(s) {", ".join(map(str, checkpointer.skipped))} could not be used '
                 f'and were moved to {runs.CHECKPOINT_DIR}/{ckpt_lib.DAMAGED_DIR}/)')
  else:
    state, start = None, 0
  # The run's position in images (runs.progress): segments of one batch size each, the last the
  # one this run trains in, from step0 on, with n_img = img0 + (step − step0)·batch there. A run
  # that keeps its batch size has one segment from 0 (n_img = step·batch, as always).
  before = progress_lib.read_segments(workdir, batch_size) if start else []
  segments = progress_lib.continue_from(before, start, batch_size)
  step0, img0 = segments[-1][0], progress_lib.images_at(segments, segments[-1][0])
  images_at = lambda s: img0 + (s - step0) * batch_size
  if step0:  # The optimizer's lr schedule counts images from the segment's start too.
    tx = build.build_optimizer(config, step0=step0, images_at_step0=img0)
  last = (total_steps(config, segments) if max_steps is None else
          min(max_steps, total_steps(config, segments)))
  if start and is_main:
    old = [b for a, b in before if a < start][-1:] or [batch_size]
    change = ''
    if old[0] != batch_size:
      change = (f' ({images_at(start) / 1e3:g} kimg) with batch size {batch_size} instead of '
                f'{old[0]}; kimg, the lr and EMA schedules and the data go on in images, to step '
                f'{total_steps(config, segments)} ({float(config.train.total_images) / 1e3:g} '
                'kimg)')
    print(f'Resuming from step {start} of {workdir}{skipped}{change}.', flush=True)
  # The data is opened before a fresh state is compiled: a dataset that is not prepared should
  # fail in a second, not after minutes of compilation. Its stream is in images (position
  # p = step·batch + j, data/pipeline.py): it goes on at batch n_img // batch, the very images an
  # unchanged run would show next unless a batch change left n_img off a multiple of the new
  # batch; then the < batch images before n_img are shown again (none is skipped).
  iterator = resources['iterator'] = data.make_iterator(
      config.data.name, split='train', global_batch_size=batch_size, seed=int(config.seed),
      start_step=images_at(start) // batch_size, data_dir=config.data.data_dir or None,
      x_flip=bool(config.data.x_flip),
      skip_bad_images=bool(config.data.get('skip_bad_images', False)))
  if state is None and init_params is not None:
    # Given params (e.g. a teacher's) are placed as they are, not baked into a jitted init.
    params = init_params()
    state = jax.device_put(state_lib.create_train_state(
        params, tx, step_lib.initial_extra(objective, params, phema_stds(config))), rep)
  elif state is None:
    state = jax.jit(make_state, out_shardings=rep)()
  # The init's (or restore's) compile and host copies are freed but kept by the C heap: return
  # them before the step is compiled (and again after, below).
  parallel.release_host_memory()

  o = config.optim
  train_step = step_lib.make_train_step(
      objective, tx, batch_size=batch_size,
      ema_halflife_images=config.train.ema_halflife_images,
      ema_rampup_ratio=config.train.ema_rampup_ratio,
      skip_nonfinite=bool(config.train.skip_nonfinite), phema_stds=phema_stds(config),
      step0=step0, images_at_step0=img0,
      lr_fn=lambda s: state_lib.learning_rate(s, o.lr, o.lr_rampup_images, batch_size,
                                              float(o.get('lr_decay_images', 0.0)), step0=step0,
                                              images_at_step0=img0))
  jitted_step = jax.jit(train_step, in_shardings=(rep, shard, rep), out_shardings=(rep, rep),
                        donate_argnums=(0,))
  preview = _make_preview(config, denoiser, spec, mesh)

  # Only now, with the state restored and the data open, is anything written to the workdir;
  # config.json only with this run's first checkpoint (a run that diverges or fails before it
  # leaves the previous config.json, which describes the checkpoints there).
  try:
    if is_main:
      files.path(workdir).mkdir(parents=True, exist_ok=True)
    writer = resources['writer'] = _MetricWriter(workdir, is_main, start)
  except OSError as e:
    raise _unwritable(workdir, e) from e
  config_saved = False
  saved_step = start  # the restored step is on disk: never saved again (that is an error now)

  def save(step: int) -> None:
    nonlocal config_saved, saved_step
    if step == saved_step:
      return
    if is_main and not config_saved:
      try:
        # The record first: a kill before config.json leaves the old config.json with a record
        # that describes every checkpoint (the reverse would count them all at the new batch).
        progress_lib.write_segments(workdir, segments)
        runs.save_config(config, workdir)
      except OSError as e:
        raise _unwritable(workdir, e) from e
    config_saved = True
    saved_step = step
    checkpointer.save(step, state)
  bar = None
  if progress and is_main:
    from tqdm import tqdm
    bar = resources['bar'] = tqdm(total=last, initial=start, unit='step', dynamic_ncols=True)

  def write_preview(step: int) -> None:
    if preview is None:
      return
    grid = preview(state.ema_params)
    if is_main:
      samples = files.path(workdir) / 'samples'
      path = _save_png(grid, samples / f'step_{step:08d}.png')
      _save_png(grid, samples / 'latest.png')
      log.info('Wrote %s', path)

  step = start
  last_good = start
  n_skipped, first_skip = 0, None
  window = {'loss': [], 'grad_norm': []}
  t_window, n_window = time.time(), 0
  while step < last and stop.signal is None:
    batch = parallel.shard_batch(next(iterator), mesh)
    if step == start:
      # Compiled ahead of the first call so that the compiler's freed memory can be returned
      # before the step's temporaries are allocated: the C heap does not reuse most of it
      # (benchmarks/memory.py, CIFAR batch 16: peak 3263 → 2792 MiB with both trims; trimming
      # after the first step instead of before it saves nothing).
      jitted_step = jitted_step.lower(state, batch, key_train).compile()
      parallel.release_host_memory()
    state, metrics = jitted_step(state, batch, key_train)
    step += 1
    # Reading the metrics every step bounds the dispatch queue (multi-device CPU runs deadlock
    # when many collective steps are queued) and catches a divergence at the exact step.
    m = jax.device_get(metrics)
    if not bool(m['finite']):
      if not config.train.skip_nonfinite:
        checkpointer.wait()  # Name a checkpoint that is committed and verified.
        good = checkpointer.latest_step()
        where = (f'the last good checkpoint is step {good}. Rerun the same command with a lower '
                 f'learning rate (e.g. --config.optim.lr={_lower_lr(o.lr)}) to resume from it'
                 if good is not None else
                 'no checkpoint was saved yet. Rerun the same command with a lower learning '
                 f'rate (e.g. --config.optim.lr={_lower_lr(o.lr)}) to start again')
        raise TrainingDiverged(
            f'The loss or a gradient became non-finite between step {last_good} and step '
            f'{step}; {where}, or set --config.train.skip_nonfinite=True to skip such steps.')
      log.warning('Skipped a non-finite update at step %d.', step)
      n_skipped += 1
      first_skip = step if first_skip is None else first_skip
      if step - last_good >= MAX_CONSECUTIVE_SKIPS:
        checkpointer.wait()
        good = checkpointer.latest_step()
        raise TrainingDiverged(
            f'Steps {last_good + 1} to {step} were all non-finite and skipped (skip_nonfinite); '
            f'the last good checkpoint is step {good}. Rerun the same command with a lower '
            f'learning rate (e.g. --config.optim.lr={_lower_lr(o.lr)}).')
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
                     ema_beta=float(m['ema_beta']), kimg=images_at(step) / 1e3)
      writer.write(step, scalars)
      if bar is not None:
        bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}",
                        img_s=f"{scalars['img_per_s']:.0f}")
      window = {'loss': [], 'grad_norm': []}
      t_window, n_window = time.time(), 0
    if step % config.train.checkpoint_every == 0 or step == last:
      save(step)
    else:
      checkpointer.poll()  # a failed async save stops the run at once, not at the next save
    if (config.train.sample_every and step % config.train.sample_every == 0 and step != last
        and stop.signal is None):
      write_preview(step)
  if stop.signal is not None:
    # The step in flight has finished (metrics are read every step); save it and stop.
    save(step)
    checkpointer.wait()
    resume = checkpointer.latest_step()
    if resume is None:  # stopped during start-up, before the first step of a new run
      raise TrainingInterrupted(
          f'Caught {stop.signal} before the first step: nothing was saved; rerun the same '
          'command to start the run.', state=state, step=0)
    raise TrainingInterrupted(
        f'Caught {stop.signal} at step {step}: saved checkpoint step {resume} in '
        f'{checkpointer.directory}; rerun the same command to resume from step {resume}.',
        state=state, step=resume)
  if step > start or preview is not None:
    write_preview(step)
  checkpointer.wait()
  if n_skipped * 2 > step - start:
    raise TrainingDiverged(
        f'{n_skipped} of the {step - start} steps from step {start + 1} to {step} were non-finite '
        f'and skipped (skip_nonfinite, the first at step {first_skip}), so the run learned little; '
        f'checkpoint step {step} keeps the last finite update. Train again with a lower learning '
        f'rate (e.g. --config.optim.lr={_lower_lr(o.lr)}).')
  return state
