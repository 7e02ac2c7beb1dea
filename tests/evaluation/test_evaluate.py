"""evaluate.py and diffjax.evaluation (sources, features, references, protocols): reference statistics, FID of runs and image sets, errors.

The published Inception weights can't be downloaded here, so every Inception call uses the seeded
random weights of the golden fixture (`tests/golden/inception_weights.py`); the plumbing (streaming,
padding, seeds, files) is what is tested, the network itself is tested in test_evaluation.py. Images
stay ≤ 8 per Inception call (299² on a CPU is ~0.3 s per image).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from diffjax import evaluation as ev
from diffjax import runs
from diffjax.evaluation import features as features_lib
from diffjax.evaluation import fid as fidlib
from diffjax.evaluation import inception_weights, protocols

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / 'tests' / 'golden'))
from inception_weights import golden_state_dict  # noqa: E402

BATCH = 4  # every Inception call in this file has this batch, so the network compiles once


@pytest.fixture(scope='module')
def variables():
  return inception_weights.inception_params_from_state_dict(
    golden_state_dict(inception_weights.inception_state_dict_layout()))


@pytest.fixture(scope='module')
def digits(data_dir):
  from diffjax import data
  images, _ = data.load_split_as_array('digits', 'test', data_dir=data_dir)
  return np.asarray(images)


@pytest.fixture(scope='module')
def workdir(data_dir, tmp_path_factory):
  from configs import edm
  from diffjax.training import loop
  config = edm.get_config('tiny')
  config.train.batch_size = 8
  config.train.total_images = 16
  config.train.num_preview = 0
  config.sample.num_steps = 2  # sampling cost is not what is tested here
  path = str(tmp_path_factory.mktemp('run'))
  loop.train(config, path, progress=False)
  return path


def _direct_features(variables, images):
  """pool3 features straight from the network, one unpadded batch of BATCH at a time."""
  import jax

  from diffjax import parallel
  mesh = parallel.make_mesh()
  fn = features_lib._inception_fn(variables, ('pool3',), mesh)  # the compiled network the runs use
  sharding = parallel.batch_sharding(mesh)
  return np.concatenate([np.asarray(fn(jax.device_put(images[i:i + BATCH], sharding))['pool3'])
                         for i in range(0, len(images), BATCH)])


def _assert_stats_close(a, b):
  # Streamed moments are float32 per batch (centred on the batch mean, combined in float64): agreement
  # to ~1e-5 of the largest entry is what float32 gives.
  np.testing.assert_allclose(a.mu, b.mu, rtol=1e-5, atol=1e-5 * np.abs(b.mu).max())
  np.testing.assert_allclose(a.sigma, b.sigma, rtol=1e-4, atol=1e-4 * np.abs(b.sigma).max())


# --------------------------------------------------------------------------------------------------------
# Reference statistics.


def test_ref_on_digits_equals_direct_computation(variables, data_dir, digits, tmp_path):
  out = str(tmp_path / 'refs' / 'digits-test.npz')
  # 6 images in batches of 4: the second batch is padded, and the padding must not count.
  stats = ev.reference_statistics('digits', split='test', data_dir=data_dir, out=out,
                                    max_images=6, keep_features=True, batch_size=BATCH,
                                    inception_variables=variables)
  feats = _direct_features(variables, digits[:8])[:6]
  expected = fidlib.statistics_from_features(feats)  # np.mean / np.cov in float64
  assert stats.n == 6
  with np.load(out) as f:
    assert {'mu', 'sigma'} <= set(f.files)
    assert f['mu'].shape == (2048,) and f['sigma'].shape == (2048, 2048)
    np.testing.assert_allclose(f['features'], feats, rtol=1e-5, atol=1e-5)
  _assert_stats_close(fidlib.load_statistics(out), expected)  # read as NVlabs/edm files are


# --------------------------------------------------------------------------------------------------------
# FID of image sets.


def test_fid_of_images_against_references(variables, digits, tmp_path):
  same, other = digits[:BATCH], digits[BATCH:2 * BATCH]
  np.savez(tmp_path / 'same.npz', images=same)
  np.savez(tmp_path / 'other.npz', images=other)
  ref = str(tmp_path / 'same_stats.npz')
  features = ev.source_features(ev.array_source(same), batch_size=BATCH,
                                  inception_variables=variables)
  ev.save_reference(ref, features.stats)

  itself = ev.evaluate_images(str(tmp_path / 'same.npz'), ref, batch_size=BATCH,
                                inception_variables=variables, out=str(tmp_path / 'r.json'))
  different = ev.evaluate_images(str(tmp_path / 'other.npz'), ref, batch_size=BATCH,
                                   inception_variables=variables)
  # Not exactly 0: float32 round-off leaves tiny negative eigenvalues in a rank-3 2048² covariance,
  # which the PSD square root clips (~1e-2 here, against ~20 between different images).
  assert itself['num_images'] == BATCH and abs(itself['fid']) < 1e-3 * different['fid']
  assert different['fid'] > 1e-2
  assert json.loads((tmp_path / 'r.json').read_text())['fid'] == itself['fid']

  # A folder of grey PNGs (read as RGB files) against statistics that carry their features (so KID
  # works): the same pixels give the same features as the 1-channel array. (KID only: each FID
  # costs two 2048² eigendecompositions and an SVD, seconds to a minute on a busy CPU.)
  other_features = ev.source_features(ev.array_source(other), keep_pool3=True,
                                        batch_size=BATCH, inception_variables=variables)
  other_ref = ev.save_reference(str(tmp_path / 'other_ref.npz'), other_features.stats,
                                  other_features.pool3)
  from PIL import Image
  folder = tmp_path / 'pngs' / 'nested'
  folder.mkdir(parents=True)
  for i, image in enumerate(other):
    Image.fromarray(image[..., 0]).save(folder / f'{i:03d}.png')
  result = ev.evaluate_images(str(tmp_path / 'pngs'), other_ref, metrics='kid',
                                batch_size=BATCH, inception_variables=variables)
  assert result['num_images'] == BATCH and 'fid' not in result
  f = other_features.pool3
  expected_kid = fidlib.kernel_inception_distance(f, f, subset_size=BATCH)
  assert result['kid_mean'] == pytest.approx(expected_kid[0], rel=1e-3, abs=1e-6)


def test_openai_batches_are_read_as_images(digits, tmp_path):
  """openai's sample and reference batches keep their images as `arr_0`."""
  path = str(tmp_path / 'openai.npz')
  np.savez(path, arr_0=digits[:5], arr_1=np.arange(5))
  assert ev.check_reference(path) == 'images'
  read = np.concatenate(list(ev.file_source(path, batch_size=2).batches()))
  np.testing.assert_array_equal(read, digits[:5])


