"""A sampler that does not fit the model, and sample.py's settings, fail before any work is done.

`samplers.fit.check` (through `build.sampler_fn`) is compared with what really happens when each
sampler runs on a model: it must refuse exactly the pairs that fail when run, and it must do so
before training (train.py) or before weights are read (sample.py).
"""

import builtins
import errno
import json
import os

import jax
import jax.numpy as jnp
import pytest

from configs import edm as edm_configs
from diffjax import build, runs, samplers, sampling
from diffjax import precond as precond_lib
from diffjax.samplers import fit

SHAPE = (4, 4, 1)


@pytest.fixture(scope='module')
def config_only(tmp_path_factory):
  """A run directory with the tiny EDM config.json and no checkpoint: every check below must fire
  before weights are read (were they not, `runs.load` would fail with 'No checkpoint')."""
  workdir = str(tmp_path_factory.mktemp('fit') / 'run')
  runs.save_config(edm_configs.get_config('tiny'), workdir)
  return workdir


def _really_samples(name, precond, options) -> bool:
  """Runs the sampler for real (2 steps, one 4×4 image, a shrinking stand-in denoiser)."""
  fn = samplers.get_sampler(name)
  keys = samplers.seed_keys([0])
  try:
    out = fn(lambda x, sigma: 0.5 * x, jnp.ones((1, *SHAPE)), keys, precond=precond,
             num_steps=2, **options)
    jax.block_until_ready(out)
  except (ValueError, TypeError, AttributeError):
    return False
  return True


@pytest.mark.parametrize('name,precond,options,fits', [
    ('heun', 'edm', {'s_churn': 1.0}, True),
    ('ddpm', 'edm', {}, False),        # no discrete posterior for a continuous-σ model
    ('ddpm', 'ddpm', {}, True),
    ('ddpm', 'ddpm', {'s_churn': 0.0}, False),
    ('pc', 'edm', {}, False),          # no SDE
    ('momentum', 'edm', {}, False),    # no Soft Diffusion corruption
])
def test_check_agrees_with_running_the_sampler(name, precond, options, fits):
  pre = precond_lib.get_preconditioning(precond)
  assert _really_samples(name, pre, options) == fits
  if fits:
    fit.check(name, pre, 2, options, SHAPE)
  else:
    with pytest.raises(ValueError, match=rf"^Sampler '{name}' does (not fit this model|not take "
                                         r"the option)"):
      fit.check(name, pre, 2, options, SHAPE)


def test_a_misfit_names_samplers_that_do_fit():
  pre = precond_lib.get_preconditioning('edm')
  with pytest.raises(ValueError) as e:
    fit.check('ddpm', pre, 2, {}, SHAPE)
  message = str(e.value)
  assert 'need a discrete model' in message and '--sampler=NAME' in message
  listed = message.split('pick one that fits (')[1].split(')')[0].split(', ')
  assert 'heun' in listed and 'ddpm' not in listed and 'pc' not in listed
  assert 'dpmpp_2m' in listed and 'unipc' in listed
  fit.check('pc', precond_lib.get_preconditioning('vp'), 2, {}, SHAPE)  # VP has an SDE


def test_options_list_what_the_sampler_takes():
  with pytest.raises(ValueError) as e:
    fit.check('ddpm', None, 2, {'s_churn': 0.0, 's_tmin': 0.0}, SHAPE,
              config_options=['s_churn', 's_tmin'])
  assert str(e.value).startswith("Sampler 'ddpm' does not take the options s_churn, s_tmin (from "
                                 "config.sample.kwargs); its options: clip_denoised, respacing, "
                                 "variance: set config.sample.kwargs")
  for option in ('clip_denoised', 'respacing', 'variance'):  # the listed ones are taken
    assert option in fit.options_of('ddpm')
  assert _really_samples('ddpm', precond_lib.get_preconditioning('ddpm'), {'variance': 'fixed_small'})
  assert 'n_corrector_steps' in fit.options_of('pc')        # passed on to predictor_corrector
  assert 'order' in fit.options_of('unipc')                 # passed on to the UniPC solver


@pytest.mark.parametrize('kwargs,pattern', [
    ({'batch_size': 0}, r'--batch must be a positive number of images per batch, got 0'),
    ({'s_churn': -1.0}, r'--churn must be >= 0 .*got -1\.0'),
    ({'s_noise': float('nan')}, r'--s_noise must be >= 0'),
    ({'s_tmin': 2.0, 's_tmax': 1.0}, r'--s_tmin=2\.0 is above --s_tmax=1\.0'),
    ({'num_steps': 0}, r'at least 1, got 0; pass --steps=N'),
    ({'sampler': 'dpmpp_2m', 's_churn': 1.0},
     r"'dpmpp_2m' does not take the option s_churn .*leave it out, or pick a sampler that takes "
     r"it \(.*heun\)"),
])
def test_sample_settings_out_of_range(config_only, kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    sampling.sample_run(config_only, '0-3', **kwargs)


@pytest.mark.parametrize('seeds,pattern', [
    ('0-4294967296', r'Seed 4294967296 is out of range; seeds go from 0 to 4294967295\.'),
    ('0,,3', r"Cannot read seeds '0,,3'"),
    ('', r"Cannot read seeds ''"),
    ('-3', r"Cannot read seeds '-3'"),
])
def test_malformed_seeds(seeds, pattern):
  with pytest.raises(ValueError, match=pattern):
    sampling.parse_seeds(seeds)


def test_an_unwritable_default_out_fails_before_weights_are_read(config_only, monkeypatch):
  """The default OUT (WORKDIR/samples/cli) on a disk that refuses writes (as a read-only mount
  does; os.access would say yes to root)."""
  real_open = builtins.open

  def read_only(file, mode='r', *args, **kwargs):
    if any(c in mode for c in 'wax+') and os.fspath(file).startswith(config_only):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), file)
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr(builtins, 'open', read_only)
  with pytest.raises(OSError, match=r'^Cannot write to .*samples/cli \(.*Read-only file system\); '
                                    r'pass an --out on a writable disk\.$'):
    sampling.sample_run(config_only, '0-3')
  assert not os.path.exists(os.path.join(config_only, 'samples'))


def test_a_config_missing_a_section_is_named(tmp_path):
  workdir = str(tmp_path / 'run')
  runs.save_config(edm_configs.get_config('tiny'), workdir)
  path = os.path.join(workdir, runs.CONFIG_FILE)
  config = json.load(open(path))
  del config['model'], config['sample']
  json.dump(config, open(path, 'w'))
  for call in (lambda: runs.load(workdir), lambda: sampling.sample_run(workdir, '0-3')):
    with pytest.raises(ValueError, match=rf'^{path} has no model, sample sections, which every '
                                         r"run's config has; restore it"):
      call()


def test_build_sampler_fn_checks_every_config_preset():
  """Every shipped preset's own sampler fits its model (the check refuses no good config)."""
  from configs import ddpm, iddpm, sde, soft
  for module, preset in ((edm_configs, 'tiny'), (ddpm, 'cifar10'), (iddpm, 'tiny'),
                         (sde, 'digits'), (soft, 'digits')):
    c = module.get_config(preset)
    build.sampler_fn(c, build.build_precond(c))
