"""EDM ODE samplers, seeds and classifier-free guidance on problems with closed-form answers.

Gaussian data N(0, S²I) has the exact denoiser D(x; σ) = S²/(S² + σ²)·x, and the probability-flow
ODE dx/dσ = (x − D)/σ then has the exact solution x(σ) = x(σ₀)·sqrt((S² + σ²)/(S² + σ₀²)), so the
error of a sampler is known exactly. A 1-D Gaussian mixture has a closed-form denoiser too
(responsibilities × per-component posterior means), which checks the sampled distribution.
"""

import functools

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import precond, registry, samplers
from diffjax.processes import schedules

S = 0.5  # data std of the Gaussian problem (σ_data of EDM)


def gaussian_denoiser(x, sigma):
  """Exact D(x; σ) = S²/(S² + σ²)·x for data N(0, S²I); x [B, ...], σ [B]."""
  sigma = jnp.reshape(sigma, sigma.shape + (1,) * (x.ndim - 1))
  return S**2 / (S**2 + sigma**2) * x


def gaussian_solution(x0, sigma0, sigma):
  """The exact ODE solution x(σ) from x(σ₀) = x0."""
  return x0 * np.sqrt((S**2 + sigma**2) / (S**2 + sigma0**2))


def relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


def count_primitives(jaxpr, name):
  """Number of `name` equations in a jaxpr, sub-jaxprs (jit, cond, scan bodies) included."""
  count = sum(eqn.primitive.name == name for eqn in jaxpr.eqns)
  return count + sum(count_primitives(sub, name) for sub in jex.core.subjaxprs(jaxpr))


@pytest.fixture(scope='module')
def gaussian_latents():
  return np.random.RandomState(0).randn(16, 1).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Convergence on the exact Gaussian problem.


@pytest.mark.parametrize('solver, order_band', [('euler', (0.8, 1.2)), ('heun', (1.8, 2.6))])
@pytest.mark.parametrize('end', ['sigma_min', 'zero'])
def test_convergence_order_on_gaussian(gaussian_latents, solver, order_band, end):
  """Error ∝ N^−p: halving it per doubling of N means p = 1 (Euler), quartering p = 2 (Heun)."""
  sample = getattr(samplers, solver)
  errors = []
  for n in (8, 16, 32, 64):
    # 'sigma_min': n steps on the Karras levels only, ending at σ_N = 0.002 (every step full
    # order); 'zero': the sampler as used, whose last step lands on σ = 0.
    sigmas = schedules.karras(n + 1)[:-1] if end == 'sigma_min' else schedules.karras(n)
    x0 = gaussian_latents * np.float32(sigmas[0])
    out = jax.jit(lambda x, s: sample(gaussian_denoiser, x, s))(x0, jnp.asarray(sigmas,
                                                                              jnp.float32))
    errors.append(relative_error(out, gaussian_solution(x0, sigmas[0], sigmas[-1])))
  orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
  assert np.all(orders > order_band[0]) and np.all(orders < order_band[1]), (errors, orders)


def algorithm_1(denoise, x, sigmas):
  """EDM Algorithm 1 transcribed directly in float64 numpy (the reference for `heun`)."""
  x = np.asarray(x, np.float64)
  for i in range(len(sigmas) - 1):
    t_cur, t_next = sigmas[i], sigmas[i + 1]
    d_cur = (x - denoise(x, t_cur)) / t_cur
    x_next = x + (t_next - t_cur) * d_cur
    if t_next != 0:
      d_prime = (x_next - denoise(x_next, t_next)) / t_next
      x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    x = x_next
  return x


def test_heun_matches_algorithm_1(gaussian_latents):
  sigmas = schedules.karras(18)
  x0 = gaussian_latents * np.float32(sigmas[0])
  out = samplers.heun(gaussian_denoiser, x0, sigmas)
  expected = algorithm_1(lambda x, s: S**2 / (S**2 + s**2) * x, x0, sigmas)
  assert relative_error(out, expected) < 1e-5
  # 18 steps leave a few per cent of error on this problem (the order test shows it shrinking).
  assert relative_error(out, gaussian_solution(x0, sigmas[0], 0.0)) < 0.1


