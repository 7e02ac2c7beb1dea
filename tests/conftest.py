"""Test set-up shared by every test file.

Four fake CPU devices so data-parallel code is exercised on every run, and a persistent compilation
cache so repeated runs of the suite skip most XLA compiles.
"""

import os

# Must happen before JAX is first imported anywhere in the test process.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402

_CACHE = os.environ.get(
    'DIFFJAX_TEST_CACHE', os.path.join(os.path.dirname(os.path.dirname(__file__)), '.jax_cache'))
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
