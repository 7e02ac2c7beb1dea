"""Progressive distillation and guided distillation as teacher-student loops of the one train loop.

Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512, Alg. 2): a student of N steps learns
to do in one DDIM step what its teacher does in two. With i ~ U{1..N}, t = i/N, t' = t − 0.5/N and
t'' = t − 1/N, the teacher takes two DDIM steps z_t → z_t' → z_t'' and the student's target is the x̃
that makes *its* single DDIM step land on z_t'' (PD Alg. 2):

    x̃ = (z_t'' − (σ_t''/σ_t) z_t) / (α_t'' − (σ_t''/σ_t) α_t),      and x̃ = x̂_teacher(z_t') at t'' = 0.

In σ-space (x = z/α, σ = σ_t/α_t, the DDIM step is x_s = x̂ + (σ_s/σ_t)(x_t − x̂)) this is
x̃ = (x_t'' − r·x_t)/(1 − r) with r = σ_t''/σ_t: the same number, computed on the one `Denoiser`,
so any σ-space model can teach. The student minimizes λ(σ_t)·‖x̂_student(z_t) − x̃‖² with the
truncated-SNR weighting, starts from its teacher's weights and gets a fresh optimizer; the student
becomes the next round's teacher, halving N from a configured start to a configured end.

Guided distillation (Meng et al. 2022, arXiv 2210.03142, §4):
  stage 1  a w-conditioned student x̂_η(z_t, w) (models.SongUNet(guidance_embedding=True): a
           sinusoidal embedding of w through a zero-initialized map added to the time embedding,
           everything else from the teacher) matches the classifier-free-guided teacher
           (1 + w)·x̂_c − w·x̂_∅ at the same z_t, with t ~ U[0, 1] and w ~ U[w_min, w_max];
  stage 2  progressive distillation of the stage-1 model with w threaded through (the same w for
           both teacher steps and the student), halving down to 1–4 steps.
With `stochastic_grid` a round also trains the start times t = j/(2N) of the twice finer grid
(including the half-length last step j = 1, whose target is the teacher's x̂), which the N-step
stochastic sampler (samplers.distilled) evaluates — our reading of the paper's "small modification
of the training algorithm for the edge cases".

Encoder distillation (Meng et al. §5): the same target with time running upward (z_t → z_t+1/(2N) →
z_t+1/N), distilling the DDIM encoder; `style_transfer` encodes with class A and decodes with class B.

Every stage is one `loop.train` call in its own directory under WORKDIR (`stage1`,
`round_<k>_<N>steps`, `encoder_round_<k>_<N>steps`, and `teacher` when the pipeline trains its own
teacher): Orbax checkpoints, exact resume, data streamed from TFDS and sharded over every device
come with it. The teacher's parameters travel in `TrainState.extra` (arguments of the jitted step,
not constants baked into it, and part of each round's checkpoint) together with N, so every round
compiles to the same program. Rerunning the same command skips finished stages and resumes the
unfinished one at its saved step. Each stage directory is a run: `build.load` and `sample.py` use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from diffjax import alpha_sigma, build
from diffjax.precond import Denoiser
from diffjax.samplers import distilled as distilled_samplers
from diffjax.samplers import guidance as guidance_lib
from diffjax.training import checkpoint as ckpt_lib
from diffjax.training import step as step_lib

GUIDANCE_MODES = ('network', 'cfg', 'none')
TargetFn = Callable[[jax.Array, jax.Array], jax.Array]


# ------------------------------------------------------------------------------------------------
# Guided denoising: one interface for a w-conditioned student, a CFG teacher and a plain model.


def guidance_mode(denoiser: Denoiser, num_classes: int, guided: bool = True) -> str:
  """How `denoiser` takes a guidance weight w.

  Returns:
    'network' for a w-conditioned network (w is an input), 'cfg' for a class-conditional model
    guided by (1 + w)·D_c − w·D_∅ (when `guided`), 'none' otherwise (w is ignored).
  """
  if getattr(denoiser.network, 'guidance_embedding', False):
    return 'network'
  if guided and num_classes:
    return 'cfg'
  return 'none'


def guided_denoise(denoiser: Denoiser, params, x, sigma, labels, w, *, mode: str,
                   train: bool = False, rngs=None) -> jax.Array:
  """x̂ of `denoiser` under guidance weight w, as `mode` says (see `guidance_mode`).

  Args:
    denoiser: the preconditioned network.
    params: its parameters.
    x: σ-space inputs [B, H, W, C].
    sigma: noise levels [B].
    labels: one-hot class labels [B, K] or None.
    w: guidance weights [B] (or a scalar).
    mode: 'network', 'cfg' or 'none'.
    train, rngs: dropout.

  Returns:
    x̂ [B, H, W, C]. In 'cfg' mode both branches run as one call of batch 2B, the null label ∅
    being the all-zero one-hot vector that label dropout trained.
  """
  if mode not in GUIDANCE_MODES:
    raise ValueError(f'Unknown guidance mode {mode!r}; known: {", ".join(GUIDANCE_MODES)}.')
  if mode == 'network':
    w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), x.shape[:1])
    return denoiser(params, x, sigma, labels, train=train, rngs=rngs, guidance=w)
  if mode == 'cfg':
    if labels is None:
      raise ValueError('Classifier-free guidance needs class labels.')
    batch = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))
    both = denoiser(params, jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                    jnp.concatenate([labels, jnp.zeros_like(labels)]), train=train, rngs=rngs)
    return guidance_lib.combine(both[:batch], both[batch:], w)
  return denoiser(params, x, sigma, labels, train=train, rngs=rngs)


def guided_denoise_fn(denoiser: Denoiser, params, labels, w, mode: str) -> TargetFn:
  """A sampler-ready `denoise_fn(x, sigma)` with labels and guidance weight w bound."""
  return lambda x, sigma: guided_denoise(denoiser, params, x, sigma, labels, w, mode=mode)


# ------------------------------------------------------------------------------------------------
# Targets.


def _b(c, x):
  return jnp.reshape(c, c.shape + (1,) * (x.ndim - c.ndim))


def pd_target(teacher: TargetFn, x_t: jax.Array, j: jax.Array, teacher_steps, *,
              upward: bool = False, logsnr_min: float = alpha_sigma.LOGSNR_MIN,
              logsnr_max: float = alpha_sigma.LOGSNR_MAX) -> jax.Array:
  """The progressive-distillation target x̃ in σ-space (PD Alg. 2; module docstring).

  The student's step spans two steps of the teacher's grid of M = `teacher_steps` points:
  t = j/M → t' = (j ∓ 1)/M → t'' = (j ∓ 2)/M (− when sampling, + when `upward`, i.e. encoding).

  Args:
    teacher: σ-space x̂(x [B, ...], σ [B]) of the teacher, labels and w bound.
    x_t: noisy inputs x = z_t/α_t [B, ...] at t.
    j: int [B], the start index on the teacher's grid (even for a plain PD round).
    teacher_steps: M = 2N (an int or a traced int scalar).
    upward: encoder distillation (time runs from 0 to 1).
    logsnr_min, logsnr_max: the schedule's λ range.

  Returns:
    x̃ [B, ...]. When sampling, t'' = 0 gives the teacher's x̂ at t' (its last step returns x̂), and
    t' = 0 (j = 1, the stochastic sampler's half-length last step) gives the teacher's x̂ at t.
  """
  m = jnp.asarray(teacher_steps, jnp.float32)
  direction = 1 if upward else -1
  j = jnp.asarray(j, jnp.int32)
  j1, j2 = j + direction, j + 2 * direction
  sig = lambda idx: alpha_sigma.sigma_of_t(
      jnp.clip(idx.astype(jnp.float32) / m, 0.0, 1.0), logsnr_min, logsnr_max)
  sigma_t, sigma_1, sigma_2 = sig(j), sig(j1), sig(j2)
  x1 = teacher(x_t, sigma_t)
  x_mid = x1 + _b(sigma_1 / sigma_t, x_t) * (x_t - x1)           # teacher DDIM step t → t'
  x2 = teacher(x_mid, sigma_1)
  x_end = x2 + _b(sigma_2 / sigma_1, x_t) * (x_mid - x2)         # teacher DDIM step t' → t''
  r = _b(sigma_2 / sigma_t, x_t)
  target = (x_end - r * x_t) / (1.0 - r)                          # PD Alg. 2 in σ-space
  if not upward:
    target = jnp.where(_b(j2 <= 0, x_t), x2, target)
    target = jnp.where(_b(j1 <= 0, x_t), x1, target)
  return target


def student_step(x_t, x_hat, sigma_t, sigma_s):
  """One σ-space DDIM step x_s = x̂ + (σ_s/σ_t)(x_t − x̂) (σ_s = 0 returns x̂)."""
  return x_hat + _b(jnp.asarray(sigma_s / sigma_t, jnp.float32), x_t) * (x_t - x_hat)


# ------------------------------------------------------------------------------------------------
# Objectives.


def distillation_objective(student: Denoiser, teacher: Denoiser, teacher_params, *,
                           num_steps: Optional[int], num_classes: int, student_mode: str,
                           teacher_mode: str, w_min: float = 0.0, w_max: float = 0.0,
                           weighting: str = 'snr_trunc', stochastic_grid: bool = False,
                           upward: bool = False, logsnr_min: float = alpha_sigma.LOGSNR_MIN,
                           logsnr_max: float = alpha_sigma.LOGSNR_MAX,
                           student_fn: Optional[Callable] = None,
                           teacher_fn: Optional[Callable] = None) -> step_lib.Objective:
  """A distillation `Objective`: guided stage 1 (num_steps None) or a PD round of N steps.

  Per example: w ~ U[w_min, w_max]; stage 1: t ~ U[0, 1], target = the teacher's (guided) x̂ at
  (z_t, w) (Meng et al. Eq. 6); PD round: t on the student's grid (or the twice finer one with
  `stochastic_grid`), target = `pd_target` (the same w for both teacher steps). Loss =
  mean over the batch of λ(σ_t)·Σ_pixels (x̂_student(z_t, w) − target)², λ from `weighting`.

  Args:
    student, teacher: the preconditioned networks.
    teacher_params: the teacher's parameters; they live in TrainState.extra['teacher'].
    num_steps: N, the student's number of steps (extra['num_steps']); None for stage 1.
    num_classes: > 0 feeds one-hot labels.
    student_mode, teacher_mode: see `guidance_mode`.
    w_min, w_max: the range of guidance weights.
    weighting: 'snr_trunc' (max(SNR, 1)), 'snr_plus_one' or 'snr'.
    stochastic_grid: also train the start times the stochastic sampler needs.
    upward: distill the DDIM encoder.
    logsnr_min, logsnr_max: the schedule's λ range.
    student_fn, teacher_fn: override the networks with
      student_fn(params, x, σ, labels, w, key) and teacher_fn(teacher_params, x, σ, labels, w)
      (tests use analytic models).

  Returns:
    `step.Objective` with extra = {'teacher': params[, 'num_steps': int32]}.
  """
  weight = alpha_sigma.weighting(weighting)
  if student_fn is None:
    def student_fn(params, x, sigma, labels, w, key):
      return guided_denoise(student, params, x, sigma, labels, w, mode=student_mode, train=True,
                            rngs={'dropout': key})
  if teacher_fn is None:
    def teacher_fn(params, x, sigma, labels, w):
      return guided_denoise(teacher, params, x, sigma, labels, w, mode=teacher_mode)

  def init_extra():
    extra = {'teacher': teacher_params}
    if num_steps is not None:
      extra['num_steps'] = jnp.asarray(num_steps, jnp.int32)
    return extra

  def loss_fn(params, batch, key, extra):
    y = jnp.asarray(batch['image'], jnp.float32)
    b = y.shape[0]
    labels = None
    if num_classes:
      labels = jax.nn.one_hot(batch['label'], num_classes, dtype=jnp.float32)
    key_t, key_n, key_w, key_s = jax.random.split(key, 4)
    w = jax.random.uniform(key_w, (b,), jnp.float32, w_min, w_max)
    teacher_params_ = extra['teacher']
    teacher_x = lambda x, sigma: teacher_fn(teacher_params_, x, sigma, labels, w)
    n = jax.random.normal(key_n, y.shape, jnp.float32)
    if num_steps is None:                               # stage 1: continuous time
      t = jax.random.uniform(key_t, (b,), jnp.float32)
      sigma = alpha_sigma.sigma_of_t(t, logsnr_min, logsnr_max)
      x_t = y + _b(sigma, y) * n
      target = teacher_x(x_t, sigma)
    else:                                               # a PD round on the teacher's grid M = 2N
      big_n = extra['num_steps']
      m = 2 * big_n
      if upward:
        j = 2 * jax.random.randint(key_t, (b,), 0, big_n)
      elif stochastic_grid:
        j = jax.random.randint(key_t, (b,), 1, m + 1)
      else:
        j = 2 * jax.random.randint(key_t, (b,), 1, big_n + 1)
      sigma = alpha_sigma.sigma_of_t(j.astype(jnp.float32) / m.astype(jnp.float32),
                                     logsnr_min, logsnr_max)
      x_t = y + _b(sigma, y) * n
      target = pd_target(teacher_x, x_t, j, m, upward=upward, logsnr_min=logsnr_min,
                         logsnr_max=logsnr_max)
    target = jax.lax.stop_gradient(target)
    pred = student_fn(params, x_t, sigma, labels, w, key_s)
    err = jnp.sum(jnp.square(pred - target), axis=tuple(range(1, y.ndim)))
    per_example = weight(sigma) * err
    return jnp.mean(per_example), {'per_example': per_example, 'sigma': sigma}

  return step_lib.Objective(loss=loss_fn, init_extra=init_extra)


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


# ------------------------------------------------------------------------------------------------
# The pipeline: teacher → stage 1 → rounds (→ encoder rounds), one loop.train per stage.


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
  if os.path.exists(os.path.join(teacher_dir, build.CONFIG_FILE)):
    return build.read_config(teacher_dir)
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


def stage_steps(c) -> int:
  from diffjax.training import loop
  return loop.total_steps(c)


def _finished_step(workdir: str) -> int:
  directory = os.path.join(workdir, build.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return 0
  checkpointer = ckpt_lib.Checkpointer(directory, async_save=False)
  try:
    return checkpointer.latest_step() or 0
  finally:
    checkpointer.close()


def _stage_objective(config, stage: Stage, c, spec, student: Denoiser, teacher_run):
  """The objective and initial params of a student stage, from its teacher's run."""
  d = config.distill
  num_classes = build.num_classes(c, spec)
  guided = bool(d.guided)
  teacher_mode = guidance_mode(teacher_run.denoiser, num_classes,
                               guided and float(d.w_max) > 0.0)
  student_mode = guidance_mode(student, num_classes, guided=False)
  teacher_params = teacher_run.ema_params
  use_ema = d.init_from == 'ema'
  if d.init_from not in ('ema', 'params'):
    raise ValueError(f"distill.init_from must be 'ema' or 'params', got {d.init_from!r}.")
  source = teacher_run.ema_params if use_ema else teacher_run.params
  precond = student.precond
  lo, hi = distilled_samplers.logsnr_range(precond)
  objective = distillation_objective(
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
        progress: bool = True) -> list[dict]:
  """Runs (or resumes) the whole distillation of `config` in `workdir`.

  Args:
    config: a configs/distill.py config.
    workdir: the run's directory; stages go to subdirectories (`plan`).
    max_steps: stop once this many training steps, counted over all stages in order, are done
      (the run can go on: rerun the same command).
    progress: show progress bars.

  Returns:
    One dict per stage: name, workdir, num_steps, step, total_steps, done.
  """
  from diffjax.training import loop
  os.makedirs(workdir, exist_ok=True)
  stages = plan(config, workdir)
  build.save_config(config, workdir)
  offset, report = 0, []
  for stage in stages:
    c = stage_config(config, stage, _teacher_config(config, workdir))
    total = stage_steps(c)
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
      loop.train(c, stage.workdir, max_steps=budget, progress=progress)
    else:
      spec = build.dataset_spec(c)
      student = build.build_denoiser(c, spec)
      teacher_run = build.load(stage.teacher_workdir)
      objective, init = _stage_objective(config, stage, c, spec, student, teacher_run)
      loop.train(c, stage.workdir, max_steps=budget, progress=progress, objective=objective,
                 init_params=init, denoiser=student)
    entry['step'] = _finished_step(stage.workdir)
    entry['done'] = entry['step'] >= total
    if not entry['done']:  # stopped by max_steps or a signal: the next command resumes here
      break
    offset += total
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'stages.json'), 'w') as f:
      json.dump(report, f, indent=2)
  return report


