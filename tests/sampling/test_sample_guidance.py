"""sample.py's guidance: the guidance interval, autoguidance by another run, and the refusal of
CFG on a model with no unconditional branch; and every σ-grid solver on every kind of run.

Runs are config.json files (the checks happen before any weights are read); where sampling runs,
`runs.load` returns the run's real preconditioning around a stand-in network F(c_in·x) =
a·c_in·x (labels add b·label index), which compiles in a moment where the tiny U-Net takes ~10 s
per sampler.
"""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import distill as distill_configs
from configs import edm as edm_configs
from configs import iddpm as iddpm_configs
from diffjax import build, runs, samplers, sampling
from diffjax.precond import Denoiser
from diffjax.training import distill as distill_lib


class Stub(nn.Module):
  """F(x_in, c_noise, labels) = a·x_in + b·(label index): linear, label-dependent, cheap."""
  label_dropout: float = 0.1
  guidance_embedding: bool = False

  @nn.compact
  def __call__(self, x, c_noise, class_labels=None, augment_labels=None, *, train=False,
               guidance=None):
    a = self.param('a', lambda k: jnp.float32(0.3))
    b = self.param('b', lambda k: jnp.float32(0.05))
    out = a * x
    if class_labels is not None:
      out = out + b * (class_labels @ jnp.arange(class_labels.shape[-1], dtype=x.dtype)).reshape(
          (-1,) + (1,) * (x.ndim - 1))
    if guidance is not None:
      out = out + 0.01 * jnp.reshape(guidance, (-1,) + (1,) * (x.ndim - 1))
    return out


def _run(config, a=0.3, **stub):
  spec = build.dataset_spec(config)
  params = {'a': jnp.float32(a), 'b': jnp.float32(0.05)}
  return runs.Run(config=config, step=1, params=params, ema_params=params,
                  denoiser=Denoiser(Stub(**stub), build.build_precond(config)), spec=spec)


def _student_config():
  c = distill_configs.get_config('tiny')
  stage = types.SimpleNamespace(kind='round', name='round_1', num_steps=2, teacher_workdir='')
  return distill_lib.stage_config(c, stage, c.teacher)