# Recipes of EDM Fig. 2 / REFERENCE §1.3 (and VE/iDDPM grids) land on the exact solution.
# Tolerances sit ~2x above the observed errors; steps landing on σ = 0 are Euler steps, so a grid
# ending at σ_min leaves an error ≈ σ_min²/(2S²) however many steps are taken.
RECIPES = {
    'vp_original': (dict(discretization='vp', schedule='vp', scaling='vp', solver='euler',
                         num_steps=512), precond.make_vp, 2e-3),
    'vp_heun_edm_steps': (dict(discretization='edm', schedule='vp', scaling='vp', solver='heun',
                               num_steps=128), precond.make_vp, 5e-4),
    'vp_edm': (dict(discretization='edm', schedule='linear', scaling='none', solver='heun',
                    num_steps=64), precond.make_vp, 6e-3),
    've_original': (dict(discretization='ve', schedule='ve', scaling='none', solver='euler',
                         num_steps=2048), precond.make_ve, 2e-2),
    've_heun': (dict(discretization='ve', schedule='linear', scaling='none', solver='heun',
                     num_steps=64), precond.make_ve, 3e-3),
    'iddpm_ddim': (dict(discretization='iddpm', schedule='linear', scaling='none',
                        solver='euler', num_steps=256), precond.make_iddpm, 1e-2),
    'iddpm_edm_grid': (dict(discretization='edm', schedule='linear', scaling='none',
                            solver='heun', num_steps=64), precond.make_iddpm, 6e-3),
    'edm_midpoint': (dict(discretization='edm', schedule='linear', scaling='none', solver='heun',
                          alpha=0.5, num_steps=32), precond.make_edm, 2e-3),
}


@pytest.mark.parametrize('recipe', sorted(RECIPES))
def test_generalized_recipes_reach_exact_solution(gaussian_latents, recipe):
  options, make_precond, tolerance = RECIPES[recipe]
  p = make_precond()
  setup = samplers.generalized_setup(
      options['num_steps'], discretization=options['discretization'],
      schedule=options['schedule'], scaling=options['scaling'], precond=p)
  assert setup.t_steps.shape == (options['num_steps'] + 1,) and float(setup.t_steps[-1]) == 0.0
  t_0 = setup.t_steps[0]
  sigma_0 = float(setup.schedule.sigma(t_0))
  assert p.sigma_min * (1 - 1e-6) <= sigma_0 <= p.sigma_max * (1 + 1e-6)
  out = jax.jit(lambda z: samplers.generalized(gaussian_denoiser, z, precond=p, **options))(
      gaussian_latents)
  expected = gaussian_solution(gaussian_latents * sigma_0, sigma_0, 0.0)
  assert relative_error(out, expected) < tolerance


def test_generalized_defaults_per_discretization():
  """Default σ ranges of EDM's generalized sampler (VP from Table 1's β_d = 19.9, β_min = 0.1)."""
  cases = {'edm': (80.0, 0.002), 've': (100.0, 0.02), 'iddpm': (80.2037, 0.0064254),
           'vp': (152.16697, 0.0104860)}
  for disc, (first, last) in cases.items():
    setup = samplers.generalized_setup(8, discretization=disc)
    sigma = np.asarray(setup.schedule.sigma(setup.t_steps))
    np.testing.assert_allclose(sigma[[0, -2]], [first, last], rtol=2e-5, err_msg=disc)


def test_generalized_edm_linear_equals_heun(gaussian_latents):
  keys = samplers.seed_keys(np.arange(16))
  sigmas = schedules.karras(12)
  for churn in (0.0, 10.0):
    reference = samplers.heun(gaussian_denoiser, gaussian_latents * np.float32(sigmas[0]), sigmas,
                              key=keys, s_churn=churn)
    out = samplers.generalized(gaussian_denoiser, gaussian_latents, num_steps=12, keys=keys,
                               s_churn=churn)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference))


