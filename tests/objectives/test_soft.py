"""Soft Score Matching and the Momentum Sampler on problems with known answers.

* With C_t ≡ I the Momentum Sampler is the reverse-diffusion sampler of VE diffusion; with σ ≡ 0 it is
  Cold Diffusion's update. Both are checked step for step against hand-written loops on the same noise.
* Gaussian data whose DCT coefficients are independent N(μ_k, v_k) has, under blur + noise, the
  corrupted marginal N(d_k μ_k, d_k² v_k + σ_t²) per coefficient and the exact clean estimate
  E[x_0 | x_t] = μ + d v/(d² v + σ²)·(X_t − d μ). The Soft Score Matching loss must be minimized by it,
  and the Momentum Sampler driven by it must reproduce μ_k and v_k (the naive sampler does not).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import precond, registry, samplers
from diffjax.objectives import soft as soft_lib
from diffjax.precond import soft as precond_soft
from diffjax.processes import corruptions as C
from diffjax.processes import soft_levels
from diffjax.samplers import momentum as M
from diffjax.samplers import noise

H = W = 4  # the Gaussian problem: 16 DCT frequencies, one channel


def problem_stats():
  k1, k2 = np.meshgrid(np.arange(H), np.arange(W), indexing='ij')
  std = (1.2 / (1.0 + k1 + k2))[..., None]
  mean = np.zeros((H, W, 1))
  mean[0, 0, 0], mean[1, 0, 0] = -0.8, 0.3
  return mean, std


def problem_schedule(mean=None, std=None):
  """Blur 0 → 3 px and noise 0.02 → 0.2 over 9 knots; p_1 = the exact corrupted law when given."""
  levels = np.concatenate([[0.0], np.geomspace(0.2, 3.0, 8)])
  return C.SoftSchedule('blur', np.linspace(0, 1, 9), levels, np.geomspace(0.02, 0.2, 9), mean,
                        std)


def exact_model(schedule, mean, std):
  """x̂_0 = E[x_0 | x_t] for the Gaussian problem: (x [B,H,W,1], t [B]) -> [B,H,W,1]."""
  m, v = jnp.asarray(mean, jnp.float32), jnp.asarray(std**2, jnp.float32)

  def model(x, t):
    d = C.blur_multipliers(schedule.level_at(t), H, W)[..., None]
    s2 = jnp.square(schedule.sigma_at(t))[:, None, None, None]
    coef = C.to_basis(x, 'dct')
    return C.from_basis(m + d * v / (d**2 * v + s2) * (coef - d * m), 'dct')

  return model


def wiggly_model(x, t):
  """Any nonlinear x̂_0(x, t) will do for checking update formulas."""
  return jnp.tanh(0.8 * x + 0.3 * t[:, None, None, None]) - 0.1 * x**2


# ------------------------------------------------------------------------------------------------
# Special cases of the Momentum Sampler (Algorithm 2).


def test_with_identity_corruption_momentum_is_ve_reverse_diffusion():
  schedule = C.SoftSchedule('identity', [0.0, 0.5, 1.0], [0.0, 0.0, 0.0], [0.05, 0.8, 5.0])
  keys = samplers.seed_keys([3, 4])
  x1 = 5.0 * np.random.RandomState(0).randn(2, H, W, 1).astype(np.float32)
  n = 6
  out = M.sample(wiggly_model, schedule, x1, keys, n, 'momentum')

  @jax.jit
  def reverse_diffusion(x, keys):
    # Song et al. (2021) for VE: x ← x + (σ_i² − σ_{i+1}²)·s(x) + sqrt(σ_i² − σ_{i+1}²)·z.
    stream = noise.stream(keys, noise.SOFT_STREAM)
    ts = 1.0 - np.arange(n + 1) / n
    for i in range(n):
      t, t_next = jnp.full((2,), ts[i]), jnp.full((2,), ts[i + 1])
      var, var_next = schedule.sigma_at(t[0])**2, schedule.sigma_at(t_next[0])**2
      score = (wiggly_model(x, t) - x) / var
      x = x + (var - var_next) * score + jnp.sqrt(var - var_next) * noise.step_normal(
          stream, i, (H, W, 1))
    return x

  expected = reverse_diffusion(jnp.asarray(x1), keys)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_without_noise_momentum_is_cold_diffusion():
  schedule = C.SoftSchedule('blur', [0.0, 0.4, 1.0], [0.0, 0.7, 2.5], [0.0, 0.0, 0.0])
  keys = samplers.seed_keys([0, 1])
  x1 = np.random.RandomState(1).randn(2, H, W, 1).astype(np.float32)
  n = 5
  out = M.sample(wiggly_model, schedule, x1, keys, n, 'momentum')

  @jax.jit
  def cold_diffusion(x):
    # Bansal et al. (2022), improved sampling: x ← x − C_t x̂_0 + C_{t−Δ} x̂_0.
    ts = 1.0 - np.arange(n + 1) / n
    for i in range(n):
      t, t_next = jnp.full((2,), ts[i]), jnp.full((2,), ts[i + 1])
      x0_hat = wiggly_model(x, t)
      x = x - schedule.corrupt(x0_hat, t) + schedule.corrupt(x0_hat, t_next)
    return x

  expected = cold_diffusion(jnp.asarray(x1))
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_momentum_step_formula():
  rng = np.random.RandomState(2)
  x, y_t, y_next, eta = (rng.randn(2, H, W, 1).astype(np.float32) for _ in range(4))
  out = M.momentum_step(x, y_t, y_next, 0.3, 0.1, eta)
  z = x - ((0.1**2 - 0.3**2) / 0.3**2) * (y_t - x) + np.sqrt(0.3**2 - 0.1**2) * eta
  np.testing.assert_allclose(np.asarray(out), z + y_next - y_t, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# The Gaussian problem: exact minimizer and exact sampling.


def test_soft_score_matching_is_minimized_by_the_exact_posterior_mean():
  """Fit a per-frequency affine model x̂_0 = Vᵀ(a ⊙ V x_t + b) at fixed t by minimizing the library's
  loss exactly (it is quadratic in (a, b): one Newton step); it must equal E[x_0 | x_t], i.e.
  a = d v/(d² v + σ²) and b = (1 − a d) μ, within the regression's sampling error."""
  mean, std = problem_stats()
  schedule = problem_schedule()
  n, t = 16384, 0.5
  rng = np.random.RandomState(3)
  x0 = C.from_basis(jnp.asarray(mean + std * rng.randn(n, H, W, 1), jnp.float32), 'dct')
  key = jax.random.key(0)
  ts = jnp.full((n,), t)

  def loss(theta, weighting='none'):
    a, b = theta[:H * W].reshape(H, W, 1), theta[H * W:].reshape(H, W, 1)
    model = lambda x, tt: C.from_basis(a * C.to_basis(x, 'dct') + b, 'dct')
    return soft_lib.soft_score_matching(model, schedule, x0, key, weighting=weighting, t=ts)[0]

  theta0 = jnp.zeros(2 * H * W)
  g, hess = jax.jit(lambda th: (jax.grad(loss)(th), jax.hessian(loss)(th)))(theta0)
  theta = np.asarray(-jnp.linalg.solve(hess, g), np.float64)
  a, b = theta[:H * W].reshape(H, W, 1), theta[H * W:].reshape(H, W, 1)

  d = np.asarray(C.blur_multipliers(schedule.level_at(t), H, W), np.float64)[..., None]
  s2 = float(schedule.sigma_at(t))**2
  v, var_x = std**2, d**2 * std**2 + s2
  gain = d * v / var_x
  assert d.min() > 0.1  # every frequency is visible to the loss at this t
  # Standard errors of a least-squares slope and intercept with n samples.
  post_var = v - gain * d * v
  se_a = np.sqrt(post_var / (n * var_x))
  se_b = np.sqrt(post_var / n) + se_a * np.abs(d * mean)
  assert np.all(np.abs(a - gain) < 4 * se_a + 1e-3)
  assert np.all(np.abs(b - (1 - gain * d) * mean) < 4 * se_b + 1e-3)
  # A weighting is a factor of t alone ('eps': 1/σ_t²): at fixed t it cannot move the minimizer.
  th = jnp.asarray(theta, jnp.float32)
  assert float(loss(th, 'none')) == pytest.approx(float(loss(th, 'eps')) * s2, rel=1e-5)


