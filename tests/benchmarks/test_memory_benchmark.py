"""benchmarks/memory.py's helpers: the copy counter against a module whose copy is known."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'benchmarks'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import memory  # noqa: E402


def test_copy_bytes_counts_shapes_and_dtypes():
  hlo = ('  %copy.3 = f32[3,3,128,128]{3,2,1,0} copy(%p)\n'
         '  %c = bf16[10]{0} copy(%a)\n  ROOT %s = s32[] copy(%b)\n  %n = f32[7]{0} negate(%x)')
  assert memory.copy_bytes(hlo) == 3 * 3 * 128 * 128 * 4 + 10 * 2 + 4


def test_copy_bytes_sees_the_copy_a_donated_output_needs():
  # The donated input is returned as an output and also read into a second one: XLA keeps the
  # input alive by copying it, 1000 float32 = 4000 bytes.
  f = jax.jit(lambda x: (x[::-1] + 1, x * 2), donate_argnums=0)
  assert memory.copy_bytes(f.lower(jnp.ones(1000)).compile().as_text()) >= 4000


def test_rss_peak_is_at_least_current():
  now, peak = memory.rss()
  assert 0 < now <= peak
