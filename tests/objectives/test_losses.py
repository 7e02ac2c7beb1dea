"""EDM-family losses against closed forms on Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import precond, registry
from diffjax.objectives import edm as losses
from diffjax.processes import schedules

LOSSES = ('edm', 'vp', 've')
PRECONDS = {'edm': precond.edm, 'vp': precond.vp, 've': precond.ve}


@pytest.mark.parametrize('name', LOSSES)
def test_weight_times_c_out_squared_is_one(name):
  # EDM §5: λ(σ)·c_out(σ)² = 1, so the network's effective target has unit weight.
  sigma = jnp.geomspace(0.002, 80.0, 50)
  loss = losses.get_loss(name)
  c_out = PRECONDS[name](sigma).c_out
  np.testing.assert_allclose(loss.weight(sigma) * c_out**2, 1.0, rtol=1e-5)


def test_edm_sigma_is_log_normal():
  sigma = losses.edm_sigma(jax.random.key(0), 200_000, p_mean=-1.2, p_std=1.2)
  log_sigma = np.log(np.asarray(sigma))
  assert abs(log_sigma.mean() + 1.2) < 0.01
  assert abs(log_sigma.std() - 1.2) < 0.01


def test_ve_sigma_is_log_uniform_on_its_range():
  sigma = np.asarray(losses.ve_sigma(jax.random.key(1), 100_000))
  assert sigma.min() >= 0.02 and sigma.max() <= 100.0
  u = np.log(sigma / 0.02) / np.log(100.0 / 0.02)
  np.testing.assert_allclose(np.histogram(u, bins=10, range=(0, 1))[0] / 1e4, 1.0, atol=0.05)


def test_vp_sigma_is_uniform_in_time():
  sigma = losses.vp_sigma(jax.random.key(2), 100_000)
  t = np.asarray(schedules.vp_sigma_inv(sigma))
  assert t.min() >= 1e-5 - 1e-7 and t.max() <= 1.0 + 1e-6
  np.testing.assert_allclose(np.histogram(t, bins=10, range=(0, 1))[0] / 1e4, 1.0, atol=0.05)


@pytest.mark.parametrize('sigma_value', [0.1, 1.0, 10.0])
def test_loss_of_exact_denoiser_is_the_posterior_variance(sigma_value):
  # Data y ~ N(0, s²I): D*(x; σ) = s²/(s²+σ²)·x and E‖D* − y‖² = D·s²σ²/(s²+σ²) per example.
  s, dims, batch = 0.7, 64, 4096
  y = s * jax.random.normal(jax.random.key(3), (batch, 4, 4, 4))
  loss = losses.get_loss('edm')
  exact = lambda x, sigma: (s**2 / (s**2 + sigma**2))[:, None, None, None] * x
  sigma = jnp.full((batch,), sigma_value)
  value, aux = losses.denoising_loss(exact, loss, y, jax.random.key(4), sigma=sigma)
  expected = float(loss.weight(sigma_value)) * dims * s**2 * sigma_value**2 / (s**2 + sigma_value**2)
  assert abs(float(value) / expected - 1) < 0.03
  # Any other denoiser does worse: the exact one minimizes the loss.
  scaled = lambda x, sigma: 1.1 * exact(x, sigma)
  worse, _ = losses.denoising_loss(scaled, loss, y, jax.random.key(4), sigma=sigma)
  assert float(worse) > float(value)


def test_loss_sums_pixels_and_averages_batch():
  y = jnp.ones((2, 2, 2, 1))
  zero = lambda x, sigma: jnp.zeros_like(x)
  loss = losses.DenoisingLoss('const', lambda key, n: jnp.ones((n,)), lambda s: jnp.ones_like(s))
  value, aux = losses.denoising_loss(zero, loss, y, jax.random.key(0))
  assert float(value) == pytest.approx(4.0)
  np.testing.assert_allclose(aux['per_example'], [4.0, 4.0])


def test_unknown_loss_lists_known():
  with pytest.raises(registry.UnknownNameError, match=r'known losses: .*edm.*ve, vp'):
    losses.get_loss('nope')


def test_edm_coefficients_match_reference():
  c = precond.edm(jnp.array([1.0, 80.0]))
  np.testing.assert_allclose(c.c_skip, [0.2, 3.906097e-5], rtol=1e-5)
  np.testing.assert_allclose(c.c_out, [0.4472136, 0.4999902], rtol=1e-6)
  np.testing.assert_allclose(c.c_in, [0.8944272, 0.01249976], rtol=1e-6)
  np.testing.assert_allclose(c.c_noise, [0.0, 1.0955067], atol=1e-6)
  assert float(losses.edm_weight(1.0)) == pytest.approx(5.0)


def test_preconditioning_ranges():
  vp = precond.get_preconditioning('vp')
  assert vp.sigma_min == pytest.approx(0.0010005, rel=1e-4)
  assert vp.sigma_max == pytest.approx(152.167, rel=1e-5)
  ve = precond.get_preconditioning('ve')
  assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)
  iddpm = precond.get_preconditioning('iddpm')
  assert iddpm.sigma_max == pytest.approx(20291.17, rel=1e-6)
  assert iddpm.sigma_min == pytest.approx(0.0064254, rel=1e-4)
  # round_sigma snaps to the grid; c_noise is the index counted from the small end.
  u = schedules.iddpm_u()
  snapped = iddpm.round_sigma(jnp.array([u[8] * 1.001, u[998] * 0.999]))
  np.testing.assert_allclose(snapped, [u[8], u[998]], rtol=1e-6)
  np.testing.assert_allclose(iddpm.coefficients(jnp.array([u[8], u[998]])).c_noise, [991, 1])


def test_vp_c_noise_is_scaled_time():
  t = jnp.array([0.01, 0.5, 1.0])
  c = precond.vp(schedules.vp_sigma(t))
  np.testing.assert_allclose(c.c_noise, 999 * np.asarray(t), rtol=1e-4)


class _Identity:
  """A 'network' returning its input (plus one extra channel) to check the preconditioning."""

  def apply(self, variables, x, c_noise, labels, aug, train=False, rngs=None):
    return jnp.concatenate([x * variables['params']['k'], jnp.ones_like(x[..., :1])], -1)


def test_denoiser_applies_equation_7():
  den = precond.Denoiser(_Identity(), precond.make_edm())
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  sigma = jnp.array([0.5, 1.0, 2.0])
  d, extra = den.raw({'k': 2.0}, x, sigma)
  c = precond.edm(sigma)
  expected = (c.c_skip + c.c_out * c.c_in * 2.0)[:, None, None, None] * x
  np.testing.assert_allclose(d, expected, rtol=1e-6)
  assert extra.shape == (3, 4, 4, 1)