@pytest.fixture(scope='module')
def gaussian_samples():
  mean, std = problem_stats()
  schedule = problem_schedule(mean, std)  # p_1 = the exact law of x_1 (full fit, no truncation)
  model = exact_model(schedule, mean, std)
  keys = samplers.seed_keys(np.arange(24576))
  latents = samplers.latents(keys, (H, W, 1))
  run = jax.jit(lambda lat, k, method: M.sample(model, schedule, schedule.start(lat), k, 128, method),
                static_argnums=2)
  return {method: np.asarray(C.to_basis(run(latents, keys, method), 'dct'), np.float64)
          for method in ('momentum', 'naive')}, mean, std, schedule


def test_momentum_sampler_with_the_exact_model_reproduces_the_data_per_frequency(gaussian_samples):
  samples, mean, std, schedule = gaussian_samples
  coef = samples['momentum']
  target_var = std**2 + schedule.sigma[0]**2  # Algorithm 2 returns x_0, which keeps σ(0) of noise
  ratio = coef.var(0) / target_var
  # The sampler is first order in Δt: the closed-form output variance (same recursion, no sampling
  # noise) is within 3% of the data's at 128 steps and halves its error per doubling of the steps.
  fit = soft_levels.GaussianFit(mean, std, 'dct')
  exact = {n: M.gaussian_variance_ratio(fit, schedule, n, 'momentum') for n in (32, 64, 128)}
  assert np.all(np.abs(exact[128] - 1) < 0.031)
  assert np.abs(exact[64] - 1).max() == pytest.approx(2 * np.abs(exact[128] - 1).max(), rel=0.1)
  assert np.abs(exact[32] - 1).max() == pytest.approx(2 * np.abs(exact[64] - 1).max(), rel=0.1)
  # 24576 samples: the empirical ratio has a standard error of 0.9% around the closed form.
  np.testing.assert_allclose(ratio / exact[128], 1.0, atol=0.04)
  np.testing.assert_allclose(ratio, 1.0, atol=0.06)
  assert np.all(np.abs(coef.mean(0) - mean) < 4 * std / np.sqrt(len(coef)) + 0.01)


