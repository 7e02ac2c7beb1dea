"""Tests of diffjax.evaluation: the FID Inception port, FID/KID/IS, streaming statistics, the digits evaluator.

The Inception golden fixture (`tests/golden/`) comes from `scripts/make_inception_golden.py`, which runs
torch-fidelity on seeded random weights; here the same weights are regenerated with numpy alone.
"""

import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax.evaluation import digits_classifier as dc
from diffjax.evaluation import fid as fidlib
from diffjax.evaluation import inception, inception_weights
from diffjax.pth import load_pth

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / 'golden'
sys.path.insert(0, str(GOLDEN))
from inception_weights import golden_state_dict, golden_tensor  # noqa: E402


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN / 'inception_golden.npz') as data:
    return {k: data[k] for k in data.files}


# --------------------------------------------------------------------------------------------------------
# .pth reading without torch.


@pytest.mark.parametrize('name', ['inception_subset.pth', 'inception_subset_legacy.pth'])
def test_load_pth_reads_both_torch_formats(name):
  sd = load_pth(GOLDEN / name)
  for key in (
    'Conv2d_1a_3x3.conv.weight',
    'Conv2d_1a_3x3.bn.running_var',
    'Conv2d_2a_3x3.conv.weight',
    'fc.bias',
  ):
    expected = golden_tensor(key, sd[key].shape)
    assert sd[key].dtype == np.float32 and sd[key].shape == expected.shape
    np.testing.assert_array_equal(sd[key], expected)
  assert sd['Conv2d_1a_3x3.conv.weight'].shape == (32, 3, 3, 3)
  assert sd['Conv2d_1a_3x3.bn.num_batches_tracked'].dtype == np.int64
  assert sd['Conv2d_1a_3x3.bn.num_batches_tracked'] == 0
  fc_bias = golden_tensor('fc.bias', (1008,))
  np.testing.assert_array_equal(
    sd['extra.transposed'], fc_bias[:12].reshape(3, 4).T
  )  # strided view
  np.testing.assert_array_equal(sd['extra.slice'], fc_bias[5:9])  # view at a storage offset
  assert sd['extra.float16'].dtype == np.float16
  np.testing.assert_array_equal(sd['extra.float16'], fc_bias[:6].astype(np.float16))
  np.testing.assert_array_equal(sd['extra.int64'], np.arange(-3, 4).reshape(7, 1))


def test_load_pth_refuses_code(tmp_path):
  import pickle
  import zipfile

  class Evil:
    def __reduce__(self):
      return (os.system, ('echo pwned',))

  legacy = tmp_path / 'evil_legacy.pth'
  legacy.write_bytes(pickle.dumps(Evil(), protocol=2))
  with pytest.raises(ValueError, match='Refusing'):
    load_pth(legacy)
  archive = tmp_path / 'evil.pth'
  with zipfile.ZipFile(archive, 'w') as z:
    z.writestr('evil/data.pkl', pickle.dumps({'w': Evil()}, protocol=2))
  with pytest.raises(ValueError, match='Refusing'):
    load_pth(archive)
  with pytest.raises(FileNotFoundError):
    load_pth(tmp_path / 'missing.pth')


# --------------------------------------------------------------------------------------------------------
# Inception port.


def test_state_dict_layout_matches_published_file(golden):
  names = [str(n) for n in golden['layout_names']]
  shapes = [tuple(int(s) for s in row if s >= 0) for row in golden['layout_shapes']]
  published = {n: s for n, s in zip(names, shapes) if not n.endswith('num_batches_tracked')}
  assert inception_weights.inception_state_dict_layout() == published


@pytest.fixture(scope='module')
def golden_inception_fn():
  variables = inception_weights.inception_params_from_state_dict(
    golden_state_dict(inception_weights.inception_state_dict_layout())
  )
  return inception_weights.make_inception_fn(variables, outputs=('pool3', 'logits_unbiased', 'logits'))


@pytest.mark.parametrize('size', [32, 64])
def test_inception_matches_torch_fidelity(golden, golden_inception_fn, size):
  out = golden_inception_fn(jnp.asarray(golden[f'images_{size}']))
  for key in ('pool3', 'logits_unbiased', 'logits'):
    expected = golden[f'{key}_{size}']
    got = np.asarray(out[key])
    assert got.shape == expected.shape
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel < 1e-4, (key, rel)
  # Not a vacuous match: the two images' features differ by far more than the tolerance.
  pool3 = golden[f'pool3_{size}']
  assert np.abs(pool3[0] - pool3[1]).max() > 100 * 1e-4 * np.abs(pool3).max()


