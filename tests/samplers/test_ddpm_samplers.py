"""DDPM ancestral and DDIM samplers on Gaussian data, where the denoiser and the reverse process are exact.

For data N(0, S²I), E[y | x] = S²/(S² + σ²)·x, and the true reverse step p(x_{t−1} | x_t) is Gaussian
with mean μ̃(x_t, E[y|x_t]) and variance β̃_t + coef1_t²·Var[y | x_t], which lies between β̃_t and β_t:
a "learned" variance set to it samples the data distribution exactly, on any respacing.
"""

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import precond, samplers
from diffjax.processes import discrete
from diffjax.samplers import ddpm as ddpm_samplers

S = 0.5


def gaussian_denoiser(x, sigma):
  sigma = jnp.reshape(sigma, sigma.shape + (1,) * (x.ndim - 1))
  return S**2 / (S**2 + sigma**2) * x


def exact_variance_denoiser(schedule: discrete.DiscreteSchedule):
  """The Gaussian denoiser with `.raw` giving the v whose learned variance is the exact reverse one."""
  sigmas = jnp.asarray(schedule.sigmas, jnp.float32)
  var_post = S**2 * schedule.sigmas**2 / (S**2 + schedule.sigmas**2)  # Var[y | x_t]
  true_log_var = np.log(schedule.posterior_variance + schedule.posterior_mean_coef1**2 * var_post)
  lo, hi = schedule.posterior_log_variance_clipped, schedule.log_betas
  frac = np.where(hi > lo, (true_log_var - lo) / np.maximum(hi - lo, 1e-30), 0.0)
  v_table = jnp.asarray(2 * frac - 1, jnp.float32)

  def denoise_fn(x, sigma):
    return gaussian_denoiser(x, sigma)

  def raw(x, sigma):
    k = jnp.argmin(jnp.abs(sigma[:, None] - sigmas), axis=-1)
    v = jnp.broadcast_to(v_table[k].reshape(-1, 1, 1, 1), x.shape)
    return gaussian_denoiser(x, sigma), v

  denoise_fn.raw = raw
  return denoise_fn, v_table


def count_primitives(jaxpr, name):
  count = sum(eqn.primitive.name == name for eqn in jaxpr.eqns)
  return count + sum(count_primitives(sub, name) for sub in jex.core.subjaxprs(jaxpr))


@pytest.mark.parametrize('respacing', ['ddim10', '25', '5,10,5'])
def test_ddim_eta0_equals_edm_euler_on_the_same_grid(respacing):
  schedule = discrete.make_schedule('cosine', 1000).respace(respacing)
  keys = samplers.seed_keys(np.arange(16))
  latents = samplers.latents(keys, (3, 3, 2))
  ddim = ddpm_samplers.ddim(gaussian_denoiser, latents, schedule, clip_denoised=False)
  # Euler in σ-space from the same start x = x_T/sqrt(ᾱ_T) down σ_{S_{K−1}} > … > σ_{S_0} > 0.
  sigmas = np.append(schedule.sigmas[::-1], 0.0)
  x = np.asarray(latents, np.float64) * np.sqrt(1 + sigmas[0]**2)
  for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):  # EDM Alg. 1 without Heun, float64
    x = x + (sigma_next - sigma) * (x - S**2 / (S**2 + sigma**2) * x) / sigma
  np.testing.assert_allclose(ddim, x, rtol=2e-6, atol=2e-6)
  # The library's float32 Euler agrees to its own rounding at σ_max ≈ 2·10⁴ (x ~ 10⁴ there).
  euler = samplers.euler(gaussian_denoiser, latents * np.sqrt(1 + sigmas[0]**2), sigmas)
  np.testing.assert_allclose(euler, x, rtol=3e-4, atol=3e-4)


