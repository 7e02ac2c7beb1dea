"""The k-diffusion family against k-diffusion itself, and the stochastic ones against the data.

The golden file (scripts/make_kdiffusion_golden.py) holds k-diffusion 0.1.1's results, in float64,
on an exact Gaussian-mixture denoiser and four σ-grids; the stochastic solvers ran with recorded
noise, which the tests replay through `noise_sampler=`. diffjax runs in float32 and must agree to
float32 precision. No torch here.
"""

import functools

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from solver_problems import load_golden, mixture_denoiser

from diffjax import build, precond, registry, samplers
from diffjax.processes import schedules
from diffjax.samplers import brownian, kdiffusion, stepping

GOLDEN = load_golden('kdiffusion_samplers')
GRIDS = ('karras', 'exponential', 'polyexponential', 'vp')
DENOISE = mixture_denoiser(GOLDEN['means'], GOLDEN['stds'], GOLDEN['weights'])
# Float32 against float64 k-diffusion on states of size ~1: the largest error seen is 1.4e-6.
TOL = 4e-6

# The golden file has more (euler, heun, lms order 2, the η = 0 forms of every SDE solver); these
# cover each code path once: the stochastic ones below run the rest with k-diffusion's noise.
DETERMINISTIC = {
    'lms': (samplers.lms, {}),
    'dpm_2': (samplers.dpm_2, {}),
    'dpmpp_2s_ancestral_eta0': (samplers.dpmpp_2s_ancestral, dict(eta=0.0)),
    'dpmpp_sde_eta0_r03': (samplers.dpmpp_sde, dict(eta=0.0, r=0.3)),
    'dpmpp_2m': (samplers.dpmpp_2m, {}),
    'dpmpp_3m_sde_eta0': (samplers.dpmpp_3m_sde, dict(eta=0.0)),
}
STOCHASTIC = {
    'euler_ancestral': (samplers.euler_ancestral, dict(eta=1.0)),
    'dpm_2_ancestral': (samplers.dpm_2_ancestral, dict(eta=0.7)),
    'dpmpp_2s_ancestral': (samplers.dpmpp_2s_ancestral, dict(eta=1.0, s_noise=0.9)),  # golden only
    'dpmpp_sde': (samplers.dpmpp_sde, dict(eta=1.0)),
    'dpmpp_2m_sde': (samplers.dpmpp_2m_sde, dict(eta=1.0)),
    'dpmpp_2m_sde_heun': (samplers.dpmpp_2m_sde, dict(eta=0.5, solver_type='heun')),
    'dpmpp_3m_sde': (samplers.dpmpp_3m_sde, dict(eta=1.0)),
}


def start(grid):
  sigmas = GOLDEN[f'{grid}__sigmas']
  return jnp.asarray(GOLDEN['latents'] * sigmas[0], jnp.float32), sigmas


def max_error(out, grid, name):
  """Max |out − golden[grid__name]|."""
  return float(np.max(np.abs(np.asarray(out, np.float64) - GOLDEN[f'{grid}__{name}'])))


@functools.lru_cache(maxsize=None)
def traced(name):
  """The solver jitted with the grid (and noise table) as arguments: one compile for all grids."""
  fn, kwargs = {**DETERMINISTIC, **STOCHASTIC}[name]
  if name in DETERMINISTIC:
    return jax.jit(lambda x, sigmas: fn(DENOISE, x, sigmas, **kwargs))

  def run(x, sigmas, table):
    return fn(DENOISE, x, sigmas, noise_sampler=lambda i, stage, s, s_next: table[i, stage],
              **kwargs)

  return jax.jit(run)


@pytest.mark.parametrize('name', DETERMINISTIC)
def test_deterministic_solvers_equal_kdiffusion(name):
  """On a grid known now (float64 coefficient tables) and on a traced grid, every grid."""
  fn, kwargs = DETERMINISTIC[name]
  x0, sigmas = start('karras')
  errors = {'karras (known grid)': max_error(fn(DENOISE, x0, sigmas, **kwargs), 'karras', name)}
  for grid in GRIDS:
    x0, sigmas = start(grid)
    errors[grid] = max_error(traced(name)(x0, jnp.asarray(sigmas, jnp.float32)), grid, name)
  assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize('name', STOCHASTIC)