# ------------------------------------------------------------------------------------------------
# Using the students: sampling, style transfer, digits evaluation.


def load_denoise_fn(run, labels, guidance: float):
  """`denoise_fn(x, σ)` of a loaded run with guidance w: through the network for a w-student,
  classifier-free guidance for a conditional teacher, plain otherwise."""
  one_hot = run.one_hot(labels)
  mode = guidance_mode(run.denoiser, run.num_classes, guided=bool(guidance))
  return guided_denoise_fn(run.denoiser, run.ema_params, one_hot,
                           jnp.full((len(labels),), guidance, jnp.float32), mode)


def style_transfer(encoder_run, decoder_run, images, source_labels, target_labels, *,
                   encode_steps: int, decode_steps: int, guidance: float = 0.0) -> jax.Array:
  """Translates images from class A to class B (Meng et al. §5): encode, then decode.

  Args:
    encoder_run: a loaded run that encodes (an encoder round, or any model: its DDIM encoder).
    decoder_run: a loaded run that samples (a round's student, or any model).
    images: [B, H, W, C] in [−1, 1].
    source_labels, target_labels: int [B], classes A and B.
    encode_steps, decode_steps: numbers of encoder and decoder steps.
    guidance: w for both.

  Returns:
    translated images [B, H, W, C].
  """
  enc = load_denoise_fn(encoder_run, source_labels, guidance)
  dec = load_denoise_fn(decoder_run, target_labels, guidance)
  z = jax.jit(lambda x: distilled_samplers.encode(enc, x, num_steps=encode_steps))(images)
  return jax.jit(lambda z: distilled_samplers.ddim(dec, z, num_steps=decode_steps))(z)


