"""The α-σ form: cosine log-SNR schedule, x/ε/v/both preconditionings, weightings, DDIM, guidance."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import registry
from diffjax.objectives import alpha_sigma as alpha_sigma_losses
from diffjax.precond import Denoiser
from diffjax.processes import alpha_sigma as A
from diffjax.samplers import distilled, ode


class FixedNet:
  """A stand-in network returning a fixed output F and recording its inputs."""

  def __init__(self, out):
    self.out = out
    self.inputs = []

  def apply(self, variables, x, c_noise, class_labels, augment_labels, train=False, rngs=None):
    self.inputs.append((x, c_noise))
    return self.out


def test_cosine_schedule_constants_and_identities():
  a, b = A.cosine_coefficients()
  np.testing.assert_allclose(b, 4.539993e-5, rtol=1e-6)
  np.testing.assert_allclose(a, 1.570705527, rtol=1e-9)
  t = jnp.linspace(0.0, 1.0, 11)
  lam = A.logsnr(t)
  np.testing.assert_allclose([lam[0], lam[-1]], [20.0, -20.0], atol=1e-3)
  alpha, sigma = A.alpha_sigma_of_logsnr(lam)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  # The two routes to (α, σ_t) agree, and σ-space σ = σ_t/α_t = e^(−λ/2) = tan(a t + b).
  alpha2, sigma2 = A.alpha_sigma_of_t(t)
  np.testing.assert_allclose(alpha, alpha2, atol=1e-6)
  np.testing.assert_allclose(sigma, sigma2, atol=1e-6)
  s = A.sigma_of_t(t)
  np.testing.assert_allclose(s, np.exp(-lam / 2), rtol=1e-5)
  np.testing.assert_allclose(A.t_of_sigma(s), t, atol=1e-6)
  alpha3, sigma3 = A.alpha_sigma_of_sigma(s)
  np.testing.assert_allclose(alpha3, alpha, atol=1e-6)
  np.testing.assert_allclose(sigma3, sigma, atol=1e-6)
  # The registered schedule: σ' = a(1 + σ²) against a central difference.
  sched = registry.get('schedule', 'cosine_logsnr')()
  u = jnp.array([0.2, 0.5, 0.7])
  h = 1e-3
  fd = (sched.sigma(u + h) - sched.sigma(u - h)) / (2 * h)
  np.testing.assert_allclose(sched.sigma_deriv(u), fd, rtol=1e-3)


@pytest.mark.parametrize('param', ['x', 'eps', 'v', 'both'])
def test_parameterizations_are_preconditionings(param):
  key = jax.random.key(0)
  k1, k2 = jax.random.split(key)
  x_e = jax.random.normal(k1, (3, 4, 4, 2)) * 3.0       # σ-space input x = z/α
  sigma = jnp.array([0.05, 1.0, 30.0])
  out = jax.random.normal(k2, (3, 4, 4, 4 if param == 'both' else 2))
  net = FixedNet(out)
  denoiser = Denoiser(net, registry.get('precond', f'alpha_sigma_{param}')())
  d = denoiser(None, x_e, sigma)
  alpha, sig_t = A.alpha_sigma_of_sigma(sigma)
  z = alpha[:, None, None, None] * x_e
  f = out[..., :2]
  expected = {
      'x': lambda: f,
      'eps': lambda: A.x_from_eps(z, f, alpha, sig_t),
      'v': lambda: A.x_from_v(z, f, alpha, sig_t),
      'both': lambda: A.x_from_both(z, out[..., :2], out[..., 2:], alpha, sig_t),
  }[param]()
  np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-5)
  # The network sees z (c_in = α) and is conditioned on 1000·t.
  x_in, c_noise = net.inputs[-1]
  np.testing.assert_allclose(x_in, z, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(c_noise, 1000.0 * A.t_of_sigma(sigma), rtol=1e-6)
  p = registry.get('precond', f'alpha_sigma_{param}')()
  np.testing.assert_allclose([p.sigma_min, p.sigma_max], [math.exp(-10), math.exp(10)])


def test_conversions_round_trip_and_guidance_agrees_in_every_space():
  keys = jax.random.split(jax.random.key(1), 4)
  lam = jnp.array([-6.0, 0.0, 3.0, 12.0])
  alpha, sigma = A.alpha_sigma_of_logsnr(lam)
  z = jax.random.normal(keys[0], (4, 5))
  x_c = jax.random.normal(keys[1], (4, 5))
  x_u = jax.random.normal(keys[2], (4, 5))
  np.testing.assert_allclose(A.x_from_eps(z, A.eps_from_x(z, x_c, alpha, sigma), alpha, sigma),
                             x_c, atol=1e-5)
  np.testing.assert_allclose(A.x_from_v(z, A.v_from_x(z, x_c, alpha, sigma), alpha, sigma), x_c,
                             atol=1e-5)
  for w in (0.0, 0.3, 4.0, jnp.array([0.0, 1.0, 2.0, 4.0])):
    in_x = A.guide(x_c, x_u, w)
    in_eps = A.x_from_eps(z, A.guide(A.eps_from_x(z, x_c, alpha, sigma),
                                     A.eps_from_x(z, x_u, alpha, sigma), w), alpha, sigma)
    in_v = A.x_from_v(z, A.guide(A.v_from_x(z, x_c, alpha, sigma),
                                 A.v_from_x(z, x_u, alpha, sigma), w), alpha, sigma)
    np.testing.assert_allclose(in_eps, in_x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(in_v, in_x, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(A.guide(x_c, x_u, 0.0), x_c)  # w = 0: the conditional model
  # Clipping x̂ before combining is what breaks the agreement.
  clipped = A.guide(jnp.clip(x_c, -0.5, 0.5), jnp.clip(x_u, -0.5, 0.5), 2.0)
  assert not np.allclose(clipped, A.guide(x_c, x_u, 2.0))


def test_weightings():
  sigma = jnp.array([0.1, 1.0, 10.0])
  snr = 1.0 / sigma**2
  np.testing.assert_allclose(alpha_sigma_losses.truncated_snr_weight(sigma), np.maximum(snr, 1.0), rtol=1e-6)
  np.testing.assert_allclose(alpha_sigma_losses.snr_plus_one_weight(sigma), snr + 1.0, rtol=1e-6)
  # SNR + 1 on ‖x − x̂‖² is the v-MSE ‖v − v̂‖² (same z).
  alpha, sig_t = A.alpha_sigma_of_sigma(sigma)
  k = jax.random.split(jax.random.key(2), 3)
  x, eps, x_hat = (jax.random.normal(kk, (3, 6)) for kk in k)
  z = alpha[:, None] * x + sig_t[:, None] * eps
  v = A.v_from_x(z, x, alpha, sig_t)
  v_hat = A.v_from_x(z, x_hat, alpha, sig_t)
  np.testing.assert_allclose(alpha_sigma_losses.snr_plus_one_weight(sigma) * jnp.sum((x - x_hat)**2, -1),
                             jnp.sum((v - v_hat)**2, -1), rtol=1e-4)
  loss = registry.get('loss', 'alpha_sigma')(weighting='snr_plus_one')
  s = loss.sample_sigma(jax.random.key(3), 1000)
  assert float(s.min()) >= math.exp(-10) * 0.999 and float(s.max()) <= math.exp(10) * 1.001
  with pytest.raises(ValueError, match='known weightings'):
    alpha_sigma_losses.weighting('nope')


def test_ddim_step_is_the_sigma_space_euler_step_and_clips():
  k = jax.random.split(jax.random.key(4), 2)
  z = jax.random.normal(k[0], (2, 3))
  x_hat = 2.0 * jax.random.normal(k[1], (2, 3))
  (at, st), (as_, ss) = A.alpha_sigma_of_t(0.7), A.alpha_sigma_of_t(0.4)
  z_s = A.ddim_step(z, x_hat, at, st, as_, ss)
  # σ-space: x_s = x̂ + (σ_s/σ_t)(x_t − x̂) with x = z/α.
  x_s = x_hat + (ss / as_) / (st / at) * (z / at - x_hat)
  np.testing.assert_allclose(z_s / as_, x_s, rtol=1e-5)
  clipped = A.ddim_step(z, x_hat, at, st, as_, ss, clip=1.0)
  np.testing.assert_allclose(clipped, A.ddim_step(z, jnp.clip(x_hat, -1, 1), at, st, as_, ss))


def _gaussian_denoiser(std):
  return lambda x, sigma: x * std**2 / (std**2 + sigma.reshape((-1,) + (1,) * (x.ndim - 1))**2)


@pytest.mark.parametrize('n', [1, 4, 64, 8192])
def test_ddim_on_gaussian_data_matches_the_closed_form(n):
  # Data std 1: x̂ = α z, each step rotates by a/N: std = cos(a/N)^(N−1)·cos(a/N + b) (REFERENCE §4.2).
  a, b = A.cosine_coefficients()
  out = distilled.ddim(_gaussian_denoiser(1.0), jnp.ones((1, 1)), num_steps=n)
  # float32 round-off accumulates like a random walk over the N steps: allow 4·√N ulps.
  np.testing.assert_allclose(float(out[0, 0]), math.cos(a / n)**(n - 1) * math.cos(a / n + b),
                             rtol=1e-6 + 4 * math.sqrt(n) * np.finfo(np.float32).eps)


def test_ddim_8192_steps_on_std_half_data():
  out = distilled.ddim(_gaussian_denoiser(0.5), jnp.ones((1, 1)), num_steps=8192)
  np.testing.assert_allclose(float(out[0, 0]), 0.499906, atol=5e-6)


def test_ddim_sampler_equals_euler_on_the_same_sigma_grid():
  # DDIM is Euler on the PF-ODE in σ-space; the registered sampler and ode.euler agree.
  k = jax.random.split(jax.random.key(5), 2)
  latents = jax.random.normal(k[0], (3, 4, 4, 1))
  denoise = lambda x, s: jnp.tanh(x * 0.3) * (1.0 / (1.0 + s[:, None, None, None]))
  n = 6
  grid = distilled.time_grid(n)
  sigmas = np.append(grid['sigma_edm'][:-1], 0.0)
  expected = ode.euler(denoise, latents / grid['alpha'][0], sigmas)
  sampler = registry.get('sampler', 'distill_ddim')
  got = sampler(denoise, latents, None, precond=registry.get('precond', 'alpha_sigma_v')(),
                num_steps=n)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  # With clipping every x̂ lies in [−1, 1], so the output does too.
  big = lambda x, s: 3.0 * jnp.ones_like(x)
  clipped = sampler(big, latents, None, precond=None, num_steps=n, clip_denoised=True)
  np.testing.assert_allclose(clipped, 1.0)
