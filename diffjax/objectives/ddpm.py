"""DDPM and Improved DDPM training objectives (Ho et al. 2020; Nichol & Dhariwal 2021).

A discrete model is a `precond.Denoiser` with the 'ddpm' preconditioning (`precond.discrete.make_ddpm`), so
D(x; σ_t) = x − σ_t·ε̂ and x̂_0 = D: ε-prediction, its x̂_0 and the posterior all come from D.

    L_simple = E_{t, x_0, ε} ‖ε − ε̂(x_t, t)‖²  (mean over pixels)                      (DDPM Eq. 14)
    L_vlb    = L_0 + L_1 + … + L_{T−1} + L_T                                           (iDDPM Eq. 4–7)
      L_{t>0} = KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)),  L_0 = −log p_θ(x_0|x_1) (discretized
      Gaussian decoder, 256 bins), L_T = KL(q(x_T|x_0) ‖ N(0, I)); all in bits per dimension.
    L_hybrid = L_simple + λ·L_vlb, λ = 0.001, the mean θ-gradient stopped in L_vlb      (iDDPM Eq. 16)

A single-t estimate of L_vlb is T·L_t (t uniform), so λ·L_vlb is L_t·λ·T — improved-diffusion's
`vb·T/1000` for λ = 0.001 (its "RESCALED_MSE"); `vlb_weight = 1/T` gives its unrescaled variant. Pure
L_vlb ("RESCALED_KL") trains T·L_t, best with importance sampling of t (iDDPM §3.3):

    p_t ∝ sqrt(E[L_t²]) over the last 10 values of L_t, (1 − 0.001)·p + 0.001/T once every t has
    10 values (uniform before), and the per-example weight 1/(T·p_t) keeps the estimate unbiased.

The loss history is `TrainState.extra`: updated from the whole global batch inside the jitted step,
so it is identical on every device and host and is checkpointed and resumed with the parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import registry
from diffjax.likelihood.vlb import _mean_flat, model_outputs, vb_terms_bpd
from diffjax.objectives.base import Objective, conditioned_batch
from diffjax.precond import Denoiser
from diffjax.precond import discrete as precond_discrete
from diffjax.processes import discrete

LOSS_TYPES = ('simple', 'hybrid', 'vlb')
SCHEDULE_SAMPLERS = ('uniform', 'loss_second_moment')


def init_loss_history(num_timesteps: int, history_per_term: int = 10) -> dict:
  """{'history': float32 [T, H] (the last H losses of each t), 'counts': int32 [T]}."""
  return {'history': jnp.zeros((num_timesteps, history_per_term), jnp.float32),
          'counts': jnp.zeros((num_timesteps,), jnp.int32)}


def loss_second_moment_probs(history: dict, uniform_prob: float = 0.001) -> jax.Array:
  """p_t ∝ sqrt(E[L_t²]) mixed with uniform_prob of the uniform law; uniform until warmed up.

  Warmed up means every t has a full history.

  Returns:
    float32 [T], summing to 1.
  """
  h, counts = history['history'], history['counts']
  num_t, per_term = h.shape
  w = jnp.sqrt(jnp.mean(jnp.square(h), axis=-1))
  w = w / jnp.sum(w)
  w = w * (1.0 - uniform_prob) + uniform_prob / num_t
  warm = jnp.all(counts == per_term)
  return jnp.where(warm, w, jnp.full((num_t,), 1.0 / num_t, w.dtype))


def sample_timesteps(key, probs, batch: int) -> tuple[jax.Array, jax.Array]:
  """t ~ p (int32 [B]) and the importance weights 1/(T·p_t) [B]."""
  num_t = probs.shape[0]
  t = jax.random.categorical(key, jnp.log(probs), shape=(batch,)).astype(jnp.int32)
  return t, 1.0 / (num_t * probs[t])


def update_loss_history(history: dict, t, losses) -> dict:
  """Appends each (t_i, loss_i) in batch order, dropping the oldest loss of a full history.

  Sequential (a scan over the batch) so a t drawn twice in a batch shifts twice, exactly as
  improved-diffusion's LossSecondMomentResampler.update_with_all_losses.

  Args:
    history: the state of `init_loss_history`.
    t: int steps [B] (of the global batch).
    losses: per-example losses [B] (unweighted).
  """
  per_term = history['history'].shape[1]

  def one(state, item):
    h, counts = state
    ti, loss = item
    row, count = h[ti], counts[ti]
    full = count == per_term
    shifted = jnp.append(row[1:], loss)
    filled = row.at[jnp.minimum(count, per_term - 1)].set(loss)
    h = h.at[ti].set(jnp.where(full, shifted, filled))
    counts = counts.at[ti].set(jnp.minimum(count + 1, per_term))
    return (h, counts), None

  (h, counts), _ = jax.lax.scan(
      one, (history['history'], history['counts']),
      (jnp.asarray(t, jnp.int32), jnp.asarray(losses, jnp.float32)))
  return {'history': h, 'counts': counts}


# ------------------------------------------------------------------------------------------------
# The per-example losses.


def per_example_terms(schedule: discrete.DiscreteSchedule, x0, xt, t, noise, eps_pred, x0_pred,
                      extra, *, loss_type: str, variance: str,
                      vlb_weight: float = 0.001) -> dict:
  """The per-example losses of one batch from the model's outputs.

  Args:
    schedule, x0, xt, t, noise: the process, data, x_t, steps [B] and the ε that made x_t.
    eps_pred, x0_pred: ε̂ and x̂_0 = D of the model.
    extra: the network's extra channels (v of the learned variance), or an empty array.
    loss_type: 'simple' (L_simple; + λ·T·L_t when the variance is learned, as the reference),
      'hybrid' (L_simple + λ·T·L_t with the mean's gradient stopped) or 'vlb' (T·L_t).
    variance: 'fixed_small', 'fixed_large' or 'learned'.
    vlb_weight: λ.

  Returns:
    {'loss': [B], 'mse': [B], 'vb': [B] (bits/dim, L_t)}.
  """
  num_t = schedule.num_steps
  mse = _mean_flat(jnp.square(noise - eps_pred))
  v = extra if variance == 'learned' else None
  if variance == 'learned' and (extra is None or extra.shape[-1] != x0.shape[-1]):
    got = 0 if extra is None else extra.shape[-1]
    raise ValueError(
        f'A learned variance needs {x0.shape[-1]} extra output channels, the network gives {got}; '
        'set config.model.out_channel_mult=2 (or use a fixed variance).')
  if loss_type == 'vlb':
    log_var = discrete.model_log_variance(schedule, t, variance, v, like=x0)
    vb = vb_terms_bpd(schedule, x0, xt, t, x0_pred, log_var)
    return {'loss': vb * num_t, 'mse': mse, 'vb': vb}
  if variance != 'learned' and loss_type == 'simple':
    return {'loss': mse, 'mse': mse, 'vb': jnp.zeros_like(mse)}
  # The VLB term trains only the variance: the mean (from ε̂) is frozen (iDDPM §3.1).
  log_var = discrete.model_log_variance(schedule, t, variance, v, like=x0)
  vb = vb_terms_bpd(schedule, x0, xt, t, jax.lax.stop_gradient(x0_pred), log_var)
  return {'loss': mse + vlb_weight * num_t * vb, 'mse': mse, 'vb': vb}


# ------------------------------------------------------------------------------------------------
# The registered loss.


@dataclasses.dataclass(frozen=True)
class DDPMLoss:
  """A discrete-time objective; `objective(denoiser)` makes the `objectives.base.Objective`.

  Attributes:
    loss_type: 'simple', 'hybrid' or 'vlb' (see `per_example_terms`).
    variance: 'fixed_small', 'fixed_large' or 'learned' (2C network outputs).
    vlb_weight: λ of L_hybrid (0.001; 1/T reproduces improved-diffusion's unrescaled variant).
    schedule_sampler: 'uniform' or 'loss_second_moment' (importance sampling of t).
    history_per_term: losses kept per t by the importance sampler (10).
    uniform_prob: uniform mixing of the importance sampler (0.001).
  """
  loss_type: str = 'hybrid'
  variance: str = 'learned'
  vlb_weight: float = 0.001
  schedule_sampler: str = 'uniform'
  history_per_term: int = 10
  uniform_prob: float = 0.001
  name: str = 'ddpm'

  def __post_init__(self):
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f'Unknown DDPM loss_type {self.loss_type!r}; known: '
                       f'{", ".join(LOSS_TYPES)}.')
    discrete.check_variance(self.variance)
    if self.schedule_sampler not in SCHEDULE_SAMPLERS:
      raise ValueError(f'Unknown schedule_sampler {self.schedule_sampler!r}; known: '
                       f'{", ".join(SCHEDULE_SAMPLERS)}.')

  @property
  def importance(self) -> bool:
    return self.schedule_sampler == 'loss_second_moment'

  def objective(self, denoiser: Denoiser, *, num_classes: int = 0,
                augment_fn: Optional[Callable] = None) -> Objective:
    """The train-step `Objective` for a denoiser with a discrete preconditioning.

    Args:
      denoiser: network + 'ddpm' (or EDM 'iddpm') preconditioning; the process is the precond's.
      num_classes: > 0 feeds one-hot labels.
      augment_fn: (key, images) -> (images, augment_labels), or None.

    Returns:
      Objective(loss, init_extra, update_extra); aux = {'t', 'loss', 'mse', 'vb'} per example.
    """
    schedule = precond_discrete.schedule_of(denoiser.precond)
    num_t = schedule.num_steps
    spec = self

    def loss_fn(params, batch, key, extra):
      key_t, key_noise, key_dropout, key_aug = jax.random.split(key, 4)
      x0, labels, augment_labels = conditioned_batch(batch, key_aug, num_classes=num_classes,
                                                     augment_fn=augment_fn)
      batch_size = x0.shape[0]
      if spec.importance:
        probs = loss_second_moment_probs(extra, spec.uniform_prob)
        t, weights = sample_timesteps(key_t, probs, batch_size)
      else:
        t = jax.random.randint(key_t, (batch_size,), 0, num_t, jnp.int32)
        weights = jnp.ones((batch_size,), jnp.float32)
      noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
      xt, eps, d, out = model_outputs(denoiser, params, schedule, x0, t, noise, labels,
                                      augment_labels, train=True, rngs={'dropout': key_dropout})
      terms = per_example_terms(schedule, x0, xt, t, noise, eps, d, out, loss_type=spec.loss_type,
                                variance=spec.variance, vlb_weight=spec.vlb_weight)
      loss = jnp.mean(terms['loss'] * jax.lax.stop_gradient(weights))
      aux = {'t': t, **{k: jax.lax.stop_gradient(v) for k, v in terms.items()}}
      return loss, aux

    if not self.importance:
      return Objective(loss=loss_fn)
    return Objective(
        loss=loss_fn,
        init_extra=lambda: init_loss_history(num_t, spec.history_per_term),
        update_extra=lambda extra, aux: update_loss_history(extra, aux['t'], aux['loss']))


def make_ddpm_loss(loss_type: str = 'hybrid', variance: str = 'learned', vlb_weight: float = 0.001,
                   schedule_sampler: str = 'uniform', history_per_term: int = 10,
                   uniform_prob: float = 0.001) -> DDPMLoss:
  """The registered 'ddpm' loss (config.loss.name = 'ddpm', its kwargs these arguments)."""
  return DDPMLoss(loss_type=loss_type, variance=variance, vlb_weight=float(vlb_weight),
                  schedule_sampler=schedule_sampler, history_per_term=int(history_per_term),
                  uniform_prob=float(uniform_prob))


registry.add('loss', 'ddpm', make_ddpm_loss)


def loss_history_probs(extra: Any, uniform_prob: float = 0.001) -> np.ndarray:
  """The importance sampler's current p_t (float64 numpy [T]) from a TrainState.extra."""
  return np.asarray(loss_second_moment_probs(extra, uniform_prob), np.float64)
