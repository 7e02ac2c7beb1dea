"""Tests of EDM's non-leaking augmentation (diffjax.data.augment)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.data import augment as aug

B, H, W, C = 16, 8, 8, 2


@pytest.fixture(scope='module')
def images():
  return jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (B, H, W, C)).astype(np.float32))


def _translation(tx, ty, batch=B):
  g = np.tile(np.eye(3, dtype=np.float32), (batch, 1, 1))
  g[:, 0, 2], g[:, 1, 2] = -tx, -ty  # G⁻¹ reads the input at q − t: content moves by +t.
  return jnp.asarray(g)


def _rotation(theta, batch=1):
  g = np.tile(np.eye(3, dtype=np.float32), (batch, 1, 1))
  c, s = np.cos(theta), np.sin(theta)
  g[:, 0, 0], g[:, 0, 1], g[:, 1, 0], g[:, 1, 1] = c, -s, s, c
  return jnp.asarray(g)


ONLY = lambda **kw: aug.AugmentConfig(
  **{**dict(xflip=0.0, yflip=0.0, scale=0.0, rotate_frac=0.0, aniso=0.0, translate_frac=0.0), **kw}
)


def test_filter_is_orthogonal():
  h = aug._SYM6
  assert abs(h.sum() - np.sqrt(2)) < 1e-12
  for lag in range(1, 6):
    assert abs(np.dot(h[: -2 * lag], h[2 * lag :])) < 1e-11
  assert abs(np.dot(h, h) - 1) < 1e-11


def test_p_zero_is_identity(images):
  out, labels = aug.augment(jax.random.key(0), images, p=0.0)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_array_equal(labels, np.zeros((B, 9), np.float32))
  assert labels.dtype == jnp.float32 and labels.shape == (B, aug.LABEL_DIM)


def test_identity_and_integer_translation_resample_exactly(images):
  np.testing.assert_allclose(aug.affine_resample(images, _translation(0, 0)), images, atol=2e-6)
  out = np.asarray(aug.affine_resample(images, _translation(2, -1)))
  x = np.asarray(images)
  rolled = np.roll(x, shift=(-1, 2), axis=(1, 2))  # rows up by 1, columns right by 2.
  np.testing.assert_allclose(out[:, :-1, 2:], rolled[:, :-1, 2:], atol=2e-6)
  # Beyond the interior the content is the reflect-padded image (EDM's padding).
  padded = np.pad(x, ((0, 0), (H, H), (W, W), (0, 0)), mode='reflect')
  np.testing.assert_allclose(out, padded[:, H + 1 : 2 * H + 1, W - 2 : 2 * W - 2], atol=2e-6)


def test_rotation_matches_analytic_rotation():
  n = 24
  yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
  f = lambda x, y: np.exp(-((x - 3.3) ** 2 / 18 + (y + 2.1) ** 2 / 8))
  image = jnp.asarray(f(xx, yy)[None, ..., None].astype(np.float32))
  theta = 0.7
  out = np.asarray(aug.affine_resample(image, _rotation(theta)))[0, ..., 0]
  # The output at q shows the input at R(θ)·q.
  expected = f(np.cos(theta) * xx - np.sin(theta) * yy, np.sin(theta) * xx + np.cos(theta) * yy)
  inner = (np.abs(xx) < 8) & (np.abs(yy) < 8)  # Away from the reflected copies near the border.
  assert np.abs(out - expected)[inner].max() < 0.02


@pytest.mark.parametrize('which', ['xflip', 'yflip'])
def test_flip_only(images, which):
  out, labels = aug.augment(jax.random.key(1), images, p=1.0, config=ONLY(**{which: 1.0}))
  column = 0 if which == 'xflip' else 1
  bits = np.asarray(labels[:, column])
  assert set(bits) == {0.0, 1.0}
  np.testing.assert_array_equal(np.delete(np.asarray(labels), column, axis=1), 0)
  axis = 2 if which == 'xflip' else 1
  expected = np.where(bits[:, None, None, None] == 1, np.flip(np.asarray(images), axis), images)
  np.testing.assert_array_equal(out, expected)


def test_labels_match_the_geometry(images):
  """Labels mean what the docstring says: recompute each op from its label and compare."""
  key = jax.random.key(2)
  out, labels = aug.augment(key, images, p=1.0, config=ONLY(translate_frac=1.0))
  t = np.asarray(labels[:, 7:9])
  np.testing.assert_array_equal(np.asarray(labels[:, :7]), 0)
  expected = aug.affine_resample(images, _translation(0.125 * W * t[:, 0], 0.125 * H * t[:, 1]))
  np.testing.assert_allclose(out, expected, atol=1e-5)

  out, labels = aug.augment(key, images, p=1.0, config=ONLY(rotate_frac=1.0))
  theta = np.arctan2(labels[:, 4], labels[:, 3] + 1)
  expected = aug.affine_resample(images, _rotation(theta, B))
  np.testing.assert_allclose(out, expected, atol=1e-4)

  out, labels = aug.augment(key, images, p=1.0, config=ONLY(scale=1.0))
  s = 2.0 ** (0.2 * np.asarray(labels[:, 2]))
  g = np.tile(np.eye(3, dtype=np.float32), (B, 1, 1))
  g[:, 0, 0] = g[:, 1, 1] = 1 / s
  np.testing.assert_allclose(out, aug.affine_resample(images, jnp.asarray(g)), atol=1e-5)


def test_label_layout_and_probabilities():
  n = 4096
  _, _, _, _, labels = aug.augment_params(jax.random.key(3), n, 8, 8, p=1.0)
  labels = np.asarray(labels)
  assert labels.shape == (n, 9)
  assert set(np.unique(labels[:, 0])) == {0.0, 1.0} and set(np.unique(labels[:, 1])) == {0.0, 1.0}
  assert abs(labels[:, 0].mean() - 0.5) < 0.05 and abs(labels[:, 1].mean() - 0.5) < 0.05
  np.testing.assert_allclose((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2, 1, atol=1e-5)
  assert abs(labels[:, 2].std() - 1) < 0.1 and abs(labels[:, 7:9].std() - 1) < 0.1
  # The stretch axis is rotated for half of the images only: otherwise w·sin r = 0.
  assert abs((labels[:, 6] == 0).mean() - 0.5) < 0.05
  np.testing.assert_allclose(np.hypot(labels[:, 5], labels[:, 6]).std(), 0.6, atol=0.1)

  _, _, geometric, _, labels = aug.augment_params(jax.random.key(4), n, 8, 8, p=0.25)
  labels = np.asarray(labels)
  assert abs(labels[:, 0].mean() - 0.5) < 0.05  # x-flip's 1e8 multiplier saturates: always 1/2.
  assert abs(labels[:, 1].mean() - 0.125) < 0.03  # y-flip: p/2.
  assert abs((labels[:, 2] != 0).mean() - 0.25) < 0.03
  assert abs((labels[:, 3:5] != 0).any(axis=1).mean() - 0.25) < 0.03
  assert abs((labels[:, 7:9] != 0).any(axis=1).mean() - 0.25) < 0.03
  assert abs(np.asarray(geometric).mean() - (1 - 0.75**4)) < 0.03


def test_traced_p_and_per_image_keys(images):
  key = jax.random.key(5)
  # `augment` is jitted with p traced: p = 0 and p = 1 above and 0.5 here share one compilation.
  out, labels = aug.augment(key, images, 0.5)
  assert 0 < np.count_nonzero(np.asarray(labels[:, 2])) < B  # The scale op fires for some only.
  # Image i depends only on fold_in(key, i) and its own pixels: a smaller batch given those keys
  # explicitly gets the same augmentations.
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(5))
  head, head_labels = aug.augment(keys, images[:5], 0.5)
  np.testing.assert_array_equal(head_labels, labels[:5])
  np.testing.assert_allclose(head, out[:5], atol=1e-6)
