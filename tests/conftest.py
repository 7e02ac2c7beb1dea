"""Test set-up shared by every test file.

Four fake CPU devices so data-parallel code is exercised on every run, and a persistent compilation
cache so repeated runs of the suite skip most XLA compiles.
"""

import os

# Must happen before JAX is first imported anywhere in the test process (and the entry points the
# tests start inherit it). Backend optimization level 0: the tests' tiny programs cost more to
# compile than to run, and LLVM's -O0 cut a cold test_training.py from 226 s to 179 s here. It
# changes code generation only; benchmarks/ and real runs keep XLA's default.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4 '
                                   '--xla_backend_optimization_level=0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402

_CACHE = os.environ.get(
    'DIFFJAX_TEST_CACHE', os.path.join(os.path.dirname(os.path.dirname(__file__)), '.jax_cache'))
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


import pytest  # noqa: E402


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A TFDS data dir with the digits prepared, as $TFDS_DATA_DIR for the module (then restored).

  Prepared here, once, before any child process could race to prepare it.
  """
  from diffjax.data import digits
  path = str(tmp_path_factory.mktemp('tfds'))
  digits.prepare_digits(path)
  old = os.environ.get('TFDS_DATA_DIR')
  os.environ['TFDS_DATA_DIR'] = path
  yield path
  if old is None:
    os.environ.pop('TFDS_DATA_DIR', None)
  else:
    os.environ['TFDS_DATA_DIR'] = old
