"""Tests of diffjax.models: published parameter counts, shapes, precision, dropout and layer maths."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import registry
from diffjax.models import SongUNet, create_network, embeddings, layers

B = 2


def _inputs(net, batch=B, seed=0):
  """Random (x, noise_labels, class_labels, augment_labels) for `net`."""
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  r = net.img_resolution
  x = jax.random.normal(k[0], (batch, r, r, net.in_channels))
  noise = jax.random.normal(k[1], (batch,))
  labels = (
    jax.nn.one_hot(jax.random.randint(k[2], (batch,), 0, net.label_dim), net.label_dim)
    if net.label_dim
    else None
  )
  augment = jax.random.normal(k[3], (batch, net.augment_dim)) if net.augment_dim else None
  return x, noise, labels, augment


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize(
  'preset, overrides, expected',
  [
    ('ddpmpp_cifar10', dict(label_dim=10), 55_735_299),
    ('ncsnpp_cifar10', dict(label_dim=10), 56_400_643),
    ('ddpmpp_64', dict(), 61_805_571),
  ],
)
def test_parameter_counts_match_edm(preset, overrides, expected):
  net = create_network(preset, **overrides)
  variables = jax.eval_shape(net.init, jax.random.PRNGKey(0), *_inputs(net, batch=1))
  assert set(variables) == {'params'}  # Fourier frequencies are constants, not variables.
  assert _count(variables['params']) == expected


@pytest.mark.parametrize(
  'encoder, decoder, embedding, taps',
  [
    ('skip', 'skip', 'fourier', (1, 3, 3, 1)),
    ('residual', 'standard', 'positional', (1, 1)),
  ],
)
def test_encoder_decoder_variants_trace(encoder, decoder, embedding, taps):
  net = create_network(
    'tiny',
    encoder_type=encoder,
    decoder_type=decoder,
    embedding_type=embedding,
    resample_filter=taps,
    channel_mult=(1, 2, 2),
  )
  x, noise, _, _ = _inputs(net)
  variables = jax.eval_shape(net.init, jax.random.PRNGKey(0), x, noise)
  out = jax.eval_shape(net.apply, variables, x, noise)
  assert out.shape == x.shape[:3] + (net.out_channels,) and out.dtype == jnp.float32


# The tests below share one conditional tiny net. XLA on CPU compiles every random draw of `init`
# separately (tens of seconds for the ~150 parameter arrays of tiny on 2 cores), so `init` is compiled
# only in `test_fresh_init`, on a smaller net, and the others use parameters filled from numpy.


@pytest.fixture(scope='module')
def tiny():
  """A conditional tiny net with augmentation labels and dropout, its inputs and random parameters.

  The parameters are random (not a fresh init) because a fresh net's near-zero (1e-5) output layers
  would hide almost every effect of dropout and conditioning behind float32 round-off.
  """
  net = create_network(
    'tiny', label_dim=10, augment_dim=9, in_channels=3, out_channels=2, dropout=0.1
  )
  inputs = _inputs(net)
  shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), *inputs)
  rng = np.random.default_rng(3)

  def fill(path, leaf):
    noise = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
    return jnp.asarray(noise + (1.0 if path[-1].key == 'scale' else 0.0))

  return net, inputs, jax.tree_util.tree_map_with_path(fill, shapes)


_APPLY = {}


def _apply(net, params, inputs, train=False, key=None, labels=None):
  """Applies `net` with one jitted function per module and mode, so repeated calls compile once."""
  x, noise, class_labels, augment = inputs
  labels = class_labels if labels is None else labels
  fn_key = (id(net), train)
  if fn_key not in _APPLY:
    _APPLY[fn_key] = (
      net,
      jax.jit(
        lambda p, x, n, c, a, rng: net.apply(
          p, x, n, c, a, train=train, rngs={'dropout': rng} if train else {}
        )
      ),
    )
  return _APPLY[fn_key][1](params, x, noise, labels, augment, key)


def test_fresh_init():
  # One level and no attention: compiling `init` costs ~0.1 s of XLA time per parameter on CPU.
  net = create_network('tiny', channel_mult=(1,), attn_resolutions=(), label_dim=10)
  inputs = _inputs(net)
  fresh = jax.jit(net.init)(jax.random.PRNGKey(0), *inputs)
  shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), *inputs)
  assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(shapes)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(fresh))
  # EDM's init: zero biases, unit GroupNorm scales, a near-zero (1e-5-scaled) output layer.
  params = fresh['params']
  head = params['dec_8x8_aux_conv']
  assert np.all(head['bias'] == 0) and 0 < np.abs(head['kernel']).max() < 1e-5
  assert np.all(params['dec_8x8_aux_norm']['scale'] == 1)
  bound = math.sqrt(6 / (10 + 16))  # map_label: Xavier-uniform, fans 10 and 16.
  assert 0.8 * bound < np.abs(params['map_label']['kernel']).max() <= bound
  out = _apply(net, fresh, inputs)
  assert out.shape == (B, 8, 8, 1) and out.dtype == jnp.float32
  assert 0 < np.abs(out).max() < 1e-3


def test_bf16_compute_keeps_float32_params_and_output(tiny):
  net, inputs, params = tiny
  net16 = net.clone(dtype=jnp.bfloat16)
  shapes16 = jax.eval_shape(net16.init, jax.random.PRNGKey(0), *inputs)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes16))
  out16 = _apply(net16, params, inputs)
  out32 = _apply(net, params, inputs)
  assert out16.dtype == jnp.float32 and out16.shape == out32.shape
  assert np.all(np.isfinite(out16))
  assert np.abs(out16 - out32).max() < 0.05 * np.abs(out32).max()


def test_label_dropout(tiny):
  net, inputs, params = tiny
  other = jax.nn.one_hot((jnp.argmax(inputs[2], -1) + 1) % 10, 10)
  key = jax.random.PRNGKey(1)  # Same key: the same dropout masks for both labels.
  always = net.clone(label_dropout=1.0)
  a = _apply(always, params, inputs, train=True, key=key)
  b = _apply(always, params, inputs, train=True, key=key, labels=other)
  np.testing.assert_array_equal(a, b)

  assert net.label_dropout == 0
  a = _apply(net, params, inputs, train=True, key=key)
  b = _apply(net, params, inputs, train=True, key=key, labels=other)
  assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()


def test_dropout_is_random_in_training_and_deterministic_in_eval(tiny):
  net, inputs, params = tiny
  a = _apply(net, params, inputs, train=True, key=jax.random.PRNGKey(1))
  b = _apply(net, params, inputs, train=True, key=jax.random.PRNGKey(2))
  again = _apply(net, params, inputs, train=True, key=jax.random.PRNGKey(1))
  assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()
  np.testing.assert_array_equal(a, again)
  np.testing.assert_array_equal(_apply(net, params, inputs), _apply(net, params, inputs))


def test_bad_inputs_fail_with_a_sentence(tiny):
  net, inputs, params = tiny
  x, noise, labels, augment = inputs
  with pytest.raises(ValueError, match='NHWC'):
    net.apply(params, jnp.moveaxis(x, -1, 1), noise, labels, augment)
  with pytest.raises(ValueError, match='one-hot'):
    net.apply(params, x, noise, jnp.argmax(labels, -1), augment)


# ---------------------------------------------------------------------------------------------------
# Presets and registry.


def test_presets_are_registered_and_overridable():
  assert registry.get('network', 'song_unet') is SongUNet
  for name in ('ddpmpp_cifar10', 'ncsnpp_cifar10', 'ddpmpp_64', 'ncsnpp_64', 'tiny', 'digits'):
    assert name in registry.names('network_preset')
  net = create_network('ncsnpp_cifar10', img_resolution=64, channel_mult=[1, 2, 2, 2])
  assert net.img_resolution == 64 and net.channel_mult == (1, 2, 2, 2)
  assert net.embedding_type == 'fourier' and net.encoder_type == 'residual'
  with pytest.raises(registry.UnknownNameError, match='ddpmpp_cifar10'):
    create_network('ddpmpp_cifar')
  with pytest.raises(ValueError, match='no field'):
    create_network('tiny', channels=3)


def test_digits_preset_size():
  net = create_network('digits')
  variables = jax.eval_shape(net.init, jax.random.PRNGKey(0), *_inputs(net, batch=1))
  assert 0.5e6 < _count(variables) < 1.1e6


# ---------------------------------------------------------------------------------------------------
# Layers against direct numpy computations.


def _np_downsample(x, taps):
  """y[i, j] = Σ_ab f[a, b] · x_pad[2i + a, 2j + b], zero padding (k - 1) // 2."""
  f = np.outer(taps, taps) / np.sum(taps) ** 2
  k = f.shape[0]
  p = (k - 1) // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  n = (xp.shape[1] - k) // 2 + 1
  y = np.zeros((x.shape[0], n, n, x.shape[3]))
  for i in range(n):
    for j in range(n):
      y[:, i, j] = np.einsum('ab,nabc->nc', f, xp[:, 2 * i : 2 * i + k, 2 * j : 2 * j + k])
  return y


