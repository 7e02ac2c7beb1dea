"""Tests of diffjax.ema (EDM2's power-function EMA and its post-hoc reconstruction) against closed
forms, quadrature and a simulated training run."""

import os

import numpy as np
import pytest

from diffjax import ema


def _profile(tau, t, exp):
  """p_{t,γ}(τ) = (γ + 1)/t · (τ/t)^γ on [0, t], 0 after (EDM2 Eq. 121)."""
  return np.where(tau <= t, (exp + 1) / t * (np.minimum(tau, t) / t)**exp, 0.0)


def test_std_and_exponent_are_inverse_and_match_the_paper():
  std = np.array([0.01, 0.05, 0.07, 0.10, 0.2, 0.28])
  exp = ema.std_to_exp(std)
  assert exp.dtype == np.float64 and exp.shape == std.shape
  np.testing.assert_allclose(ema.exp_to_std(exp), std, rtol=1e-12)
  # EDM2 §3.1: σ_rel 0.05 and 0.10 are γ = 16.97 and 6.94.
  np.testing.assert_allclose(ema.std_to_exp([0.05, 0.10]), [16.97, 6.94], atol=0.01)
  # σ_rel is the standard deviation of the profile divided by t (numerically, on a grid).
  tau = (np.arange(200_000) + 0.5) / 200_000
  for s, g in zip(std, exp):
    p = _profile(tau, 1.0, g) / 200_000
    mean = np.sum(p * tau)
    np.testing.assert_allclose(np.sqrt(np.sum(p * (tau - mean)**2)), s, rtol=1e-4)
  for bad in (0.0, -0.1, 0.3):
    with pytest.raises(ValueError, match='σ_rel'):
      ema.std_to_exp(bad)


def test_power_function_beta():
  g = ema.std_to_exp(0.1)
  np.testing.assert_allclose(ema.power_function_beta(0.1, 4096.0, 1024.0), 0.75**(g + 1))
  assert ema.power_function_beta(0.05, 256.0, 256.0) == 0  # The first step copies the weights.


def test_correlation_equals_closed_form_and_quadrature():
  n = 400_000
  tau = (np.arange(n) + 0.5) * (3.0 / n)
  for ta, sa, tb, sb in ((1.0, 0.05, 1.0, 0.05), (0.6, 0.05, 1.4, 0.10), (2.5, 0.10, 0.9, 0.07),
                         (1.2, 0.2, 1.2, 0.03)):
    ga, gb = ema.std_to_exp(sa), ema.std_to_exp(sb)
    m = min(ta, tb)
    closed = (ga + 1) * (gb + 1) * m**(ga + gb + 1) / ((ga + gb + 1) * ta**(ga + 1) * tb**(gb + 1))
    quad = np.sum(_profile(tau, ta, ga) * _profile(tau, tb, gb)) * (3.0 / n)
    value = ema.power_function_correlation(ta, sa, tb, sb)
    np.testing.assert_allclose(value, closed, rtol=1e-12)
    np.testing.assert_allclose(value, quad, rtol=1e-4)


def test_coefficients_are_the_least_squares_fit():
  """Algorithm 3 against a least-squares fit of the sampled profiles (then normalized to sum 1)."""
  in_ofs = np.repeat([250.0, 500.0, 750.0, 1000.0], 2)
  in_std = np.tile(ema.DEFAULT_STDS, 4)
  out_std = np.array([0.03, 0.07, 0.15])
  x = ema.posthoc_coefficients(in_ofs, in_std, 1000.0, out_std)
  assert x.shape == (8, 3) and x.dtype == np.float64
  np.testing.assert_allclose(x.sum(axis=0), 1, rtol=1e-12)
  n = 200_000
  tau = (np.arange(n) + 0.5) * (1000.0 / n)
  basis = np.stack([_profile(tau, t, g) for t, g in zip(in_ofs, ema.std_to_exp(in_std))], 1)
  for j, s in enumerate(out_std):
    target = _profile(tau, 1000.0, ema.std_to_exp(s))
    fit = np.linalg.lstsq(basis, target, rcond=None)[0]
    fit /= fit.sum()
    # Compared as profiles: the Gram matrix is ill-conditioned, the fitted profile is not.
    np.testing.assert_allclose(basis @ x[:, j], basis @ fit, atol=2e-4 * target.max())


def test_reconstructing_a_tracked_profile_returns_its_snapshot():
  in_ofs = np.repeat([100.0, 200.0, 300.0], 2)
  in_std = np.tile(ema.DEFAULT_STDS, 3)
  x = ema.posthoc_coefficients(in_ofs, in_std, [300.0, 200.0], [0.10, 0.05])
  np.testing.assert_allclose(x[:, 0], np.eye(6)[5], atol=1e-9)
  np.testing.assert_allclose(x[:, 1], np.eye(6)[2], atol=1e-9)
  with pytest.raises(ValueError, match='basis'):
    ema.posthoc_coefficients([100.0, 100.0], [0.05, 0.05], 100.0, 0.07)