def test_inception_converter_rejects_other_files():
  layout = inception_weights.inception_state_dict_layout()
  sd = {k: np.zeros(s, np.float32) for k, s in layout.items()}
  del sd['Mixed_6b.branch7x7_2.conv.weight']
  sd['fc.weight'] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(ValueError, match='Mixed_6b.branch7x7_2.conv.weight') as e:
    inception_weights.inception_params_from_state_dict(sd)
  assert 'fc.weight' in str(e.value)
  # DataParallel prefixes and torch's BN counters are tolerated.
  sd = {'module.' + k: np.zeros(s, np.float32) for k, s in layout.items()}
  sd['module.fc.num_batches_tracked'] = np.int64(0)
  variables = inception_weights.inception_params_from_state_dict(sd)
  assert variables['params']['Mixed_5b']['branch5x5_2']['conv']['kernel'].shape == (5, 5, 48, 64)
  assert variables['params']['fc']['kernel'].shape == (2048, 1008)


def _tf1_resize_loops(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """TF1 resize_bilinear(align_corners=False), pixel by pixel, in float32 as TF1's kernel computes it."""
  h, w, _ = image.shape
  sy, sx = np.float32(h) / np.float32(out_h), np.float32(w) / np.float32(out_w)
  out = np.zeros((out_h, out_w, image.shape[2]), np.float32)
  for y in range(out_h):
    in_y = np.float32(y) * sy
    y0 = int(np.floor(in_y))
    y1, fy = min(y0 + 1, h - 1), np.float32(in_y - y0)
    for x in range(out_w):
      in_x = np.float32(x) * sx
      x0 = int(np.floor(in_x))
      x1, fx = min(x0 + 1, w - 1), np.float32(in_x - x0)
      top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * fx
      bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * fx
      out[y, x] = top + (bottom - top) * fy
  return out


@pytest.mark.parametrize(
  'in_hw,out_hw',
  [((9, 11), (23, 17)), ((13, 10), (5, 4)), ((32, 32), (64, 64)), ((8, 8), (37, 37))],
)
def test_tf1_resize_matches_sampling_formula(in_hw, out_hw):
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, size=(2, *in_hw, 3)).astype(np.float32)
  got = np.asarray(inception.resize_bilinear_tf1(jnp.asarray(images), out_hw))
  expected = np.stack([_tf1_resize_loops(img, *out_hw) for img in images])
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_tf1_resize_to_299_matches_formula_and_torch_fidelity(golden):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(1, 32, 32, 3)).astype(np.float32)
  got = np.asarray(inception.resize_bilinear_tf1(jnp.asarray(images), (299, 299)))[0]
  # The same formula in float64 in weighted form: source coordinate d * in / out, no half-pixel shift.
  src = np.arange(299) * (32 / 299)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, 31)
  t = src - lo
  rows = images[0][lo] * (1 - t)[:, None, None] + images[0][hi] * t[:, None, None]
  expected = rows[:, lo] * (1 - t)[None, :, None] + rows[:, hi] * t[None, :, None]
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
  # torch-fidelity's port of the TF1 kernel, on the fixture's odd sizes (NCHW there).
  x = jnp.asarray(golden['resize_in'].transpose(0, 2, 3, 1))
  for h, w in ((23, 17), (5, 4)):
    got = np.asarray(inception.resize_bilinear_tf1(x, (h, w))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, golden[f'resize_out_{h}x{w}'], rtol=0, atol=1e-4)


def test_missing_weights_say_where_to_put_them(tmp_path):
  with pytest.raises(FileNotFoundError, match='weights-inception-2015-12-05-6726825d.pth') as e:
    inception_weights.find_inception_weights(tmp_path / 'nope.pth')
  assert inception.INCEPTION_URL in str(e.value) and 'DIFFJAX_INCEPTION_WEIGHTS' in str(e.value)


