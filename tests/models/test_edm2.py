"""Tests of the EDM2 magnitude-preserving U-Net against NVlabs/edm2's own code and closed forms.

The goldens (tests/golden/edm2_*) come from scripts/make_edm2_golden.py, which runs EDM2's PyTorch
network; these tests need no torch.
"""

import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import edm2 as edm2_configs
from diffjax import build, ema
from diffjax import precond as precond_lib
from diffjax import state as state_lib
from diffjax.convert import edm2 as convert_edm2
from diffjax.models import create_network, edm2
from diffjax.training import step as step_lib

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'golden')


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


def _abstract_params(net, batch=1):
  r = net.img_resolution
  labels = jnp.zeros((batch, net.label_dim)) if net.label_dim else None
  variables = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((batch, r, r, net.in_channels)),
                             jnp.zeros((batch,)), labels)
  assert set(variables) == {'params'}  # Fourier frequencies are constants, not variables.
  return variables['params']


def test_parameter_counts_match_edm2():
  with open(os.path.join(GOLDEN, 'edm2_param_counts.json')) as f:
    golden = json.load(f)
  for preset, expected in golden['counts'].items():
    overrides = {} if preset == 'edm2-digits' else {'label_dim': golden['label_dim_img64']}
    assert _count(_abstract_params(create_network(preset, **overrides))) == expected, preset


def _from_edm2(tensors):
  """EDM2 Precond state_dict names and PyTorch layouts → this network's params tree (the mapping
  diffjax.convert uses for EDM2 snapshots)."""
  return convert_edm2.params_from_state_dict(tensors)


def test_output_matches_edm2_precond():
  """D(x; σ) and u(σ) of EDM2's Precond on random weights and gains, through diffjax's Denoiser."""
  g = np.load(os.path.join(GOLDEN, 'edm2_output.npz'))
  cfg = json.loads(str(g['config']))
  net = edm2.EDM2UNet(
      img_resolution=cfg['img_resolution'], in_channels=cfg['img_channels'],
      out_channels=cfg['img_channels'], label_dim=cfg['label_dim'],
      model_channels=cfg['model_channels'], channel_mult=tuple(cfg['channel_mult']),
      num_blocks=cfg['num_blocks'], attn_resolutions=tuple(cfg['attn_resolutions']),
      channels_per_head=cfg['channels_per_head'], logvar_channels=cfg['logvar_channels'])
  params = _from_edm2({k[len('param/'):]: g[k] for k in g.files if k.startswith('param/')})
  # Every parameter of the network is mapped, with its shape: the tree is EDM2's one to one.
  expected = jax.tree.map(lambda a: a.shape, _abstract_params(net))
  assert jax.tree.map(lambda a: a.shape, params) == expected
  denoiser = precond_lib.Denoiser(net, precond_lib.get_preconditioning('edm', sigma_data=0.5))
  d, extra = jax.jit(denoiser.raw)(params, g['x'], g['sigma'], g['labels'])
  scale = np.abs(g['denoised']).max()
  np.testing.assert_allclose(np.asarray(d), g['denoised'], atol=2e-5 * scale, rtol=0)
  # u is one extra channel, constant over the pixels.
  assert extra.shape == g['x'].shape[:3] + (1,)
  np.testing.assert_allclose(np.asarray(extra[..., 0]),
                             np.broadcast_to(g['logvar'][:, None, None], extra.shape[:3]),
                             rtol=1e-5, atol=1e-5)


