"""Soft Diffusion corruptions, schedules, the p_1 start and Wasserstein level selection.

The DCT blur is checked against what a Gaussian blur must do (a centred delta spreads to spatial std
σ_B with mass 1), and C_t against the algebra of a symmetric operator with C_0 = I. The level-selection
tool is checked on problems whose answer is known: a 1-D path with W2 = |f(i) − f(j)| and synthetic
Gaussian images whose corrupted laws are exactly the diagonal Gaussians the tool fits.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import registry
from diffjax.processes import corruptions as C
from diffjax.processes import soft_levels


def delta_image(n):
  x = np.zeros((1, n, n, 1), np.float32)
  x[0, n // 2, n // 2, 0] = 1.0
  return x


def operator_matrix(fn, h, w):
  """The [HW, HW] matrix of a linear map of [1, H, W, 1] images (columns = images of basis vectors)."""
  eye = np.eye(h * w, dtype=np.float32).reshape(h * w, h, w, 1)
  return np.asarray(fn(jnp.asarray(eye))).reshape(h * w, h * w).T


# ------------------------------------------------------------------------------------------------
# Operators.


@pytest.mark.parametrize('sigma_b', [1.0, 2.0, 4.0])
def test_blur_of_a_centred_delta_has_std_sigma_and_mass_one(sigma_b):
  n = 65  # odd: a true centre pixel; 32 px to the reflecting edges, 8σ for σ_B = 4
  y = np.asarray(C.apply('blur', delta_image(n), sigma_b), np.float64)[0, :, :, 0]
  offsets = np.arange(n) - n // 2
  mass = y.sum()
  var_rows = (y.sum(axis=1) * offsets**2).sum() / mass
  var_cols = (y.sum(axis=0) * offsets**2).sum() / mass
  assert mass == pytest.approx(1.0, abs=1e-5)
  assert np.sqrt(var_rows) == pytest.approx(sigma_b, rel=1e-4)
  assert np.sqrt(var_cols) == pytest.approx(sigma_b, rel=1e-4)
  # Centred and unimodal: a blur, not a shift.
  assert np.unravel_index(np.argmax(y), y.shape) == (n // 2, n // 2)


def test_dct_basis_is_the_orthonormal_dct_ii_of_jax_scipy():
  x = np.random.RandomState(5).randn(2, 7, 6, 3).astype(np.float32)
  coef = np.asarray(C.to_basis(jnp.asarray(x), 'dct'))
  np.testing.assert_allclose(coef, np.asarray(jax.scipy.fft.dctn(x, axes=(1, 2), norm='ortho')),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(C.from_basis(jnp.asarray(coef), 'dct')), x, atol=1e-5)
  v = C.dct_matrix(7)
  np.testing.assert_allclose(v @ v.T, np.eye(7), atol=1e-12)


def test_blur_diagonal_is_the_published_formula():
  n = 8
  d = np.asarray(C.blur_multipliers(jnp.float32(1.7), n, n))
  k = np.arange(n)
  expected = np.exp(-(np.pi**2 * (k[:, None]**2 + k[None, :]**2) / n**2) * 1.7**2 / 2)
  np.testing.assert_allclose(d, expected, rtol=1e-5)
  assert d[0, 0] == 1.0


@pytest.mark.parametrize('corruption, level', [('blur', 1.3), ('mask', 0.4), ('identity', 0.0)])
def test_corruption_operator_is_symmetric(corruption, level):
  m = operator_matrix(lambda x: C.apply(corruption, x, level), 8, 6)
  np.testing.assert_allclose(m, m.T, atol=1e-6)
  if corruption == 'blur':  # Vᵀ diag(d) V with 0 < d ≤ 1: positive definite, a contraction
    eig = np.linalg.eigvalsh(m.astype(np.float64))
    assert eig.min() > 0 and eig.max() == pytest.approx(1.0, abs=1e-5)


def test_schedule_c0_is_identity_and_c_t_matches_level():
  rng = np.random.RandomState(0)
  x = rng.randn(3, 8, 8, 2).astype(np.float32)
  t = jnp.asarray([0.0, 0.5, 1.0])
  for corruption in ('blur', 'mask'):
    s = C.interpolated_schedule(corruption, level_max=4.0 if corruption == 'blur' else 1.0,
                                sigma_min=0.01, sigma_max=0.1, num_levels=6)
    np.testing.assert_allclose(np.asarray(s.corrupt(x, 0.0)), x, atol=1e-5)  # C_0 = I
    per_example = np.asarray(s.corrupt(x, t))
    np.testing.assert_allclose(per_example[0], x[0], atol=1e-5)
    for b in (1, 2):  # each example gets the operator of its own time
      expected = np.asarray(C.apply(corruption, x, float(s.level_at(t[b]))))[b]
      np.testing.assert_allclose(per_example[b], expected, atol=1e-5)


def test_blur_then_inverse_round_trips():
  x = np.random.RandomState(1).randn(2, 16, 16, 3).astype(np.float32)
  for level in (0.3, 0.7):
    y = C.apply('blur', x, level)
    assert np.abs(np.asarray(y) - x).max() > 1e-2  # it did blur
    np.testing.assert_allclose(np.asarray(C.apply_inverse('blur', y, level)), x, atol=2e-4)


def test_mask_hides_the_requested_fraction_and_is_not_invertible():
  h, w = 6, 5
  for level in (0.0, 0.25, 0.5, 1.0):
    d = np.asarray(C.mask_multipliers(jnp.float32(level), h, w))
    assert (1.0 - d).sum() / (h * w) == pytest.approx(level, abs=1e-5)
  d = np.asarray(C.mask_multipliers(jnp.float32(0.5), h, w))
  x = np.ones((1, h, w, 1), np.float32)
  back = np.asarray(C.apply_inverse('mask', C.apply('mask', x, 0.5), 0.5))
  assert np.all(back[0, :, :, 0][d == 0] == 0)  # what is masked is gone
  # The centre survives longest, the corners go first.
  assert d[h // 2, w // 2] == 1.0 and d[0, 0] == 0.0


def test_unknown_corruption_and_bad_schedule_fail_in_one_sentence():
  with pytest.raises(ValueError, match='known corruptions: identity, blur, mask'):
    C.apply('jpeg', np.zeros((1, 4, 4, 1)), 1.0)
  with pytest.raises(ValueError, match='non-decreasing'):
    C.SoftSchedule('blur', [0.0, 1.0], [2.0, 1.0], [0.01, 0.1])
  with pytest.raises(ValueError, match='from 0 to 1'):
    C.SoftSchedule('blur', [0.0, 0.5], [0.0, 1.0], [0.01, 0.1])


def test_schedule_interpolates_linearly_between_knots():
  s = C.SoftSchedule('blur', [0.0, 0.25, 1.0], [0.0, 1.0, 4.0], [0.01, 0.02, 0.1])
  t = jnp.asarray([0.0, 0.125, 0.25, 0.625, 1.0])
  np.testing.assert_allclose(np.asarray(s.level_at(t)), [0.0, 0.5, 1.0, 2.5, 4.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s.sigma_at(t)), [0.01, 0.015, 0.02, 0.06, 0.1], rtol=1e-6)
  assert C.SoftSchedule.from_dict(json.loads(json.dumps(s.to_dict()))).to_dict() == s.to_dict()


# ------------------------------------------------------------------------------------------------
# The start distribution p_1.


def test_start_matches_the_gaussian_fit_of_the_corrupted_data():
  """x_1 = Vᵀ(d_1 μ + sqrt(d_1² v + σ_1²) V z): per-coefficient mean and std of p_1."""
  h = w = 4
  rng = np.random.RandomState(2)
  mean = rng.randn(h, w, 2)
  std = rng.uniform(0.2, 1.5, (h, w, 2))
  s = C.SoftSchedule('blur', [0.0, 1.0], [0.0, 1.2], [0.01, 0.3], mean, std)
  z = rng.randn(20000, h, w, 2).astype(np.float32)
  coef = np.asarray(C.to_basis(s.start(z), 'dct'), np.float64)
  d1 = C.blur_multipliers(1.2, h, w, xp=np)[..., None]
  np.testing.assert_allclose(coef.mean(0), d1 * mean, atol=0.03)
  np.testing.assert_allclose(coef.std(0) / np.sqrt(d1**2 * std**2 + 0.3**2), 1.0, atol=0.04)
  # Without a fit the start is pure noise at σ_1.
  bare = C.SoftSchedule('blur', [0.0, 1.0], [0.0, 1.2], [0.01, 0.3])
  np.testing.assert_allclose(np.asarray(bare.start(z[:2])), 0.3 * z[:2], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Wasserstein level selection.


def gaussian_images(n, h, w, seed=0):
  """Images whose DCT coefficients are independent N(μ_k, v_k): the tool's fit is then exact."""
  rng = np.random.RandomState(seed)
  k1, k2 = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  std = (2.0 / (1.0 + k1 + k2))[..., None]
  mean = np.zeros((h, w, 1))
  mean[0, 0, 0] = -1.5
  coef = mean + std * rng.randn(n, h, w, 1)
  return np.asarray(C.from_basis(jnp.asarray(coef, jnp.float32), 'dct')), mean, std


