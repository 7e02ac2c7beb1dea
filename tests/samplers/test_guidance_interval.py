"""The guidance interval (Kynkäänniemi et al. 2024) and autoguidance (Karras et al. 2024) wrappers.

Inside (σ_lo, σ_hi] the guided denoiser is exactly `combine`'s CFG result; outside it is exactly
the conditional denoiser, decided per sample. Autoguidance of two Gaussian-data denoisers (closed
form, Karras et al. 2024 §3's setting) equals D_0 + g·(D_1 − D_0) written out by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import samplers
from diffjax.processes import schedules


def _toy():
  d_cond = lambda x, sigma: jnp.sin(x) + sigma[:, None]
  d_uncond = lambda x, sigma: 0.5 * x - sigma[:, None]**2
  return d_cond, d_uncond


LO, HI = 0.3, 2.0
# Per sample: below, at the open end, inside, at the closed end, above.
SIGMA = jnp.array([0.1, LO, 1.0, HI, 5.0], jnp.float32)
INSIDE = np.array([False, False, True, True, False])


@pytest.mark.parametrize('skip_outside', [False, True])
@pytest.mark.parametrize('w', [1.5, (0.0, 0.5, 1.0, 3.0, 2.0)])
def test_interval_is_cfg_inside_and_the_conditional_model_outside(w, skip_outside):
  d_cond, d_uncond = _toy()
  x = jax.random.normal(jax.random.key(0), (5, 3))
  w = jnp.asarray(w, jnp.float32)
  fn = jax.jit(samplers.guided(d_cond, d_uncond, w, sigma_interval=(LO, HI),
                               skip_outside=skip_outside))
  got = np.asarray(fn(x, SIGMA))
  cfg = np.asarray(samplers.combine(d_cond(x, SIGMA), d_uncond(x, SIGMA), w))
  np.testing.assert_array_equal(got[INSIDE], cfg[INSIDE])
  np.testing.assert_array_equal(got[~INSIDE], np.asarray(d_cond(x, SIGMA))[~INSIDE])
  # A batch wholly outside: the conditional model alone (and skipped, with skip_outside).
  outside = jnp.full((5,), 10.0)
  np.testing.assert_array_equal(fn(x, outside), d_cond(x, outside))


@pytest.mark.parametrize('skip_outside', [False, True])
def test_batched_interval_equals_two_calls(skip_outside):
  labels = jax.nn.one_hot(jnp.array([0, 2, 1, 2, 0]), 3)

  def denoise_with_labels(x, sigma, class_labels):
    return jnp.tanh(x) * (1.0 + class_labels @ jnp.arange(1.0, 4.0))[:, None] - sigma[:, None]

  x = jax.random.normal(jax.random.key(1), (5, 4))
  d_cond = lambda x, s: denoise_with_labels(x, s, labels)
  d_uncond = lambda x, s: denoise_with_labels(x, s, jnp.zeros_like(labels))
  batched = samplers.guided_batched(denoise_with_labels, labels, 2.0, sigma_interval=(LO, HI),
                                    skip_outside=skip_outside)
  got = np.asarray(jax.jit(batched)(x, SIGMA))
  want = np.asarray(samplers.guided(d_cond, d_uncond, 2.0, sigma_interval=(LO, HI))(x, SIGMA))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got[~INSIDE], np.asarray(d_cond(x, SIGMA))[~INSIDE])


def test_interval_in_a_sampler_guides_only_its_steps():
  # Heun on a Karras grid through the interval: equal to a sampler whose denoiser switches by
  # hand, and different from both the unguided and the always-guided sampler.
  d_cond, d_uncond = _toy()
  x = jax.random.normal(jax.random.key(2), (3, 2)) * 80.0
  sigmas = schedules.karras(6)
  by_hand = lambda z, s: (
      jnp.where(((s > LO) & (s <= HI))[:, None], samplers.combine(d_cond(z, s), d_uncond(z, s),
                                                                  1.0), d_cond(z, s)))
  got = samplers.heun(samplers.guided(d_cond, d_uncond, 1.0, sigma_interval=(LO, HI)), x, sigmas)
  np.testing.assert_allclose(got, samplers.heun(by_hand, x, sigmas), rtol=1e-6, atol=1e-6)
  assert not np.allclose(got, samplers.heun(d_cond, x, sigmas), atol=1e-3)


@pytest.mark.parametrize('bad', [(2.0, 1.0), (-1.0, 1.0), (1.0,), 'a,b'])
def test_bad_interval_says_what_to_pass(bad):
  with pytest.raises(ValueError, match='σ_lo'):
    samplers.guided(*_toy(), 1.0, sigma_interval=bad)


def test_autoguidance_of_gaussian_denoisers_is_the_formula():
  # Data N(μ_k, s_k² I): D_k(x; σ) = μ_k + s_k²/(s_k² + σ²)·(x − μ_k). Karras et al. 2024:
  # D_g = D_0 + g·(D_1 − D_0), the main model D_1, the weaker guide D_0; diffjax's w = g − 1.
  def gaussian(mu, s):
    return lambda x, sigma: mu + s**2 / (s**2 + sigma[:, None]**2) * (x - mu)

  main, guide = gaussian(0.3, 0.5), gaussian(0.1, 0.9)
  x = jax.random.normal(jax.random.key(3), (6, 4)) * 2.0
  sigma = jnp.array([0.05, 0.3, 1.0, 2.0, 10.0, 80.0])
  for g in (1.0, 2.05, 3.0):
    mu0, s0, mu1, s1 = 0.1, 0.9, 0.3, 0.5
    sig = np.asarray(sigma)[:, None]
    xn = np.asarray(x, np.float64)
    d0 = mu0 + s0**2 / (s0**2 + sig**2) * (xn - mu0)
    d1 = mu1 + s1**2 / (s1**2 + sig**2) * (xn - mu1)
    np.testing.assert_allclose(samplers.guided(main, guide, g - 1.0)(x, sigma), d0 + g * (d1 - d0),
                               rtol=2e-6, atol=2e-6)
  # Guided by itself, a model is not guided at all: bitwise.
  np.testing.assert_array_equal(samplers.guided(main, main, 1.05)(x, sigma), main(x, sigma))
