"""Discrete-time diffusion: β schedules, respacing, posterior tables, the VLB and iDDPM's objectives.

Checked against numbers of Nichol & Dhariwal (2021) and improved-diffusion (REFERENCE §2), closed forms
on Gaussian data (whose denoiser and posterior are exact) and the importance sampler's definition.
"""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import iddpm as iddpm_configs
from diffjax import precond, registry
from diffjax.likelihood import vlb
from diffjax.objectives import ddpm as ddpm_lib
from diffjax.precond import Denoiser
from diffjax.precond import discrete as precond_discrete
from diffjax.processes import discrete, schedules
from diffjax.samplers import noise

LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------
# β schedules and respacing.


def test_cosine_t4000_first_beta_and_only_the_last_is_clipped():
  betas = discrete.cosine_betas(4000)
  assert betas.dtype == np.float64 and betas.shape == (4000,)
  np.testing.assert_allclose(betas[0], 9.865819e-6, rtol=1e-6)
  assert np.flatnonzero(betas >= 0.999).tolist() == [3999]
  assert betas[-1] == 0.999 and betas[-2] < 0.999


def test_linear_betas_are_rescaled_for_any_t():
  np.testing.assert_allclose(discrete.linear_betas(1000)[[0, -1]], [1e-4, 0.02], rtol=1e-12)
  np.testing.assert_allclose(discrete.linear_betas(4000)[[0, -1]], [2.5e-5, 0.005], rtol=1e-12)
  assert registry.get('beta_schedule', 'cosine') is discrete.cosine_betas
  with pytest.raises(registry.UnknownNameError, match='cosine, linear'):
    discrete.get_betas('quadratic', 10)


def test_respacing_4000_to_250_keeps_alpha_bar_and_does_not_reclip():
  full = discrete.make_schedule('cosine', 4000)
  spaced = full.respace('250')
  assert spaced.num_steps == 250 and spaced.timesteps[0] == 0 and spaced.timesteps[-1] == 3999
  np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timesteps],
                             rtol=1e-12)
  np.testing.assert_allclose(spaced.betas[-1], 0.999996, atol=5e-7)
  assert spaced.betas[-1] > 0.999  # not re-clipped
  np.testing.assert_allclose(spaced.sigmas, full.sigmas[spaced.timesteps], rtol=1e-10)
  # The network keeps seeing original indices (rescaled to [0, 1000) when asked).
  np.testing.assert_allclose(spaced.noise_labels(rescale=True)[-1], 3999 * 1000 / 4000)


def test_respaced_index_sets_as_improved_diffusion_defines_them():
  assert discrete.space_timesteps(1000, 'ddim10').tolist() == list(range(0, 1000, 100))
  # "10,15,20" of 300: three sections of 100 steps at fractional strides 99/9, 99/14 and 99/19.
  expected = ([0, 11, 22, 33, 44, 55, 66, 77, 88, 99] +
              [100, 107, 114, 121, 128, 135, 142, 149, 157, 164, 171, 178, 185, 192, 199] +
              [200, 205, 210, 216, 221, 226, 231, 236, 242, 247, 252, 257, 263, 268, 273, 278,
               283, 289, 294, 299])
  assert discrete.space_timesteps(300, '10,15,20').tolist() == expected
  assert discrete.space_timesteps(1000, 'ddim50').tolist() == list(range(0, 1000, 20))
  with pytest.raises(ValueError, match='stride'):
    discrete.space_timesteps(1000, 'ddim999')
  with pytest.raises(ValueError, match='section of 100'):
    discrete.space_timesteps(300, '101,1,1')


def test_posterior_tables_float64():
  s = discrete.make_schedule('linear', 1000)
  t = 500
  ab, ab_prev, beta = s.alphas_cumprod[t], s.alphas_cumprod[t - 1], s.betas[t]
  np.testing.assert_allclose(ab, np.prod(1.0 - s.betas[:t + 1]), rtol=1e-12)
  np.testing.assert_allclose(s.posterior_variance[t], beta * (1 - ab_prev) / (1 - ab), rtol=1e-12)
  np.testing.assert_allclose(s.posterior_mean_coef1[t], beta * np.sqrt(ab_prev) / (1 - ab))
  np.testing.assert_allclose(s.posterior_mean_coef2[t],
                             (1 - ab_prev) * np.sqrt(1 - beta) / (1 - ab))
  assert s.posterior_variance[0] == 0.0
  np.testing.assert_allclose(s.posterior_log_variance_clipped[0], np.log(s.posterior_variance[1]))
  np.testing.assert_allclose(s.sigmas, np.sqrt((1 - s.alphas_cumprod) / s.alphas_cumprod))
  np.testing.assert_allclose(s.model_log_variance('fixed_large')[1:], np.log(s.betas[1:]))


