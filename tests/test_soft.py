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

from diffjax import corruptions as C
from diffjax import losses_soft, precond, registry, samplers
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

  # Song et al. (2021) reverse diffusion for VE: x ← x + (σ_i² − σ_{i+1}²)·s(x) + sqrt(σ_i² − σ_{i+1}²)·z.
  stream = noise.stream(keys, noise.SOFT_STREAM)
  x = jnp.asarray(x1)
  ts = 1.0 - np.arange(n + 1) / n
  for i in range(n):
    t, t_next = jnp.full((2,), ts[i]), jnp.full((2,), ts[i + 1])
    var, var_next = schedule.sigma_at(t[0])**2, schedule.sigma_at(t_next[0])**2
    score = (wiggly_model(x, t) - x) / var
    x = x + (var - var_next) * score + jnp.sqrt(var - var_next) * noise.step_normal(
        stream, i, (H, W, 1))
  np.testing.assert_allclose(np.asarray(out), np.asarray(x), rtol=1e-5, atol=1e-5)


def test_without_noise_momentum_is_cold_diffusion():
  schedule = C.SoftSchedule('blur', [0.0, 0.4, 1.0], [0.0, 0.7, 2.5], [0.0, 0.0, 0.0])
  keys = samplers.seed_keys([0, 1])
  x1 = np.random.RandomState(1).randn(2, H, W, 1).astype(np.float32)
  n = 5
  out = M.sample(wiggly_model, schedule, x1, keys, n, 'momentum')

  # Cold Diffusion (Bansal et al. 2022, improved sampling): x ← x − C_t x̂_0 + C_{t−Δ} x̂_0.
  x = jnp.asarray(x1)
  ts = 1.0 - np.arange(n + 1) / n
  for i in range(n):
    t, t_next = jnp.full((2,), ts[i]), jnp.full((2,), ts[i + 1])
    x0_hat = wiggly_model(x, t)
    x = x - schedule.corrupt(x0_hat, t) + schedule.corrupt(x0_hat, t_next)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x), rtol=1e-5, atol=1e-5)


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
  loss exactly (it is quadratic: one Newton step); it must equal E[x_0 | x_t] wherever C_t lets the
  loss see the frequency."""
  mean, std = problem_stats()
  schedule = problem_schedule()
  n, t = 20000, 0.5
  rng = np.random.RandomState(3)
  x0 = C.from_basis(jnp.asarray(mean + std * rng.randn(n, H, W, 1), jnp.float32), 'dct')
  key = jax.random.key(0)

  def loss(theta, weighting):
    a, b = theta[:H * W].reshape(H, W, 1), theta[H * W:].reshape(H, W, 1)
    model = lambda x, tt: C.from_basis(a * C.to_basis(x, 'dct') + b, 'dct')
    value, _ = losses_soft.soft_score_matching(model, schedule, x0, key, weighting=weighting,
                                               t=jnp.full((n,), t))
    return value

  d = np.asarray(C.blur_multipliers(schedule.level_at(t), H, W))[..., None]
  s2 = float(schedule.sigma_at(t))**2
  gain = d * std**2 / (d**2 * std**2 + s2)
  visible = (d > 0.1)[..., 0]  # where d_t² does not starve the regression
  theta0 = jnp.zeros(2 * H * W)
  for weighting in ('eps', 'none'):
    g = jax.grad(loss)(theta0, weighting)
    hess = jax.hessian(loss)(theta0, weighting) + 1e-9 * jnp.eye(2 * H * W)
    theta = np.asarray(-jnp.linalg.solve(hess, g))
    a, b = theta[:H * W].reshape(H, W, 1), theta[H * W:].reshape(H, W, 1)
    np.testing.assert_allclose(a[visible], gain[visible], atol=0.02)
    np.testing.assert_allclose(b[visible], ((1 - gain * d) * mean)[visible], atol=0.02)
    # The weighting only scales the loss at fixed t: the minimizer is the same.
    assert np.isfinite(float(loss(jnp.asarray(theta), weighting)))


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
  # 24576 samples: the variance ratio has a standard error of 0.9%; 128 steps add a first-order
  # discretization error of about 1% here.
  np.testing.assert_allclose(coef.var(0) / target_var, 1.0, atol=0.045)
  np.testing.assert_allclose(coef.mean(0), mean, atol=4 * std / np.sqrt(len(coef)) + 0.01)


def test_naive_sampler_with_the_exact_model_loses_the_variance(gaussian_samples):
  samples, _, std, schedule = gaussian_samples
  ratio = samples['naive'].var(0) / (std**2 + schedule.sigma[0]**2)
  assert ratio.min() < 0.75  # re-corrupting x̂_0 from scratch collapses the blurred frequencies


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
  from diffjax.training import step as step_lib
  schedule = problem_schedule(*problem_stats())
  denoiser = soft_denoiser(schedule)
  params = denoiser.network.init(jax.random.key(0), jnp.zeros((1, H, W, 1)), jnp.zeros((1,)),
                                 jnp.zeros((1, 3)))['params']
  objective = registry.get('loss', 'soft')(weighting='eps').objective(denoiser, num_classes=3)
  assert isinstance(objective, step_lib.Objective)
  batch = {'image': jnp.asarray(np.random.RandomState(4).randn(8, H, W, 1), jnp.float32),
           'label': jnp.arange(8) % 3}
  (value, aux), grads = jax.value_and_grad(objective.loss, has_aux=True)(
      params, batch, jax.random.key(1), objective.init_extra())
  assert np.isfinite(float(value)) and aux['per_example'].shape == (8,)
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
  # The denoiser is the residual model x̂_0 = x_t + φ(x_t, t): with t = 0.5 and F = 0.1x + 0.1 …
  x = batch['image']
  expected = x + 0.1 * x + 0.2 * 500.0 / 1000.0
  got = denoiser.bind(params, jnp.zeros((8, 3)))(x, jnp.full((8,), 0.5))  # zero labels: Dense adds 0
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6)
  with pytest.raises(ValueError, match='known weightings: eps, none'):
    registry.get('loss', 'soft')(weighting='snr')


def test_registered_samplers_use_the_precond_schedule_and_per_sample_seeds():
  schedule = problem_schedule(*problem_stats())
  p = registry.get('precond', 'soft')(**schedule.to_dict())
  for name in ('momentum', 'soft_naive'):
    sampler = samplers.get_sampler(name)
    run = jax.jit(lambda lat, k: sampler(wiggly_model, lat, k, precond=p, num_steps=4))
    seeds = [7, 8, 9, 10]
    keys = samplers.seed_keys(seeds)
    lat = samplers.latents(keys, (H, W, 1))
    together = np.asarray(run(lat, keys))
    apart = np.concatenate([np.asarray(run(lat[:2], keys[:2])), np.asarray(run(lat[2:], keys[2:]))])
    np.testing.assert_allclose(together, apart, rtol=1e-6, atol=1e-6)
    assert together.shape == (4, H, W, 1) and np.all(np.isfinite(together))
  with pytest.raises(ValueError, match='Soft Diffusion model'):
    samplers.get_sampler('momentum')(wiggly_model, lat, keys, precond=precond.make_edm(),
                                     num_steps=4)


def test_soft_configs_build_their_parts():
  from configs import soft
  from diffjax import build
  c = soft.get_config('digits')
  p = build.build_precond(c)
  assert isinstance(p, C.SoftPreconditioning) and p.schedule.corruption == 'blur'
  assert c.sample.sampler == 'momentum' and c.sample.num_steps == p.schedule.num_levels - 1
  assert p.schedule.p1_mean is not None  # the digits levels file is checked in
  assert build.build_loss(c).weighting == 'eps'
  for arg, corruption in (('cifar10,mask', 'mask'), ('celeba64,identity', 'identity')):
    c = soft.get_config(arg)
    assert build.build_precond(c).schedule.corruption == corruption
  assert build.build_loss(soft.get_config('digits,unweighted')).weighting == 'none'
  with pytest.raises(ValueError, match='known presets'):
    soft.get_config('mnist')