def test_stochastic_solvers_equal_kdiffusion_with_its_noise(name):
  errors = {}
  for grid in ('karras', 'exponential'):
    x0, sigmas = start(grid)
    table = jnp.asarray(GOLDEN[f'{grid}__{name}__noise'])
    out = traced(name)(x0, jnp.asarray(sigmas, jnp.float32), table)
    errors[grid] = max_error(out, grid, name)
  assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize('nfe', [11, 12])
def test_dpm_fast_equals_kdiffusion(nfe):
  """nfe = 11: orders 3, 3, 3, 2; nfe = 12: 3, 3, 3, 2, 1 (k-diffusion stops at σ_min)."""
  x0 = jnp.asarray(GOLDEN['latents'] * 80.0, jnp.float32)
  out = samplers.dpm_fast(DENOISE, x0, np.geomspace(80.0, 0.002, nfe + 1))
  assert max_error(out, 'dpm_fast', f'nfe{nfe}') < 2 * TOL


def test_dpm_fast_to_zero_denoises_at_the_end():
  x0 = jnp.asarray(GOLDEN['latents'] * 80.0, jnp.float32)
  out = samplers.dpm_fast(DENOISE, x0, schedules.karras(11, 0.002, 80.0))  # 10 + 1 evaluations
  at_min = jnp.asarray(GOLDEN['dpm_fast__nfe10'], jnp.float32)
  np.testing.assert_allclose(out, DENOISE(at_min, jnp.full([6], 0.002)), atol=2 * TOL)


def test_dpm_adaptive_equals_kdiffusion_per_sample():
  """In float64: in float32 an accept/reject decision may flip (3e-3 apart for order 3)."""
  with jax.enable_x64(True):
    # A denoiser of its own: JAX would reuse the float32 constants DENOISE's arrays became.
    denoise = mixture_denoiser(*(np.array(GOLDEN[k]) for k in ('means', 'stds', 'weights')))
    x0 = jnp.asarray(GOLDEN['latents'] * 80.0)
    for order in (2, 3):
      out = samplers.dpm_adaptive(denoise, x0, np.array([80.0, 0.002]), order=order)
      assert max_error(out, 'dpm_adaptive', f'order{order}') < 1e-9, order


def test_grids_equal_kdiffusion():
  n = len(GOLDEN['karras__sigmas']) - 1
  ours = {
      'karras': schedules.sigma_grid('karras', n, sigma_min=0.002, sigma_max=80.0, rho=7.0),
      'exponential': schedules.sigma_grid('exponential', n, sigma_min=0.01, sigma_max=20.0),
      'polyexponential': schedules.sigma_grid('polyexponential', n, sigma_min=0.005,
                                              sigma_max=40.0, rho=2.0),
      'vp': schedules.sigma_grid('vp', n),  # uniform t with EDM Table 1's β_d, β_min, ε_s
  }
  for grid, sigmas in ours.items():
    np.testing.assert_allclose(sigmas, GOLDEN[f'{grid}__sigmas'], rtol=1e-12, err_msg=grid)
  np.testing.assert_allclose(schedules.sigma_grid('linear_logsnr', n, sigma_min=0.01,
                                                  sigma_max=20.0), ours['exponential'],
                             rtol=1e-12)
  logsnr = -2.0 * np.log(schedules.linear_logsnr(n, 0.01, 20.0)[:-1])
  np.testing.assert_allclose(np.diff(logsnr), np.diff(logsnr)[0], rtol=1e-9)


def count_primitives(jaxpr, name):
  count = sum(eqn.primitive.name == name for eqn in jaxpr.eqns)
  return count + sum(count_primitives(sub, name) for sub in jex.core.subjaxprs(jaxpr))