def sample_images(run, seeds, labels, *, sampler: str, num_steps: int, guidance: float,
                  batch_size: int = 500) -> np.ndarray:
  """uint8 samples [N, H, W, C] of a loaded run with a registered sampler and guidance w."""
  from diffjax import images as images_lib
  from diffjax import sampling
  fn = build.sampler_fn(run.config, run.denoiser.precond, sampler, num_steps)
  shape = (run.spec.resolution, run.spec.resolution, run.spec.channels)
  sample_fn = sampling.make_sample_fn(run.denoiser, fn, shape, run.num_classes, guidance)
  x = sampling.generate(sample_fn, run.ema_params, seeds, labels, batch_size=batch_size)
  return images_lib.to_uint8(x)


def evaluate_digits(workdir: str, *, num_images: int = 1000, guidance: Optional[float] = None,
                    teacher_steps: Optional[list[int]] = None, batch_size: int = 500,
                    stages: Optional[list[str]] = None) -> list[dict]:
  """Scores every finished stage of a digits distillation with the digits evaluator.

  Teacher: DDIM with classifier-free guidance (2 evaluations per step) at each of `teacher_steps`
  (default: its config's sample.num_steps, then start_steps halved down to 1 — the undistilled
  baseline); stage 1: DDIM with start_steps; each round of N steps: deterministic DDIM with N
  evaluations and, when trained with the stochastic grid, the stochastic sampler with 2N
  evaluations. Writes WORKDIR/eval/summary_w<w>.json and one sample grid per entry.

  Returns:
    One dict per (stage, sampler): stage, sampler, num_steps, nfe, fd, accuracy, confidence.
  """
  from diffjax import images as images_lib
  from diffjax.evaluation import digits_classifier
  config = build.read_config(workdir)
  d = config.distill
  w = float(d.sample_guidance if guidance is None else guidance)
  seeds = list(range(num_images))
  labels = np.asarray(seeds) % 10
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for stage in plan(config, workdir):
    if stages is not None and stage.name not in stages:
      continue
    c = stage_config(config, stage, _teacher_config(config, workdir))
    if _finished_step(stage.workdir) < stage_steps(c):
      continue
    run_ = build.load(stage.workdir)
    jobs = []
    if stage.kind == 'teacher':
      steps = teacher_steps
      if steps is None:
        steps = [int(run_.config.sample.num_steps)] + [
            int(d.start_steps) >> k for k in range(int(np.log2(d.start_steps)) + 1)]
      for n in dict.fromkeys(steps):
        jobs.append(('distill_ddim', int(n), 2 * int(n) if w else int(n)))
    elif stage.kind == 'stage1':
      jobs.append(('distill_ddim', int(d.start_steps), int(d.start_steps)))
    elif stage.kind == 'round':
      jobs.append(('distill_ddim', stage.num_steps, stage.num_steps))
      if d.stochastic_grid:
        jobs.append(('distill_stochastic', 2 * stage.num_steps, 2 * stage.num_steps))
    for sampler, n, nfe in jobs:
      images = sample_images(run_, seeds, labels, sampler=sampler, num_steps=n, guidance=w,
                             batch_size=batch_size)
      metrics = digits_classifier.digits_metrics(images, labels)
      row = {'stage': stage.name, 'sampler': sampler, 'num_steps': n, 'nfe': nfe, 'guidance': w,
             **{k: float(v) for k, v in metrics.items()}}
      rows.append(row)
      images_lib.save_grid(images[:100], os.path.join(
          out_dir, f'{stage.name}_{sampler}_{n}_w{w:g}.png'), ncols=10)
      print(json.dumps(row), flush=True)
  with open(os.path.join(out_dir, f'summary_w{w:g}.json'), 'w') as f:
    json.dump(rows, f, indent=2)
  return rows