# ------------------------------------------------------------------------------------------------
# Gaussian mixture: the sampled distribution.

MIX_WEIGHTS = np.array([0.3, 0.7])
MIX_MEANS = np.array([-2.0, 2.0])
MIX_STDS = np.array([0.3, 0.5])


def mixture_denoiser(x, sigma):
  """E[y | y + σn = x] for y ~ Σ_k w_k N(μ_k, s_k²): responsibilities × posterior means."""
  sigma = jnp.reshape(sigma, sigma.shape + (1,) * x.ndim)  # [B, 1, ..., 1] against x[..., None]
  variance = MIX_STDS**2 + sigma**2
  x = x[..., None]
  log_p = np.log(MIX_WEIGHTS) - 0.5 * jnp.log(variance) - 0.5 * (x - MIX_MEANS)**2 / variance
  responsibility = jax.nn.softmax(log_p, axis=-1)
  posterior_mean = MIX_MEANS + MIX_STDS**2 / variance * (x - MIX_MEANS)
  return jnp.sum(responsibility * posterior_mean, axis=-1)


@pytest.mark.parametrize('s_churn', [0.0, 40.0])
def test_gaussian_mixture_distribution(s_churn):
  batch = 4096
  keys = samplers.seed_keys(np.arange(batch))
  z = samplers.latents(keys, (1,))
  sample = jax.jit(lambda z, k: samplers.get_sampler('heun')(
      mixture_denoiser, z, k, precond=precond.make_edm(), num_steps=32, s_churn=s_churn,
      s_noise=1.0))
  x = np.asarray(sample(z, keys))[:, 0]
  # The modes are > 8 std apart, so the sign assigns each sample to its component.
  mode = (x > 0).astype(int)
  weights = np.bincount(mode, minlength=2) / batch
  np.testing.assert_allclose(weights, MIX_WEIGHTS, atol=0.03)  # ≈ 4 standard errors
  for k in range(2):
    np.testing.assert_allclose(x[mode == k].mean(), MIX_MEANS[k], atol=0.04)
    np.testing.assert_allclose(x[mode == k].std(), MIX_STDS[k], atol=0.03)


# ------------------------------------------------------------------------------------------------
# Denoiser evaluations and program structure.


def _recording_denoiser(calls):

  def denoise_fn(x, sigma):
    jax.debug.callback(lambda s: calls.append(float(s[0])), sigma, ordered=True)
    return gaussian_denoiser(x, sigma)

  return denoise_fn


def test_nfe_counts_and_evaluated_levels(gaussian_latents):
  n = 6
  sigmas = schedules.karras(n)
  x0 = gaussian_latents * np.float32(sigmas[0])
  s32 = sigmas.astype(np.float32)
  for solver, expected in [('euler', list(s32[:n])),
                           ('heun', [s32[0]] + [s for s in s32[1:n] for _ in range(2)])]:
    calls = []
    sample = functools.partial(getattr(samplers, solver), _recording_denoiser(calls))
    jax.block_until_ready(jax.jit(lambda x, sample=sample: sample(x, sigmas))(x0))
    jax.effects_barrier()
    assert len(calls) == (n if solver == 'euler' else 2 * n - 1)
    np.testing.assert_array_equal(calls, expected)
  calls = []
  jax.block_until_ready(samplers.generalized(_recording_denoiser(calls), gaussian_latents,
                                             num_steps=n, discretization='vp', schedule='vp',
                                             scaling='vp'))
  jax.effects_barrier()
  assert len(calls) == 2 * n - 1


