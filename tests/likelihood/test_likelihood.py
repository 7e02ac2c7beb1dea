"""PF-ODE likelihood: bits/dim of Gaussian data against the exact Gaussian NLL; dequantization; offset.

With data N(0, s²I) and its exact denoiser, the PF-ODE is linear and the model's density at t = ε is
N(0, std_ε²I) with std_t = s(t)·sqrt(s² + σ(t)²) (up to the prior's mismatch with the true marginal at
T, below 1e-5 nats/dim here), so bits/dim has a closed form to compare with.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import samplers
from diffjax.likelihood import ode as likelihood
from diffjax.processes import sde as sde_lib

S_DATA = 0.5
SHAPE = (4, 4, 1)
DIMS = 16
# Bits/dim the ODE tolerance (rtol = atol = 1e-5) allows: ~1e-5 relative on log p ≈ tens of nats.
BPD_TOL = 1e-4


def gaussian_denoiser(x, sigma, s=S_DATA):
  sigma = jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1))
  return x * s**2 / (s**2 + sigma**2)


def exact_bpd(sde, x, epsilon=sde_lib.TRAIN_EPSILON):
  """−log N(x; 0, std_ε²I)/(D ln 2) + 7."""
  std = float(sde.s(epsilon) * np.sqrt(S_DATA**2 + float(sde.sigma(epsilon))**2))
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  nll = 0.5 * np.sum(x**2, -1) / std**2 + 0.5 * DIMS * np.log(2 * np.pi * std**2)
  return nll / (DIMS * np.log(2)) + 7.0


@pytest.fixture(scope='module')
def data():
  keys = samplers.seed_keys(np.arange(64))
  return keys, samplers.latents(keys, SHAPE) * S_DATA


def test_vp_bpd_exact_and_hutchinson(data):
  """VP: the exact divergence and both Hutchinson probes, in one jit (fewer compiles)."""
  keys, x = data
  sde = sde_lib.VPSDE()

  def run(x, keys):
    out = {}
    for name, kwargs in (('exact', dict(divergence='exact')),
                         ('rademacher', dict(probe='rademacher')),
                         ('gaussian', dict(probe='gaussian'))):
      out[name] = likelihood.bpd(gaussian_denoiser, x, keys, sde=sde, dequantize_data=False,
                                 **kwargs)
    return out

  out = jax.jit(run)(x, keys)
  expected = exact_bpd(sde, x)
  # The Jacobian of the drift is c(t)·I, so a Rademacher probe (vᵀv = D) is exact as well.
  for name in ('exact', 'rademacher'):
    bpd, info = out[name]
    np.testing.assert_allclose(bpd, expected, atol=BPD_TOL, err_msg=name)
    assert 0 < int(info['num_steps']) < 100
  # A Gaussian probe scales the exact divergence integral by |v|²/D (unbiased, not exact).
  v = likelihood.probes(keys, SHAPE, 'gaussian')
  ratio = jnp.sum(v.reshape(64, -1)**2, -1) / DIMS
  np.testing.assert_allclose(out['gaussian'][1]['delta_logp'],
                             out['exact'][1]['delta_logp'] * ratio, rtol=1e-3, atol=1e-3)
  errors = np.asarray(out['gaussian'][0]) - expected
  assert abs(errors.mean()) < 4 * errors.std() / np.sqrt(len(errors))


@pytest.mark.parametrize('name', ['subvp', 've'])
def test_bpd_hutchinson_other_sdes(data, name):
  keys, x = data
  sde = sde_lib.get_sde(name)
  bpd, _ = jax.jit(lambda x, k: likelihood.bpd(gaussian_denoiser, x, k, sde=sde,
                                               dequantize_data=False))(x, keys)
  np.testing.assert_allclose(bpd, exact_bpd(sde, x), atol=BPD_TOL)


def test_exact_divergence_with_correlated_data():
  """A non-diagonal Jacobian: data N(0, Σ) with Σ = AAᵀ; the exact trace must ignore off-diagonals."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)) * 0.3, jnp.float32)
  cov = a @ a.T + 0.05 * jnp.eye(8)
  sde = sde_lib.VESDE()

  def denoise(x, sigma):
    flat = x.reshape(x.shape[0], -1)
    gain = jax.vmap(lambda s: cov @ jnp.linalg.inv(cov + s**2 * jnp.eye(8)))(sigma)
    return jnp.einsum('bij,bj->bi', gain, flat).reshape(x.shape)

  x = jnp.asarray(np.random.default_rng(1).multivariate_normal(np.zeros(8), cov, size=6),
                  jnp.float32).reshape(6, 2, 2, 2)
  logp, _ = jax.jit(lambda x: likelihood.log_likelihood(denoise, x, sde=sde, divergence='exact'))(x)
  cov_eps = np.asarray(cov, np.float64) + float(sde.sigma(1e-5))**2 * np.eye(8)
  flat = np.asarray(x, np.float64).reshape(6, -1)
  expected = (-0.5 * np.einsum('bi,ij,bj->b', flat, np.linalg.inv(cov_eps), flat)
              - 0.5 * np.linalg.slogdet(2 * np.pi * cov_eps)[1])
  np.testing.assert_allclose(logp, expected, atol=2e-3)


def test_dequantization_and_the_8_bit_offset():
  keys = samplers.seed_keys(np.arange(3))
  u = np.array([0, 1, 127, 128, 254, 255], np.uint8).reshape(1, 6, 1, 1).repeat(3, 0)
  x = likelihood.dequantize(u, keys)
  # x = 2(u + U)/256 − 1 with U ∈ [0, 1): each value stays in its own bin of width 2/256.
  lower = 2 * u.astype(np.float64) / 256 - 1
  assert np.all(x >= lower - 1e-7) and np.all(x < lower + 2 / 256)
  # Pipeline floats u/127.5 − 1 give the same result as the uint8 images.
  np.testing.assert_array_equal(likelihood.dequantize(u / 127.5 - 1.0, keys), x)
  # Per-sample keys: sample 1's noise does not depend on the batch.
  np.testing.assert_array_equal(likelihood.dequantize(u[1:2], keys[1:2]), x[1:2])
  # A density uniform on [−1, 1)^D is 8 bits/dim on the 8-bit scale: log p = −D ln 2.
  np.testing.assert_allclose(likelihood.bits_per_dim(-10 * math.log(2.0), 10), 8.0, rtol=1e-6)
  with pytest.raises(ValueError, match='known probes'):
    likelihood.probes(keys, (2,), 'normal')