def test_naive_sampler_with_the_exact_model_loses_the_variance(gaussian_samples):
  samples, mean, std, schedule = gaussian_samples
  ratio = samples['naive'].var(0) / (std**2 + schedule.sigma[0]**2)
  exact = M.gaussian_variance_ratio(soft_levels.GaussianFit(mean, std, 'dct'), schedule, 128, 'naive')
  np.testing.assert_allclose(ratio / exact, 1.0, atol=0.04)
  assert ratio.max() < 0.7  # re-corrupting x̂_0 from scratch halves the variance of every mode


# ------------------------------------------------------------------------------------------------
# Plumbing: registry, objective, seeds, configs.


class AffineNet(nn.Module):
  """A cheap stand-in network with the diffjax signature: F = w·x + b·c_noise/1000 (+ labels)."""
  label_dim: int = 0
  augment_dim: int = 0

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
    w = self.param('w', nn.initializers.constant(0.1), (x.shape[-1],))
    b = self.param('b', nn.initializers.constant(0.2), ())
    out = w * x + b * noise_labels[:, None, None, None] / 1000.0
    if class_labels is not None:
      out = out + nn.Dense(1)(class_labels)[:, None, None, :]
    return out


def soft_denoiser(schedule):
  return precond.Denoiser(AffineNet(label_dim=3), registry.get('precond', 'soft')(
      **schedule.to_dict()))