def _sampler_programs():
  sigmas = schedules.karras(5)
  keys = samplers.seed_keys(np.arange(4))
  edm, iddpm = precond.make_edm(), precond.make_iddpm()
  return {
      'euler': lambda z: samplers.euler(gaussian_denoiser, z * 80.0, sigmas),
      'heun': lambda z: samplers.heun(gaussian_denoiser, z * 80.0, sigmas),
      'heun_churn': lambda z: samplers.heun(gaussian_denoiser, z * 80.0, sigmas, key=keys,
                                            s_churn=20.0),
      'generalized_vp': lambda z: samplers.generalized(
          gaussian_denoiser, z, num_steps=5, discretization='vp', schedule='vp', scaling='vp',
          keys=keys, s_churn=20.0),
      'registry_euler': lambda z: samplers.get_sampler('euler')(
          gaussian_denoiser, z, keys, precond=edm, num_steps=5),
      'registry_heun_iddpm': lambda z: samplers.get_sampler('heun')(
          gaussian_denoiser, z, keys, precond=iddpm, num_steps=5, s_churn=10.0),
      'registry_generalized': lambda z: samplers.get_sampler('generalized')(
          gaussian_denoiser, z, keys, precond=iddpm, num_steps=5, discretization='iddpm',
          solver='euler'),
  }


@pytest.mark.parametrize('name', sorted(_sampler_programs()))
def test_each_sampler_is_one_scan(name):
  z = jnp.zeros((4, 2, 2, 1))
  jaxpr = jax.make_jaxpr(_sampler_programs()[name])(z).jaxpr
  assert count_primitives(jaxpr, 'scan') == 1
  assert count_primitives(jaxpr, 'while') == 0


# ------------------------------------------------------------------------------------------------
# Seeds and keys.


def test_images_depend_only_on_their_seed():
  heun = jax.jit(lambda z, k: samplers.get_sampler('heun')(
      gaussian_denoiser, z, k, precond=precond.make_edm(), num_steps=8, s_churn=30.0))

  def generate(seeds):
    keys = samplers.seed_keys(seeds)
    return np.asarray(heun(samplers.latents(keys, (4, 4, 3)), keys))

  together = generate(np.arange(8))
  apart = np.concatenate([generate(np.arange(4)), generate(np.arange(4, 8))])
  np.testing.assert_allclose(together, apart, rtol=1e-6, atol=1e-6)
  assert np.abs(together[0] - together[1]).max() > 1e-2  # different seeds, different images


def test_sharded_batch_gives_the_same_images():
  """Data parallel over the (fake) devices: a sharded batch samples the same images."""
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  keys = samplers.seed_keys(np.arange(2 * len(devices)))
  z = samplers.latents(keys, (2, 2, 1))
  heun = jax.jit(lambda z, k: samplers.get_sampler('heun')(
      gaussian_denoiser, z, k, precond=precond.make_edm(), num_steps=6, s_churn=20.0))
  sharded = heun(jax.device_put(z, sharding), jax.device_put(keys, sharding))
  np.testing.assert_allclose(sharded, heun(z, keys), rtol=1e-6, atol=1e-6)


def test_latent_and_churn_streams_are_independent():
  keys = samplers.seed_keys([0, 1])
  z = samplers.latents(keys, (64,))
  assert z.shape == (2, 64)
  churn = samplers.noise.step_normal(samplers.noise.stream(keys, samplers.noise.CHURN_STREAM), 0,
                                     (64,))
  assert abs(float(jnp.mean(z * churn))) < 0.5  # not the same (or sign-flipped) stream
  assert not np.allclose(z, churn)


def test_churn_only_inside_its_sigma_range(gaussian_latents):
  sigmas = schedules.karras(10)
  keys = samplers.seed_keys(np.arange(16))
  x0 = gaussian_latents * np.float32(sigmas[0])
  deterministic = samplers.heun(gaussian_denoiser, x0, sigmas)
  outside = samplers.heun(gaussian_denoiser, x0, sigmas, key=keys, s_churn=40.0, s_tmin=100.0)
  np.testing.assert_array_equal(outside, deterministic)
  inside = samplers.heun(gaussian_denoiser, x0, sigmas, key=keys, s_churn=40.0, s_tmin=0.05,
                         s_tmax=50.0)
  assert np.abs(np.asarray(inside) - np.asarray(deterministic)).max() > 1e-3


