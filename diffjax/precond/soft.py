"""Soft Diffusion's network as a denoiser: the 'soft' preconditioning carrying its `SoftSchedule`."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp

from diffjax import registry
from diffjax.precond.core import Coefficients, Preconditioning
from diffjax.processes.corruptions import SoftSchedule


def soft_coefficients(t, noise_label_scale: float = 1000.0) -> Coefficients:
  """x̂_0 = φ_θ(x_t | t) + x_t (REFERENCE §5's residual parameterization) as EDM coefficients.

  c_skip = c_out = c_in = 1 and c_noise = `noise_label_scale`·t: the network sees x_t as it is and
  is conditioned on the diffusion time (scaled like VP's (M − 1)·t so that a positional embedding
  resolves it).
  """
  t = jnp.asarray(t, jnp.float32)
  one = jnp.ones_like(t)
  return Coefficients(c_skip=one, c_out=one, c_in=one, c_noise=noise_label_scale * t)


@dataclasses.dataclass(frozen=True)
class SoftPreconditioning(Preconditioning):
  """The preconditioning of a Soft Diffusion model, carrying its forward process.

  With it `precond.Denoiser(network, precond)` is x̂_0(x_t, t) = x_t + φ_θ(x_t, t): the second
  argument of its `denoise_fn(x, level)` is the **diffusion time t ∈ [0, 1]**, not an EDM σ
  (sigma_min = 0 and sigma_max = 1 record that range). The Soft Score Matching loss (`objectives.soft`)
  and the Momentum/naive samplers (`samplers.momentum`) read the corruption and noise schedule from
  `schedule`, so one config entry (config.precond.kwargs) defines the process for training and
  sampling alike. EDM's σ-grid samplers do not apply to such a model.
  """
  schedule: Optional[SoftSchedule] = None


def make_soft(corruption: str = 'blur', t: Sequence[float] = (0.0, 1.0),
              level: Sequence[float] = (0.0, 1.0), sigma: Sequence[float] = (0.01, 0.1),
              p1_mean=None, p1_std=None, noise_label_scale: float = 1000.0,
              info: Optional[dict] = None) -> SoftPreconditioning:
  """The registered 'soft' preconditioning built from a schedule's lists (config.precond.kwargs).

  Args:
    corruption, t, level, sigma, p1_mean, p1_std: the `SoftSchedule` fields.
    noise_label_scale: c_noise = noise_label_scale·t.
    info: the level-selection tool's notes when a levels file is passed whole (ignored).
  """
  del info
  schedule = SoftSchedule(corruption, t, level, sigma, p1_mean, p1_std)
  return SoftPreconditioning(
      name='soft', coefficients=lambda s: soft_coefficients(s, noise_label_scale), sigma_min=0.0,
      sigma_max=1.0, schedule=schedule)


registry.add('precond', 'soft', make_soft)


def schedule_of(precond) -> SoftSchedule:
  """The `SoftSchedule` of a Soft Diffusion preconditioning; one clear error for any other."""
  schedule = getattr(precond, 'schedule', None)
  if not isinstance(schedule, SoftSchedule):
    name = getattr(precond, 'name', type(precond).__name__)
    raise ValueError(f'This needs a Soft Diffusion model (config.precond.name = "soft"), but the '
                     f'preconditioning is {name!r}; use configs/soft.py or an EDM sampler.')
  return schedule


# ------------------------------------------------------------------------------------------------
# Wasserstein level selection.


