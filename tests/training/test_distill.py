"""Progressive and guided distillation: exact targets, tabular distillation, stage 1, samplers, resume."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import distill as distill_configs
from diffjax import build, models, registry, runs, sampling
from diffjax import state as state_lib
from diffjax.objectives import distill as distill_lib
from diffjax.processes import alpha_sigma as A
from diffjax.runs import checkpoint as ckpt_lib
from diffjax.samplers import distilled, noise
from diffjax.training import distill


def gaussian_denoiser(cov):
  """The exact σ-space denoiser E[y | y + σn = x] of zero-mean Gaussian data with covariance cov."""
  cov = jnp.asarray(cov, jnp.float32)
  dim = cov.shape[0]

  def denoise(x, sigma):
    s2 = jnp.reshape(sigma, (-1, 1, 1))**2
    gain = cov @ jnp.linalg.inv(cov + s2 * jnp.eye(dim))        # [B, D, D]
    return jnp.einsum('bij,bj->bi', gain, x.reshape(x.shape[0], dim)).reshape(x.shape)

  return denoise


@pytest.mark.parametrize('cov', [[[0.25]], [[1.0, 0.3], [0.3, 0.5]]])
def test_one_student_step_lands_on_the_teachers_two_steps(cov):
  teacher = gaussian_denoiser(cov)
  n = 4                                   # student steps; the teacher has 2N
  m = 2 * n
  dim = len(cov)
  j = jnp.array([2, 4, 6, 8, 1, 3, 5, 7])  # even: the PD grid; odd: the stochastic sampler's grid
  t = j / m
  sigma = A.sigma_of_t(t)
  x_t = jax.random.normal(jax.random.key(0), (8, dim)) * jnp.sqrt(1.0 + sigma[:, None]**2)
  target = distill_lib.pd_target(teacher, x_t, j, m)
  # The teacher's two DDIM steps and the student's one, with x̂_student = x̃.
  sig = lambda idx: A.sigma_of_t(jnp.clip(idx / m, 0.0, 1.0))
  x1 = teacher(x_t, sigma)
  x_mid = distill_lib.student_step(x_t, x1, sigma, sig(j - 1))
  x_end = distill_lib.student_step(x_mid, teacher(x_mid, sig(j - 1)), sig(j - 1), sig(j - 2))
  regular = (j >= 3)
  student_end = distill_lib.student_step(x_t, target, sigma, sig(j - 2))
  np.testing.assert_allclose(student_end[regular], x_end[regular], rtol=2e-4, atol=2e-4)
  # t'' = 0 (j = 2): the target is the teacher's x̂ at t'; t' = 0 (j = 1): its x̂ at t.
  np.testing.assert_allclose(target[0], teacher(x_mid, sig(j - 1))[0], rtol=1e-6)
  np.testing.assert_allclose(target[4], x1[4], rtol=1e-6)
  # z-space form of PD Alg. 2: x̃ = (z'' − (σ''/σ)z)/(α'' − (σ''/σ)α).
  a_t, s_t = A.alpha_sigma_of_t(t)
  a_2, s_2 = A.alpha_sigma_of_t(jnp.clip((j - 2) / m, 0, 1))
  ratio = (s_2 / s_t)[:, None]
  z_form = (a_2[:, None] * x_end - ratio * a_t[:, None] * x_t) / (a_2 - ratio[:, 0] * a_t)[:, None]
  keep = j >= 3
  np.testing.assert_allclose(target[keep], z_form[keep], rtol=2e-4, atol=2e-4)
  # Encoder distillation: the same closed form with time running upward.
  up = jnp.array([0, 2, 4, 6])
  x_up = jax.random.normal(jax.random.key(1), (4, dim))
  s0 = sig(up)
  tgt = distill_lib.pd_target(teacher, x_up, up, m, upward=True)
  mid = distill_lib.student_step(x_up, teacher(x_up, s0), s0, sig(up + 1))
  end = distill_lib.student_step(mid, teacher(mid, sig(up + 1)), sig(up + 1), sig(up + 2))
  np.testing.assert_allclose(distill_lib.student_step(x_up, tgt, s0, sig(up + 2)), end, rtol=1e-3,
                             atol=1e-3)


def _distill_tabular(std: float, teacher_steps: int, samples: int = 8) -> float:
  """Distills the exact 1-D Gaussian teacher of `teacher_steps` DDIM steps down to one step.

  The student of each round is a table of one coefficient per step (D(x; σ_i) = c_i·x), fitted by
  least squares to the PD targets of the previous round's table; round 1's teacher table is the
  exact denoiser on its grid. Every round runs the same compiled function (tables padded to
  `teacher_steps`, N traced). Returns the 1-step student's output for z_1 = 1 (its output std).
  """
  size = teacher_steps * samples // 2

  @jax.jit
  def one_round(table, m, key):
    n = m // 2
    teacher = lambda x, sigma: table[jnp.clip(jnp.round(A.t_of_sigma(sigma) * m).astype(
        jnp.int32), 1, m) - 1][:, None] * x
    i = jnp.arange(size) % n + 1                    # every student step, equally often
    j = 2 * i
    sigma = A.sigma_of_t(j / m)
    x_t = jax.random.normal(key, (size, 1)) * jnp.sqrt(std**2 + sigma[:, None]**2)
    target = distill_lib.pd_target(teacher, x_t, j, m)
    num = jax.ops.segment_sum(target[:, 0] * x_t[:, 0], i - 1, num_segments=teacher_steps)
    den = jax.ops.segment_sum(x_t[:, 0]**2, i - 1, num_segments=teacher_steps)
    return jnp.where(jnp.arange(teacher_steps) < n, num / jnp.maximum(den, 1e-30), 0.0)

  sigma = A.sigma_of_t(jnp.arange(1, teacher_steps + 1) / teacher_steps)
  table = std**2 / (std**2 + sigma**2)               # the exact teacher on its grid
  m = teacher_steps
  for r in range(int(np.log2(teacher_steps))):
    table = one_round(table, jnp.int32(m), jax.random.key(r))
    m //= 2
  c = float(table[0])
  return float(distilled.ddim(lambda x, s: c * x, jnp.ones((1, 1)), num_steps=1)[0, 0])


@pytest.mark.parametrize('std', [0.5, 1.0])
def test_tabular_student_distilled_8192_to_1_reproduces_the_teacher(std):
  a, b = A.cosine_coefficients()
  student = _distill_tabular(std, 8192)
  teacher = float(distilled.ddim(gaussian_denoiser([[std**2]]), jnp.ones((1, 1)),
                                 num_steps=8192)[0, 0])
  if std == 0.5:
    np.testing.assert_allclose(teacher, 0.499906, atol=5e-6)
    np.testing.assert_allclose(student, 0.499906, atol=2e-5)
  else:
    closed = np.cos(a / 8192)**8191 * np.cos(a / 8192 + b)
    np.testing.assert_allclose(student, closed, atol=2e-5)
  np.testing.assert_allclose(student, teacher, atol=2e-5)
  # And distillation matters: the undistilled 1-step DDIM of the teacher is far off.
  assert abs(float(distilled.ddim(gaussian_denoiser([[std**2]]), jnp.ones((1, 1)),
                                  num_steps=1)[0, 0]) - teacher) > 0.4


def _class_gaussians(num_classes=3, std=0.3):
  """Analytic class-conditional and unconditional denoisers: class c ~ N(μ_c, std²), null ~ N(0, 1)."""
  means = jnp.linspace(-0.8, 0.8, num_classes)

  def denoise(x, sigma, labels):
    s2 = jnp.reshape(sigma, (-1,) + (1,) * (x.ndim - 1))**2
    null = jnp.sum(labels, axis=-1) == 0
    mu = jnp.where(null, 0.0, labels @ means).reshape((-1,) + (1,) * (x.ndim - 1))
    var = jnp.where(null, 1.0, std**2).reshape(mu.shape)
    return mu + var / (var + s2) * (x - mu)

  return denoise


def test_stage1_loss_is_zero_when_the_student_is_the_guided_teacher():
  denoise = _class_gaussians()

  def teacher_fn(params, x, sigma, labels, w):
    del params
    return A.guide(denoise(x, sigma, labels), denoise(x, sigma, jnp.zeros_like(labels)), w)

  def guided_student(params, x, sigma, labels, w, key):
    del key
    return teacher_fn(None, x, sigma, labels, w) + params['bias']

  objective = distill_lib.distillation_objective(
      None, None, {'unused': jnp.zeros(())}, num_steps=None, num_classes=3, student_mode='network',
      teacher_mode='cfg', w_min=0.0, w_max=4.0, student_fn=guided_student, teacher_fn=teacher_fn)
  batch = {'image': jax.random.uniform(jax.random.key(0), (16, 4, 4, 1), minval=-1, maxval=1),
           'label': jnp.arange(16) % 3}
  extra = objective.init_extra()
  loss, aux = objective.loss({'bias': jnp.zeros(())}, batch, jax.random.key(1), extra)
  assert float(loss) < 1e-8
  assert aux['per_example'].shape == (16,)
  # A student that ignores w (the conditional model) is not the guided teacher.
  unguided = lambda p, x, s, labels, w, key: denoise(x, s, labels)
  objective2 = distill_lib.distillation_objective(
      None, None, {}, num_steps=None, num_classes=3, student_mode='none', teacher_mode='cfg',
      w_min=0.0, w_max=4.0, student_fn=unguided, teacher_fn=teacher_fn)
  loss2, _ = objective2.loss({}, batch, jax.random.key(1), objective2.init_extra())
  assert float(loss2) > 1e-3
  # w = 0 reduces the guided teacher to the conditional model.
  objective3 = distill_lib.distillation_objective(
      None, None, {}, num_steps=None, num_classes=3, student_mode='none', teacher_mode='cfg',
      w_min=0.0, w_max=0.0, student_fn=unguided, teacher_fn=teacher_fn)
  loss3, _ = objective3.loss({}, batch, jax.random.key(1), objective3.init_extra())
  assert float(loss3) < 1e-8


def test_pd_round_loss_vanishes_for_the_exact_student():
  # A PD round with an analytic 1-D Gaussian teacher: the student whose x̂ is the closed-form x̃
  # of the batch has zero loss (the target is what its one step must predict).
  teacher = gaussian_denoiser([[0.25]])
  objective = distill_lib.distillation_objective(
      None, None, {}, num_steps=4, num_classes=0, student_mode='none', teacher_mode='none',
      student_fn=lambda p, x, s, labels, w, key: p['oracle'](x, s),
      teacher_fn=lambda p, x, s, labels, w: teacher(x, s))

  def oracle(x, sigma):
    j = jnp.round(A.t_of_sigma(sigma) * 8).astype(jnp.int32)
    return distill_lib.pd_target(teacher, x, j, 8)

  batch = {'image': jax.random.normal(jax.random.key(2), (32, 1, 1, 1)) * 0.5,
           'label': jnp.zeros(32, jnp.int32)}
  extra = objective.init_extra()
  assert int(extra['num_steps']) == 4
  loss, aux = objective.loss({'oracle': oracle}, batch, jax.random.key(3), extra)
  assert float(loss) < 1e-6
  # Students are trained on the grid t = i/N only (no stochastic grid): σ takes N values.
  assert len(np.unique(np.round(np.asarray(aux['sigma']), 5))) <= 4


def test_stochastic_sampler_edge_steps_and_renoise_variance():
  shape = (64, 8, 8, 1)
  keys = noise.seed_keys(np.arange(shape[0]))
  latents = noise.latents(keys, shape[1:])
  denoise = lambda x, s: jnp.tanh(x) * 0.5
  # N = 1 is only the deterministic edge step: the same as 1-step DDIM, no keys needed.
  one = distilled.stochastic(denoise, latents, None, num_steps=1)
  np.testing.assert_allclose(one, distilled.ddim(denoise, latents, num_steps=1), rtol=1e-6)
  # N = 2: shapes, determinism given keys, per-sample keys (a sub-batch gives the same images).
  two = distilled.stochastic(denoise, latents, keys, num_steps=2)
  assert two.shape == shape
  np.testing.assert_array_equal(two, distilled.stochastic(denoise, latents, keys, num_steps=2))
  part = distilled.stochastic(denoise, latents[5:9], keys[5:9], num_steps=2)
  np.testing.assert_allclose(part, two[5:9], rtol=1e-6, atol=1e-6)
  other = distilled.stochastic(denoise, latents, noise.seed_keys(np.arange(64) + 100), num_steps=2)
  assert not np.allclose(other, two)
  with pytest.raises(ValueError, match='per-sample keys'):
    distilled.stochastic(denoise, latents, None, num_steps=2)
  # The re-noise step: with the identity denoiser and zero latents, N = 2 returns
  # x_s = z_s/α_s with z_s = σ_{s|k}·ξ (k = 0, s = 1/2): Var(α_s·out) = (1 − e^(λ_s − λ_k))σ_s².
  identity = lambda x, s: x
  out = distilled.stochastic(identity, jnp.zeros(shape), keys, num_steps=2)
  tab = distilled.stochastic_tables(2)
  np.testing.assert_allclose([tab['k'][0], tab['s'][0]], [0.0, 0.5])
  alpha_s, sigma_s = (float(v) for v in A.alpha_sigma_of_t(0.5))
  lam_s, lam_k = float(A.logsnr(0.5)), float(A.logsnr(0.0))
  expected = (1.0 - np.exp(lam_s - lam_k)) * sigma_s**2
  np.testing.assert_allclose(tab['var'][0], expected, rtol=1e-6)
  np.testing.assert_allclose(np.var(np.asarray(out) * alpha_s), expected, rtol=0.05)
  np.testing.assert_allclose(np.mean(np.asarray(out) * alpha_s), 0.0, atol=0.02)
  # Registered, and the last-step entries are unused (no noise after the final step).
  assert registry.get('sampler', 'distill_stochastic') is distilled.distill_stochastic
  assert tab['var'][-1] == 0.0


def test_w_conditioned_student_starts_as_the_teacher():
  teacher_net = models.create_network('tiny', label_dim=3)
  student_net = models.create_network('tiny', label_dim=3, guidance_embedding=True)
  spec = types.SimpleNamespace(resolution=8, channels=1)
  teacher_params = build.init_params(teacher_net, spec, jax.random.key(0))
  params = distill.init_student_params(student_net, spec, teacher_params, jax.random.key(1))
  assert set(params) - set(teacher_params) == {'map_guidance'}
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  c_noise = jnp.array([10.0, 200.0, 500.0, 900.0])
  labels = jax.nn.one_hot(jnp.array([0, 1, 2, 0]), 3)
  apply = jax.jit(lambda p, w: student_net.apply({'params': p}, x, c_noise, labels, guidance=w))
  ref = jax.jit(lambda p: teacher_net.apply({'params': p}, x, c_noise, labels))(teacher_params)
  for w in (0.0, 4.0):
    np.testing.assert_allclose(apply(params, jnp.full((4,), w)), ref, rtol=1e-5, atol=1e-6)
  # The zero-initialized map still gets a gradient, so w can be learned.
  grad = jax.grad(lambda p: jnp.sum(apply(p, jnp.full((4,), 2.0))**2))(params)
  assert float(jnp.abs(grad['map_guidance']['kernel']).sum()) > 0
  with pytest.raises(ValueError, match='lacks teacher parameters'):
    bigger_teacher = {**teacher_params, 'extra': {'kernel': jnp.zeros(3)}}
    distill.init_student_params(student_net, spec, bigger_teacher)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  os.environ['TFDS_DATA_DIR'] = path
  return path


def test_killed_distillation_resumes_inside_round_2(data_dir, tmp_path, capsys):
  # A teacher run: a fresh tiny α-σ network saved as a checkpoint (its quality is irrelevant here).
  teacher_dir = str(tmp_path / 'teacher')
  tc = distill_configs.get_config('tiny_teacher')
  spec = build.dataset_spec(tc)
  denoiser = build.build_denoiser(tc, spec)
  params = build.init_params(denoiser.network, spec, jax.random.key(0))
  runs.save_config(tc, teacher_dir)
  ck = ckpt_lib.Checkpointer(os.path.join(teacher_dir, runs.CHECKPOINT_DIR))
  ck.save(2, state_lib.create_train_state(params, build.build_optimizer(tc)))
  ck.close()

  config = distill_configs.get_config('tiny')      # PD 4 → 1: rounds of 2 and 1 steps, 4 steps each
  config.distill.teacher_workdir = teacher_dir
  config.distill.start_steps = 4
  workdir = str(tmp_path / 'pd')
  names = [s.name for s in distill.plan(config, workdir)]
  assert names == ['round_1_2steps', 'round_2_1steps']
  report = distill.run(config, workdir, max_steps=6, progress=False)   # "killed" in round 2
  assert [(r['name'], r['step'], r['done']) for r in report] == [
      ('round_1_2steps', 4, True), ('round_2_1steps', 2, False)]
  capsys.readouterr()
  report = distill.run(config, workdir, progress=False)
  out = capsys.readouterr().out
  assert '[distill] round_1_2steps' not in out                        # finished: skipped
  assert f'Resuming from step 2 of {os.path.join(workdir, "round_2_1steps")}' in out
  assert [(r['name'], r['step'], r['done']) for r in report] == [
      ('round_1_2steps', 4, True), ('round_2_1steps', 4, True)]
  # Every round's student loads and samples with the distilled samplers (sample.py's path).
  run = runs.load(os.path.join(workdir, 'round_2_1steps'))
  assert run.step == 4 and run.config.sample.num_steps == 1
  assert run.config.sample.sampler == 'distill_ddim'
  assert int(run.config.distill.num_steps) == 1
  result = sampling.sample_run(os.path.join(workdir, 'round_1_2steps'), '0-3',
                               out=str(tmp_path / 'samples'), sampler='distill_stochastic',
                               num_steps=4)
  assert result['images'].shape == (4, 8, 8, 1)


def test_ddim_encoder_inverts_the_sampler():
  # Encoding runs the same DDIM ODE upward (Meng et al. §5): on Gaussian data with the exact
  # denoiser, decoding the code returns the input up to the O(1/N) discretization error.
  denoise = gaussian_denoiser([[0.25]])
  x = jnp.array([[-0.8], [0.3], [0.9]])
  errors = []
  for n in (128, 512):
    z = distilled.encode(denoise, x, num_steps=n)
    np.testing.assert_allclose(z, x / 0.5, rtol=0.02)      # the probability-flow code: x/std
    errors.append(float(jnp.max(jnp.abs(distilled.ddim(denoise, z, num_steps=n) - x))))
  assert errors[1] < 0.01 and errors[1] < errors[0] / 3      # first order: ~4× smaller at 4× N
