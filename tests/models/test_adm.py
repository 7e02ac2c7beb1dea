"""The DDPM / iDDPM / ADM U-Net: exact published parameter counts (by `jax.eval_shape`, never an eager
init of a big model), its resampling and embedding conventions, and a tiny forward/backward pass."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import models, registry
from diffjax.models import adm_unet


def _inputs(net, batch=1):
  x = jnp.zeros((batch, net.img_resolution, net.img_resolution, net.in_channels), jnp.float32)
  labels = jnp.zeros((batch, net.label_dim), jnp.float32) if net.label_dim else None
  return x, jnp.zeros((batch,), jnp.float32), labels


def _count(net):
  shapes = jax.eval_shape(lambda k: net.init(k, *_inputs(net)), jax.random.key(0))
  return sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))


@pytest.mark.parametrize('preset, overrides, expected', [
    # Ho et al. 2020 CIFAR-10 = diffusers' google/ddpm-cifar10-32 UNet2DModel: 35,746,307.
    ('ddpm_cifar10', {}, 35_746_307),
    # Dhariwal & Nichol ImageNet-64 (EDM Table 7: 295.9M) with learned variance (6 outputs) and as
    # EDM retrained it (3 outputs).
    ('adm_imagenet64', {}, 295_904_454),
    ('adm_imagenet64', {'out_channels': 3}, 295_899_267),
    # improved-diffusion's CIFAR-10 and unconditional ImageNet-64 models (learned variance).
    ('iddpm_cifar10', {}, 52_546_438),
    ('iddpm_imagenet64', {}, 121_063_942),
])
def test_parameter_counts(preset, overrides, expected):
  net = models.create_network(preset, **overrides)
  assert isinstance(net, adm_unet.ADMUNet)
  assert _count(net) == expected


def test_ddpm_preset_layout():
  net = models.create_network('ddpm_cifar10')
  shapes = jax.eval_shape(lambda k: net.init(k, *_inputs(net)), jax.random.key(0))['params']
  # conv-resampling levels, attention only at 16×16 (one qkv per attention block: 2 + 3 + 1 mid).
  assert shapes['enc_16x16_down']['kernel'].shape == (3, 3, 128, 128)
  assert shapes['dec_16x16_up']['kernel'].shape == (3, 3, 256, 256)
  qkv = [k for k, v in shapes.items() if isinstance(v, dict) and 'qkv' in v]
  assert sorted(qkv) == ['dec_16x16_block0', 'dec_16x16_block1', 'dec_16x16_block2', 'dec_4x4_in0',
                         'enc_16x16_block0', 'enc_16x16_block1']
  # Additive embedding (no scale-shift): the affine maps 512 → C, not 2C.
  assert shapes['enc_32x32_block0']['affine']['kernel'].shape == (512, 128)
  adm = models.create_network('adm_imagenet64')
  shapes = jax.eval_shape(lambda k: adm.init(k, *_inputs(adm)), jax.random.key(0))['params']
  assert shapes['enc_64x64_block0']['affine']['kernel'].shape == (768, 2 * 192)
  assert shapes['map_label']['kernel'].shape == (1000, 768)
  assert 'enc_32x32_down' in shapes and 'conv0' in shapes['enc_32x32_down']  # resblock updown


def test_resample_conv_padding_conventions():
  rng = np.random.RandomState(0)
  x = rng.randn(2, 4, 4, 3).astype(np.float32)
  for padding, pads in [(1, ((1, 1), (1, 1))), (0, ((0, 1), (0, 1)))]:
    conv = adm_unet.ResampleConv(5, padding=padding)
    params = conv.init(jax.random.key(1), x)['params']
    params = {'kernel': jnp.asarray(rng.randn(3, 3, 3, 5), jnp.float32),
              'bias': jnp.asarray(rng.randn(5), jnp.float32)}
    out = np.asarray(conv.apply({'params': params}, x))
    xp = np.pad(x, ((0, 0), *pads, (0, 0)))
    k = np.asarray(params['kernel'])
    ref = np.zeros((2, 2, 2, 5), np.float32)
    for i in range(2):
      for j in range(2):
        patch = xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]
        ref[:, i, j] = np.einsum('bhwc,hwco->bo', patch, k) + params['bias']
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  up = adm_unet.ResampleConv(3, up=True)
  params = {'kernel': jnp.zeros((3, 3, 3, 3)).at[1, 1].set(jnp.eye(3)), 'bias': jnp.zeros(3)}
  np.testing.assert_array_equal(up.apply({'params': params}, x),  # identity conv: nearest ×2
                                np.repeat(np.repeat(x, 2, axis=1), 2, axis=2))


def test_timestep_embeddings_match_the_papers():
  t = jnp.array([0.0, 3.0, 999.0])
  half = 8
  ho = np.exp(-np.log(10000) * np.arange(half) / (half - 1))
  arg = np.asarray(t)[:, None] * ho
  np.testing.assert_allclose(adm_unet.timestep_embedding(t, 16, 'ddpm'),
                             np.concatenate([np.sin(arg), np.cos(arg)], -1), rtol=1e-5, atol=2e-5)
  adm = np.exp(-np.log(10000) * np.arange(half) / half)
  arg = np.asarray(t)[:, None] * adm
  np.testing.assert_allclose(adm_unet.timestep_embedding(t, 16, 'adm'),
                             np.concatenate([np.cos(arg), np.sin(arg)], -1), rtol=1e-5, atol=2e-5)


def test_tiny_forward_is_conditioned_and_output_layer_starts_at_zero():
  net = models.create_network('adm_tiny', label_dim=10)
  x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 1), jnp.float32)
  labels = jax.nn.one_hot(jnp.array([3, 7]), 10)
  # Random parameters of the right shapes (a jitted Flax init costs ~20 s of CPU compile here).
  shapes = jax.eval_shape(lambda k: net.init(k, x, jnp.zeros(2), labels), jax.random.key(0))
  rng = np.random.RandomState(1)
  params = jax.tree.map(lambda s: jnp.asarray(rng.randn(*s.shape) * 0.2, jnp.float32),
                        shapes['params'])
  apply = jax.jit(lambda p, t, lab: net.apply({'params': p}, x, t, lab))
  out = apply(params, jnp.array([5.0, 50.0]), labels)
  assert out.shape == (2, 8, 8, 2) and out.dtype == jnp.float32
  assert float(jnp.abs(out - apply(params, jnp.array([6.0, 50.0]), labels)).max()) > 1e-4
  assert float(jnp.abs(out - apply(params, jnp.array([5.0, 50.0]), labels[::-1])).max()) > 1e-4
  # ADM zero-initializes the output-side layers (out conv, conv1 of every block, attention proj).
  init, init_zero = adm_unet._inits('adm')
  assert init_zero.weight == 0.0 and init_zero.bias == 0.0
  np.testing.assert_allclose(init.weight, math.sqrt(1 / 3))  # PyTorch's default U(±1/sqrt(fan_in))
  with pytest.raises(ValueError, match='expects x of shape'):
    net.apply({'params': params}, x[:, :4], jnp.zeros(2), labels)


def test_presets_registered_and_bad_fields_fail():
  for name in ('ddpm_cifar10', 'iddpm_cifar10', 'iddpm_imagenet64', 'adm_imagenet64',
               'adm_digits', 'adm_tiny'):
    assert registry.get('network_preset', name)['network'] == 'adm_unet'
  with pytest.raises(ValueError, match='no field'):
    models.create_network('adm_tiny', channel_mult_noise=2)
  with pytest.raises(ValueError, match='Unknown ADMUNet resample'):
    net = models.create_network('adm_tiny', resample='pixelshuffle')
    jax.eval_shape(lambda k: net.init(k, *_inputs(net)), jax.random.key(0))


def test_configs_build_the_papers_models():
  from configs import ddpm as ddpm_configs
  from configs import iddpm as iddpm_configs
  from diffjax import build

  class Cifar10:
    resolution, channels, num_classes = 32, 3, 10

  ho = ddpm_configs.get_config('cifar10')
  assert _count(build.build_network(ho, Cifar10)) == 35_746_307
  assert (ho.precond.kwargs.beta_schedule, ho.loss.kwargs.loss_type) == ('linear', 'simple')
  for option, sampler in (('hybrid', 'uniform'), ('vlb', 'loss_second_moment')):
    c = iddpm_configs.get_config(f'cifar10,{option}')
    assert _count(build.build_network(c, Cifar10)) == 52_546_438  # 2C outputs
    assert c.loss.kwargs.loss_type == option and c.loss.kwargs.schedule_sampler == sampler
    p = build.build_precond(c)
    assert p.schedule.num_steps == 4000 and p.rescale_timesteps
  # EMA 0.9999 per step of 128 images, as a half-life in images.
  np.testing.assert_allclose(0.5**(128 / c.train.ema_halflife_images), 0.9999, rtol=1e-12)
