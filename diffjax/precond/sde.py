"""score_sde's continuous-time networks as denoisers: the preconditioning of a `processes.sde` SDE."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from diffjax import registry
from diffjax.precond import core as precond_lib
from diffjax.processes.sde import SDE, SDES, TRAIN_EPSILON, VESDE, VPSDE, _split_kwargs, get_sde


@dataclasses.dataclass(frozen=True)
class SDEPreconditioning(precond_lib.Preconditioning):
  """A `precond.Preconditioning` that also carries its SDE (for PC / PF-ODE samplers, likelihood)."""

  sde: Optional[SDE] = None


def sde_coefficients(sde: SDE, sigma) -> precond_lib.Coefficients:
  """The preconditioning of score_sde's continuous-time networks (EDM Eq. 7 form).

  ε-prediction (VP, sub-VP; score = −F/std): D = x̃ − σ·F(s·x̃), c_in = s, c_out = −σ.
  VE (NCSN++ with scale_by_sigma; score = F/σ): D = x̃ + σ·F(x̃), c_in = 1, c_out = σ.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  ones = jnp.ones_like(sigma)
  if sde.eps_prediction:
    return precond_lib.Coefficients(c_skip=ones, c_out=-sigma, c_in=sde.s_of_sigma(sigma),
                                    c_noise=sde.c_noise(sigma))
  return precond_lib.Coefficients(c_skip=ones, c_out=sigma, c_in=ones,
                                  c_noise=sde.c_noise(sigma))


def sde_preconditioning(sde: SDE, epsilon: float = TRAIN_EPSILON) -> SDEPreconditioning:
  """The network wrapper, supporting σ(ε) … σ(1) (samplers clamp their grids to it)."""
  with jax.ensure_compile_time_eval():  # constants, even when built inside a jit trace
    sigma_min = float(sde.sigma(jnp.float32(epsilon)))
    sigma_max = float(sde.sigma(jnp.float32(sde.T)))
  return SDEPreconditioning(name=f'sde_{sde.name}',
                            coefficients=functools.partial(sde_coefficients, sde), sigma_min=sigma_min, sigma_max=sigma_max, sde=sde)


def resolve_sde(sde: Any = None, precond: Optional[precond_lib.Preconditioning] = None) -> SDE:
  """The SDE a sampler or the likelihood should use.

  Args:
    sde: an `SDE`, a registered name ('vp', 'subvp', 've': default constants), or None.
    precond: the network's preconditioning; with sde None its SDE is taken: an `SDEPreconditioning`
      carries one; EDM's 'vp' and 've' preconditionings map to the VP SDE and to the VE SDE over
      their σ range.

  Raises:
    ValueError: when no SDE can be determined.
  """
  if isinstance(sde, SDE):
    return sde
  if isinstance(sde, str):
    return get_sde(sde)
  if sde is not None:
    raise ValueError(f'sde must be an SDE or one of {", ".join(SDES)}; got {sde!r}.')
  if precond is not None:
    if getattr(precond, 'sde', None) is not None:
      return precond.sde
    if precond.name == 'vp':
      return VPSDE()
    if precond.name == 've':
      return VESDE(precond.sigma_min, precond.sigma_max)
  name = getattr(precond, 'name', None)
  raise ValueError(f'Cannot tell which SDE to use with the {name!r} preconditioning; pass '
                   f'sde=\'vp\', \'subvp\' or \'ve\' (or train with an sde_* preconditioning).')


def make_preconditioning(name: str, **kwargs) -> SDEPreconditioning:
  """The preconditioning of SDE `name`; kwargs: the SDE's constants and epsilon (σ_min = σ(ε))."""
  sde, rest = _split_kwargs(name, kwargs)
  epsilon = rest.pop('epsilon', TRAIN_EPSILON)
  if rest:
    raise ValueError(f'Unknown sde_{name} preconditioning option(s) {", ".join(sorted(rest))}.')
  return sde_preconditioning(sde, epsilon)


for _name in SDES:
  registry.add('precond', f'sde_{_name}',
               lambda _n=_name, **kwargs: make_preconditioning(_n, **kwargs))