def test_synthetic_training_run():
  """Track σ_rel 0.05 and 0.10 through a simulated run, snapshot them, and reconstruct afterwards.

  The weights are a random walk with drift (float32, as in training); every profile is tracked
  with power_function_beta exactly as the train step does. The reconstruction of a tracked σ_rel
  at a snapshot time is that snapshot to float precision, and an untracked σ_rel (0.07) comes out
  close to tracking it directly: much closer than the two tracked averages are to each other.
  """
  rng = np.random.default_rng(0)
  steps, every, batch, dim = 4000, 400, 32, 64
  theta = np.zeros(dim, np.float32)
  stds = ema.DEFAULT_STDS + (0.07,)
  tracked = [theta.copy() for _ in stds]
  snaps, times, snap_std = [], [], []
  drift = rng.standard_normal(dim).astype(np.float32)
  for k in range(1, steps + 1):
    theta = theta + (0.01 * drift + 0.1 * rng.standard_normal(dim)).astype(np.float32)
    for i, s in enumerate(stds):
      beta = np.float32(ema.power_function_beta(s, k * batch, batch))
      tracked[i] = beta * tracked[i] + (1 - beta) * theta
    if k % every == 0:
      for i, s in enumerate(ema.DEFAULT_STDS):
        snaps.append(tracked[i].copy())
        times.append(k * batch)
        snap_std.append(s)
  snaps = np.stack(snaps).astype(np.float64)
  x = ema.posthoc_coefficients(times, snap_std, steps * batch, stds)
  recon = x.T @ snaps
  np.testing.assert_allclose(recon[0], tracked[0], rtol=0, atol=1e-5 * np.abs(tracked[0]).max())
  np.testing.assert_allclose(recon[1], tracked[1], rtol=0, atol=1e-5 * np.abs(tracked[1]).max())
  error = np.abs(recon[2] - tracked[2]).max()
  spread = np.abs(tracked[0] - tracked[1]).max()
  assert error < 0.01 * spread, (error, spread)  # Measured: 0.0138 against a spread of 6.0.


def test_phema_cli_writes_a_run_with_the_reconstructed_ema(tmp_path):
  """`python -m diffjax.phema` on checkpoints holding tracked profiles: the written run loads with
  `diffjax.load`, its EMA is Algorithm 3's combination of the snapshots (times = step · batch),
  and asking for a tracked σ_rel at a snapshot's step returns that snapshot."""
  import jax

  from configs import edm2 as edm2_configs
  from diffjax import build, phema, runs
  from diffjax import state as state_lib
  from diffjax.runs import checkpoint as ckpt_lib
  from diffjax.training import step as step_lib

  config = edm2_configs.get_config('tiny')
  work, batch = str(tmp_path / 'run'), config.train.batch_size
  runs.save_config(config, work)
  spec = build.dataset_spec(config)
  denoiser = build.build_denoiser(config, spec)
  tx = build.build_optimizer(config)
  objective = build.build_objective(config, spec, denoiser)
  stds = tuple(config.train.phema_stds)

  def make_state():
    params = build.init_params(denoiser.network, spec, jax.random.key(0))
    return state_lib.create_train_state(params, tx, step_lib.initial_extra(objective, params, stds))

  abstract = jax.eval_shape(make_state)
  rng = np.random.default_rng(0)
  fill = lambda a: rng.standard_normal(a.shape).astype(a.dtype)
  steps, saved = (5, 10, 15, 20), {}
  checkpointer = ckpt_lib.Checkpointer(os.path.join(work, runs.CHECKPOINT_DIR), async_save=False)
  for s in steps:
    state = jax.tree.map(fill, abstract).replace(step=np.int32(s))
    saved[s] = state
    checkpointer.save(s, state)
  checkpointer.close()

  def ema_of(out):
    return jax.tree.leaves(runs.load(out).ema_params)

  key = lambda s, std: saved[s].extra[step_lib.PHEMA][ema.profile_key(std)]
  assert phema.main(['--workdir', work, '--std', '0.10', '--step', '15',
                     '--out', str(tmp_path / 'p10')]) == 0
  for a, b in zip(ema_of(str(tmp_path / 'p10')), jax.tree.leaves(key(15, 0.10))):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert phema.main(['--workdir', work, '--std', '0.07', '--out', str(tmp_path / 'p07')]) == 0
  times = np.repeat(np.asarray(steps, np.float64) * batch, 2)
  x = ema.posthoc_coefficients(times, np.tile(stds, 4), 20 * batch, 0.07)[:, 0]
  parts = [key(s, std) for s in steps for std in stds]
  expected = jax.tree.map(lambda *leaves: sum(c * np.float64(v) for c, v in zip(x, leaves)), *parts)
  loaded = runs.load(str(tmp_path / 'p07'))
  for a, b in zip(jax.tree.leaves(loaded.ema_params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert loaded.step == 20 and not loaded.config.train.phema_stds
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(saved[20].params)):
    np.testing.assert_array_equal(a, b)  # The raw params are the source's at that step.
  # An existing run is not overwritten; a run without tracked profiles says what to do.
  assert phema.main(['--workdir', work, '--std', '0.07', '--out', str(tmp_path / 'p07')]) == 1
  with pytest.raises(ValueError, match='phema_stds'):
    phema.reconstruct(str(tmp_path / 'p07'), 0.07)