# ------------------------------------------------------------------------------------------------
# The discrete preconditioning: the same denoiser on a finite σ-grid.


def test_ddpm_precond_is_iddpm_grid_with_step_index():
  p = precond.get_preconditioning('ddpm', beta_schedule='cosine', num_timesteps=1000)
  u = schedules.iddpm_u(1000)
  # EDM's iDDPM grid u_{M−1−t} is the cosine process's σ_t (EDM Table 1).
  np.testing.assert_allclose(p.schedule.sigmas, u[:1000][::-1], rtol=1e-10)
  np.testing.assert_allclose([p.sigma_min, p.sigma_max], [0.0064254, 20291.17], rtol=1e-5)
  t = jnp.array([0, 7, 500, 999])
  sigma = jnp.asarray(p.schedule.sigmas, jnp.float32)[t]
  c = p.coefficients(sigma)
  np.testing.assert_array_equal(c.c_noise, t)
  np.testing.assert_allclose(c.c_in, np.sqrt(p.schedule.alphas_cumprod[t]), rtol=1e-5)
  np.testing.assert_allclose(p.round_sigma(sigma * 1.001), sigma, rtol=1e-6)
  # EDM's own iDDPM preconditioning is recognized as the same discrete process.
  np.testing.assert_allclose(precond_discrete.schedule_of(precond.make_iddpm()).alphas_cumprod,
                             p.schedule.alphas_cumprod, rtol=1e-9)
  with pytest.raises(ValueError, match='discrete model'):
    precond_discrete.schedule_of(precond.make_edm())


# ------------------------------------------------------------------------------------------------
# The VLB terms on Gaussian data, where everything is exact.

S = 0.5  # data std
S200 = discrete.make_schedule('cosine', 200)
# Jitted once: eager evaluation would compile every primitive of the bound separately.
vb_terms_200 = jax.jit(lambda *args: vlb.vb_terms_bpd(S200, *args))


def _gaussian_setup(schedule, t, n=256, dims=64, seed=0):
  rng = np.random.RandomState(seed)
  y = (rng.randn(n, dims, 1, 1) * S).astype(np.float32)
  eps = rng.randn(n, dims, 1, 1).astype(np.float32)
  t = np.full(n, t, np.int32)
  xt = np.asarray(discrete.q_sample(schedule, jnp.asarray(y), t, jnp.asarray(eps)))
  sigma = schedule.sigmas[t[0]]
  x = xt / np.sqrt(schedule.alphas_cumprod[t[0]])
  x0_pred = (S**2 / (S**2 + sigma**2) * x).astype(np.float32)  # the exact denoiser E[y | x]
  return y, xt, t, x0_pred


@pytest.mark.parametrize('t', [1, 37, 199])
def test_kl_terms_equal_closed_form_float64(t):
  s = S200
  y, xt, tt, x0_pred = _gaussian_setup(s, t)
  v = np.tanh(np.random.RandomState(1).randn(*y.shape)).astype(np.float32)
  log_var = discrete.learned_log_variance(s, tt, jnp.asarray(v))
  vb = np.asarray(vb_terms_200(y, xt, tt, x0_pred, log_var))
  # The same KL in float64 numpy.
  y64, xt64, x064 = (a.astype(np.float64) for a in (y, xt, x0_pred))
  c1, c2 = s.posterior_mean_coef1[t], s.posterior_mean_coef2[t]
  lv_q = s.posterior_log_variance_clipped[t]
  frac = (v.astype(np.float64) + 1) / 2
  lv_p = frac * np.log(s.betas[t]) + (1 - frac) * lv_q
  diff = c1 * y64 + c2 * xt64 - (c1 * x064 + c2 * xt64)
  kl = 0.5 * (-1 + lv_p - lv_q + np.exp(lv_q - lv_p) + diff**2 * np.exp(-lv_p))
  expected = kl.reshape(len(y), -1).mean(axis=1) / LN2
  np.testing.assert_allclose(vb, expected, rtol=2e-4, atol=1e-6)
  # In expectation over data and noise, y − E[y|x] has variance S²σ²/(S² + σ²): the mean KL is exact.
  sigma = s.sigmas[t]
  lv_p = np.log(s.betas[t])
  expected_mean = 0.5 * (-1 + lv_p - lv_q + np.exp(lv_q - lv_p) +
                         c1**2 * S**2 * sigma**2 / (S**2 + sigma**2) * np.exp(-lv_p)) / LN2
  log_var = discrete.model_log_variance(s, tt, 'fixed_large', like=jnp.asarray(y))
  vb = vb_terms_200(y, xt, tt, x0_pred, log_var)
  np.testing.assert_allclose(float(jnp.mean(vb)), expected_mean, rtol=0.03)


