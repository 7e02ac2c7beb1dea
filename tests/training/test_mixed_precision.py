"""Mixed precision (--config.train.compute_dtype): float32 state, bf16/fp16 compute, loss scaling.

References: the float32 run of the same steps (bf16 must track its loss within bf16's rounding
noise), and the loss-scaling rule of Micikevicius et al. 2018 §3.2 worked by hand (halve and skip
on overflow, double after N finite steps). The 200-step loss curves are in
benchmarks/mixed_precision.py (NOTES.md); this file keeps to a few steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import edm as edm_configs
from diffjax import build
from diffjax import state as state_lib
from diffjax.training import step as step_lib


def _config(dtype):
  c = edm_configs.get_config('tiny')
  c.train.batch_size = 8
  c.train.compute_dtype = dtype
  c.augment.p = 0.0
  # Smaller than the tiny preset (one level, no attention): two train-step compiles stay seconds.
  c.model.kwargs.update(model_channels=8, channel_mult=(1,), attn_resolutions=())
  return c


def _dtypes(tree):
  return {jnp.dtype(a.dtype).name for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype,
                                                                                   jnp.floating)}


def test_loss_scale_halves_and_skips_on_overflow_and_doubles_after_n_finite_steps():
  tx = state_lib.dynamic_loss_scale(optax.sgd(0.1), init_scale=8.0, period=3)
  params = {'w': jnp.ones(3)}
  s = tx.init(params)
  assert float(state_lib.loss_scale(s)) == 8.0
  bad = {'w': jnp.array([1.0, jnp.inf, 0.0])}
  u, s = tx.update(bad, s, params)
  assert float(s.scale) == 4.0 and int(s.good_steps) == 0
  np.testing.assert_array_equal(np.asarray(optax.apply_updates(params, u)['w']), np.ones(3))
  good = {'w': jnp.ones(3)}
  for n in range(1, 4):
    u, s = tx.update(good, s, params)
    np.testing.assert_allclose(np.asarray(u['w']), -0.1 * np.ones(3))
    # Doubles on the third finite step in a row, and the count starts again.
    assert (float(s.scale), int(s.good_steps)) == ((4.0, n) if n < 3 else (8.0, 0))
  u, s = tx.update({'w': jnp.array([jnp.nan, 0.0, 0.0])}, s, params)
  assert float(s.scale) == 4.0
  assert state_lib.loss_scale(optax.sgd(0.1).init(params)) is None


def test_overflowing_step_keeps_params_and_is_not_a_divergence():
  # loss·S overflows float32 (1e35 · 2^15 > 3.4e38) while the loss itself is finite.
  tx = state_lib.dynamic_loss_scale(optax.sgd(1e-36), init_scale=2.0**15, period=10)
  loss = lambda params, batch, key: (1e35 * jnp.sum(params['w'] * batch), {})
  params = {'w': jnp.ones(4)}
  state = state_lib.create_train_state(params, tx)
  step = jax.jit(step_lib.make_train_step(loss, tx, batch_size=1, ema_halflife_images=10.0))
  new, m = step(state, jnp.ones(4), jax.random.key(0))
  assert bool(m['finite']) and not bool(m['grads_finite'])
  assert float(m['loss_scale']) == 2.0**15 and float(state_lib.loss_scale(new.opt_state)) == 2.0**14
  np.testing.assert_array_equal(np.asarray(new.params['w']), np.ones(4))
  # A small enough scale passes: 1e35 · 2^11 < 3.4e38 after four halvings.
  for _ in range(4):
    new, m = step(new, jnp.ones(4), jax.random.key(0))
  assert bool(m['grads_finite']) and float(state_lib.loss_scale(new.opt_state)) == 2.0**11
  np.testing.assert_allclose(np.asarray(new.params['w']), 0.9 * np.ones(4), rtol=1e-5)


def test_float16_builds_a_scaled_float32_state():
  config = _config('float16')
  spec = build.dataset_spec(config)
  net = build.build_network(config, spec)
  assert net.dtype == jnp.float16
  tx = build.build_optimizer(config)
  shapes = jax.eval_shape(lambda k: state_lib.create_train_state(
      build.init_params(net, spec, k), tx), jax.random.key(0))
  assert isinstance(shapes.opt_state, state_lib.LossScaleState)
  assert _dtypes(shapes.params) == _dtypes(shapes.ema_params) == {'float32'}
  assert _dtypes(shapes.opt_state) == {'float32'}
  with pytest.raises(ValueError, match="Unknown compute dtype 'fp8'.*known: float32, bfloat16"):
    build.build_network(_config('fp8'), spec)


def test_bfloat16_tracks_the_float32_loss(tmp_path, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path))
  from diffjax import data
  it = data.make_iterator('digits', global_batch_size=8, seed=0, data_dir=str(tmp_path))
  batches = [next(it) for _ in range(4)]
  losses, states = {}, {}
  for dtype in ('float32', 'bfloat16'):
    config = _config(dtype)
    spec = build.dataset_spec(config)
    denoiser = build.build_denoiser(config, spec)
    tx = build.build_optimizer(config)
    step = jax.jit(step_lib.make_train_step(build.build_objective(config, spec, denoiser), tx,
                                            batch_size=8, ema_halflife_images=100.0))
    state = state_lib.create_train_state(
        build.init_params(denoiser.network, spec, jax.random.key(0)), tx)
    losses[dtype] = []
    for b in batches:
      state, m = step(state, b, jax.random.key(1))
      losses[dtype].append(float(m['loss']))
    states[dtype] = state
  f32, bf16 = np.array(losses['float32']), np.array(losses['bfloat16'])
  assert np.all(np.isfinite(bf16))
  # Same noise, same init: bf16's 8-bit mantissa (relative rounding 2^-9) moves each loss by far
  # less than the loss changes from step to step.
  np.testing.assert_allclose(bf16, f32, rtol=0.05)
  assert _dtypes(states['bfloat16'].params) == _dtypes(states['bfloat16'].opt_state) == {'float32'}
  assert _dtypes(states['bfloat16'].ema_params) == {'float32'}