def scan_bodies(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'scan':
      yield eqn.params['jaxpr'].jaxpr
    for sub in jex.core.subjaxprs(jaxpr):
      yield from scan_bodies(sub)


@pytest.mark.parametrize('name', ['dpm_2', 'dpmpp_3m_sde_eta0'])
def test_one_scan_without_branches_on_a_traced_grid(name):
  """One lax.scan; a two-evaluation solver's only cond is the last step's, outside the loop."""
  fn, kwargs = DETERMINISTIC[name]
  x0, sigmas = start('karras')
  jaxpr = jax.make_jaxpr(lambda s: fn(DENOISE, x0, s, **kwargs))(jnp.asarray(sigmas)).jaxpr
  bodies = list(scan_bodies(jaxpr))
  assert len(bodies) == 1
  assert count_primitives(bodies[0], 'cond') == 0
  assert count_primitives(jaxpr, 'cond') == (1 if name == 'dpm_2' else 0)


def test_two_evaluation_solvers_skip_the_call_at_sigma_zero():
  calls = []

  def counting(x, sigma):
    calls.append(1)  # traced once per call site
    return DENOISE(x, sigma)

  x0, sigmas = start('karras')
  samplers.dpm_2(counting, x0, sigmas)
  # The scan body traces both calls once; the last step (to σ = 0) traces only the first.
  assert len(calls) == 3


# ------------------------------------------------------------------------------------------------
# Noise: per seed, and one Brownian path per seed.


def test_solver_noise_depends_on_the_seed_only():
  sigmas = schedules.karras(6)
  keys = samplers.seed_keys([3, 5, 7, 9])
  latents = samplers.latents(keys, (3,))
  run = jax.jit(lambda x, k: samplers.euler_ancestral(DENOISE, x * sigmas[0], sigmas, key=k))
  whole = np.asarray(run(latents, keys))
  # The same seeds in another order (one compile; a batch split is the same question).
  np.testing.assert_array_equal(np.asarray(run(latents[::-1], keys[::-1]))[::-1], whole)
  assert np.all(np.std(whole, axis=0) > 0.05)  # the samples differ from one another


def test_brownian_noise_is_one_path_per_seed():
  """Per seed; unit variance; increments over [c, a] split at b add up (one path W(σ))."""
  top = 20.0
  keys = samplers.seed_keys(range(512))

  @jax.jit
  def increment(keys, a, b):  # (W(a) − W(b))/sqrt(a − b)
    return brownian.make('brownian', keys, keys.shape[0], (3,), top)(0, 0, a, b)

  whole = np.asarray(increment(keys, 7.0, 0.5), np.float64)
  upper = np.asarray(increment(keys, 7.0, 3.0), np.float64)
  lower = np.asarray(increment(keys, 3.0, 0.5), np.float64)
  # W(7) − W(0.5) = (W(7) − W(3)) + (W(3) − W(0.5)), the parts independent, unit variance each.
  np.testing.assert_allclose(whole * np.sqrt(6.5), upper * 2.0 + lower * np.sqrt(2.5),
                             atol=1e-5)
  assert abs(np.std(whole) - 1.0) < 0.06 and abs(np.mean(upper * lower)) < 0.06
  # Sample b's path depends on its key alone: the same keys in another order.
  np.testing.assert_array_equal(np.asarray(increment(keys[::-1], 7.0, 0.5))[::-1],
                                whole.astype(np.float32))
  other = np.asarray(brownian.make('gaussian', keys, 512, (3,), top)(0, 0, 7.0, 0.5))
  assert abs(np.mean(other * whole)) < 0.06  # the two kinds draw different numbers


def test_brownian_noise_converges_as_the_grid_is_refined():
  """With one Brownian path per seed the SDE solution converges; fresh noise per step does not."""
  keys = samplers.seed_keys(range(16))
  latents = samplers.latents(keys, (3,))

  def solve(n, noise):
    sigmas = schedules.karras(n, sigma_min=0.02, sigma_max=10.0)
    return np.asarray(samplers.dpmpp_2m_sde(DENOISE, latents * sigmas[0], sigmas, key=keys,
                                            noise_sampler=noise))

  reference = solve(128, 'brownian')
  errors = [np.sqrt(np.mean((solve(n, 'brownian') - reference)**2)) for n in (8, 32)]
  fresh = np.sqrt(np.mean((solve(32, 'gaussian') - reference)**2))
  assert errors[1] < errors[0] / 2.5, errors
  assert fresh > 4 * errors[1], (fresh, errors)


# ------------------------------------------------------------------------------------------------
# The stochastic solvers sample the mixture.


@pytest.mark.parametrize('name', ['euler_ancestral', 'dpmpp_2s_ancestral', 'dpmpp_sde',
                                  'dpmpp_2m_sde', 'dpmpp_3m_sde'])
def test_stochastic_solvers_sample_the_mixture(name):
  """Component fractions within 4 binomial std of π_k, each component's spread within 15% of s_k."""
  fn, kwargs = STOCHASTIC[name]
  kwargs = {**kwargs, 's_noise': 1.0, 'noise_sampler': 'gaussian'}
  means, stds, weights = GOLDEN['means'], GOLDEN['stds'], GOLDEN['weights']
  num = 2048
  keys = samplers.seed_keys(range(num))
  sigmas = schedules.karras(32, sigma_min=0.002, sigma_max=20.0)
  x = np.asarray(fn(DENOISE, samplers.latents(keys, (3,)) * sigmas[0], sigmas, key=keys,
                    **kwargs), np.float64)
  # Assign each sample to the component that explains it best (the components barely overlap).
  logp = (np.log(weights) - 3 * np.log(stds)
          - 0.5 * np.sum((x[:, None] - means)**2, -1) / stds**2)
  which = np.argmax(logp, axis=1)
  fractions = np.bincount(which, minlength=3) / num
  assert np.all(np.abs(fractions - weights) < 4 * np.sqrt(weights * (1 - weights) / num)), (
      fractions)
  spread = np.array([np.sqrt(np.mean((x[which == k] - means[k])**2)) for k in range(3)])
  np.testing.assert_allclose(spread, stds, rtol=0.15)


# ------------------------------------------------------------------------------------------------
# Registry forms and the --grid option.

NEW_SAMPLERS = ('euler_ancestral', 'lms', 'dpm_2', 'dpm_2_ancestral', 'dpmpp_2s_ancestral',
                'dpmpp_sde', 'dpmpp_2m', 'dpmpp_2m_sde', 'dpmpp_2m_sde_heun', 'dpmpp_3m_sde',
                'unipc', 'unipc_bh1', 'deis', 'dpm_fast', 'dpm_adaptive')


def test_registry_form_walks_the_named_grid_clamped_to_the_network():
  pre = precond.make_edm(sigma_min=0.01, sigma_max=40.0)
  keys = samplers.seed_keys([0, 1])
  latents = samplers.latents(keys, (2, 2, 1))
  image_denoise = lambda x, s: 0.25 / (0.25 + s[:, None, None, None]**2) * x  # noqa: E731
  reference = schedules.exponential(6, 0.01, 40.0)
  out = registry.get('sampler', 'dpmpp_2m')(image_denoise, latents, keys, precond=pre,
                                            num_steps=6, grid='exponential')
  direct = samplers.dpmpp_2m(image_denoise, latents * reference[0], reference)
  np.testing.assert_allclose(out, direct, rtol=1e-6)
  np.testing.assert_allclose(stepping.sigma_grid_for(pre, 6), schedules.karras(6, 0.01, 40.0),
                             rtol=1e-6)  # no grid named: Karras (float32-rounded levels)
  for name in NEW_SAMPLERS:
    assert 'grid' in registry.get('sampler', name).__code__.co_varnames, name


def test_sampler_fn_checks_the_grid_option():
  import ml_collections
  config = ml_collections.ConfigDict({'sample': {'sampler': 'heun', 'num_steps': 4,
                                                 'kwargs': {}}})
  pre = precond.make_edm()
  build.sampler_fn(config, pre, 'dpmpp_3m_sde', grid='polyexponential')  # known: no error
  with pytest.raises(registry.UnknownNameError, match='exponential'):
    build.sampler_fn(config, pre, 'unipc', grid='exponentail')
  with pytest.raises(ValueError, match='chooses its own time steps'):
    build.sampler_fn(config, pre, 'ddim', grid='karras')


def test_kdiffusion_module_exports():
  assert set(kdiffusion.__all__) <= set(dir(kdiffusion))