def test_w2_distances_are_the_closed_form_for_every_pair():
  images, _, _ = gaussian_images(500, 6, 6)
  fit = soft_levels.fit_gaussian(images, 'blur')
  levels, sigmas = soft_levels.candidate_path('blur', 12, 0.05, 5.0, 0.01, 0.2)
  dist = soft_levels.w2_distances(fit, 'blur', levels, sigmas)
  for i, j in [(0, 1), (0, 11), (3, 7), (10, 11)]:
    expected = soft_levels.w2_diagonal(*soft_levels.corrupted_fit(fit, 'blur', levels[i], sigmas[i]),
                             *soft_levels.corrupted_fit(fit, 'blur', levels[j], sigmas[j]))
    assert dist[i, j] == pytest.approx(expected, rel=1e-6)
  np.testing.assert_allclose(dist, dist.T)
  assert np.all(np.diag(dist) == 0)


def test_select_levels_equalizes_hops_on_a_known_path():
  """On a line with W2(i, j) = |f_i − f_j|, 5 levels need ε ≥ (f_max − f_0)/4 = 0.25."""
  f = (np.arange(201) / 200.0)**2
  dist = np.abs(f[:, None] - f[None, :])
  path, eps = soft_levels.select_levels(dist, 5)
  assert len(path) == 5 and path[0] == 0 and path[-1] == 200
  hops = [dist[a, b] for a, b in zip(path[:-1], path[1:])]
  assert max(hops) <= eps
  assert 0.25 <= eps < 0.26
  # ε is the smallest threshold that works: just below it, the path needs more hops.
  below = soft_levels.fewest_hops(dist, np.nextafter(eps, 0))
  assert below is None or len(below) > 5