def evaluate_style_transfer_digits(workdir: str, *, encoder_stage: str, decoder_stage: str,
                                   encode_steps: int, decode_steps: int, guidance: float = 0.0,
                                   shift: int = 1, per_class: int = 20) -> dict:
  """Digits style transfer (Meng et al. §5): test digits of class A encoded with label A, decoded
  with label B = (A + shift) mod 10, scored by the digits classifier on B.

  Writes WORKDIR/eval/transfer_<encoder>_<decoder>.png (rows: a source row, then its translation).

  Returns:
    {'accuracy' (classifier says B), 'fd', 'source_accuracy' (still says A), settings...}.
  """
  from diffjax import images as images_lib
  from diffjax.evaluation import digits_classifier
  images, labels = digits_classifier.load_digits_split('test')
  keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
  x = jnp.asarray(images[keep], jnp.float32) / 127.5 - 1.0
  source = np.asarray(labels[keep])
  target = (source + shift) % 10
  enc = build.load(os.path.join(workdir, encoder_stage))
  dec = build.load(os.path.join(workdir, decoder_stage))
  out = style_transfer(enc, dec, x, source, target, encode_steps=encode_steps,
                       decode_steps=decode_steps, guidance=guidance)
  out_u8 = images_lib.to_uint8(out)
  metrics = digits_classifier.digits_metrics(out_u8, target)
  logits = digits_classifier.digits_logits(out_u8)
  result = {'encoder': encoder_stage, 'decoder': decoder_stage, 'encode_steps': encode_steps,
            'decode_steps': decode_steps, 'guidance': guidance, 'shift': shift,
            'accuracy': float(metrics['accuracy']), 'fd': float(metrics['fd']),
            'source_accuracy': float(np.mean(np.argmax(np.asarray(logits), -1) == source))}
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  pick = np.concatenate([np.flatnonzero(source == c)[:2] for c in range(10)])
  src_u8 = images_lib.to_uint8(x)
  rows = np.concatenate([src_u8[pick][:10], out_u8[pick][:10], src_u8[pick][10:],
                         out_u8[pick][10:]])
  images_lib.save_grid(rows, os.path.join(
      out_dir, f'transfer_{encoder_stage}_{decoder_stage}_w{guidance:g}.png'), ncols=10)
  with open(os.path.join(out_dir, f'transfer_{encoder_stage}_{decoder_stage}_w{guidance:g}.json'),
            'w') as f:
    json.dump(result, f, indent=2)
  return result
