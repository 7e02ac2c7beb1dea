"""Tests of the input pipeline and the built-in digits dataset (diffjax.data)."""

import os
import time
from unittest import mock

import numpy as np
import pytest

import diffjax.data as dj_data
from diffjax import registry
from diffjax.data import digits as digits_lib
from diffjax.data import pipeline, sources, specs


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A TFDS data dir with the digits prepared once for the module."""
  path = str(tmp_path_factory.mktemp('tfds'))
  digits_lib.prepare_digits(path)
  return path


def _sklearn_uint8():
  from sklearn.datasets import load_digits

  bunch = load_digits()
  # The documented conversion, written out independently of the builder: round(v·255/16), half up.
  return np.floor(bunch.images * 255.0 / 16.0 + 0.5).astype(np.uint8), bunch.target


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


# ------------------------------------------------------------------------------------------------
# The digits builder.
# ------------------------------------------------------------------------------------------------


def test_digits_builder_matches_sklearn(data_dir):
  t0 = time.time()
  builder = digits_lib.prepare_digits(data_dir)  # Already prepared: must be a cheap no-op.
  assert time.time() - t0 < 2.0
  splits = builder.info.splits
  assert splits['train'].num_examples + splits['test'].num_examples == 1797
  assert (splits['train'].num_examples, splits['test'].num_examples) == (1438, 359)
  assert builder.info.features['label'].num_classes == 10
  images, targets = _sklearn_uint8()
  seen = []
  for split in ('train', 'test'):
    source = builder.as_data_source(split=split)
    examples = [source[i] for i in range(len(source))]
    index = np.array([ex['index'] for ex in examples])
    stored = np.stack([ex['image'] for ex in examples])
    assert stored.shape == (len(source), 8, 8, 1) and stored.dtype == np.uint8
    np.testing.assert_array_equal(stored[..., 0], images[index])
    np.testing.assert_array_equal([ex['label'] for ex in examples], targets[index])
    counts = np.bincount(targets[index], minlength=10)
    assert (counts > 0).all()
    if split == 'test':  # Stratified: every class holds out round(20%) of its examples.
      np.testing.assert_array_equal(counts, np.round(0.2 * np.bincount(targets)).astype(int))
    seen.append(index)
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(1797))
  # The split is fixed: it is exactly what the documented recipe gives.
  np.testing.assert_array_equal(np.sort(seen[1]), digits_lib.split_indices(targets)['test'])
  assert images.max() == 255 and images.min() == 0


def test_digits16_builder(data_dir):
  builder = digits_lib.prepare_digits(data_dir, '16x16')
  source = builder.as_data_source(split='test')
  example = source[0]
  assert example['image'].shape == (16, 16, 1)
  expected, _ = digits_lib.load_sklearn_digits(16)
  np.testing.assert_array_equal(example['image'], expected[example['index']])
  spec = dj_data.get_dataset_spec('digits16')
  assert spec.resolution == 16 and spec.channels == 1 and spec.num_classes == 10


# ------------------------------------------------------------------------------------------------
# Specs and errors.
# ------------------------------------------------------------------------------------------------


def test_specs_and_registry():
  spec = dj_data.get_dataset_spec('digits')
  assert (spec.resolution, spec.channels, spec.num_classes) == (8, 1, 10)
  assert dj_data.get_dataset_spec('cifar10').shape == (32, 32, 3)
  assert dj_data.get_dataset_spec('celeb_a').resolution == 64
  assert dj_data.get_dataset_spec('imagenet64').num_classes == 1000
  for name in ('digits', 'cifar10', 'celeb_a', 'imagenet64', 'ffhq64', 'afhqv2_64', 'image_folder'):
    assert name in registry.names('dataset')
  assert registry.get('dataset', 'cifar10') is dj_data.get_dataset_spec('cifar10')


def test_unknown_dataset_lists_known():
  with pytest.raises(registry.UnknownNameError) as info:
    dj_data.make_iterator('cifar11')
  message = str(info.value)
  assert "'cifar11'" in message and 'cifar10' in message and 'digits' in message


def test_unprepared_dataset_says_how_without_downloading(tmp_path):
  import tensorflow_datasets as tfds

  t0 = time.time()
  # Any download attempt fails the test loudly instead of retrying for minutes.
  with (
    mock.patch.object(tfds.download.DownloadManager, 'download', side_effect=AssertionError),
    mock.patch.object(
      tfds.download.DownloadManager, 'download_and_extract', side_effect=AssertionError
    ),
  ):
    with pytest.raises(dj_data.DatasetNotPreparedError) as info:
      dj_data.make_iterator(
        'cifar10', global_batch_size=8, data_dir=str(tmp_path), process_index=0, process_count=1
      )
  assert time.time() - t0 < 10.0
  message = str(info.value)
  assert 'tfds build cifar10' in message and str(tmp_path) in message
  assert 'data_dir' in message
  assert not os.path.exists(os.path.join(tmp_path, 'downloads'))


def test_missing_image_folder_says_how(tmp_path):
  with pytest.raises(dj_data.DatasetNotPreparedError, match='<class>'):
    dj_data.make_iterator(
      'ffhq64', global_batch_size=8, data_dir=str(tmp_path), process_index=0, process_count=1
    )


def test_bad_batch_and_split(data_dir):
  with pytest.raises(ValueError, match='multiple of the process count'):
    dj_data.make_iterator(
      'digits', global_batch_size=10, data_dir=data_dir, process_index=0, process_count=4
    )
  with pytest.raises(ValueError, match='no split'):
    dj_data.make_iterator(
      'digits',
      split='validation',
      global_batch_size=8,
      data_dir=data_dir,
      process_index=0,
      process_count=1,
    )


# ------------------------------------------------------------------------------------------------
# The iterator.
# ------------------------------------------------------------------------------------------------


def _iterator(data_dir, **kwargs):
  args = dict(global_batch_size=128, seed=3, data_dir=data_dir, process_index=0, process_count=1)
  args.update(kwargs)
  return dj_data.make_iterator('digits', **args)


def test_batches_shapes_values(data_dir):
  images, labels = dj_data.load_split_as_array('digits', 'train', data_dir)
  assert images.shape == (1438, 8, 8, 1) and images.dtype == np.uint8 and labels.dtype == np.int32
  it = _iterator(data_dir)
  batch = next(it)
  assert batch['image'].shape == (128, 8, 8, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (128,) and batch['label'].dtype == np.int32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  assert batch['image'].min() == -1.0 and batch['image'].max() == 1.0
  # Every image is x/127.5 − 1 of a stored example, with its label.
  flat = images.reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0
  for image, label in zip(batch['image'][:16], batch['label'][:16]):
    match = np.flatnonzero((flat == image.reshape(-1)).all(axis=1))
    assert len(match) >= 1 and label in labels[match]
  assert it.step == 1 and it.exact_resume and it.local_batch_size == 128
  it.close()


def test_resume_is_exact_across_epochs(data_dir):
  # 1438 examples, batch 512: epochs end inside steps 2, 5 and 8.
  full = _batches(_iterator(data_dir, global_batch_size=512, x_flip=True), 9)
  resumed = _iterator(data_dir, global_batch_size=512, x_flip=True, start_step=4)
  _assert_batches_equal(full[4:], _batches(resumed, 5))
  assert resumed.step == 9
  # Epochs are fresh permutations: every epoch covers each example exactly once.
  images, _ = dj_data.load_split_as_array('digits', 'train', data_dir)
  order = pipeline._Order(len(images), 3, shuffle=True)
  first_epochs = order.indices(np.arange(2 * len(images)))
  for e in range(2):
    np.testing.assert_array_equal(np.sort(first_epochs[e * 1438 : (e + 1) * 1438]), np.arange(1438))
  assert not np.array_equal(first_epochs[:1438], first_epochs[1438:])


def test_other_seed_other_order(data_dir):
  a = next(_iterator(data_dir, seed=0))
  b = next(_iterator(data_dir, seed=1))
  assert not np.array_equal(a['label'], b['label'])


@pytest.mark.parametrize('count', [2, 4])
def test_processes_split_the_global_batch(data_dir, count):
  kwargs = dict(global_batch_size=256, x_flip=True, start_step=5)
  single = _batches(_iterator(data_dir, **kwargs), 2)
  parts = [
    _batches(_iterator(data_dir, process_index=i, process_count=count, **kwargs), 2)
    for i in range(count)
  ]
  for step in range(2):
    for key in ('image', 'label'):
      pieces = [p[step][key] for p in parts]
      assert all(len(x) == 256 // count for x in pieces)
      np.testing.assert_array_equal(np.concatenate(pieces), single[step][key])


def test_x_flip_mirrors_half(data_dir):
  plain = _batches(_iterator(data_dir, global_batch_size=512), 2)
  flipped = _batches(_iterator(data_dir, global_batch_size=512, x_flip=True), 2)
  is_flipped = []
  for a, b in zip(plain, flipped):
    np.testing.assert_array_equal(a['label'], b['label'])
    same = (a['image'] == b['image']).all(axis=(1, 2, 3))
    mirrored = (a['image'][:, :, ::-1] == b['image']).all(axis=(1, 2, 3))
    assert (same | mirrored).all()
    is_flipped.append(mirrored & ~same)
  assert 0.4 < np.concatenate(is_flipped).mean() < 0.6


def test_single_pass_in_stored_order(data_dir):
  images, labels = dj_data.load_split_as_array('digits', 'test', data_dir)
  it = _iterator(data_dir, split='test', global_batch_size=100, shuffle=False, repeat=False)
  batches = list(it)
  assert [len(b['label']) for b in batches] == [100, 100, 100, 59]
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]), labels)
  got = np.concatenate([b['image'] for b in batches])
  np.testing.assert_array_equal(got, images.astype(np.float32) / 127.5 - 1.0)


def test_throughput(data_dir):
  it = _iterator(data_dir, x_flip=True)
  next(it)
  t0 = time.time()
  n = 0
  while time.time() - t0 < 0.5:
    n += len(next(it)['label'])
  it.close()
  assert n / (time.time() - t0) > 5000  # ≥ 5× the ~1000 img/s a small model consumes.


def test_synchronous_equals_prefetched(data_dir):
  a = _batches(_iterator(data_dir, prefetch=0), 3)
  b = _batches(_iterator(data_dir, prefetch=4), 3)
  _assert_batches_equal(a, b)


# ------------------------------------------------------------------------------------------------
# Real TFDS datasets (mocked), the streaming fallback and image folders.
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def mocked_cifar10():
  import tensorflow_datasets as tfds

  sources._load_split_cached.cache_clear()
  with (
    tfds.testing.mock_data(num_examples=48),
    mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', return_value=True),
  ):
    yield
  sources._load_split_cached.cache_clear()


def test_cifar10_path_with_mock_data(mocked_cifar10, tmp_path):
  kwargs = dict(global_batch_size=16, data_dir=str(tmp_path), process_index=0, process_count=1)
  full = _batches(dj_data.make_iterator('cifar10', **kwargs), 5)
  assert full[0]['image'].shape == (16, 32, 32, 3) and full[0]['image'].dtype == np.float32
  assert -1.0 <= full[0]['image'].min() and full[0]['image'].max() <= 1.0
  assert ((0 <= full[0]['label']) & (full[0]['label'] < 10)).all()
  _assert_batches_equal(
    full[3:], _batches(dj_data.make_iterator('cifar10', start_step=3, **kwargs), 2)
  )


def test_stream_fallback_with_mock_data(mocked_cifar10, tmp_path):
  spec = dj_data.register_dataset(
    specs.DatasetSpec(
      name='_test_stream', resolution=16, channels=3, num_classes=10, tfds_name='cifar10'
    )
  )
  try:
    it = dj_data.make_iterator(
      '_test_stream',
      global_batch_size=8,
      data_dir=str(tmp_path),
      process_index=1,
      process_count=2,
      x_flip=True,
    )
    batch = next(it)
    assert not it.exact_resume
    # The 32×32 mock images are resized to the spec's 16×16 on the way.
    assert batch['image'].shape == (4, 16, 16, 3) and batch['label'].shape == (4,)
    assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
    it.close()
  finally:
    registry._TABLE['dataset'].pop(spec.name)


def test_array_record_random_access_path(data_dir):
  """A large-dataset spec reads an array_record TFDS dataset by index (here: the digits)."""
  spec = dj_data.register_dataset(
    specs.DatasetSpec(
      name='_test_records', resolution=8, channels=1, num_classes=10, tfds_name='digits/8x8'
    )
  )
  try:
    kwargs = dict(global_batch_size=64, data_dir=data_dir, process_index=0, process_count=1)
    it = dj_data.make_iterator('_test_records', num_threads=2, **kwargs)
    assert it.exact_resume
    full = _batches(it, 4)
    resumed = dj_data.make_iterator('_test_records', start_step=2, **kwargs)
    _assert_batches_equal(full[2:], _batches(resumed, 2))
    # Same order and content as the in-memory path of the same data.
    _assert_batches_equal(full, _batches(dj_data.make_iterator('digits', **kwargs), 4))
  finally:
    registry._TABLE['dataset'].pop(spec.name)


def _write_folder(root, sizes):
  from PIL import Image

  rng = np.random.RandomState(0)
  for split, count in (('train', 6), ('test', 2)):
    for cls in ('cat', 'dog'):
      os.makedirs(os.path.join(root, split, cls))
      for i in range(count):
        h, w = sizes[i % len(sizes)]
        array = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
        Image.fromarray(array).save(os.path.join(root, split, cls, f'{i}.png'))


def test_image_folder(tmp_path):
  root = str(tmp_path / 'pets')
  _write_folder(root, [(20, 24), (16, 16)])
  spec = dj_data.register_image_folder('_test_pets', resolution=8, splits=('train', 'test'))
  try:
    assert dj_data.get_dataset_spec('_test_pets', data_dir=root).num_classes == 2
    kwargs = dict(global_batch_size=4, data_dir=root, process_index=0, process_count=1)
    full = _batches(dj_data.make_iterator('_test_pets', **kwargs), 6)
    assert full[0]['image'].shape == (4, 8, 8, 3)
    assert set(np.concatenate([b['label'] for b in full])) == {0, 1}
    _assert_batches_equal(
      full[4:], _batches(dj_data.make_iterator('_test_pets', start_step=4, **kwargs), 2)
    )
    images, labels = dj_data.load_split_as_array('_test_pets', 'test', root)
    assert images.shape == (4, 8, 8, 3) and sorted(labels) == [0, 0, 1, 1]
  finally:
    registry._TABLE['dataset'].pop(spec.name)


def test_preprocess_crop_and_resize():
  spec = dj_data.get_dataset_spec('celeb_a')
  image = np.zeros((218, 178, 3), np.uint8)
  image[39:179, 19:159] = 200  # Exactly the centred 140×140 crop is bright.
  out = dj_data.preprocess_image(image, spec)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, 200)


def test_abandoned_iterator_stops_its_thread(data_dir):
  import gc
  import threading

  it = _iterator(data_dir, prefetch=2)
  next(it)
  thread = it._thread
  del it
  gc.collect()
  thread.join(timeout=2.0)
  assert not thread.is_alive()
  assert not any(t is thread for t in threading.enumerate())


def test_importing_the_package_does_not_import_tensorflow():
  import subprocess
  import sys

  code = 'import sys, diffjax.data; assert "tensorflow" not in sys.modules, "TF imported"'
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  subprocess.run([sys.executable, '-c', code], check=True, timeout=60, cwd=root)
