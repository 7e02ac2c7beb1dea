"""The multistep solvers' loops copy no image per step (their history is a ring written in place).

A history rotated through the scan carry ((D_i, D_{i−1}) ← (D_{i−1}, D_{i−2})) made XLA:CPU's copy
insertion duplicate every carried image every step (3–7 copies per step: most of the multistep
overhead in benchmarks/solver_overhead.py, benchmarks/NOTES.md 2026-12-07b). `stepping.ring`
replaced it; this compiles each solver on a trivial denoiser and counts the copies of image-sized
buffers left in its loop body.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from diffjax import samplers

SHAPE = (4, 8, 8, 3)  # flat state [4, 192]


def _loop_copies(name: str, **options) -> int:
  solve = getattr(samplers, name)
  fn = jax.jit(lambda z, sigmas: solve(lambda x, sigma: 0.5 * x, z, sigmas, **options))
  text = fn.lower(jnp.zeros(SHAPE), jnp.linspace(1.0, 0.0, 9)).compile().as_text()
  bodies = re.findall(r'\n(%[\w.\-]*region[\w.\-]* \(.*?\n})', text, re.S)
  assert bodies, 'no while loop found in the compiled solver'
  image = rf'f32\[(?:\d+,)*{SHAPE[0]},{SHAPE[1] * SHAPE[2] * SHAPE[3]}\]'
  return sum(len(re.findall(rf'= {image}[^ ]* copy\(', body)) for body in bodies)


# One per loop shape: LMS's (deis's is the same), UniPC's two states, 2M's with noise (3M's is 2M's
# with one more slot).
@pytest.mark.parametrize('name,options', [
    ('lms', {}), ('unipc', {}),
    ('dpmpp_2m_sde', {'key': samplers.seed_keys(range(4)), 'noise_sampler': 'gaussian'})])
def test_multistep_loop_copies_no_image(name, options):
  assert _loop_copies(name, **options) == 0