def test_download_verifies_checksum(tmp_path):
  import hashlib

  src = tmp_path / 'src.pth'
  src.write_bytes(b'not really inception weights' * 100)
  digest = hashlib.sha256(src.read_bytes()).hexdigest()
  inception_weights.verify_sha256(src, digest)
  inception_weights.verify_sha256(src, digest[:8])  # torch.hub-style prefix
  with pytest.raises(ValueError, match='Checksum mismatch'):
    inception_weights.verify_sha256(src, '0' * 64)
  # A file:// URL exercises the download path with no network.
  dst = tmp_path / 'cache' / 'weights.pth'
  with pytest.raises(ValueError, match='Checksum mismatch'):
    inception_weights.download_inception(dst, url=src.as_uri(), sha256='deadbeef')
  assert not dst.exists() and not list(
    dst.parent.glob('*.part')
  )  # nothing half-written is left behind
  assert inception_weights.download_inception(dst, url=src.as_uri(), sha256=digest[:8]) == str(dst)
  assert dst.read_bytes() == src.read_bytes()
  # An existing file is checked, not downloaded again.
  assert inception_weights.download_inception(dst, url='http://invalid.invalid/x', sha256=digest) == str(
    dst
  )


# --------------------------------------------------------------------------------------------------------
# FID.


def _random_covariance(rng, d, rank=None):
  a = rng.standard_normal((d, rank or d))
  return a @ a.T / (rank or d)


def test_fid_of_distribution_with_itself_is_zero():
  rng = np.random.default_rng(0)
  for n, d in ((500, 32), (20, 64)):  # the second is rank deficient (n < d)
    feats = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 3.0
    s = fidlib.statistics_from_features(feats)
    assert abs(fidlib.fid_from_statistics(s, s)) < 1e-12 * np.trace(s.sigma)


def test_fid_between_gaussians_equals_closed_form():
  rng = np.random.default_rng(1)
  d = 48
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.0, 2.0, d)
  b[:5] = 1e-12  # a near-singular covariance
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  s1, s2 = (q * a) @ q.T, (q * b) @ q.T
  # Commuting covariances: tr(S1 + S2 - 2 (S1 S2)^(1/2)) = sum (sqrt(a) - sqrt(b))^2.
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert fidlib.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
  # Non-commuting: compare with scipy's general sqrtm of S1 S2.
  s3, s4 = _random_covariance(rng, d), _random_covariance(rng, d)
  covmean = scipy.linalg.sqrtm(s3 @ s4).real
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s3 + s4 - 2 * covmean)
  assert fidlib.frechet_distance(mu1, s3, mu2, s4) == pytest.approx(expected, rel=1e-8)
  # Near-singular (rank 10 of 64, as with fewer images than features): finite, >= 0, symmetric.
  s5, s6 = _random_covariance(rng, 64, rank=10), _random_covariance(rng, 64, rank=10)
  m = np.zeros(64)
  d56, d65 = fidlib.frechet_distance(m, s5, m, s6), fidlib.frechet_distance(m, s6, m, s5)
  assert np.isfinite(d56) and d56 > 0 and d56 == pytest.approx(d65, rel=1e-8)
  with pytest.raises(ValueError, match='different feature spaces'):
    fidlib.frechet_distance(m, s5, m[:10], s6[:10, :10])


def test_fid_of_features_with_themselves_is_non_negative_and_tiny():
  # 64-d Gaussian features with a common offset, n = 2000, in float32 as a feature network returns them.
  # Before the fix, the traces used the unclipped eigenvalues while the cross term used clipped ones, and
  # the streamed raw moments lost the covariance to cancellation: FID(x, x) came out below 0.
  rng = np.random.default_rng(4)
  feats = (rng.standard_normal((2000, 64)) @ rng.standard_normal((64, 64)) * 0.3 + 50.0).astype(
    np.float32
  )
  direct = fidlib.statistics_from_features(feats)
  streamed = fidlib.StreamingStats()
  for lo in range(0, 2000, 300):  # uneven last batch
    streamed.update(feats[lo : lo + 300])
  streamed = streamed.statistics()
  for a, b in ((direct, direct), (streamed, streamed), (direct, streamed), (streamed, direct)):
    assert 0.0 <= fidlib.fid_from_statistics(a, b) <= 1e-6
  # Rank deficient (n < d) covariances have round-off negative eigenvalues; still exactly >= 0.
  few = fidlib.StreamingStats().update(feats[:20]).statistics()
  assert np.linalg.eigvalsh(few.sigma).min() < 0
  assert 0.0 <= fidlib.fid_from_statistics(few, few) <= 1e-6


