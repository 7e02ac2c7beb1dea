"""The EDM2 recipe against closed forms: the uncertainty loss (Eq. 21), its optimum, the
learning-rate decay, Adam β2 and the forced-weight-normalization link of the optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import edm2 as edm2_configs
from diffjax import build, registry
from diffjax import state as state_lib
from diffjax.objectives import edm as edm_losses
from diffjax.objectives import edm2 as edm2_losses

SHAPE = (6, 4, 4, 2)


def _toy_raw(u):
  """A denoiser D = 0.7·x whose extra channel is the per-example log-variance u [B]."""
  def raw(x, sigma):
    del sigma
    return 0.7 * x, jnp.broadcast_to(u[:, None, None, None], x.shape[:3] + (1,))
  return raw


def test_uncertainty_loss_equals_closed_form():
  rng = np.random.default_rng(0)
  y = jnp.asarray(rng.uniform(-1, 1, SHAPE), jnp.float32)
  u = jnp.asarray(rng.normal(0, 1, SHAPE[0]), jnp.float32)
  sigma = jnp.asarray([0.01, 0.1, 0.5, 1.0, 5.0, 50.0], jnp.float32)
  key = jax.random.key(3)
  value, aux = edm2_losses.uncertainty_loss(_toy_raw(u), y, key, p_mean=-0.8, p_std=1.6,
                                            sigma_data=0.5, sigma=sigma)
  # The noise is N(0, σ²) from the key's second half, as objectives.edm.denoising_loss draws it.
  n = np.asarray(jax.random.normal(jax.random.split(key)[1], SHAPE))
  n = n * np.asarray(sigma)[:, None, None, None]
  yy, s, uu = np.asarray(y, np.float64), np.asarray(sigma, np.float64), np.asarray(u, np.float64)
  err = np.sum((0.7 * (yy + n) - yy)**2, axis=(1, 2, 3))
  lam = (s**2 + 0.25) / (s * 0.5)**2
  expected = lam / np.exp(uu) * err + np.prod(SHAPE[1:]) * uu  # Σ over pixels of Eq. 21.
  np.testing.assert_allclose(aux['per_example'], expected, rtol=1e-5)
  np.testing.assert_allclose(value, expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux['logvar'], u)


def test_zero_uncertainty_is_the_edm_loss():
  """With u ≡ 0 the EDM2 loss is EDM's Eq. 8 with the same p(σ), λ(σ) and draws."""
  y = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, SHAPE), jnp.float32)
  key = jax.random.key(7)
  raw = _toy_raw(jnp.zeros(SHAPE[0]))
  value, aux = edm2_losses.uncertainty_loss(raw, y, key, p_mean=-0.8, p_std=1.6, sigma_data=0.5)
  edm = edm_losses.make_edm(p_mean=-0.8, p_std=1.6, sigma_data=0.5)
  ref, ref_aux = edm_losses.denoising_loss(lambda x, s: raw(x, s)[0], edm, y, key)
  np.testing.assert_allclose(aux['sigma'], ref_aux['sigma'])
  np.testing.assert_allclose(value, ref, rtol=1e-6)


def test_optimal_uncertainty_is_the_per_pixel_weighted_error():
  """∂L/∂u = 0 at e^u = λ(σ)·‖D − y‖²/N: u learns the per-pixel log-variance, as in EDM2."""
  rng = np.random.default_rng(2)
  y = jnp.asarray(rng.uniform(-1, 1, SHAPE), jnp.float32)
  sigma = jnp.full((SHAPE[0],), 0.8, jnp.float32)
  key = jax.random.key(0)
  loss = lambda u: edm2_losses.uncertainty_loss(_toy_raw(u), y, key, p_mean=0.0, p_std=1.0,
                                                sigma_data=0.5, sigma=sigma)[0]
  n = np.asarray(jax.random.normal(jax.random.split(key)[1], SHAPE)) * 0.8
  err = np.sum((0.7 * (np.asarray(y) + n) - np.asarray(y))**2, axis=(1, 2, 3))
  lam = (0.64 + 0.25) / (0.8 * 0.5)**2
  u_star = jnp.asarray(np.log(lam * err / np.prod(SHAPE[1:])), jnp.float32)
  np.testing.assert_allclose(jax.grad(loss)(u_star), 0, atol=1e-4)
  assert float(jnp.max(jnp.abs(jax.grad(loss)(u_star + 0.5)))) > 0.1


def test_loss_is_registered_and_needs_the_uncertainty_channel():
  loss = registry.get('loss', 'edm2')(p_mean=-0.4, p_std=1.0)
  assert (loss.p_mean, loss.p_std, loss.sigma_data) == (-0.4, 1.0, 0.5)
  no_extra = lambda x, s: (x, x[..., :0])
  with pytest.raises(ValueError, match='log-variance'):
    edm2_losses.uncertainty_loss(no_extra, jnp.zeros(SHAPE), jax.random.key(0), p_mean=0.0,
                                 p_std=1.0, sigma_data=0.5)


