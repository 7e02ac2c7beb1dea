"""The distillation pipeline: teacher → stage 1 → rounds (→ encoder rounds), one `loop.train` each.

The objectives, targets and the student's initialization are in `diffjax.objectives.distill` (with
the papers' maths); this module plans the stages and runs them. Every stage is one `loop.train` call
in its own directory under WORKDIR (`stage1`, `round_<k>_<N>steps`, `encoder_round_<k>_<N>steps`,
and `teacher` when the pipeline trains its own teacher): Orbax checkpoints, exact resume, data
streamed from TFDS and sharded over every device come with it. The teacher's parameters travel in
`TrainState.extra` (arguments of the jitted step, not constants baked into it, and part of each
round's checkpoint) together with N, so every round compiles to the same program. Rerunning the same
command skips finished stages and resumes the unfinished one at its saved step. Each stage directory
is a run: `diffjax.runs.load` and `sample.py` use it; `diffjax.evaluation.distill` scores them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from diffjax import build, runs
from diffjax import precond as precond_lib
from diffjax.objectives import distill as distill_lib
from diffjax.runs import checkpoint as ckpt_lib
from diffjax.samplers import distilled as distilled_samplers
from diffjax.training import loop

# ------------------------------------------------------------------------------------------------
# The pipeline: teacher → stage 1 → rounds (→ encoder rounds), one loop.train per stage.


# ------------------------------------------------------------------------------------------------
# Student initialization.


def init_student_params(student_network, spec, teacher_params, key=None) -> Any:
  """The student's parameters: the teacher's, plus freshly initialized new layers.

  New layers (the w-embedding map of a guided student) keep their own initialization, which is
  zero for `map_guidance`, so the student starts as the teacher's conditional model.

  Raises:
    ValueError: when the teacher has parameters the student lacks or shapes differ (the student
      must be the teacher's architecture, possibly with added inputs).
  """
  key = jax.random.key(0) if key is None else key
  fresh = traverse_util.flatten_dict(build.init_params(student_network, spec, key))
  teacher = traverse_util.flatten_dict(jax.device_get(teacher_params))
  missing = sorted('/'.join(k) for k in teacher if k not in fresh)
  if missing:
    raise ValueError(f'The student network lacks teacher parameters {missing[:3]}; build the '
                     'student with the teacher\'s model preset and kwargs.')
  out = {}
  for k, v in fresh.items():
    if k in teacher:
      if tuple(teacher[k].shape) != tuple(v.shape):
        raise ValueError(f'Parameter {"/".join(k)} has shape {tuple(teacher[k].shape)} in the '
                         f'teacher and {tuple(v.shape)} in the student; use the same architecture.')
      out[k] = jnp.asarray(teacher[k])
    else:
      out[k] = v
  return traverse_util.unflatten_dict(out)


@dataclasses.dataclass
class Stage:
  """One training stage of a distillation run.

  Attributes:
    name: 'teacher', 'stage1', 'round_<k>_<N>steps' or 'encoder_round_<k>_<N>steps'.
    kind: 'teacher', 'stage1', 'round' or 'encoder'.
    workdir: its run directory.
    num_steps: the student's N (None for the teacher and stage 1).
    teacher_workdir: the run that teaches it (None for the teacher).
  """
  name: str
  kind: str
  workdir: str
  num_steps: Optional[int] = None
  teacher_workdir: Optional[str] = None


def _halvings(start: int, end: int, what: str) -> list[int]:
  start, end = int(start), int(end)
  if end < 1 or start <= end or start % end or (start // end) & (start // end - 1):
    raise ValueError(f'{what}: start_steps / end_steps must be a power of two greater than 1 '
                     f'(e.g. 1024 → 1), got {start} → {end}.')
  steps, n = [], start
  while n > end:
    n //= 2
    steps.append(n)
  return steps


def plan(config, workdir: str) -> list[Stage]:
  """The stages of config.distill, in training order."""
  d = config.distill
  stages = []
  teacher_dir = d.teacher_workdir or os.path.join(workdir, 'teacher')
  if not d.teacher_workdir:
    if 'teacher' not in config:
      raise ValueError('Pass --teacher=WORKDIR of a trained model (or use a preset with a teacher '
                       'config, e.g. configs/distill.py:digits).')
    stages.append(Stage('teacher', 'teacher', teacher_dir))
  base = teacher_dir
  if d.guided:
    stage1 = os.path.join(workdir, 'stage1')
    stages.append(Stage('stage1', 'stage1', stage1, None, teacher_dir))
    base = stage1
  prev = base
  for k, n in enumerate(_halvings(d.start_steps, d.end_steps, 'distill'), 1):
    name = f'round_{k}_{n}steps'
    stages.append(Stage(name, 'round', os.path.join(workdir, name), n, prev))
    prev = stages[-1].workdir
  if d.encoder:
    prev = base
    for k, n in enumerate(_halvings(d.encoder_start_steps, d.encoder_end_steps, 'encoder'), 1):
      name = f'encoder_round_{k}_{n}steps'
      stages.append(Stage(name, 'encoder', os.path.join(workdir, name), n, prev))
      prev = stages[-1].workdir
  return stages


def _teacher_config(config, workdir: str):
  """The original teacher's run config (its architecture and preconditioning fix the students')."""
  teacher_dir = config.distill.teacher_workdir or os.path.join(workdir, 'teacher')
  if os.path.exists(os.path.join(teacher_dir, runs.CONFIG_FILE)):
    return runs.read_config(teacher_dir)
  if 'teacher' not in config:
    raise FileNotFoundError(f'{teacher_dir} is not a trained run; pass --teacher=WORKDIR of one.')
  return ml_collections.ConfigDict(config.teacher.to_dict())


def stage_config(config, stage: Stage, teacher_config) -> ml_collections.ConfigDict:
  """The run config of a student stage: the teacher's data, network and preconditioning with
  the distillation's optimizer, training length, and an N-step distilled sampler.

  The original teacher's config (`teacher_config`) fixes the architecture and preconditioning: a
  student starts from its teacher's weights, so both must read them the same way.
  """
  d = config.distill
  if stage.kind == 'teacher':
    c = ml_collections.ConfigDict(config.teacher.to_dict())
    if config.data.get('data_dir'):
      c.data.data_dir = config.data.data_dir
    return c
  c = ml_collections.ConfigDict(teacher_config.to_dict())
  for key in ('distill', 'teacher'):
    if key in c:
      del c[key]
  c.seed = int(config.seed)
  if config.data.get('data_dir'):
    c.data.data_dir = config.data.data_dir
  kwargs = c.model.kwargs.to_dict() if c.model.get('kwargs') is not None else {}
  kwargs.update(dropout=float(d.dropout), label_dropout=0.0, guidance_embedding=bool(d.guided))
  c.model.kwargs = kwargs
  c.augment.p = 0.0
  c.optim = ml_collections.ConfigDict(config.optim.to_dict())
  c.train = ml_collections.ConfigDict(config.train.to_dict())
  c.train.total_images = float(d.stage1_images if stage.kind == 'stage1' else d.round_images)
  c.sample = ml_collections.ConfigDict(
      {'sampler': 'distill_ddim', 'num_steps': int(stage.num_steps or d.start_steps),
       'kwargs': {}, 'guidance': float(d.sample_guidance)})
  c.distill = {'stage': stage.name, 'kind': stage.kind, 'num_steps': stage.num_steps or 0,
               'teacher_workdir': stage.teacher_workdir or '', 'guided': bool(d.guided),
               'w_min': float(d.w_min), 'w_max': float(d.w_max),
               'stochastic_grid': bool(d.stochastic_grid) and stage.kind == 'round'}
  return c


def stage_steps(c, workdir: Optional[str] = None) -> int:
  """The training length of a stage in steps; with its `workdir`, of the stage as it resumes.

  A stage resumed with another batch size goes on in images (`loop.resumed_total_steps`), so its
  length in steps is the steps taken plus those the new batch size needs for the images left.
  """
  if workdir is None:
    return loop.total_steps(c)
  return loop.resumed_total_steps(c, workdir, _finished_step(workdir))


def _finished_step(workdir: str) -> int:
  directory = os.path.join(workdir, runs.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return 0
  checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
  try:
    return checkpointer.latest_step() or 0
  finally:
    checkpointer.close()


def _stage_objective(config, stage: Stage, c, spec, student: precond_lib.Denoiser, teacher_run):
  """The objective and initial params of a student stage, from its teacher's run."""
  d = config.distill
  num_classes = build.num_classes(c, spec)
  guided = bool(d.guided)
  teacher_mode = distill_lib.guidance_mode(teacher_run.denoiser, num_classes,
                               guided and float(d.w_max) > 0.0)
  student_mode = distill_lib.guidance_mode(student, num_classes, guided=False)
  teacher_params = teacher_run.ema_params
  use_ema = d.init_from == 'ema'
  if d.init_from not in ('ema', 'params'):
    raise ValueError(f"distill.init_from must be 'ema' or 'params', got {d.init_from!r}.")
  source = teacher_run.ema_params if use_ema else teacher_run.params
  precond = student.precond
  lo, hi = distilled_samplers.logsnr_range(precond)
  objective = distill_lib.distillation_objective(
      student, teacher_run.denoiser, teacher_params,
      num_steps=None if stage.kind == 'stage1' else stage.num_steps, num_classes=num_classes,
      student_mode=student_mode, teacher_mode=teacher_mode,
      w_min=float(d.w_min) if guided else 0.0, w_max=float(d.w_max) if guided else 0.0,
      weighting=d.weighting, stochastic_grid=bool(d.stochastic_grid) and stage.kind == 'round',
      upward=stage.kind == 'encoder', logsnr_min=lo, logsnr_max=hi)
  # Called only for a fresh stage (a resumed one restores its checkpoint; loop.train then only
  # traces this for shapes).
  init = lambda: init_student_params(student.network, spec, source, jax.random.key(int(config.seed)))
  return objective, init