def test_fid_between_diagonal_gaussians_equals_closed_form():
  # Diagonal covariances commute: FD = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
  rng = np.random.default_rng(5)
  d = 64
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) + 0.5
  s1, s2 = rng.uniform(0.01, 4.0, d), rng.uniform(0.01, 4.0, d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  got = fidlib.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(expected, rel=1e-6)
  # Same means: only the covariance term is left.
  got = fidlib.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s2))
  assert got == pytest.approx(np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2), rel=1e-6)


def test_statistics_npz_round_trip(tmp_path):
  rng = np.random.default_rng(2)
  s = fidlib.statistics_from_features(rng.standard_normal((100, 16)))
  fidlib.save_statistics(tmp_path / 'ref.npz', s)
  with np.load(tmp_path / 'ref.npz') as data:
    assert {'mu', 'sigma'} <= set(data.files)
  back = fidlib.load_statistics(tmp_path / 'ref.npz')
  np.testing.assert_array_equal(back.mu, s.mu)
  np.testing.assert_array_equal(back.sigma, s.sigma)
  assert back.n == 100
  # NVlabs/edm's reference files have only mu and sigma (float64 or float32).
  np.savez(tmp_path / 'edm.npz', mu=s.mu.astype(np.float32), sigma=s.sigma.astype(np.float32))
  edm = fidlib.load_statistics(tmp_path / 'edm.npz')
  assert edm.n is None and edm.mu.dtype == np.float64
  np.savez(tmp_path / 'bad.npz', mean=s.mu)
  with pytest.raises(ValueError, match='mu'):
    fidlib.load_statistics(tmp_path / 'bad.npz')
  with pytest.raises(FileNotFoundError, match='evaluate.py ref'):
    fidlib.load_statistics(tmp_path / 'missing.npz')