@pytest.fixture(scope='module')
def workdirs(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp('guided')
  configs = {'edm': edm_configs.get_config('tiny'),                     # label_dropout 0
             'teacher': distill_configs.get_config('tiny').teacher,    # label_dropout 0.1
             'uncond': edm_configs.get_config('tiny')}
  configs['uncond'].data.conditional = False
  out = {}
  for name, c in configs.items():
    out[name] = str(root / name)
    runs.save_config(c, out[name])
  return out


@pytest.fixture
def stub_load(monkeypatch, workdirs):
  """runs.load → the stand-in network under the run's real config and preconditioning; the
  'weaker' guide has another weight a."""
  weights = {workdirs['edm']: 0.3, workdirs['teacher']: 0.3, workdirs['uncond']: 0.1}

  def load(workdir, step=None):
    c = runs.read_config(workdir)
    return _run(c, weights[workdir], label_dropout=float(c.model.kwargs.label_dropout))

  monkeypatch.setattr(sampling.runs, 'load', load)


def test_guidance_on_a_model_without_label_dropout_is_refused_before_loading(workdirs, tmp_path):
  # No checkpoint exists: the sentence comes before any weights are read.
  with pytest.raises(ValueError, match='label dropout.*--guide_workdir'):
    sampling.sample_run(workdirs['edm'], '0-1', out=str(tmp_path / 'o'), guidance=0.5)
  with pytest.raises(ValueError, match='needs guidance'):
    sampling.sample_run(workdirs['teacher'], '0-1', out=str(tmp_path / 'o'),
                        guidance_interval=(0.3, 2.0))


def test_guide_must_make_the_same_images_with_the_same_labels():
  spec = types.SimpleNamespace(resolution=8, channels=1)
  sampling.check_guide(spec, 10, spec, 0)  # an unconditional guide is fine
  with pytest.raises(ValueError, match='8x8x1 images.*16x16x3'):
    sampling.check_guide(types.SimpleNamespace(resolution=16, channels=3), 10, spec, 10, 'G')
  with pytest.raises(ValueError, match='has 5 classes and this run 10'):
    sampling.check_guide(spec, 10, spec, 5, 'G')


def test_autoguidance_by_itself_is_unguided_and_by_another_run_is_the_formula(
    workdirs, stub_load, tmp_path):
  kw = dict(num_steps=3, sampler='dpmpp_2m', batch_size=4)
  plain = sampling.sample_run(workdirs['edm'], '0-3', out=str(tmp_path / 'plain'), **kw)
  itself = sampling.sample_run(workdirs['edm'], '0-3', out=str(tmp_path / 'self'), guidance=1.5,
                               guide_workdir=workdirs['edm'], **kw)
  np.testing.assert_array_equal(itself['images'], plain['images'])
  # An unconditional, weaker guide (a = 0.1): the samples of D_guide + g·(D_main − D_guide),
  # g = 1 + w, sampled directly.
  guided = sampling.sample_run(workdirs['edm'], '0-3', out=str(tmp_path / 'guided'),
                               guidance=1.5, guide_workdir=workdirs['uncond'], **kw)
  main, guide = _run(runs.read_config(workdirs['edm'])), _run(runs.read_config(workdirs['uncond']),
                                                                0.1)
  labels = jax.nn.one_hot(np.arange(4) % 10, 10)
  d_main, d_guide = main.denoiser.bind(main.ema_params, labels), guide.denoiser.bind(
      guide.ema_params)
  by_hand = lambda x, s: d_guide(x, s) + 2.5 * (d_main(x, s) - d_guide(x, s))
  keys = samplers.seed_keys(range(4))
  fn = build.sampler_fn(main.config, main.denoiser.precond, 'dpmpp_2m', 3)
  want = fn(by_hand, samplers.latents(keys, (8, 8, 1)), keys)
  from diffjax import images as images_lib
  got, want = guided['images'].astype(int), images_lib.to_uint8(np.asarray(want)).astype(int)
  assert np.abs(got - want).max() <= 1  # uint8 rounding of float32-close images
  assert np.abs(guided['images'].astype(int) - plain['images']).max() > 2


def test_guidance_interval_through_sample_run(workdirs, stub_load, tmp_path):
  kw = dict(num_steps=4, sampler='heun', batch_size=4, guidance=2.0)
  full = sampling.sample_run(workdirs['teacher'], '0-3', out=str(tmp_path / 'a'), **kw)
  none = sampling.sample_run(workdirs['teacher'], '0-3', out=str(tmp_path / 'b'),
                             guidance_interval=(1e3, 2e3), **kw)  # the interval holds no step
  unguided = sampling.sample_run(workdirs['teacher'], '0-3', out=str(tmp_path / 'c'),
                                 **{**kw, 'guidance': 0.0})
  np.testing.assert_array_equal(none['images'], unguided['images'])
  assert np.abs(full['images'].astype(int) - unguided['images']).max() > 2
  # Another interval is another setting: its shards are never mixed into these.
  with pytest.raises(ValueError, match='other settings'):
    sampling.sample_run(workdirs['teacher'], '0-3', out=str(tmp_path / 'b'),
                        guidance_interval=(0.5, 2e3), **kw)


GRID_SOLVERS = ('euler_ancestral', 'lms', 'dpm_2', 'dpm_2_ancestral', 'dpmpp_2s_ancestral',
                'dpmpp_sde', 'dpmpp_2m', 'dpmpp_2m_sde', 'dpmpp_2m_sde_heun', 'dpmpp_3m_sde',
                'dpm_fast', 'dpm_adaptive', 'unipc', 'unipc_bh1', 'deis', 'heun', 'euler')


def _kind_run(kind):
  config = {'edm': lambda: edm_configs.get_config('tiny'),
            'iddpm': lambda: iddpm_configs.get_config('tiny'),
            'distilled': _student_config}[kind]()
  return config, _run(config, guidance_embedding=kind == 'distilled')


def _all_solvers(config, run, names, num_steps, **options):
  """One sample_fn that runs every solver in `names` (stacked on axis 1), as sample.py builds it."""
  fns = [build.sampler_fn(config, run.denoiser.precond, name, num_steps, **options)
         for name in names]
  both = lambda denoise_fn, latents, keys: jnp.stack(
      [fn(denoise_fn, latents, keys) for fn in fns], axis=1)
  shape = (run.spec.resolution, run.spec.resolution, run.spec.channels)
  guidance = 0.5 if getattr(run.denoiser.network, 'guidance_embedding', False) else 0.0
  return sampling.make_sample_fn(run.denoiser, both, shape, run.num_classes, guidance), shape


@pytest.mark.parametrize('kind', ['edm', 'iddpm', 'distilled'])
def test_every_grid_solver_builds_and_traces_on_every_kind_of_run(kind, data_dir):
  # The sampler as sample.py builds it (build.sampler_fn's checks, make_sample_fn, the run's own
  # preconditioning: EDM's; iDDPM's discrete σ table and round_sigma; a w-conditioned distilled
  # student's α-σ form), traced without compiling (the tiny U-Net would take ~10 s per solver).
  # Their numerics are the golden tests' (tests/samplers); a discrete model's are below.
  config, run = _kind_run(kind)
  sample_fn, shape = _all_solvers(config, run, GRID_SOLVERS, 2)
  labels = jnp.arange(2) % 10 if run.num_classes else None
  out = jax.eval_shape(sample_fn, run.ema_params, samplers.seed_keys([0, 1]), labels)
  assert out.shape == (2, len(GRID_SOLVERS)) + shape


def test_multistep_solvers_stay_finite_where_a_discrete_grid_repeats_levels(data_dir):
  # iDDPM's round_sigma snaps 17 of a 64-step polyexponential grid's low levels onto levels
  # already there; a zero-length step made the multistep solvers' h_{i−1}/h_i (and LMS's Lagrange
  # nodes) NaN until the registry form walked each level once (stepping.distinct_levels).
  config, run = _kind_run('iddpm')
  names = ('lms', 'dpmpp_2m', 'unipc')
  sample_fn, shape = _all_solvers(config, run, names, 64, grid='polyexponential')
  out = sampling.generate(sample_fn, run.ema_params, [0, 1], np.arange(2), batch_size=4)
  assert out.shape == (2, len(names)) + shape
  assert np.all(np.isfinite(out)), [n for n, o in zip(names, out.swapaxes(0, 1))
                                    if not np.all(np.isfinite(o))]


def test_guidance_interval_flag_reads_two_levels():
  from diffjax import cli
  flag = lambda v: types.SimpleNamespace(value=v)
  read = lambda text: cli.GuidanceFlags(flag(text), flag(None), flag(None)).options()
  assert read('0.28,5.42')['guidance_interval'] == (0.28, 5.42)
  assert read(None)['guidance_interval'] is None
  for bad in ('0.28', 'a,b', '1,2,3'):
    with pytest.raises(ValueError, match='two noise levels lo,hi'):
      read(bad)