def test_key_forms():
  sigmas = schedules.karras(4)
  z = samplers.latents(samplers.seed_keys(np.arange(3)), (2,)) * 80.0
  typed = samplers.seed_keys(np.arange(3))
  raw = jax.random.key_data(typed)  # legacy uint32 [B, 2]
  run = lambda key: np.asarray(samplers.heun(gaussian_denoiser, z, sigmas, key=key,
                                             s_churn=10.0))
  np.testing.assert_array_equal(run(typed), run(raw))
  single = run(jax.random.key(7))  # one key, split over the batch
  assert single.shape == (3, 2)
  with pytest.raises(ValueError, match='PRNG keys'):
    samplers.heun(gaussian_denoiser, z, sigmas, s_churn=10.0)
  with pytest.raises(ValueError, match='one PRNG key per sample'):
    samplers.heun(gaussian_denoiser, z, sigmas, key=samplers.seed_keys([0, 1]), s_churn=10.0)


# ------------------------------------------------------------------------------------------------
# Grids and the registry.


def test_edm_grid_for_clamps_and_rounds():
  np.testing.assert_array_equal(samplers.edm_grid_for(precond.make_edm(), 18),
                                schedules.karras(18))
  ve = samplers.edm_grid_for(precond.make_ve(), 18)
  np.testing.assert_allclose(ve[[0, -2, -1]], [80.0, 0.02, 0.0], rtol=1e-12)
  grid = samplers.edm_grid_for(precond.make_iddpm(), 18)
  u = schedules.iddpm_u().astype(np.float32)
  assert grid[-1] == 0.0 and np.all(np.isin(grid[:-1].astype(np.float32), u))
  np.testing.assert_allclose(grid[-2], 0.0064254, rtol=1e-4)  # σ_min clamped to u_999


def test_registry():
  assert {'euler', 'heun', 'generalized'} <= set(samplers.names())
  assert samplers.get_sampler('heun') is registry.get('sampler', 'heun')
  with pytest.raises(registry.UnknownNameError, match='known samplers: .*euler, .*generalized, heun'):
    samplers.get_sampler('heunn')
  with pytest.raises(ValueError, match='known discretizations'):
    samplers.generalized(gaussian_denoiser, jnp.zeros((1, 1)), num_steps=4,
                         discretization='karras')


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance.


def _toy_denoisers():
  d_cond = lambda x, sigma: jnp.sin(x) + sigma[:, None]
  d_uncond = lambda x, sigma: 0.5 * x - sigma[:, None]**2
  return d_cond, d_uncond


def test_guidance_values():
  d_cond, d_uncond = _toy_denoisers()
  x = jax.random.normal(jax.random.key(0), (4, 3))
  sigma = jnp.array([0.5, 1.0, 2.0, 4.0])
  np.testing.assert_array_equal(samplers.guided(d_cond, d_uncond, 0.0)(x, sigma),
                                d_cond(x, sigma))
  for w in (1.5, jnp.array([0.0, 0.5, 1.0, 3.0])):
    w_col = jnp.reshape(jnp.asarray(w), (-1, 1))
    expected = (1 + w_col) * d_cond(x, sigma) - w_col * d_uncond(x, sigma)
    np.testing.assert_allclose(samplers.guided(d_cond, d_uncond, w)(x, sigma), expected,
                               rtol=1e-6)