def test_magnitude_preserving_operations():
  """Closed forms: unit-RMS inputs give unit-RMS outputs; mp_cat splits the energy (1−t)² : t²."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((200_000,)), jnp.float32)
  assert abs(float(jnp.sqrt(jnp.mean(edm2.mp_silu(x)**2))) - 1) < 0.01
  a = jnp.asarray(rng.standard_normal((4096, 24)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((4096, 8)), jnp.float32)
  for t in (0.3, 0.5, 0.8):
    cat = edm2.mp_cat(a, b, t)
    energy = jnp.mean(jnp.sum(cat**2, -1))
    assert abs(float(energy) / 32 - 1) < 0.02
    share_a = float(jnp.mean(jnp.sum(cat[:, :24]**2, -1)) / energy)
    assert abs(share_a - (1 - t)**2 / ((1 - t)**2 + t**2)) < 0.01
    s = edm2.mp_sum(a[:, :8], b, t)
    assert abs(float(jnp.sqrt(jnp.mean(s**2))) - 1) < 0.02
    np.testing.assert_allclose(s, ((1 - t) * a[:, :8] + t * b) / math.hypot(1 - t, t), rtol=1e-5,
                               atol=1e-6)
  w = jnp.asarray(3 * rng.standard_normal((3, 3, 5, 7)), jnp.float32)
  rms = jnp.sqrt(jnp.mean(edm2.normalize_weight(w)**2, axis=(0, 1, 2)))
  raw_rms = np.sqrt(np.mean(np.asarray(w)**2, (0, 1, 2)))
  np.testing.assert_allclose(rms, raw_rms / (edm2.WEIGHT_EPS + raw_rms), rtol=1e-6)
  feats = edm2.MPFourier(4096).apply({}, jnp.linspace(-3, 3, 64))
  assert abs(float(jnp.sqrt(jnp.mean(feats**2))) - 1) < 0.03


def test_uncertainty_channel_and_errors():
  net = create_network('edm2-tiny')
  r = net.img_resolution
  out = jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), jnp.zeros((2, r, r, 1)),
                                                     jnp.zeros((2,)))[0])
  assert out.shape == (2, r, r, 2)
  plain = create_network('edm2-tiny', logvar_channels=0)
  out = jax.eval_shape(lambda: plain.init_with_output(jax.random.key(0), jnp.zeros((2, r, r, 1)),
                                                       jnp.zeros((2,)))[0])
  assert out.shape == (2, r, r, 1)
  with pytest.raises(ValueError, match='augment'):
    _abstract_params(create_network('edm2-tiny', augment_dim=9))
  with pytest.raises(ValueError, match='NHWC'):
    jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((2, 4, 4, 1)), jnp.zeros((2,)))


def _rms_per_output(w):
  return np.sqrt(np.mean(np.square(np.asarray(w)), axis=tuple(range(w.ndim - 1))))


def _weights(params):
  """{path: leaf} of every MPConv weight."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(p): v for p, v in flat if p[-1].key == 'weight'}


def test_forced_weight_normalization_through_training_steps():
  """The stored weights stay at unit magnitude per output channel through real train steps.

  The projection is the optimizer's last link, which build.build_optimizer adds for EDM2UNet, so
  this runs the config's optimizer through training.step.make_train_step unchanged. Repeated
  projection settles at RMS 1 − ε. Without it, Adam steps of 0.05 per element would move the RMS
  by ~1e-3 (tests/objectives/test_edm2_loss.py checks the link itself against plain Adam).
  """
  config = edm2_configs.get_config('tiny')
  config.optim.lr, config.optim.lr_rampup_images = 0.05, 0.0  # Large steps: drift would show.
  spec = types.SimpleNamespace(resolution=8, channels=1, num_classes=10)
  denoiser = build.build_denoiser(config, spec)
  objective = build.build_objective(config, spec, denoiser)
  batch_size = 8
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.uniform(-1, 1, (batch_size, 8, 8, 1)), jnp.float32),
           'label': jnp.asarray(rng.integers(0, 10, batch_size))}
  params0 = build.init_params(denoiser.network, spec, jax.random.key(0))
  # Drawn unit-magnitude up to ε/RMS of the draw (EDM2 projects its N(0, 1) draw the same way).
  for w in _weights(params0).values():
    np.testing.assert_allclose(_rms_per_output(w), 1, atol=1e-3)

  tx = build.build_optimizer(config)
  stds = tuple(config.train.phema_stds)  # The same step also tracks the post-hoc EMA profiles.
  step = jax.jit(step_lib.make_train_step(objective, tx, batch_size=batch_size,
                                          ema_halflife_images=100.0, phema_stds=stds))
  state = state_lib.create_train_state(params0, tx,
                                       step_lib.initial_extra(objective, params0, stds))
  profiles = {s: params0 for s in stds}
  for k in range(1, 4):  # Step 0 has lr 0 (the ramp starts at 0 images); the others move.
    state, metrics = step(state, batch, jax.random.key(1))
    assert bool(metrics['finite'])
    for path, w in _weights(state.params).items():
      np.testing.assert_allclose(_rms_per_output(w), 1 - edm2.WEIGHT_EPS, atol=2e-6, err_msg=path)
    for s in stds:  # EDM2 Eq. 127 by hand: β_k = (1 − 1/k)^(γ+1), t = k batches after step k.
      beta = (1 - 1 / k)**(ema.std_to_exp(s) + 1)
      profiles[s] = jax.tree.map(lambda e, p, b=beta: b * e + (1 - b) * p, profiles[s],
                                 state.params)
      tracked = state.extra[step_lib.PHEMA][ema.profile_key(s)]
      for a, b in zip(jax.tree.leaves(tracked), jax.tree.leaves(profiles[s])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(_weights(state.params).values(), _weights(params0).values()))
  assert moved > 0.05  # The weights did change direction.
  assert float(state.params['out_gain']) != 0  # Gains are trained, not projected.