def test_learning_rate_decay():
  """lr = ref_lr · min(t/t_ramp, 1) / sqrt(max(t/t_ref, 1)) (EDM2 §2.5), t in images."""
  steps = np.array([0, 1, 5, 10, 40, 100, 1000])
  lr = state_lib.learning_rate(steps, 0.01, rampup_images=64 * 10, batch_size=64,
                               decay_images=64 * 40)
  t = steps * 64.0
  expected = 0.01 * np.minimum(t / 640, 1) / np.sqrt(np.maximum(t / 2560, 1))
  np.testing.assert_allclose(lr, expected, rtol=1e-6)
  # No decay configured: EDM's schedule unchanged.
  np.testing.assert_allclose(state_lib.learning_rate(steps, 0.01, 640, 64),
                             0.01 * np.minimum(t / 640, 1), rtol=1e-6)


def test_config_optimizer_is_edm2_adam():
  """build_optimizer on the edm2 config: Adam β = (0.9, 0.99) with the decaying schedule, then the
  projection; checked against Adam written out by hand on a parameter it leaves alone."""
  config = edm2_configs.get_config('digits')
  assert config.optim.b2 == 0.99 and config.loss.name == 'edm2'
  o, batch = config.optim, config.train.batch_size
  tx = build.build_optimizer(config)
  # 'bias' is no MPConv weight, so the projection leaves it to Adam.
  params = {'bias': jnp.float32(0.3)}
  opt = tx.init(params)
  m = v = 0.0
  w = 0.3
  for step, g in enumerate([1.0, -2.0, 0.5, 3.0, -1.0]):
    updates, opt = tx.update({'bias': jnp.float32(g)}, opt, params)
    params = optax.apply_updates(params, updates)
    m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
    m_hat, v_hat = m / (1 - 0.9**(step + 1)), v / (1 - 0.99**(step + 1))
    lr = o.lr * min(step * batch / o.lr_rampup_images, 1) / np.sqrt(
        max(step * batch / o.lr_decay_images, 1))
    w -= lr * m_hat / (np.sqrt(v_hat) + o.eps)
    np.testing.assert_allclose(params['bias'], w, rtol=1e-5)


def test_projection_link_keeps_params_on_the_constraint():
  """project_updates(P) after Adam stores P(w + Adam's update); plain Adam leaves the sphere."""
  project = lambda p: jax.tree.map(lambda a: a / jnp.linalg.norm(a), p)
  plain = optax.adam(0.1)  # Adam's update does not depend on the params: one state serves both.
  projected = optax.chain(optax.adam(0.1), state_lib.project_updates(project))
  w = {'weight': jnp.asarray([0.6, 0.8, 0.0], jnp.float32)}
  s_plain, s_proj = plain.init(w), projected.init(w)
  w_plain = w_proj = w
  for g in ([1.0, -0.5, 2.0], [0.3, 0.2, -1.0], [-1.0, 1.0, 0.5]):
    g = {'weight': jnp.asarray(g, jnp.float32)}
    u_adam, s_plain = plain.update(g, s_plain)
    u_proj, s_proj = projected.update(g, s_proj, w_proj)
    expected = project(optax.apply_updates(w_proj, u_adam))
    w_proj = optax.apply_updates(w_proj, u_proj)
    np.testing.assert_allclose(w_proj['weight'], expected['weight'], atol=1e-7)
    np.testing.assert_allclose(jnp.linalg.norm(w_proj['weight']), 1, rtol=1e-6)
    w_plain = optax.apply_updates(w_plain, u_adam)
  assert abs(float(jnp.linalg.norm(w_plain['weight'])) - 1) > 1e-3  # Measured: 5.8e-3.


@pytest.mark.parametrize('arg', edm2_configs.PRESETS + ('digits,uncond',))
def test_every_edm2_preset_builds(arg):
  config = edm2_configs.get_config(arg)
  assert isinstance(build.build_loss(config), edm2_losses.EDM2Loss)
  build.build_optimizer(config)
  build.sampler_fn(config, build.build_precond(config))
  assert registry.get('network_preset', config.model.preset)['network'] == 'edm2_unet'
  assert config.optim.b2 == 0.99 and tuple(config.train.phema_stds) == (0.05, 0.10)
  if arg.startswith('img64-'):  # train_edm2.py: batch 2048, t_ref 35k batches, P_mean/P_std.
    assert config.optim.lr_decay_images == 35000 * 2048 and config.train.batch_size == 2048
    assert (config.loss.kwargs.p_mean, config.loss.kwargs.p_std) == (-0.8, 1.6)