def test_decoder_sums_to_one_over_the_256_bins():
  bins = jnp.arange(256, dtype=jnp.float32) / 127.5 - 1.0
  decoder = jax.jit(vlb.discretized_gaussian_log_likelihood)
  for mean, log_scale in [(0.0, -3.0), (0.37, -6.5), (-0.99, -2.0), (0.5, 0.5), (1.2, -4.0)]:
    log_p = decoder(bins, mean, log_scale)
    assert abs(float(jnp.sum(jnp.exp(log_p))) - 1.0) < 2e-6
  # An interior bin is Φ(b) − Φ(a) in float64.
  from scipy.stats import norm
  x, mean, std = bins[140], 0.1, 0.02
  expected = np.log(norm.cdf((x + 1 / 255 - mean) / std) - norm.cdf((x - 1 / 255 - mean) / std))
  np.testing.assert_allclose(decoder(x, mean, np.log(std)), expected, rtol=1e-5)


def test_decoder_term_at_t0_and_prior_term():
  s = S200
  y = (np.random.RandomState(0).randint(0, 256, (4, 3, 3, 1)) / 127.5 - 1).astype(np.float32)
  t = np.zeros(4, np.int32)
  log_var = discrete.model_log_variance(s, t, 'fixed_small', like=jnp.asarray(y))
  # A model that predicts x_0 exactly: L_0 is −log2 of the bin mass of N(y, β̃_1) around y.
  vb = vb_terms_200(y, y, t, y, log_var)
  std = math.exp(0.5 * s.posterior_log_variance_clipped[0])
  from scipy.stats import norm
  inner = -np.log2(norm.cdf(1 / 255 / std) - norm.cdf(-1 / 255 / std))
  edge = -np.log2(norm.cdf(1 / 255 / std))
  per_dim = np.where(np.abs(y) > 0.999, edge, inner)
  np.testing.assert_allclose(vb, per_dim.reshape(4, -1).mean(axis=1), rtol=1e-4)
  ab = s.alphas_cumprod[-1]
  expected = 0.5 * (-1 - np.log1p(-ab) + (1 - ab) + ab * y.astype(np.float64)**2) / LN2
  np.testing.assert_allclose(vlb.prior_bpd(s, jnp.asarray(y)),
                             expected.reshape(4, -1).mean(axis=1), rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Learned variance and L_hybrid.


def test_learned_log_variance_stays_between_the_bounds():
  s = discrete.make_schedule('cosine', 1000)
  v = jnp.linspace(-1.0, 1.0, 21)
  for t in (1, 10, 500, 998, 999):
    lv = np.asarray(discrete.learned_log_variance(s, jnp.full(21, t), v))
    lo, hi = s.posterior_log_variance_clipped[t], np.log(s.betas[t])
    assert np.all(lv >= lo - 1e-5) and np.all(lv <= hi + 1e-5)
    np.testing.assert_allclose(lv[[0, -1]], [lo, hi], rtol=1e-6)
    assert np.all(np.diff(lv) >= -1e-6)  # monotone in v


def _terms_of_network_output(schedule, loss_type, y, xt, t, noise):
  """Per-example loss as a function of the raw network output F = [ε̂, v] (2C channels)."""
  sigma = discrete.gather(schedule.sigmas, t, y)
  x = xt / discrete.gather(np.sqrt(schedule.alphas_cumprod), t, y)

  def fn(f):
    eps, v = f[..., :1], f[..., 1:]
    d = x - sigma * eps  # D = c_skip·x + c_out·F with c_skip = 1, c_out = −σ
    terms = ddpm_lib.per_example_terms(schedule, y, xt, t, noise, eps, d, v,
                                          loss_type=loss_type, variance='learned')
    return terms

  return fn


def test_hybrid_vlb_term_trains_only_the_variance():
  s = discrete.make_schedule('cosine', 100)
  rng = np.random.RandomState(0)
  y = jnp.asarray((rng.randint(0, 256, (6, 4, 4, 1)) / 127.5 - 1).astype(np.float32))
  noise = jnp.asarray(rng.randn(6, 4, 4, 1).astype(np.float32))
  t = jnp.array([0, 1, 5, 50, 98, 99])
  xt = discrete.q_sample(s, y, t, noise)
  f = jnp.asarray(rng.randn(6, 4, 4, 2).astype(np.float32) * 0.3)
  fn = _terms_of_network_output(s, 'hybrid', y, xt, t, noise)
  fn_vlb = _terms_of_network_output(s, 'vlb', y, xt, t, noise)

  @jax.jit
  def run(f):
    vb_part = lambda f: jnp.sum(fn(f)['loss'] - fn(f)['mse'])
    return (jax.grad(vb_part)(f), fn(f), jax.grad(lambda f: jnp.sum(fn_vlb(f)['loss']))(f),
            fn_vlb(f))

  g, terms, g_vlb, terms_vlb = run(f)
  assert float(jnp.abs(g[..., :1]).max()) == 0.0  # stop-gradient on the mean
  assert float(jnp.abs(g[..., 1:]).max()) > 0.0
  np.testing.assert_allclose(terms['loss'], terms['mse'] + 0.001 * 100 * terms['vb'], rtol=1e-6)
  # Pure L_vlb trains the mean as well, and is T·L_t.
  assert float(jnp.abs(g_vlb[..., :1]).max()) > 0.0
  np.testing.assert_allclose(terms_vlb['loss'], 100 * terms_vlb['vb'], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Importance sampling of t.


def test_uniform_until_every_t_has_ten_losses_then_second_moment():
  num_t = 6
  h = ddpm_lib.init_loss_history(num_t)
  profile = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 3.0])
  rng = np.random.RandomState(0)
  ts, losses = [], []
  for _ in range(10):
    for t in range(num_t):
      ts.append(t)
      losses.append(profile[t] * (1 + 0.1 * rng.randn()))
  # All but the very last loss: one t still has 9, so sampling stays uniform.
  h = ddpm_lib.update_loss_history(h, jnp.array(ts[:-1]), jnp.array(losses[:-1]))
  np.testing.assert_allclose(ddpm_lib.loss_second_moment_probs(h), np.full(num_t, 1 / num_t))
  h = ddpm_lib.update_loss_history(h, jnp.array(ts[-1:]), jnp.array(losses[-1:]))
  hist = np.array(losses, np.float64).reshape(10, num_t).T
  np.testing.assert_allclose(h['history'], hist, rtol=1e-6)
  w = np.sqrt(np.mean(hist**2, axis=1))
  expected = (1 - 0.001) * w / w.sum() + 0.001 / num_t
  probs = ddpm_lib.loss_second_moment_probs(h)
  np.testing.assert_allclose(probs, expected, rtol=1e-5)
  # Draws follow p and carry the weights 1/(T·p).
  t, weights = ddpm_lib.sample_timesteps(jax.random.key(0), probs, 20000)
  freq = np.bincount(np.asarray(t), minlength=num_t) / 20000
  np.testing.assert_allclose(freq, expected, atol=0.015)
  np.testing.assert_allclose(weights, 1 / (num_t * np.asarray(probs)[np.asarray(t)]), rtol=1e-6)
  # A full history drops its oldest loss; a t repeated within a batch shifts twice.
  h = ddpm_lib.update_loss_history(h, jnp.array([2, 2]), jnp.array([7.0, 8.0]))
  np.testing.assert_allclose(h['history'][2], np.append(hist[2, 2:], [7.0, 8.0]), rtol=1e-6)
  assert int(h['counts'][2]) == 10