def test_kid_needs_reference_features(tmp_path):
  stats = fidlib.Statistics(np.zeros(3), np.eye(3), 4)
  fidlib.save_statistics(tmp_path / 's.npz', stats)
  with pytest.raises(ValueError, match='KID needs the reference features'):
    ev.check_reference(str(tmp_path / 's.npz'), need_features=True)
  assert ev.check_reference(str(tmp_path / 's.npz')) == 'statistics'
  assert ev.check_reference('digits:test') == 'dataset'
  with pytest.raises(FileNotFoundError, match='No reference at'):
    ev.check_reference(str(tmp_path / 'missing.npz'))


def test_seed_sets():
  assert ev.seed_sets(3, first_seed=10) == [[10, 11, 12]]
  assert ev.seed_sets(2, protocol='edm3') == [[0, 1], [2, 3], [4, 5]]
  assert ev.seed_sets(99, seeds='0-2,7') == [[0, 1, 2, 7]]
  assert protocols._seed_text([0, 1, 2, 7, 9, 10]) == '0-2,7,9-10'
  with pytest.raises(ValueError, match='backwards'):
    ev.seed_sets(4, seeds='5-1')
  with pytest.raises(ValueError, match='edm3 picks its seeds'):
    ev.seed_sets(4, seeds='0-3', protocol='edm3')
  with pytest.raises(ValueError, match='Unknown protocol'):
    ev.seed_sets(4, protocol='edm5')


# --------------------------------------------------------------------------------------------------------
# FID of a trained run.