def test_wasserstein_schedule_on_gaussian_images(tmp_path):
  images, mean, std = gaussian_images(3000, 8, 8)
  schedule, info = soft_levels.wasserstein_schedule(images, 'blur', num_levels=8, num_candidates=64,
                                          level_min=0.05, level_max=8.0, sigma_min=0.01,
                                          sigma_max=0.1, p1_tol=0.1)
  assert schedule.num_levels == 8
  np.testing.assert_allclose(schedule.t, np.linspace(0, 1, 8))
  assert schedule.level[0] == 0 and schedule.level[-1] == 8.0
  assert np.all(np.diff(schedule.level) > 0) and np.all(np.diff(schedule.sigma) > 0)
  assert max(info['w2_steps']) <= info['eps'] + 1e-12
  # The steps are balanced: the tool does not waste levels where nothing changes.
  assert min(info['w2_steps']) > 0.5 * info['eps']
  # At σ_B = 8 px on 8×8 only the mean (DC) survives: the stored p_1 fit is that one coefficient.
  assert schedule.p1_mean.shape == (1, 1, 1)
  assert schedule.p1_mean[0, 0, 0] == pytest.approx(mean[0, 0, 0], abs=0.1)
  assert schedule.p1_std[0, 0, 0] == pytest.approx(std[0, 0, 0], rel=0.05)
  path = soft_levels.save_schedule(str(tmp_path / 'levels.json'), schedule, info)
  loaded = soft_levels.load_schedule(path)
  assert loaded['info']['eps'] == info['eps']
  rebuilt = registry.get('precond', 'soft')(**loaded).schedule
  np.testing.assert_allclose(rebuilt.level, schedule.level)
  np.testing.assert_allclose(rebuilt.p1_std, schedule.p1_std)


def test_load_schedule_names_the_tool_when_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match='scripts/soft_levels.py'):
    soft_levels.load_schedule(str(tmp_path / 'nope.json'))