def test_registered_loss_trains_through_the_objective_protocol():
  from diffjax.objectives import base as objectives_base
  schedule = problem_schedule(*problem_stats())
  denoiser = soft_denoiser(schedule)
  params = denoiser.network.init(jax.random.key(0), jnp.zeros((1, H, W, 1)), jnp.zeros((1,)),
                                 jnp.zeros((1, 3)))['params']
  objective = registry.get('loss', 'soft')(weighting='eps').objective(denoiser, num_classes=3)
  assert isinstance(objective, objectives_base.Objective)
  batch = {'image': jnp.asarray(np.random.RandomState(4).randn(8, H, W, 1), jnp.float32),
           'label': jnp.arange(8) % 3}
  (value, aux), grads = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))(
      params, batch, jax.random.key(1), objective.init_extra())
  assert np.isfinite(float(value)) and aux['per_example'].shape == (8,)
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
  # The denoiser is the residual model x̂_0 = x_t + φ(x_t, t): with t = 0.5 and F = 0.1x + 0.1 …
  x = batch['image']
  expected = x + 0.1 * x + 0.2 * 500.0 / 1000.0
  got = denoiser.bind(params, jnp.zeros((8, 3)))(x, jnp.full((8,), 0.5))  # zero labels: Dense adds 0
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6)
  with pytest.raises(ValueError, match='known weightings: none, eps'):
    registry.get('loss', 'soft')(weighting='snr')


def test_registered_samplers_use_the_precond_schedule_and_per_sample_seeds():
  schedule = problem_schedule(*problem_stats())
  p = registry.get('precond', 'soft')(**schedule.to_dict())
  seeds = [7, 8, 9, 10]
  keys = samplers.seed_keys(seeds)
  lat = samplers.latents(keys, (H, W, 1))
  run = jax.jit(lambda lat, k: samplers.get_sampler('momentum')(wiggly_model, lat, k, precond=p,
                                                                num_steps=4))
  together = np.asarray(run(lat, keys))
  apart = np.concatenate([np.asarray(run(lat[:2], keys[:2])), np.asarray(run(lat[2:], keys[2:]))])
  np.testing.assert_allclose(together, apart, rtol=1e-6, atol=1e-6)  # image k depends on seed k only
  # The registered form is `sample` started from p_1 (the schedule's fit).
  direct = M.sample(wiggly_model, schedule, schedule.start(lat), keys, 4, 'momentum')
  np.testing.assert_allclose(together, np.asarray(direct), rtol=1e-5, atol=1e-5)
  naive = samplers.get_sampler('soft_naive')(wiggly_model, lat, keys, precond=p, num_steps=4)
  assert naive.shape == (4, H, W, 1) and np.all(np.isfinite(np.asarray(naive)))
  with pytest.raises(ValueError, match='Soft Diffusion model'):
    samplers.get_sampler('momentum')(wiggly_model, lat, keys, precond=precond.make_edm(),
                                     num_steps=4)


def test_soft_configs_build_their_parts():
  from configs import soft
  from diffjax import build
  c = soft.get_config('digits')
  p = build.build_precond(c)
  assert isinstance(p, precond_soft.SoftPreconditioning) and p.schedule.corruption == 'blur'
  assert c.sample.sampler == 'momentum' and c.sample.num_steps == p.schedule.num_levels - 1
  assert p.schedule.p1_mean is not None  # the digits levels file is checked in
  assert build.build_loss(c).weighting == 'none'
  for arg, corruption in (('cifar10,mask', 'mask'), ('celeba64,identity', 'identity')):
    c = soft.get_config(arg)
    assert build.build_precond(c).schedule.corruption == corruption
  assert build.build_loss(soft.get_config('digits,eps_weighted')).weighting == 'eps'
  with pytest.raises(ValueError, match='known presets'):
    soft.get_config('mnist')