def test_batched_guidance_equals_two_calls():
  labels = jax.nn.one_hot(jnp.array([0, 2, 1, 2]), 3)

  def denoise_with_labels(x, sigma, class_labels):
    # A label-dependent toy denoiser; the all-zero label is the unconditional model.
    return jnp.tanh(x) * (1.0 + class_labels @ jnp.arange(1.0, 4.0))[:, None] - sigma[:, None]

  calls = []

  def counting(x, sigma, class_labels):
    calls.append(x.shape[0])
    return denoise_with_labels(x, sigma, class_labels)

  x = jax.random.normal(jax.random.key(1), (4, 5))
  sigma = jnp.full((4,), 0.7)
  w = jnp.array([0.0, 1.0, 2.0, 0.3])
  two_calls = samplers.guided(lambda x, s: denoise_with_labels(x, s, labels),
                              lambda x, s: denoise_with_labels(x, s, jnp.zeros_like(labels)), w)
  batched = samplers.guided_batched(counting, labels, w)
  np.testing.assert_allclose(batched(x, sigma), two_calls(x, sigma), rtol=1e-6, atol=1e-6)
  assert calls == [8]  # one network call of batch 2B


def test_guided_sampler_runs_in_a_scan(gaussian_latents):
  d_cond, d_uncond = _toy_denoisers()
  fn = lambda z: samplers.heun(samplers.guided(gaussian_denoiser, gaussian_denoiser, 2.0), z,
                               schedules.karras(6))
  jaxpr = jax.make_jaxpr(fn)(gaussian_latents).jaxpr
  assert count_primitives(jaxpr, 'scan') == 1
  # Guiding a model with itself changes nothing.
  np.testing.assert_allclose(fn(gaussian_latents * 80.0),
                             samplers.heun(gaussian_denoiser, gaussian_latents * 80.0,
                                           schedules.karras(6)), rtol=1e-5)


def _scan_bodies(jaxpr):
  """The body jaxprs of every scan in a jaxpr (nested ones included)."""
  bodies = [eqn.params['jaxpr'].jaxpr for eqn in jaxpr.eqns if eqn.primitive.name == 'scan']
  for sub in jex.core.subjaxprs(jaxpr):
    bodies += _scan_bodies(sub)
  return bodies


@pytest.mark.parametrize('last_sigma', [0.0, 0.002])
def test_heun_loop_body_has_no_cond_on_a_known_or_traced_grid(last_sigma):
  # A lax.cond in the scan body costs ~4× the per-NFE overhead. A grid known at trace time needs
  # none; a traced one (sigmas passed into jit) selects inside the loop and decides only the last
  # step with a cond. Both must give the same samples, and the same as a plain Python loop.
  sigmas = np.append(schedules.karras(6, sigma_min=0.02)[:-1], last_sigma)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1)) * sigmas[0]
  denoise = lambda x, sigma: x * 0.25 / (0.25 + sigma.reshape(-1, 1, 1, 1)**2)
  known = lambda x: samplers.heun(denoise, x, sigmas)
  traced = lambda x, t: samplers.heun(denoise, x, t)
  known_jaxpr = jax.make_jaxpr(known)(x).jaxpr
  traced_jaxpr = jax.make_jaxpr(traced)(x, jnp.asarray(sigmas)).jaxpr
  for jaxpr in (known_jaxpr, traced_jaxpr):
    (body,) = _scan_bodies(jaxpr)
    assert count_primitives(body, 'cond') == 0
  assert count_primitives(known_jaxpr, 'cond') == 0
  assert count_primitives(traced_jaxpr, 'cond') == 1
  # EDM Alg. 1 step by step in float64: Heun unless the step lands on σ = 0.
  z = np.asarray(x, np.float64)
  d = lambda z, s: (z - z * 0.25 / (0.25 + s**2)) / s
  for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
    z_euler = z + (s_next - s_cur) * d(z, s_cur)
    z = z_euler if s_next == 0 else z + (s_next - s_cur) * 0.5 * (d(z, s_cur) + d(z_euler, s_next))
  for out in (jax.jit(known)(x), jax.jit(traced)(x, jnp.asarray(sigmas))):
    np.testing.assert_allclose(out, z, rtol=2e-5, atol=2e-5)