@pytest.mark.parametrize('respacing', [None, '10'])
def test_learned_variance_ancestral_samples_the_gaussian_exactly(respacing):
  full = discrete.make_schedule('cosine', 200)
  schedule = full.respace(respacing) if respacing else full
  denoise_fn, v = exact_variance_denoiser(schedule)
  # Inside [β̃_t, β_t] for t > 0 (the last step adds no noise).
  assert float(jnp.min(v[1:])) >= -1.0 - 1e-6 and float(jnp.max(v[1:])) <= 1.0 + 1e-6
  keys = samplers.seed_keys(np.arange(512))
  latents = samplers.latents(keys, (4, 4, 1))
  x = jax.jit(lambda z, k: ddpm_samplers.ancestral(denoise_fn, z, schedule, keys=k,
                                                   variance='learned', clip_denoised=False))(
                                                       latents, keys)
  std = float(jnp.std(x))
  assert abs(std - S) < 0.02, std  # 8192 draws: the standard error of the std is ~0.004
  if respacing:  # With few steps a fixed β̃ visibly underestimates the reverse variance.
    x_small = ddpm_samplers.ancestral(gaussian_denoiser, latents, schedule, keys=keys,
                                      variance='fixed_small', clip_denoised=False)
    assert float(jnp.std(x_small)) < S - 0.05


def test_registered_samplers_respace_and_feed_original_indices():
  p = precond.get_preconditioning('ddpm', beta_schedule='linear', num_timesteps=1000)
  seen = []

  def spy(x, sigma):
    seen.append(sigma)
    return gaussian_denoiser(x, sigma)

  keys = samplers.seed_keys(np.arange(2))
  z = samplers.latents(keys, (2, 2, 1))
  jax.make_jaxpr(lambda z: samplers.get_sampler('ddim')(spy, z, keys, precond=p, num_steps=10,
                                                         respacing='ddim'))(z)
  schedule = ddpm_samplers.respaced_schedule(p, 10, 'ddim')
  np.testing.assert_array_equal(schedule.timesteps, np.arange(0, 1000, 100))
  # The σ handed to the network maps back to the original index through c_noise.
  c = p.coefficients(jnp.asarray(schedule.sigmas, jnp.float32))
  np.testing.assert_array_equal(c.c_noise, schedule.timesteps)
  assert len(seen) == 1  # traced once inside one scan
  with pytest.raises(ValueError, match='keeps 45 of 1000 steps'):
    ddpm_samplers.respaced_schedule(p, 18, '10,15,20')
  with pytest.raises(ValueError, match='needs PRNG keys'):
    samplers.get_sampler('ddpm')(gaussian_denoiser, z, None, precond=p, num_steps=4)
  with pytest.raises(ValueError, match='extra output channels'):
    samplers.get_sampler('ddpm')(gaussian_denoiser, z, keys, precond=p, num_steps=4,
                                 variance='learned')


@pytest.mark.parametrize('name, options', [('ddpm', {'variance': 'learned'}),
                                           ('ddim', {'eta': 0.5})])
def test_each_ddpm_sampler_is_one_scan_and_depends_only_on_its_seed(name, options):
  p = precond.get_preconditioning('ddpm', beta_schedule='cosine', num_timesteps=100)
  denoise_fn, _ = exact_variance_denoiser(p.schedule)
  sampler = samplers.get_sampler(name)
  fn = jax.jit(lambda z, k: sampler(denoise_fn, z, k, precond=p, num_steps=20, **options))
  keys = samplers.seed_keys(np.arange(6))
  z = samplers.latents(keys, (2, 2, 1))
  jaxpr = jax.make_jaxpr(fn)(z, keys).jaxpr
  assert count_primitives(jaxpr, 'scan') == 1 and count_primitives(jaxpr, 'while') == 0
  together = np.asarray(fn(z, keys))
  apart = np.concatenate([np.asarray(fn(z[:3], keys[:3])), np.asarray(fn(z[3:], keys[3:]))])
  np.testing.assert_allclose(together, apart, rtol=1e-6, atol=1e-6)
  assert np.abs(together[0] - together[1]).max() > 1e-3


def test_edm_heun_runs_on_a_ddpm_model_through_round_sigma():
  """An iDDPM-trained model is usable by EDM's samplers (the 'ddpm' precond snaps σ to its grid)."""
  p = precond.get_preconditioning('ddpm', beta_schedule='cosine', num_timesteps=1000)
  keys = samplers.seed_keys(np.arange(256))
  z = samplers.latents(keys, (4, 4, 1))
  grid = samplers.edm_grid_for(p, 32)
  assert np.all(np.isin(grid[:-1].astype(np.float32), p.schedule.sigmas.astype(np.float32)))
  x = samplers.get_sampler('heun')(gaussian_denoiser, z, keys, precond=p, num_steps=32)
  assert abs(float(jnp.std(x)) - S) < 0.03