class _EpsNet(nn.Module):
  """A trivial conditional ε/v network for loop tests: 1×1 conv modulated by the step index."""
  label_dim: int = 10
  augment_dim: int = 0
  out_channels: int = 2

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
    t = jnp.asarray(noise_labels, jnp.float32)[:, None] / 10.0
    mod = nn.Dense(2)(jnp.concatenate([jnp.sin(t), jnp.cos(t), class_labels], axis=-1))
    return nn.Conv(self.out_channels, (1, 1))(x) * (1 + mod[:, None, None, :1]) + mod[
        :, None, None, 1:]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  os.environ['TFDS_DATA_DIR'] = path
  return path


def _loop_config():
  c = iddpm_configs.get_config('tiny,vlb')
  c.precond.kwargs.num_timesteps = 10
  c.train.batch_size = 8
  c.train.total_images = 8 * 32
  c.train.checkpoint_every = 16
  c.train.num_preview = 0
  return c


def test_loss_history_is_checkpointed_and_resumed(data_dir, tmp_path):
  from diffjax import build
  from diffjax.training import loop
  config = _loop_config()
  network = _EpsNet()
  denoiser = Denoiser(network, build.build_precond(config))
  x, labels = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 10))
  params = network.init(jax.random.key(0), x, jnp.zeros(1), labels)['params']
  params = jax.tree.map(np.asarray, params)  # host copies: the jitted step donates its state
  kwargs = dict(progress=False, denoiser=denoiser, init_params=lambda: params)
  full = loop.train(config, str(tmp_path / 'full'), **kwargs)
  first = loop.train(config, str(tmp_path / 'part'), max_steps=16, **kwargs)
  assert int(first.extra['counts'].sum()) <= 16 * 8
  resumed = loop.train(config, str(tmp_path / 'part'), **kwargs)
  assert int(resumed.step) == int(full.step) == 32
  assert int(full.extra['counts'].sum()) == 10 * 10  # every t full: importance sampling is on
  np.testing.assert_array_equal(resumed.extra['counts'], full.extra['counts'])
  np.testing.assert_allclose(resumed.extra['history'], full.extra['history'], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bits_per_dim_is_the_sum_of_all_terms_and_ignores_batching():
  p = precond_discrete.make_ddpm('cosine', 10)
  network = _EpsNet()
  denoiser = Denoiser(network, p)
  rng = np.random.RandomState(0)
  images = (rng.randint(0, 256, (6, 4, 4, 1)) / 127.5 - 1).astype(np.float32)
  labels = rng.randint(0, 10, 6).astype(np.int32)
  params = network.init(jax.random.key(0), jnp.asarray(images), jnp.zeros(6),
                        jax.nn.one_hot(labels, 10))['params']
  common = dict(variance='learned', num_classes=10)
  one = vlb.bits_per_dim(denoiser, params, [{'image': images, 'label': labels}],
                                     batch_size=8, **common)
  two = vlb.bits_per_dim(
      denoiser, params, [{'image': images[:4], 'label': labels[:4]},
                         {'image': images[4:], 'label': labels[4:]}], batch_size=4, **common)
  np.testing.assert_allclose(one['per_image_bpd'], two['per_image_bpd'], rtol=1e-5)
  assert one['num_images'] == 6 and one['num_timesteps'] == 10
  np.testing.assert_allclose(one['bpd'], one['prior_bpd'] + np.sum(one['vb_terms']), rtol=1e-6)
  # Image 0 by hand: the prior term plus L_t for every t with the noise of fold_in(key_0, t).
  terms = jax.jit(vlb.vb_terms_fn(denoiser, p.schedule, **common))
  key0 = noise.seed_keys([0])
  total = float(vlb.prior_bpd(p.schedule, jnp.asarray(images[:1]))[0])
  for t in range(10):
    total += float(terms(params, jnp.asarray(images[:1]), jnp.asarray(labels[:1]), key0,
                         jnp.int32(t))['vb'][0])
  np.testing.assert_allclose(one['per_image_bpd'][0], total, rtol=1e-5)
  assert one['prior_bpd'] < 0.01  # the cosine schedule ends near N(0, I)