def _np_upsample(x, taps):
  """Transposed conv by definition: scatter 4·f·x[i, j] at (2i + a, 2j + b), then crop (k - 1) // 2."""
  f = 4 * np.outer(taps, taps) / np.sum(taps) ** 2
  k = f.shape[0]
  p = (k - 1) // 2
  h = x.shape[1]
  full = np.zeros((x.shape[0], 2 * (h - 1) + k, 2 * (h - 1) + k, x.shape[3]))
  for i in range(h):
    for j in range(h):
      full[:, 2 * i : 2 * i + k, 2 * j : 2 * j + k] += (
        f[None, :, :, None] * x[:, i, j][:, None, None, :]
      )
  return full[:, p : full.shape[1] - p, p : full.shape[2] - p]


@pytest.mark.parametrize('taps', [(1, 1), (1, 3, 3, 1)])
def test_resampling_matches_numpy(taps):
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
  down = layers.downsample_2d(jnp.asarray(x), taps)
  up = layers.upsample_2d(jnp.asarray(x), taps)
  assert down.shape == (2, 4, 4, 3) and up.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(down, _np_downsample(x, taps), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(up, _np_upsample(x, taps), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('taps', [(1, 1), (1, 3, 3, 1)])
def test_resampling_keeps_a_constant_image_constant(taps):
  x = jnp.full((1, 8, 8, 2), 0.7)
  # Zero padding (as EDM) dims the outermost pixel of the FIR filter; the interior must be exact.
  border = 0 if len(taps) == 2 else 1
  inner = slice(border, -border or None)
  np.testing.assert_allclose(layers.downsample_2d(x, taps)[:, inner, inner], 0.7, rtol=1e-6)
  np.testing.assert_allclose(layers.upsample_2d(x, taps)[:, inner, inner], 0.7, rtol=1e-6)


def test_conv_resampling_shapes():
  x = jnp.ones((1, 8, 8, 4))
  for kw, size in ((dict(up=True), 16), (dict(down=True), 4), (dict(), 8)):
    for fused in (False, True):
      conv = layers.Conv2d(5, 3, resample_filter=(1, 3, 3, 1), fused_resample=fused, **kw)
      out, _ = conv.init_with_output(jax.random.PRNGKey(0), x)
      assert out.shape == (1, size, size, 5)


def test_positional_embedding_formula():
  x = np.array([0.0, 0.3, -2.5, 999.0], np.float32)
  for endpoint in (False, True):
    got = embeddings.positional_embedding(jnp.asarray(x), 8, endpoint=endpoint)
    d = 4 - 1 if endpoint else 4
    freqs = np.array([10000.0 ** (-i / d) for i in range(4)])
    arg = x[:, None].astype(np.float64) * freqs
    np.testing.assert_allclose(got, np.concatenate([np.cos(arg), np.sin(arg)], 1), atol=2e-4)


def test_fourier_embedding_has_fixed_frequencies_and_no_parameters():
  emb = embeddings.FourierEmbedding(256)
  x = jnp.array([0.1, -0.4])
  variables = emb.init(jax.random.PRNGKey(0), x)
  assert not jax.tree_util.tree_leaves(variables)
  freqs = embeddings.fourier_frequencies(256)
  assert abs(np.std(freqs) - 16) < 2.5
  arg = 2 * np.pi * np.asarray(x, np.float64)[:, None] * freqs
  np.testing.assert_allclose(
    emb.apply({}, x), np.concatenate([np.cos(arg), np.sin(arg)], 1), atol=1e-4
  )


def test_initializer_statistics():
  params = layers.Conv2d(256, 3, init_spec=layers.Init('xavier_uniform')).init(
    jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 128))
  )['params']
  fan_in, fan_out = 128 * 9, 256 * 9
  bound = math.sqrt(6 / (fan_in + fan_out))
  w = np.asarray(params['kernel'])
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
  assert abs(w.std() - bound / math.sqrt(3)) < 0.02 * bound
  assert np.all(params['bias'] == 0)
  w = layers.Linear(64, init_spec=layers.Init('kaiming_normal', weight=1e-5)).init(
    jax.random.PRNGKey(0), jnp.zeros((1, 1024))
  )['params']['kernel']
  assert abs(float(w.std()) - 1e-5 / 32) < 0.05 * 1e-5 / 32


