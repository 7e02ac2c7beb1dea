"""EDM2 snapshots, openai predict_xstart models, shape-only datasets, and converted runs as teachers.

The EDM2 fixture is a float16 snapshot pickled by NVlabs/edm2's own training-loop code
(scripts/make_convert_golden.py); its D(x; σ) and u(σ) were recorded by EDM2's Precond on the
stored values widened to float32. No torch here.
"""

import json
import shutil

import jax
import numpy as np
from convert_testlib import assert_close

import diffjax as dj
from configs import distill as distill_configs
from diffjax import build, convert, runs, sampling
from diffjax.convert import torch_pickle
from diffjax.training import distill


def test_edm2_snapshot_converts_matches_reference_and_samples(golden, tmp_path):
  """from_edm on an EDM2 float16 snapshot → run: D and u equal EDM2's, the float16 EMA is loaded
  exactly, torch's Fourier buffers are used, and sample_run (sample.py's path) samples it."""
  path = golden['files']['edm2']
  snapshot = torch_pickle.load_network_pickle(path)
  unet = torch_pickle.children(snapshot['ema'])['unet']
  assert torch_pickle.parameters(unet)['out_gain'].dtype == np.float16  # what EDM2 stores
  out = convert.from_edm(path, tmp_path / 'run')
  run = dj.load(out)
  c = run.config
  assert (c.data.name, c.model.preset, c.precond.name, c.loss.name) == (
      'digits', 'edm2-img64-s', 'edm', 'edm2')
  assert (c.loss.kwargs.p_mean, c.loss.kwargs.p_std) == (-0.8, 1.6)  # the pickled EDM2Loss
  assert c.sample.num_steps == 32 and c.optim.b2 == 0.99
  assert json.loads((tmp_path / 'run' / 'convert.json').read_text())['stored_dtypes'] == [
      'float16']

  ref = golden['ref']
  d, extra = jax.jit(run.denoiser.raw)(run.ema_params, ref['edm2/x'], ref['edm2/sigma'],
                                       ref['edm2/labels'])
  assert_close(d, ref['edm2/D'], 'edm2 D(x; σ)')
  np.testing.assert_allclose(extra[:, 0, 0, 0], ref['edm2/logvar'], rtol=0, atol=1e-5)
  # The float16 EMA widened exactly: the converted gain is the stored one bit for bit.
  assert float(run.ema_params['out_gain']) == float(torch_pickle.parameters(unet)['out_gain'])
  # torch drew the Fourier buffers; diffjax's own draws would give another network.
  table = np.asarray(c.model.kwargs.noise_fourier_table, np.float32)
  freqs = torch_pickle.buffers(torch_pickle.children(unet)['emb_fourier'])['freqs']
  np.testing.assert_array_equal(table[:len(freqs)], freqs.astype(np.float32))

  # Euler (one network call per step) compiles in half Heun's time; any sampler reads the run.
  result = sampling.sample_run(out, [0, 1], out=str(tmp_path / 'samples'), sampler='euler',
                               num_steps=2, batch_size=2)
  assert result['images'].shape == (2, 8, 8, 1) and result['images'].dtype == np.uint8


def test_predict_xstart_model_denoises_with_its_output(golden):
  """predict_xstart=True: D is the network's x_0 output itself (openai's START_X mean type). The
  iddpm fixture's network output o was recorded as D_ε = x − σ·o, so as an x_0-model the same
  weights must give D = o = (x − D_ε)/σ."""
  info = golden['meta']['iddpm']
  conversion = convert.read_improved_diffusion(golden['files']['iddpm'], predict_xstart=True,
                                               **info['flags'])
  assert conversion.config.precond.kwargs.predict_xstart
  denoiser, params = conversion.denoiser()
  ref = golden['ref']
  x, sigma = ref['iddpm/x'], ref['iddpm/sigma']
  d, v = jax.jit(denoiser.raw)(params, x, sigma, None)
  output = (x - ref['iddpm/D']) / sigma[:, None, None, None]
  assert_close(d, output, 'predict_xstart D')
  assert_close(v, ref['iddpm/v'], 'predict_xstart learned-variance channels')


def test_shape_only_dataset_for_a_larger_diffusers_model(golden, tmp_path):
  """A diffusers folder whose sample_size has no registered dataset (as ddpm-celebahq-256) names
  the generic images<R>x<R>x<C> spec and samples without any data. The fixture's weights at
  sample_size 32 (a convolutional network takes any size; 32², not 256², keeps it fast)."""
  folder = tmp_path / 'ddpm-32'
  shutil.copytree(golden['files']['diffusers'], folder)
  config_file = folder / 'unet' / 'config.json'
  config = json.loads(config_file.read_text())
  config['sample_size'] = 32
  config_file.write_text(json.dumps(config))
  out = convert.from_diffusers(folder, tmp_path / 'run')
  run = dj.load(out)
  assert run.config.data.name == 'images32x32x1' and not run.config.data.conditional
  result = sampling.sample_run(out, [0], out=str(tmp_path / 'samples'), sampler='ddim',
                               num_steps=2, batch_size=1)
  assert result['images'].shape == (1, 32, 32, 1)


def test_converted_edm_run_teaches_progressive_distillation(golden, tmp_path):
  """A converted EDM pickle as distill.py's --teacher: the pipeline plans a PD round from it, its
  student config keeps the teacher's network and preconditioning, the student starts from the
  converted weights, and the round's loss (two teacher DDIM steps as the target) traces with them.

  Shapes only (jax.eval_shape): compiling the teacher-in-the-loop step costs minutes on the test
  machine, and the loop itself is tested on a trained teacher in tests/training/test_distill.py.
  """
  teacher = convert.from_edm(golden['files']['edm_vp'], tmp_path / 'teacher')
  config = distill_configs.get_config('tiny')  # PD
  config.distill.teacher_workdir = teacher
  config.distill.start_steps, config.distill.end_steps = 2, 1
  (stage,) = distill.plan(config, str(tmp_path / 'pd'))
  assert stage.teacher_workdir == teacher
  c = distill.stage_config(config, stage, runs.read_config(teacher))
  assert (c.model.preset, c.precond.name, c.data.name) == ('ddpmpp_cifar10', 'vp', 'digits')
  teacher_run = dj.load(teacher)
  spec = build.dataset_spec(c)
  student = build.build_denoiser(c, spec)
  objective, init = distill._stage_objective(config, stage, c, spec, student, teacher_run)
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, str(a.dtype)), tree)
  params = jax.eval_shape(init)
  assert shapes(params) == shapes(teacher_run.ema_params)  # the student is the teacher's network
  batch = {'image': jax.ShapeDtypeStruct((4, 8, 8, 1), np.float32),
           'label': jax.ShapeDtypeStruct((4,), np.int32)}
  loss, _ = jax.eval_shape(objective.loss, teacher_run.ema_params, batch, jax.random.key(0),
                           objective.init_extra())
  assert loss.shape == () and loss.dtype == np.float32
