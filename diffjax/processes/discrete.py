"""Discrete-time diffusion (Ho et al. 2020; Nichol & Dhariwal 2021): β schedules, posterior tables,
timestep respacing, and the discrete preconditioning that puts an ε-model on EDM's σ-grid.

The forward process has T steps, indexed t = 0 … T−1 as in the released code of improved-diffusion:

    q(x_t | x_{t−1}) = N(sqrt(1 − β_t)·x_{t−1}, β_t·I),     ᾱ_t = Π_{s≤t} (1 − β_s)          (DDPM Eq. 2)
    q(x_t | x_0)     = N(sqrt(ᾱ_t)·x_0, (1 − ᾱ_t)·I)                                        (DDPM Eq. 4)
    q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t·I),  β̃_t = β_t(1 − ᾱ_{t−1})/(1 − ᾱ_t),              (DDPM Eq. 6–7)
        μ̃_t = [β_t sqrt(ᾱ_{t−1})/(1 − ᾱ_t)]·x_0 + [(1 − ᾱ_{t−1}) sqrt(α_t)/(1 − ᾱ_t)]·x_t

with ᾱ_{−1} = 1. Every table is computed once in float64 numpy (`DiscreteSchedule`); jitted code
gathers float32 rows of it.

σ-space (DESIGN.md): x_t = sqrt(ᾱ_t)·(x_0 + σ_t·ε) with σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), so a discrete
ε-model is EDM's denoiser D(x; σ) = x − σ·ε̂(sqrt(ᾱ)·x, t) on the finite grid σ_0 < … < σ_{T−1}:
c_skip = 1, c_out = −σ, c_in = 1/sqrt(σ² + 1) = sqrt(ᾱ), c_noise = the index t of σ on the grid
(EDM Table 1, iDDPM column). `make_ddpm` registers that preconditioning as 'ddpm'; its round_sigma
snaps to the grid, so the EDM samplers run on a DDPM/iDDPM model exactly as EDM ran ADM.

Respacing (Nichol & Dhariwal §4): keep a subset S of the steps (`space_timesteps`), recompute
β'_k = 1 − ᾱ_{S_k}/ᾱ_{S_{k−1}} from ᾱ on S (not re-clipped) and feed the network the original index S_k.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import registry

COSINE_S = 0.008
MAX_BETA = 0.999
VARIANCES = ('fixed_small', 'fixed_large', 'learned')


# ------------------------------------------------------------------------------------------------
# β schedules (float64 numpy).


def linear_betas(num_timesteps: int) -> np.ndarray:
  """Ho et al.'s linear β from 1e-4 to 0.02 for T = 1000, rescaled for any T (iDDPM §3.2).

  β = linspace(1e-4·1000/T, 0.02·1000/T, T): the same total noise as the 1000-step schedule.

  Returns:
    float64 [T].
  """
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_alpha_bar(t, s: float = COSINE_S):
  """ᾱ(t) = cos²(((t + s)/(1 + s))·π/2) for t ∈ [0, 1] (iDDPM Eq. 17, before normalizing by ᾱ(0))."""
  return np.cos((np.asarray(t, np.float64) + s) / (1.0 + s) * np.pi / 2)**2


def cosine_betas(num_timesteps: int, s: float = COSINE_S, max_beta: float = MAX_BETA) -> np.ndarray:
  """iDDPM's cosine schedule: β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), max_beta) (iDDPM Eq. 17).

  The clip at 0.999 prevents a singularity at t = T (where ᾱ = 0); for T = 4000 it only touches
  the last step. Since ᾱ_t = Π(1 − β) this is ᾱ((t+1)/T)/ᾱ(0) until the clip.

  Returns:
    float64 [T].
  """
  t = np.arange(num_timesteps, dtype=np.float64)
  ratio = cosine_alpha_bar((t + 1) / num_timesteps, s) / cosine_alpha_bar(t / num_timesteps, s)
  return np.minimum(1.0 - ratio, max_beta)


registry.add('beta_schedule', 'linear', linear_betas)
registry.add('beta_schedule', 'cosine', cosine_betas)


def get_betas(name: str, num_timesteps: int) -> np.ndarray:
  """The β schedule `name` ∈ {linear, cosine} with T steps, float64 [T]."""
  if int(num_timesteps) != num_timesteps or num_timesteps < 1:
    raise ValueError(f'num_timesteps must be a positive integer, got {num_timesteps!r}.')
  return registry.get('beta_schedule', name)(int(num_timesteps))


# ------------------------------------------------------------------------------------------------
# Respacing.


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> np.ndarray:
  """The steps of a T-step process that a respaced sampler keeps (improved-diffusion's rule).

  * "ddimN": the DDIM stride, range(0, T, k) for the smallest k giving exactly N steps.
  * "N" or "N1,N2,…" (or ints): split 0…T−1 into len(counts) equal sections (the first T mod len
    sections one longer) and take N_i steps from section i at a fractional stride
    (size − 1)/(N_i − 1), rounded half to even (Python's round), each section starting at its
    first step.

  Args:
    num_timesteps: T of the original process.
    section_counts: the spec above.

  Returns:
    int64 [K] sorted original indices.

  Raises:
    ValueError: when a section is shorter than its count or no DDIM stride gives N steps.
  """
  if isinstance(section_counts, str):
    text = section_counts.strip()
    if text.startswith('ddim'):
      desired = int(text[len('ddim'):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return np.arange(0, num_timesteps, stride, dtype=np.int64)
      if desired == num_timesteps:
        return np.arange(num_timesteps, dtype=np.int64)
      raise ValueError(f'No integer stride gives exactly {desired} of {num_timesteps} steps '
                       f'("ddim{desired}"); pick another count or an evenly spaced "{desired}".')
    try:
      counts = [int(x) for x in text.split(',')]
    except ValueError:
      raise ValueError(f'Cannot read the respacing {section_counts!r}; write e.g. "250", '
                       '"10,15,20" or "ddim50".') from None
  elif isinstance(section_counts, int):
    counts = [section_counts]
  else:
    counts = [int(x) for x in section_counts]
  if not counts or min(counts) < 1:
    raise ValueError(f'Respacing counts must be positive, got {section_counts!r}.')
  size_per, extra = divmod(num_timesteps, len(counts))
  start, kept = 0, []
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f'Cannot take {count} steps from a section of {size} steps '
                       f'(respacing {section_counts!r} of {num_timesteps}).')
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    position = 0.0
    for _ in range(count):
      kept.append(start + round(position))
      position += stride
    start += size
  return np.asarray(sorted(set(kept)), np.int64)


# ------------------------------------------------------------------------------------------------
# The tables.


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteSchedule:
  """All float64 tables of a (possibly respaced) discrete process with K steps.

  Attributes:
    betas: β_k [K].
    timesteps: original index of step k [K] (k itself unless respaced); what the network sees.
    num_original: T of the process the network was trained on.
    alphas_cumprod: ᾱ_k [K].
    alphas_cumprod_prev: ᾱ_{k−1} [K] with ᾱ_{−1} = 1.
    posterior_variance: β̃_k [K] (β̃_0 = 0).
    posterior_log_variance_clipped: log β̃_k with β̃_0 replaced by β̃_1 [K] (log 0 is −∞).
    posterior_mean_coef1, posterior_mean_coef2: μ̃_k = coef1·x_0 + coef2·x_k [K].
    log_betas: log β_k [K], the upper end of the learned variance.
    sigmas: σ_k = sqrt((1 − ᾱ_k)/ᾱ_k) [K], increasing: the σ-grid of the model.
  """
  betas: np.ndarray
  timesteps: np.ndarray
  num_original: int
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray
  log_betas: np.ndarray
  sigmas: np.ndarray

  @property
  def num_steps(self) -> int:
    """K, the number of steps of this (possibly respaced) process."""
    return int(self.betas.shape[0])

  @classmethod
  def from_betas(cls, betas, timesteps: Optional[np.ndarray] = None,
                 num_original: Optional[int] = None) -> 'DiscreteSchedule':
    """Derives every table from β (float64).

    Args:
      betas: β_k [K] in (0, 1].
      timesteps: original indices [K]; arange(K) by default.
      num_original: T of the original process; K by default.
    """
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or betas.size < 1 or np.any(betas <= 0) or np.any(betas > 1):
      raise ValueError('β must be a non-empty vector with entries in (0, 1].')
    k = betas.shape[0]
    timesteps = np.arange(k, dtype=np.int64) if timesteps is None else np.asarray(timesteps,
                                                                                   np.int64)
    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    # β̃_0 = 0: its log is clipped to log β̃_1 (the decoder at t = 0 never uses β̃_0 anyway).
    post_log_var = np.log(np.append(post_var[1], post_var[1:]) if k > 1 else betas)
    with np.errstate(divide='ignore'):
      sigmas = np.sqrt((1.0 - ab) / ab)
    return cls(
        betas=betas, timesteps=timesteps, num_original=int(num_original or k),
        alphas_cumprod=ab, alphas_cumprod_prev=ab_prev, posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=betas * np.sqrt(ab_prev) / (1.0 - ab),
        posterior_mean_coef2=(1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
        log_betas=np.log(betas), sigmas=sigmas)

  def respace(self, section_counts: str | int | Sequence[int] | np.ndarray) -> 'DiscreteSchedule':
    """The process restricted to the kept steps S (indices into this schedule).

    β'_k = 1 − ᾱ_{S_k}/ᾱ_{S_{k−1}} (ᾱ_{S_{−1}} = 1), not re-clipped: the respaced ᾱ equals the
    original ᾱ on S, and the learned-variance range and posterior follow from β'.

    Args:
      section_counts: a `space_timesteps` spec ("250", "10,15,20", "ddim50") or the kept indices.
    """
    if isinstance(section_counts, np.ndarray) and section_counts.dtype.kind in 'iu':
      kept = np.unique(section_counts)
    else:
      kept = space_timesteps(self.num_steps, section_counts)
    if kept.size == 0 or kept[0] < 0 or kept[-1] >= self.num_steps:
      raise ValueError(f'Kept steps must lie in [0, {self.num_steps}).')
    ab = self.alphas_cumprod[kept]
    betas = 1.0 - ab / np.append(1.0, ab[:-1])
    return DiscreteSchedule.from_betas(betas, self.timesteps[kept], self.num_original)

  def model_log_variance(self, kind: str) -> np.ndarray:
    """log Σ_k [K] of a fixed-variance reverse process.

    'fixed_small': β̃ (the clipped log), the lower bound of the reverse variance; 'fixed_large':
    β, with β_0 replaced by β̃_1 so the decoder at t = 0 is not too wide (as improved-diffusion).
    """
    if kind == 'fixed_small':
      return self.posterior_log_variance_clipped
    if kind == 'fixed_large':
      if self.num_steps == 1:
        return self.log_betas
      return np.log(np.append(self.posterior_variance[1], self.betas[1:]))
    raise ValueError(f'Unknown fixed variance {kind!r}; known: fixed_small, fixed_large.')

  def noise_labels(self, rescale: bool = False) -> np.ndarray:
    """c_noise of each step [K]: the original index, ×1000/T with `rescale` (improved-diffusion's
    rescale_timesteps, which keeps the embedding's input range at [0, 1000) for any T)."""
    t = self.timesteps.astype(np.float64)
    return t * (1000.0 / self.num_original) if rescale else t


def make_schedule(beta_schedule: str = 'cosine', num_timesteps: int = 1000,
                  respacing: Optional[str] = None) -> DiscreteSchedule:
  """The tables of the β schedule `beta_schedule` with T steps, optionally respaced."""
  schedule = DiscreteSchedule.from_betas(get_betas(beta_schedule, num_timesteps))
  return schedule.respace(respacing) if respacing else schedule


def schedule_from_sigmas(sigmas) -> DiscreteSchedule:
  """The discrete process whose σ-grid is `sigmas` (increasing, [T]): ᾱ = 1/(1 + σ²).

  Used for EDM's 'iddpm' preconditioning, whose grid u_{M−1−t} is iDDPM's cosine σ_t.
  """
  ab = 1.0 / (1.0 + np.asarray(sigmas, np.float64)**2)
  return DiscreteSchedule.from_betas(1.0 - ab / np.append(1.0, ab[:-1]))


# ------------------------------------------------------------------------------------------------
# Jittable per-step arithmetic (float32 rows of the tables).


def gather(table: np.ndarray, t, like: jax.Array) -> jax.Array:
  """table[t] as float32, shaped [B, 1, …, 1] to broadcast against `like` [B, …].

  Args:
    table: a float64 table [K].
    t: int step indices [B] (or a scalar).
    like: the array the result multiplies.
  """
  values = jnp.asarray(np.asarray(table, np.float32))[jnp.asarray(t)]
  values = jnp.broadcast_to(values, like.shape[:1])
  return values.reshape(values.shape + (1,) * (like.ndim - 1))


def q_sample(schedule: DiscreteSchedule, x0, t, noise) -> jax.Array:
  """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε (DDPM Eq. 4). Shapes [B, …]; t int [B]."""
  return (gather(np.sqrt(schedule.alphas_cumprod), t, x0) * x0 +
          gather(np.sqrt(1.0 - schedule.alphas_cumprod), t, x0) * noise)


def q_posterior_mean(schedule: DiscreteSchedule, x0, xt, t) -> jax.Array:
  """μ̃_t(x_t, x_0) = coef1_t·x_0 + coef2_t·x_t (DDPM Eq. 7). Shapes [B, …]; t int [B]."""
  return (gather(schedule.posterior_mean_coef1, t, xt) * x0 +
          gather(schedule.posterior_mean_coef2, t, xt) * xt)


def eps_from_x0(schedule: DiscreteSchedule, xt, t, x0) -> jax.Array:
  """ε = (x_t − sqrt(ᾱ_t)·x_0)/sqrt(1 − ᾱ_t): the noise implied by a (possibly clipped) x̂_0."""
  return ((xt - gather(np.sqrt(schedule.alphas_cumprod), t, xt) * x0) /
          gather(np.sqrt(1.0 - schedule.alphas_cumprod), t, xt))


def learned_log_variance(schedule: DiscreteSchedule, t, v) -> jax.Array:
  """iDDPM's learned variance (Eq. 15): log Σ = frac·log β_t + (1 − frac)·log β̃_t, frac = (v + 1)/2.

  v is the network's unconstrained extra output; v ∈ [−1, 1] interpolates between the two bounds
  (in log space), outside it extrapolates.

  Args:
    t: int steps [B].
    v: [B, …] network output.

  Returns:
    log Σ [B, …].
  """
  frac = (v + 1.0) / 2.0
  return (frac * gather(schedule.log_betas, t, v) +
          (1.0 - frac) * gather(schedule.posterior_log_variance_clipped, t, v))


def model_log_variance(schedule: DiscreteSchedule, t, variance: str, v=None,
                       like: Optional[jax.Array] = None) -> jax.Array:
  """log Σ_θ(x_t, t) of the reverse process for `variance` ∈ VARIANCES.

  Args:
    t: int steps [B].
    variance: 'fixed_small' (β̃), 'fixed_large' (β) or 'learned' (needs v).
    v: the network's variance output [B, …] when learned.
    like: an array [B, …] the fixed variance is broadcast against.
  """
  if variance == 'learned':
    if v is None:
      raise ValueError('A learned variance needs the network\'s extra output channels.')
    return learned_log_variance(schedule, t, v)
  table = schedule.model_log_variance(variance)
  return jnp.broadcast_to(gather(table, t, like), like.shape)


def check_variance(variance: str) -> None:
  if variance not in VARIANCES:
    raise ValueError(f'Unknown variance {variance!r}; known: {", ".join(VARIANCES)}.')
