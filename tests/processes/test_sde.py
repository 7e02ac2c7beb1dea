"""Score SDEs in σ-space: marginals, identities, preconditioning, loss weighting, PC and PF-ODE sampling.

Sampling is checked against data N(0, s²I), whose denoiser is exact: D(x̃; σ) = x̃·s²/(s² + σ²).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import precond, registry, samplers
from diffjax.objectives import edm as losses
from diffjax.processes import sde as sde_lib
from diffjax.samplers import sde as sde_samplers

S_DATA = 0.5
SDES = {'vp': sde_lib.VPSDE(), 'subvp': sde_lib.SubVPSDE(), 've': sde_lib.VESDE()}


def gaussian_denoiser(x, sigma, s=S_DATA):
  """E[y | y + σn = x] for y ~ N(0, s²I)."""
  sigma = jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1))
  return x * s**2 / (s**2 + sigma**2)


def test_marginal_coefficients_match_reference():
  vp, subvp = SDES['vp'], SDES['subvp']
  np.testing.assert_allclose(vp.mean_coeff(1.0), 6.571586e-3, rtol=1e-6)
  np.testing.assert_allclose(vp.marginal_std(1e-3), 1.048542e-2, rtol=1e-6)
  np.testing.assert_allclose(subvp.marginal_std(0.5), 0.9209362, rtol=1e-6)
  # marginal_prob is (m·x0, std) and std = s·σ for every SDE.
  x0 = jnp.ones((2, 3))
  for sde in SDES.values():
    t = jnp.array([0.1, 0.9])
    mean, std = sde.marginal_prob(x0, t)
    np.testing.assert_allclose(mean[:, 0], sde.mean_coeff(t), rtol=1e-6)
    np.testing.assert_allclose(std, sde.s(t) * sde.sigma(t), rtol=2e-6)


@pytest.mark.parametrize('name', ['vp', 'subvp', 've'])
def test_sde_is_a_schedule(name):
  """σ', s' are the derivatives; σ⁻¹ inverts σ; f = (s'/s)x and g² = 2s²σσ' (the ★ identity)."""
  sde = SDES[name]
  t = jnp.linspace(0.01, 1.0, 9)
  np.testing.assert_allclose(sde.sigma_deriv(t), jax.vmap(jax.grad(sde.sigma))(t), rtol=1e-5)
  np.testing.assert_allclose(sde.s_deriv(t), jax.vmap(jax.grad(sde.s))(t), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(sde.sigma_inv(sde.sigma(t)), t, rtol=1e-5)
  np.testing.assert_allclose(sde.s_of_sigma(sde.sigma(t)), sde.s(t), rtol=1e-5)
  np.testing.assert_allclose(sde.diffusion(t)**2, 2 * sde.s(t)**2 * sde.sigma(t) * sde.sigma_deriv(t),
                             rtol=1e-5)
  x = jnp.ones((9, 2))
  drift, g = sde.sde(x, t)
  if name == 've':
    np.testing.assert_array_equal(drift, 0.0)
    np.testing.assert_allclose(g, sde.sigma(t) * np.sqrt(2 * np.log(100 / 0.02)), rtol=1e-6)
  else:
    t64 = np.asarray(t, np.float64)
    beta = 0.1 + t64 * 19.9
    np.testing.assert_allclose(drift[:, 0], -0.5 * beta, rtol=1e-5)
    discount = 1.0 if name == 'vp' else -np.expm1(-2 * 0.1 * t64 - 19.9 * t64**2)
    np.testing.assert_allclose(g**2, beta * discount, rtol=1e-5)
  z = jnp.full((1, 4), 2.0)
  var = sde.prior_std**2
  np.testing.assert_allclose(sde.prior_logp(z), -2 * np.log(2 * np.pi * var) - 8 / var, rtol=1e-6)


def test_preconditionings_condition_networks_as_score_sde():
  sigma = jnp.array([0.01, 0.5, 20.0])
  vp = registry.get('precond', 'sde_vp')()
  ve = precond.get_preconditioning('sde_ve')
  subvp = precond.get_preconditioning('sde_subvp', beta_min=0.1, beta_max=20.0)
  # The VP network is EDM Table 1's VP column (c_noise = 999·t); VE is its VE column (ln ½σ).
  for ours, edm in ((vp.coefficients(sigma), precond.vp(sigma)),
                    (ve.coefficients(sigma), precond.ve(sigma))):
    for a, b in zip(ours, edm):
      np.testing.assert_allclose(a, b, rtol=2e-5)
  c = subvp.coefficients(sigma)
  t = subvp.sde.sigma_inv(sigma)
  np.testing.assert_allclose(c.c_noise, 999 * t, rtol=1e-5)
  np.testing.assert_allclose(c.c_in, subvp.sde.mean_coeff(t), rtol=1e-5)
  np.testing.assert_allclose(c.c_out, -sigma)
  assert vp.sde is SDES['vp'] or vp.sde == SDES['vp']
  np.testing.assert_allclose(vp.sigma_min, 0.0010005, rtol=1e-4)
  np.testing.assert_allclose(vp.sigma_max, 152.167, rtol=1e-5)
  with pytest.raises(registry.UnknownNameError, match='known sdes: subvp, ve, vp'):
    sde_lib.get_sde('vpp')


@pytest.mark.parametrize('name,reduce_mean,likelihood',
                         [('vp', True, False), ('subvp', True, True), ('ve', False, False),
                          ('ve', False, True)])
def test_loss_equals_score_sde_objective(name, reduce_mean, likelihood):
  """λ(σ)·‖D − y‖² equals score_sde's per-example loss written with the score (its losses.py)."""
  sde = SDES[name]
  key_y, key_z, key_t = jax.random.split(jax.random.key(0), 3)
  y = jax.random.uniform(key_y, (4, 3, 3, 2), minval=-1, maxval=1)
  z = jax.random.normal(key_z, y.shape)
  t = jax.random.uniform(key_t, (4,), minval=1e-3, maxval=1.0)
  mean, std = sde.marginal_prob(y, t)
  x_t = mean + std[:, None, None, None] * z
  fake_net = lambda x, sigma: 0.7 * x + 0.1 * jnp.sin(3 * x)   # any D(x̃; σ)
  score = sde.score(fake_net, x_t, t)
  if likelihood:
    per_pixel = (score + z / std[:, None, None, None])**2 * sde.diffusion(t)[:, None, None, None]**2
  else:
    per_pixel = (score * std[:, None, None, None] + z)**2
  flat = per_pixel.reshape(4, -1)
  expected = flat.mean(-1) if reduce_mean else 0.5 * flat.sum(-1)

  loss = losses.get_loss(f'sde_{name}', reduce_mean=reduce_mean, num_dims=18,
                         likelihood_weighting=likelihood)
  sigma = sde.sigma(t)
  # The same noise in σ-space: x̃ = y + σn with n = z.
  denoised = fake_net(y + sigma[:, None, None, None] * z, sigma)
  ours = losses.weighted_squared_error(denoised, y, sigma, loss.weight)
  np.testing.assert_allclose(ours, expected, rtol=2e-3)
  sampled = sde.sigma_inv(loss.sample_sigma(jax.random.key(1), 1000))
  assert 0.9e-5 <= float(sampled.min()) and float(sampled.max()) <= 1.0 + 1e-5
  assert abs(float(sampled.mean()) - 0.5) < 0.05


def test_loss_needs_num_dims_for_reduce_mean():
  with pytest.raises(ValueError, match='num_dims'):
    losses.get_loss('sde_vp', reduce_mean=True)


# ------------------------------------------------------------------------------------------------
# Sampling N(0, s²I) with the exact denoiser: 1024 samples × 64 dims, the std of which has a
# standard error of s/sqrt(2·65536) ≈ 0.0014.

_SHAPE = (8, 8, 1)
_STAT_TOL = 4 * S_DATA / np.sqrt(2 * 1024 * 64)


@pytest.fixture(scope='module')
def seeds_and_latents():
  keys = samplers.seed_keys(np.arange(1024))
  return keys, samplers.latents(keys, _SHAPE)


@pytest.mark.parametrize('name,predictor,corrector,snr', [
    ('vp', 'euler_maruyama', 'none', 0.16),          # score_sde's VP / sub-VP setting
    ('subvp', 'euler_maruyama', 'none', 0.16),
    ('ve', 'reverse_diffusion', 'langevin', 0.05),   # score_sde's VE setting (snr: see below)
])
def test_pc_sampler_reproduces_gaussian_std(seeds_and_latents, name, predictor, corrector, snr):
  # A Langevin step of size ε on N(0, v) has stationary variance v/(1 − ε/2v) = v/(1 − snr²) here,
  # so the paper's snr = 0.16 would inflate the std by 1.3 %; 0.05 keeps it at 0.1 %.
  keys, latents = seeds_and_latents
  x = jax.jit(lambda lat, k: sde_samplers.predictor_corrector(
      gaussian_denoiser, lat, k, sde=SDES[name], num_steps=1000, predictor=predictor,
      corrector=corrector, snr=snr))(latents, keys)
  assert abs(float(jnp.std(x)) - S_DATA) < _STAT_TOL + 1e-3
  assert abs(float(jnp.mean(x))) < 4 * S_DATA / np.sqrt(x.size)


def test_all_predictors_and_registry(seeds_and_latents):
  """Every predictor (via the registered 'pc' sampler on an sde_vp network) gets the std to within
  its O(1/N) discretization bias; image b depends on seed b alone without a corrector."""
  keys, latents = seeds_and_latents
  pc = samplers.get_sampler('pc')
  p = precond.get_preconditioning('sde_vp')

  def run(lat, k):
    return [pc(gaussian_denoiser, lat, k, precond=p, num_steps=1000, predictor=pred,
               corrector='none') for pred in ('euler_maruyama', 'reverse_diffusion', 'ancestral')]

  outs = jax.jit(run)(latents, keys)
  for x in outs:
    assert abs(float(jnp.std(x)) - S_DATA) < _STAT_TOL + 0.005
  # The stochastic samplers' noise is per sample: the first 8 seeds alone give the same images.
  sub = jax.jit(lambda lat, k: pc(gaussian_denoiser, lat, k, precond=p, num_steps=1000,
                                  predictor='ancestral', corrector='none'))(latents[:8], keys[:8])
  np.testing.assert_allclose(sub, outs[2][:8], atol=1e-5)


@pytest.mark.parametrize('name', ['vp', 'subvp', 've'])
def test_probability_flow_reproduces_gaussian_std(seeds_and_latents, name):
  keys, latents = seeds_and_latents
  x, stats = jax.jit(lambda lat: sde_samplers.probability_flow(
      gaussian_denoiser, lat, sde=SDES[name], return_stats=True))(latents)
  assert abs(float(jnp.std(x)) - S_DATA) < _STAT_TOL
  # The flow is linear for Gaussian data: x_ε = x_T·std_ε/std_T exactly, up to the ODE tolerance.
  sde, eps = SDES[name], sde_lib.VP_SAMPLING_EPSILON if name != 've' else 1e-5
  std = lambda t: sde.s(t) * jnp.sqrt(S_DATA**2 + sde.sigma(t)**2)
  expected = latents * sde.prior_std * std(eps) / std(1.0)
  expected = gaussian_denoiser(expected / sde.s(eps), jnp.full((1024,), sde.sigma(eps)))
  np.testing.assert_allclose(x, expected, atol=5e-4)
  assert 0 < int(stats['num_steps']) < 100


def test_probability_flow_fixed_step_heun(seeds_and_latents):
  keys, latents = seeds_and_latents
  p = precond.get_preconditioning('vp')   # EDM's VP network: the PF-ODE of the VP SDE
  x = jax.jit(lambda lat: samplers.get_sampler('pf_ode')(
      gaussian_denoiser, lat, None, precond=p, num_steps=100, solver='heun'))(latents)
  assert abs(float(jnp.std(x)) - S_DATA) < _STAT_TOL


def test_unknown_options_fail_clearly(seeds_and_latents):
  keys, latents = seeds_and_latents
  with pytest.raises(ValueError, match='known predictors'):
    sde_samplers.predictor_corrector(gaussian_denoiser, latents, keys, sde=SDES['vp'],
                                     num_steps=2, predictor='heun')
  with pytest.raises(ValueError, match='Cannot tell which SDE'):
    samplers.get_sampler('pc')(gaussian_denoiser, latents, keys,
                               precond=precond.get_preconditioning('edm'), num_steps=2)


def test_configs_build_score_sde_parts():
  from configs import sde as sde_configs
  from diffjax import build
  for arg, kind, sampler_kwargs in (('cifar10', 'vp', ('euler_maruyama', 'none')),
                                    ('cifar10,subvp,deep', 'subvp', ('euler_maruyama', 'none')),
                                    ('cifar10,ve', 've', ('reverse_diffusion', 'langevin')),
                                    ('digits,ve,likelihood', 've', ('reverse_diffusion', 'langevin'))):
    c = sde_configs.get_config(arg)
    p, loss = build.build_precond(c), build.build_loss(c)
    assert p.name == loss.name == f'sde_{kind}' and p.sde.name == kind
    assert (c.sample.kwargs.predictor, c.sample.kwargs.corrector) == sampler_kwargs
    assert c.sample.sampler in samplers.names()
  c = sde_configs.get_config('cifar10')
  assert c.loss.kwargs.reduce_mean and c.loss.kwargs.num_dims == 3072
  np.testing.assert_allclose(c.train.ema_halflife_images, 887184.0, rtol=1e-5)
  with pytest.raises(ValueError, match='Pick one SDE'):
    sde_configs.get_config('cifar10,vp,ve')
