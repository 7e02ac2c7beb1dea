"""The objectives of progressive and guided distillation: guided teachers, two-step targets, students.

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
unfinished one at its saved step. Each stage directory is a run: `runs.load` and `sample.py` use it.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from diffjax.objectives import alpha_sigma as alpha_sigma_losses
from diffjax.objectives.base import Objective, one_hot_labels
from diffjax.precond import Denoiser
from diffjax.processes import alpha_sigma
from diffjax.samplers import guidance as guidance_lib

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
                           teacher_fn: Optional[Callable] = None) -> Objective:
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
    `objectives.base.Objective` with extra = {'teacher': params[, 'num_steps': int32]}.
  """
  weight = alpha_sigma_losses.weighting(weighting)
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
    labels = one_hot_labels(batch, num_classes)
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

  return Objective(loss=loss_fn, init_extra=init_extra)
