"""Train step and loop: data parallel equivalence, exact resume, image units, configs.

A divergence that stops the run is test_reliability's; train.py resuming as users run it is
test_reliability's kill loop and test_lock's (an unknown preset is test_bad_inputs').
"""

import json
import os

import jax
import numpy as np
import pytest

from configs import edm as edm_configs
from diffjax import build, parallel, registry, runs
from diffjax import state as state_lib
from diffjax.training import loop
from diffjax.training import step as step_lib


def tiny_config(**train):
  c = edm_configs.get_config('tiny')
  c.train.batch_size = 8
  c.train.total_images = 8 * 6
  c.train.checkpoint_every = 3
  c.train.log_every = 1
  c.train.num_preview = 4
  c.sample.num_steps = 2
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  os.environ['TFDS_DATA_DIR'] = path
  return path


def _params_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_same_steps_on_one_and_four_devices(data_dir):
  from diffjax import data
  config = tiny_config()
  config.augment.p = 0.2   # exercise the augmentation path too
  spec = build.dataset_spec(config)
  denoiser = build.build_denoiser(config, spec)
  tx = build.build_optimizer(config)
  step_fn = step_lib.make_train_step(
      build.build_objective(config, spec, denoiser), tx, batch_size=8, ema_halflife_images=100.0)
  it = data.make_iterator('digits', global_batch_size=8, seed=0, data_dir=data_dir)
  batches = [next(it) for _ in range(3)]
  params = build.init_params(denoiser.network, spec, jax.random.key(0))
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    mesh = parallel.make_mesh(devices)
    rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    state = jax.device_put(state_lib.create_train_state(params, tx), rep)
    jitted = jax.jit(step_fn, in_shardings=(rep, shard, rep), out_shardings=(rep, rep))
    for b in batches:
      state, metrics = jitted(state, parallel.shard_batch(b, mesh), jax.random.key(7))
      assert bool(metrics['finite'])
    results.append(jax.device_get(state))
  assert int(results[0].step) == int(results[1].step) == 3
  _params_close(results[0].params, results[1].params, rtol=1e-4, atol=1e-5)
  _params_close(results[0].ema_params, results[1].ema_params, rtol=1e-4, atol=1e-5)


def test_interrupted_run_equals_uninterrupted(data_dir, tmp_path):
  config = tiny_config()
  full = loop.train(config, str(tmp_path / 'full'), progress=False)
  part = str(tmp_path / 'part')
  first = loop.train(config, part, max_steps=3, progress=False)
  assert int(first.step) == 3
  resumed = loop.train(config, part, progress=False)
  assert int(resumed.step) == int(full.step) == 6
  _params_close(resumed.params, full.params)
  _params_close(resumed.ema_params, full.ema_params)
  # Metrics were logged for every step of both runs, and a preview grid was written.
  with open(os.path.join(part, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert os.path.exists(os.path.join(part, 'samples', 'latest.png'))
  # The run loads back for sampling, at its newest step.
  run = runs.load(part)
  assert run.step == 6
  _params_close(run.ema_params, full.ema_params)


def test_ema_and_lr_follow_image_units():
  # EDM: β = 0.5^(batch / min(half-life, ratio · n_img)); lr ramps linearly in images.
  assert float(state_lib.ema_beta(0, 512, 0.5e6, 0.05)) == 0.0
  beta = float(state_lib.ema_beta(1000, 512, 0.5e6, 0.05))
  assert beta == pytest.approx(0.5**(512 / (0.05 * 512 * 1000)), rel=1e-6)
  beta_late = float(state_lib.ema_beta(10**6, 512, 0.5e6, 0.05))
  assert beta_late == pytest.approx(0.5**(512 / 0.5e6), rel=1e-6)
  assert float(state_lib.learning_rate(10, 1e-3, 10e6, 512)) == pytest.approx(1e-3 * 5120 / 10e6)
  assert float(state_lib.learning_rate(10**6, 1e-3, 10e6, 512)) == pytest.approx(1e-3)


@pytest.mark.parametrize('arg', [
    'cifar10', 'cifar10,uncond', 'cifar10,ncsnpp', 'cifar10,vp', 'cifar10,ve,ncsnpp',
    'ffhq64', 'afhqv2_64,ncsnpp', 'digits', 'tiny', None])
def test_every_preset_builds(arg):
  config = edm_configs.get_config(arg)
  build.build_precond(config)
  build.build_loss(config)
  build.build_optimizer(config)
  build.sampler_fn(config, build.build_precond(config))
  assert registry.get('network_preset', config.model.preset)


def test_unknown_names_list_known_ones():
  with pytest.raises(ValueError, match='known presets: afhqv2_64, cifar10, digits'):
    edm_configs.get_config('cifar100')
  with pytest.raises(ValueError, match='known options: cond'):
    edm_configs.get_config('cifar10,huge')
  config = edm_configs.get_config('tiny')
  config.sample.sampler = 'magic'
  with pytest.raises(registry.UnknownNameError, match='known samplers: .*heun'):
    build.sampler_fn(config, build.build_precond(config))
  config.data.name = 'mnist2'
  with pytest.raises(registry.UnknownNameError, match='known datasets: .*digits'):
    build.dataset_spec(config)
