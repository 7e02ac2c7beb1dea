"""Schedules, σ-grids and preconditionings against EDM's Table 1 and REFERENCE.md §1.2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import precond, registry
from diffjax.processes import schedules

# REFERENCE §1.2: EDM's grid for N = 18.
KARRAS_18 = [
    80, 57.585985, 40.785574, 28.374585, 19.352453, 12.910082, 8.4009353, 5.3151945, 3.2568215,
    1.9233398, 1.0881706, 0.58534812, 0.29644228, 0.13951647, 0.059947311, 0.022934518,
    0.0075280200, 0.002, 0.
]


def test_karras_grid_n18_matches_reference():
  grid = schedules.karras(18)
  assert grid.shape == (19,) and grid.dtype == np.float64
  np.testing.assert_allclose(grid, KARRAS_18, rtol=1e-7, atol=0)


@pytest.mark.parametrize('sigma, expected', [
    (1.0, dict(c_skip=0.2, c_out=0.4472136, c_in=0.8944272, c_noise=0.0, weight=5.0)),
    (80.0, dict(c_skip=3.906097e-5, c_out=0.4999902, c_in=0.01249976, c_noise=1.0955067,
                weight=None)),
])
def test_edm_coefficients(sigma, expected):
  c = precond.edm(jnp.float32(sigma), sigma_data=0.5)
  for name in ('c_skip', 'c_out', 'c_in', 'c_noise'):
    np.testing.assert_allclose(float(getattr(c, name)), expected[name], rtol=1e-5, atol=1e-7,
                               err_msg=name)
  # λ(σ)·c_out² = 1 with λ = (σ² + σ_d²)/(σ·σ_d)² (EDM Table 1).
  weight = (sigma**2 + 0.25) / (sigma * 0.5)**2
  if expected['weight'] is not None:
    np.testing.assert_allclose(weight, expected['weight'], rtol=1e-7)
  np.testing.assert_allclose(weight * float(c.c_out)**2, 1.0, rtol=1e-5)


def test_iddpm_levels_checkpoints():
  u = schedules.iddpm_u()
  assert u.shape == (1001,) and u[-1] == 0.0 and np.all(np.diff(u) < 0)
  np.testing.assert_allclose(u[[0, 8, 998, 999]], [20291.17, 80.2037, 0.0093505, 0.0064254],
                             rtol=2e-5)


def test_iddpm_grid_spans_j0_to_last_level():
  u = schedules.iddpm_u()
  grid = schedules.iddpm_grid(10)
  assert grid.shape == (11,) and grid[-1] == 0.0
  assert grid[0] == u[8] and grid[-2] == u[999]  # j0 = 8 for σ_max = 81 (EDM's default)
  assert np.all(np.isin(grid[:-1], u))


def test_vp_and_ve_grid_end_points():
  vp = schedules.vp_grid(32)
  np.testing.assert_allclose(vp[0], 152.16697, rtol=1e-6)  # σ(1)
  np.testing.assert_allclose(vp[-2], np.sqrt(np.expm1(0.5 * 19.9e-6 + 0.1e-3)), rtol=1e-10)  # σ(ε_s)
  assert vp[-1] == 0.0 and np.all(np.diff(vp) < 0)
  ve = schedules.ve_grid(32)
  np.testing.assert_allclose(ve[[0, -2, -1]], [100.0, 0.02, 0.0], rtol=1e-12)
  assert np.all(np.diff(ve) < 0)


def test_vp_grid_refits_betas_to_a_range():
  grid = schedules.vp_grid(8, sigma_min=0.002, sigma_max=80.0)
  np.testing.assert_allclose(grid[[0, -2]], [80.0, 0.002], rtol=1e-10)
  beta_d, beta_min = schedules.vp_betas_for_range(schedules.vp_sigma(1e-3).item(),
                                                   schedules.vp_sigma(1.0).item())
  np.testing.assert_allclose([beta_d, beta_min], [19.9, 0.1], rtol=1e-4)


def test_preconditioning_sigma_ranges():
  vp = precond.make_vp()
  np.testing.assert_allclose([vp.sigma_min, vp.sigma_max], [0.0010005, 152.167], rtol=1e-5)
  ve = precond.make_ve()
  assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)
  iddpm = precond.make_iddpm()
  np.testing.assert_allclose([iddpm.sigma_min, iddpm.sigma_max], [0.0064254, 20291.17], rtol=2e-5)
  u = schedules.iddpm_u()
  np.testing.assert_allclose(np.asarray(iddpm.round_sigma(jnp.array([80.0, 1e-6, 1e5]))),
                             [u[8], u[999], u[0]], rtol=1e-6)


_SCHEDULES = {
    'vp': (schedules.vp_schedule(), np.linspace(1e-3, 1.0, 7)),
    've': (schedules.ve_schedule(), np.geomspace(4e-4, 1e4, 7)),
    'linear': (schedules.linear_schedule(), np.geomspace(2e-3, 80.0, 7)),
}


@pytest.mark.parametrize('name', sorted(_SCHEDULES))
def test_schedule_inverse_and_derivative(name):
  schedule, t = _SCHEDULES[name]
  t = jnp.asarray(t, jnp.float32)
  np.testing.assert_allclose(schedule.sigma_inv(schedule.sigma(t)), t, rtol=2e-5)
  grad = jax.vmap(jax.grad(schedule.sigma))(t)
  np.testing.assert_allclose(schedule.sigma_deriv(t), grad, rtol=1e-5)
  for scaling_name in ('vp', 'none'):
    scaling = schedules.get_scaling(scaling_name, schedule)
    grad = jax.vmap(jax.grad(scaling.s))(t)
    np.testing.assert_allclose(scaling.s_deriv(t), grad, rtol=1e-5, atol=1e-12)


def test_vp_scaling_is_alpha():
  """s(t)² + (s(t)σ(t))² = 1: the VP scaling is the α of the α-σ form."""
  schedule = schedules.vp_schedule()
  scaling = schedules.vp_scaling(schedule)
  t = jnp.linspace(1e-3, 1.0, 9)
  s, sigma = scaling.s(t), schedule.sigma(t)
  np.testing.assert_allclose(s**2 + (s * sigma)**2, 1.0, rtol=1e-6)


def test_unknown_discretization_lists_known_names():
  with pytest.raises(registry.UnknownNameError, match='edm, exponential, iddpm, karras, linear_logsnr, polyexponential, ve, vp'):
    schedules.sigma_grid('karas', 18)