def test_fid_of_run_through_inception(variables, workdir, digits, tmp_path):
  # One set through the real Inception network (each 2048² FID costs ~10 s here); the edm3
  # protocol's three sets and their minimum are test_resumable_fid's, with tiny features.
  ref = str(tmp_path / 'ref.npz')
  ev.save_reference(ref, ev.source_features(ev.array_source(digits[:BATCH]), batch_size=BATCH,
                                                inception_variables=variables).stats)
  result = ev.evaluate_fid(workdir, ref, num_images=3, batch_size=BATCH,
                             inception_variables=variables)
  assert result['seeds'] == '0-2' and 'sets' not in result and result['protocol'] is None
  assert np.isfinite(result['fid']) and result['fid'] > 0 and result['num_images'] == 3
  path = pathlib.Path(result['json'])
  assert path.parent == pathlib.Path(workdir) / 'eval' and f'{result["step"]:08d}' in path.name
  assert json.loads(path.read_text())['fid'] == result['fid']
  assert path.with_suffix('.png').exists()

  # Image k depends on seed k only: seeds 3-5 alone (one padded batch) and as part of 0-5 (split
  # over two batches, at other positions) give the same features.
  run = runs.load(workdir)
  alone = ev.generated_features(run, [3, 4, 5], batch_size=BATCH, keep_pool3=True,
                                  inception_variables=variables)
  within = ev.generated_features(run, range(6), batch_size=BATCH, keep_pool3=True,
                                   inception_variables=variables)
  assert alone.num_images == 3 and within.num_images == 6
  np.testing.assert_allclose(alone.pool3, within.pool3[3:], rtol=1e-4, atol=1e-4)


def test_digits_result_names_say_what_was_evaluated():
  name = protocols._digits_result_name
  assert name(1200, 'heun', 18, 0.0, {}) == 'digits_00001200_heun18'
  assert name(1200, 'heun', 18, 0.5, {}) == 'digits_00001200_heun18_w0p5'
  assert name(1200, 'heun', 18, 0.0, {'churn': 40.0, 's_noise': 1.003}, 500, 7) == (
    'digits_00001200_heun18_churn40_noise1p003_n500_seed7')
  assert name(1200, 'dpmpp_2m', 10, 0.0, {'grid': 'exponential'}) == (
    'digits_00001200_dpmpp_2m10_gridexponential')
  # FID names too: a σ-grid name (evaluate.py fid --grid=NAME) is a word, not a number.
  assert protocols._result_name(1200, 'unipc', 10, 0.0, {'grid': 'polyexponential', 's_noise': 1.5},
                                50_000, 'edm3') == (
    'fid_00001200_unipc10_gridpolyexponential_noise1p5_n50000_edm3')
  settings = [('heun', 18, 0.0), ('heun', 9, 0.0), ('euler', 18, 0.0), ('heun', 18, 2.0)]
  assert len({name(1200, *x, {}) for x in settings}) == len(settings)


def test_digits_evaluations_of_one_checkpoint_do_not_collide(workdir):
  a = ev.evaluate_digits(workdir, num_images=10, batch_size=10)
  # A string sampler option (evaluate.py digits --grid=NAME) goes through to the sampler and
  # into the result's name and JSON.
  b = ev.evaluate_digits(workdir, num_images=10, batch_size=10, sampler='euler', num_steps=3,
                         grid='exponential')
  assert a['json'] != b['json'] and b['json'].endswith('_euler3_gridexponential_n10.json')
  assert json.loads(pathlib.Path(b['json']).read_text())['grid'] == 'exponential'
  for result in (a, b):
    path = pathlib.Path(result['json'])
    assert path.parent == pathlib.Path(workdir) / 'eval' and path.exists()
    assert path.name.startswith(f'digits_{result["step"]:08d}_{result["sampler"]}{result["num_steps"]}')
    assert json.loads(path.read_text())['sampler'] == result['sampler']
    assert path.with_suffix('.png').exists()


# --------------------------------------------------------------------------------------------------------
# The command line: bad input ends in one line and a non-zero exit.


def test_cli_bad_inputs(workdir, digits, tmp_path):
  np.savez(tmp_path / 'images.npz', images=digits[:4])
  # No Inception weights anywhere the search looks, even on a machine that has them.
  env = dict(os.environ, HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / 'cache'),
             TORCH_HOME=str(tmp_path / 'torch'), DIFFJAX_INCEPTION_WEIGHTS='')
  cases = [
    (['nope'], 'Unknown mode'),
    (['fid', f'--images={tmp_path / "images.npz"}', f'--ref={tmp_path / "missing.npz"}'],
     'No reference at'),
    (['fid', f'--workdir={workdir}', '--ref=digits', '--seeds=5-1'], 'runs backwards'),
    (['ref', '--dataset=digits', '--max_images=4'], 'Inception weights were not found'),
  ]
  for args, message in cases:
    proc = subprocess.run([sys.executable, 'evaluate.py', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, args
    assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], (args, proc.stderr[-2000:])
    if args[0] == 'nope':
      assert 'ref, fid, digits' in lines[0]