def test_group_norm_matches_numpy_and_edm_group_rule():
  assert (
    layers.group_count(256) == 32 and layers.group_count(64) == 16 and layers.group_count(3) == 1
  )
  with pytest.raises(ValueError, match='divide'):
    layers.group_count(144)
  x = np.random.default_rng(1).standard_normal((2, 4, 4, 16)).astype(np.float32) * 3 + 1
  got = layers.GroupNorm(eps=1e-6).apply(
    {'params': {'scale': jnp.ones(16), 'bias': jnp.zeros(16)}}, jnp.asarray(x)
  )
  g = x.reshape(2, 4, 4, 4, 4)  # [B, H, W, 4 groups, 4 channels]
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  np.testing.assert_allclose(got, ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape), atol=1e-5)


@pytest.mark.parametrize('offset, atol', [(0.0, 1e-5), (5.0, 1e-4), (20.0, 1e-3)])
def test_group_norm_one_pass_moments_stay_accurate_off_centre(offset, atol):
  # GroupNorm takes both moments in one pass (E[h²] − E[h]²): its float32 cancellation grows with
  # (mean/std)², within the bounds its docstring states.
  rng = np.random.default_rng(2)
  x = (rng.standard_normal((2, 8, 8, 64)) + offset).astype(np.float32)
  scale, bias = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
  got = layers.GroupNorm(eps=1e-6).apply(
    {'params': {'scale': jnp.asarray(scale), 'bias': jnp.asarray(bias)}}, jnp.asarray(x))
  g = x.astype(np.float64).reshape(2, 8, 8, 16, 4)
  mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
  want = ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
  np.testing.assert_allclose(got, want, atol=atol)
