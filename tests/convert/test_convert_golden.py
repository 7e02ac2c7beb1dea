"""Converted checkpoints against the reference code's own outputs (scripts/make_convert_golden.py).

Each golden file was written by NVlabs/edm, openai's improved-/guided-diffusion or diffusers from a
small network with every parameter random; the reference recorded its denoiser D(x; σ) (and for
openai's learned variance the extra channels and `p_mean_variance`) on fixed inputs. Here the file
is converted without torch and diffjax's D must agree to float32 precision: max |diff| ≤ 1e-4 of
the output's standard deviation. Two fixtures go the whole way a user does (the CLI from a URL, or
`from_*`, then `diffjax.load`); the others are converted in memory (`read_*().denoiser()`), which
is the same mapping without the disk round trip. One jit per network.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from convert_testlib import assert_close

import diffjax as dj
from diffjax import convert, sampling
from diffjax.convert import __main__ as cli
from diffjax.processes import discrete


def _labels(ref, name, num_classes=10):
  labels = ref.get(f'{name}/labels')
  if labels is not None and labels.ndim == 1:
    labels = jax.nn.one_hot(labels, num_classes)
  return labels


def _compare(name, golden, denoiser, params):
  ref = golden['ref']
  raw = jax.jit(lambda p, x, s, y: denoiser.raw(p, x, s, y))
  d, extra = raw(params, ref[f'{name}/x'], ref[f'{name}/sigma'], _labels(ref, name))
  rel = assert_close(d, ref[f'{name}/D'], f'{name} D(x; σ)')
  if f'{name}/v' in ref:
    assert_close(extra, ref[f'{name}/v'], f'{name} learned-variance channels')
  return rel, d, extra


def _read(name, golden):
  info, path = golden['meta'][name], golden['files'][name]
  if info['converter'] == 'edm':
    return convert.read_edm(path)
  if info['converter'] == 'diffusers':
    return convert.read_diffusers(path)
  project = 'guided-diffusion' if 'resblock_updown' in info['flags'] else 'improved-diffusion'
  return convert.read_improved_diffusion(path, project=project, **info['flags'])


@pytest.mark.parametrize('name', ['edm_ncsnpp', 'edm_vp', 'edm_adm', 'guided', 'diffusers'])
def test_converted_denoiser_matches_reference(name, golden):
  conversion = _read(name, golden)
  denoiser, params = conversion.denoiser()
  _, d, v = _compare(name, golden, denoiser, params)
  if name == 'guided':
    _check_posterior(name, golden, conversion.config, d, v)


def _check_posterior(name, golden, config, d, v):
  """The reverse step the 'ddpm' sampler takes: mean and learned log-variance of p(x_{t−1}|x_t),
  from the converted model's D and extra channels v, against the reference's p_mean_variance."""
  ref = golden['ref']
  schedule = discrete.make_schedule(config.precond.kwargs.beta_schedule,
                                    config.precond.kwargs.num_timesteps)
  t = jnp.asarray(ref[f'{name}/t'])
  mean = discrete.q_posterior_mean(schedule, d, jnp.asarray(ref[f'{name}/x_t']), t)
  assert_close(mean, ref[f'{name}/mean'], f'{name} posterior mean')
  assert_close(discrete.learned_log_variance(schedule, t, v), ref[f'{name}/log_variance'],
               f'{name} learned log-variance')


def test_edm_from_url_through_the_cli_and_load(golden, http_root, tmp_path):
  """python -m diffjax.convert edm URL --workdir=OUT, then dj.load(OUT).denoise_fn(labels)."""
  url, requests = http_root
  src = f'{url}/{golden["files"]["edm_ddpmpp"].name}'
  out = tmp_path / 'run'
  argv = ['edm', src, f'--workdir={out}', f'--cache_dir={tmp_path / "cache"}', '--no_progress']
  assert cli.main(argv) == 0
  # The server is session-wide (other tests ask it for other files): count this file's downloads.
  name = golden['files']['edm_ddpmpp'].name
  assert len([r for r in requests if r.endswith('/' + name)]) == 1
  config = json.loads((out / 'config.json').read_text())
  assert config['data']['name'] == 'digits' and config['precond']['name'] == 'edm'
  assert config['model']['augment_dim'] == 9 and config['sample']['sampler'] == 'heun'
  provenance = json.loads((out / 'convert.json').read_text())
  assert provenance['precond'] == 'EDMPrecond' and provenance['network'] == 'SongUNet'

  run = dj.load(str(out))
  ref = golden['ref']
  denoise = jax.jit(run.denoise_fn(class_labels=ref['edm_ddpmpp/labels']))
  d = denoise(ref['edm_ddpmpp/x'], ref['edm_ddpmpp/sigma'])
  assert_close(d, ref['edm_ddpmpp/D'], 'edm_ddpmpp D(x; σ) after dj.load')
  # The converted EMA is both params and EMA params (train.py fine-tunes from it).
  for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(run.ema_params)):
    np.testing.assert_array_equal(a, b)

  # The same URL again comes from the cache; the workdir now holds a run and is refused.
  cached = convert.fetch(src, cache=str(tmp_path / 'cache'), progress=False)
  # The server is session-wide (other tests ask it for other files): count this file's downloads.
  name = golden['files']['edm_ddpmpp'].name
  assert len([r for r in requests if r.endswith('/' + name)]) == 1
  assert open(cached, 'rb').read() == golden['files']['edm_ddpmpp'].read_bytes()
  assert cli.main(argv) == 1


def test_iddpm_run_keeps_learned_variance_and_samples(golden, tmp_path):
  """improved-diffusion (learn_sigma, cosine, T = 4000, rescaled t) → run → D, v, p(x_{t−1}|x_t),
  and sample_run (what sample.py calls) with the learned-variance ancestral sampler."""
  info = golden['meta']['iddpm']
  out = convert.from_improved_diffusion(golden['files']['iddpm'], tmp_path / 'run', **info['flags'])
  run = dj.load(out)
  config = run.config
  assert config.precond.name == 'ddpm' and config.precond.kwargs.rescale_timesteps
  assert config.precond.kwargs.num_timesteps == 4000
  assert config.sample.sampler == 'ddpm' and config.sample.kwargs.variance == 'learned'
  _, d, v = _compare('iddpm', golden, run.denoiser, run.ema_params)
  _check_posterior('iddpm', golden, config, d, v)

  result = sampling.sample_run(out, [0, 1], out=str(tmp_path / 'samples'), num_steps=2,
                               batch_size=2)
  assert result['images'].shape == (2, 8, 8, 1) and result['images'].dtype == np.uint8
  assert os.path.exists(result['npz'])