def run(config, workdir: str, *, max_steps: Optional[int] = None,
        progress: bool = True, allow_config_change: bool = False) -> list[dict]:
  """Runs (or resumes) the whole distillation of `config` in `workdir`.

  Args:
    config: a configs/distill.py config.
    workdir: the run's directory; stages go to subdirectories (`plan`).
    max_steps: stop once this many training steps, counted over all stages in order, are done
      (the run can go on: rerun the same command).
    progress: show progress bars.
    allow_config_change: resume stages whose config changed in what their checkpoints depend on
      (`loop.train`'s; refused otherwise).

  Returns:
    One dict per stage: name, workdir, num_steps, step, total_steps, done.

  Raises:
    runs.WorkdirLocked: another live run holds the workdir (each stage's `loop.train` also locks
      its own directory).
  """
  with runs.lock.hold(workdir):  # before anything is written: a second run refuses here
    return _run_stages(config, workdir, max_steps=max_steps, progress=progress,
                       allow_config_change=allow_config_change)


def _run_stages(config, workdir: str, *, max_steps: Optional[int], progress: bool,
                allow_config_change: bool = False) -> list[dict]:
  """The body of `run`, under the workdir lock."""
  os.makedirs(workdir, exist_ok=True)
  stages = plan(config, workdir)
  runs.save_config(config, workdir)
  offset, report = 0, []
  for stage in stages:
    c = stage_config(config, stage, _teacher_config(config, workdir))
    total = stage_steps(c, stage.workdir)
    done_step = _finished_step(stage.workdir)
    entry = {'name': stage.name, 'workdir': stage.workdir, 'num_steps': stage.num_steps,
             'step': done_step, 'total_steps': total, 'done': done_step >= total}
    report.append(entry)
    if entry['done']:
      offset += total
      continue
    budget = None if max_steps is None else int(max_steps) - offset
    if budget is not None and budget <= done_step:
      break
    if jax.process_index() == 0:
      print(f'[distill] {stage.name}: {total} training steps'
            + (f', teacher {stage.teacher_workdir}' if stage.teacher_workdir else ''), flush=True)
    if stage.kind == 'teacher':
      loop.train(c, stage.workdir, max_steps=budget, progress=progress,
                 allow_config_change=allow_config_change)
    else:
      spec = build.dataset_spec(c)
      student = build.build_denoiser(c, spec)
      teacher_run = runs.load(stage.teacher_workdir)
      objective, init = _stage_objective(config, stage, c, spec, student, teacher_run)
      loop.train(c, stage.workdir, max_steps=budget, progress=progress, objective=objective,
                 init_params=init, denoiser=student, allow_config_change=allow_config_change)
    entry['step'] = _finished_step(stage.workdir)
    entry['done'] = entry['step'] >= total
    if not entry['done']:  # stopped by max_steps or a signal: the next command resumes here
      break
    offset += total
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'stages.json'), 'w') as f:
      json.dump(report, f, indent=2)
  return report