def test_streaming_stats_over_4_devices_equal_single_device():
  assert jax.device_count() >= 4, 'conftest should provide 4 fake CPU devices'
  rng = np.random.default_rng(3)
  feats = (rng.standard_normal((150, 24)) * rng.uniform(0.5, 2, 24) + rng.uniform(0, 3, 24)).astype(
    np.float32
  )
  expected = fidlib.statistics_from_features(feats)

  mesh = Mesh(np.array(jax.devices()[:4]), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  multi = fidlib.StreamingStats()
  for lo in range(0, 150, 64):  # batches of 64 = 4 x 16; the last (22 rows) is padded and masked
    chunk = feats[lo : lo + 64]
    mask = np.arange(64) < len(chunk)
    padded = np.concatenate([chunk, np.full((64 - len(chunk), 24), 7.0, np.float32)])
    x = jax.device_put(padded, sharding)
    assert fidlib._batch_axes(x)[0] is mesh  # the shard_map + psum path is the one exercised
    multi.update(x, jax.device_put(mask, sharding))
  single = fidlib.StreamingStats()
  for lo in range(0, 150, 50):
    single.update(jax.device_put(feats[lo : lo + 50], jax.devices()[0]))

  for got in (multi.statistics(), single.statistics()):
    assert got.n == 150
    np.testing.assert_allclose(got.mu, expected.mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sigma, expected.sigma, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    multi.statistics().sigma, single.statistics().sigma, rtol=1e-5, atol=1e-5
  )
  merged = fidlib.StreamingStats().merge(multi).merge(single).statistics()
  assert merged.n == 300
  np.testing.assert_allclose(merged.mu, expected.mu, rtol=1e-5, atol=1e-6)


def test_quantize_images():
  x = jnp.array([-1.5, -1.0, -0.99, 0.0, 0.5, 1.0, 2.0])
  np.testing.assert_array_equal(fidlib.quantize_images(x), [0, 0, 1, 128, 191, 255, 255])


# --------------------------------------------------------------------------------------------------------
# KID and IS.


def test_kid_equals_direct_computation():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((60, 8))
  y = rng.standard_normal((50, 8)) * 1.3 + 0.2
  mean, std = fidlib.kernel_inception_distance(x, y, num_subsets=5, subset_size=40, seed=7)
  draws = np.random.RandomState(7)
  mmds = []
  for _ in range(5):
    a = x[draws.choice(60, 40, replace=False)]
    b = y[draws.choice(50, 40, replace=False)]
    k = lambda u, v: (u @ v / 8 + 1) ** 3
    m = 40
    kxx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / (m * m)
    mmds.append(kxx + kyy - 2 * kxy)
  assert mean == pytest.approx(np.mean(mmds), rel=1e-10)
  assert std == pytest.approx(np.std(mmds), rel=1e-8)
  # Same distribution: ~0 (unbiased, so it may dip below 0); different: clearly positive.
  same = fidlib.kernel_inception_distance(x[:30], x[30:], num_subsets=20, subset_size=30)[0]
  assert abs(same) < 0.2 * mean


def test_inception_score_equals_direct_computation():
  rng = np.random.default_rng(5)
  logits = rng.standard_normal((103, 12)) * 3
  mean, std = fidlib.inception_score(logits, splits=10, seed=11)
  z = logits[np.random.RandomState(11).permutation(103)]
  p = scipy.special.softmax(z, axis=1)
  scores = []
  for i in range(10):
    chunk = p[i * 103 // 10 : (i + 1) * 103 // 10]
    # E_x KL(p(y|x) || p(y)) = H(p(y)) - E_x H(p(y|x)) when p(y) is the chunk's mean prediction.
    scores.append(
      np.exp(scipy.stats.entropy(chunk.mean(0)) - np.mean(scipy.stats.entropy(chunk, axis=1)))
    )
  assert mean == pytest.approx(np.mean(scores), rel=1e-10)
  assert std == pytest.approx(np.std(scores), rel=1e-8)
  # Uninformative predictions score 1; confident, evenly spread ones score the number of classes.
  assert fidlib.inception_score(np.zeros((100, 12)))[0] == pytest.approx(1.0)
  assert fidlib.inception_score(np.tile(np.eye(12) * 50, (10, 1)), shuffle=False, splits=10)[
    0
  ] == pytest.approx(12, rel=1e-6)


# --------------------------------------------------------------------------------------------------------
# Digits evaluator.


def test_digits_split_is_the_datasets_split():
  train_idx, test_idx = dc.digits_split_indices('train'), dc.digits_split_indices('test')
  assert len(train_idx) == 1438 and len(test_idx) == 359
  assert np.intersect1d(train_idx, test_idx).size == 0
  images, labels = dc.load_digits_split('test')
  assert images.shape == (359, 8, 8, 1) and images.dtype == np.uint8 and images.max() == 255
  assert np.all(np.bincount(labels, minlength=10) >= 35)  # stratified: ~36 per class
  # The evaluator restates the TFDS builder's split and scaling; they must not drift apart.
  digits = pytest.importorskip('diffjax.data.digits')
  all_images, all_labels = digits.load_sklearn_digits()
  splits = digits.split_indices(all_labels)
  np.testing.assert_array_equal(splits['train'], train_idx)
  np.testing.assert_array_equal(splits['test'], test_idx)
  np.testing.assert_array_equal(all_images[test_idx], images)


def test_digits_classifier_accuracy_and_fd():
  test_images, test_labels = dc.load_digits_split('test')
  m = dc.digits_metrics(test_images, test_labels)
  assert m['accuracy'] >= 0.97
  assert m['num_images'] == 359 and 0.9 < m['confidence'] <= 1.0
  noise = np.random.default_rng(0).integers(0, 256, (360, 8, 8, 1), dtype=np.uint8)
  noise_fd = dc.digits_metrics(noise)['fd']
  assert m['fd'] < 10.0 and noise_fd > 20 * m['fd']
  # The stored reference statistics are those of the stored weights on the train split.
  train_images, _ = dc.load_digits_split('train')
  recomputed = fidlib.statistics_from_features(dc.digits_features(train_images))
  stored = dc.digits_reference_statistics('train')
  assert fidlib.fid_from_statistics(recomputed, stored) < 1e-6
  assert dc.digits_logits(train_images[:3, ..., 0]).shape == (3, 10)
  with pytest.raises(ValueError, match='quantize_images'):
    dc.digits_metrics(test_images.astype(np.float32) / 127.5 - 1)
