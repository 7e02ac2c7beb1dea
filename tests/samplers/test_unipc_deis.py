"""UniPC and DEIS against diffusers' schedulers, and their order of convergence on Gaussian data.

The golden file (scripts/make_kdiffusion_golden.py) holds diffusers' UniPCMultistepScheduler
(bh1, bh2; orders 1–3) and DEISMultistepScheduler (orders 1–3) stepped in float64 on the exact
mixture denoiser, on their own Karras σ-grids (which the file holds too). On Gaussian data the
PF-ODE has a closed-form solution, so the order of each method is measured exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from solver_problems import (
  convergence_orders,
  gaussian_denoiser,
  gaussian_solution,
  load_golden,
  mixture_denoiser,
)

from diffjax import samplers
from diffjax.processes import schedules

GOLDEN = load_golden('kdiffusion_diffusers_multistep')
MIXTURE = load_golden('kdiffusion_samplers')
DENOISE = mixture_denoiser(MIXTURE['means'], MIXTURE['stds'], MIXTURE['weights'])
TOL = 4e-6  # float32 against float64 diffusers, states of size ~1 (largest seen: 1.1e-6)

CASES = {f'unipc_{t}_order{p}': (samplers.unipc, dict(order=p, solver_type=t))
         for t in ('bh1', 'bh2') for p in (1, 2, 3)}
CASES.update({f'deis_order{p}': (samplers.deis, dict(order=p)) for p in (1, 2, 3)})


def start(name):
  sigmas = GOLDEN[f'{name}__sigmas']
  return jnp.asarray(GOLDEN['latents'] * sigmas[0], jnp.float32), sigmas


@pytest.mark.parametrize('name', CASES)
def test_equals_diffusers(name):
  fn, kwargs = CASES[name]
  x0, sigmas = start(name)
  out = np.asarray(fn(DENOISE, x0, sigmas, **kwargs), np.float64)
  assert np.max(np.abs(out - GOLDEN[name])) < TOL


def test_traced_grid_equals_diffusers():
  """The coefficient tables in jnp float32 (a grid passed into jit) agree as well."""
  for name in ('unipc_bh2_order3', 'deis_order3'):
    fn, kwargs = CASES[name]
    x0, sigmas = start(name)
    run = jax.jit(functools.partial(lambda f, kw, x, s: f(DENOISE, x, s, **kw), fn, kwargs))
    out = run(x0, jnp.asarray(sigmas, jnp.float32))
    assert np.max(np.abs(np.asarray(out, np.float64) - GOLDEN[name])) < TOL, name


def test_unip2_is_dpmpp_2m():
  """UniP-2 with ρ = ½ is DPM-Solver++(2M) step for step (an independent identity)."""
  x0, sigmas = start('unipc_bh2_order2')
  unip = samplers.unipc(DENOISE, x0, sigmas, order=2, corrector=False, lower_order_final=False)
  np.testing.assert_allclose(unip, samplers.dpmpp_2m(DENOISE, x0, sigmas), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Order of convergence, in float64: log2 of the error ratio from N = 32 to N = 64 steps.

# Log-uniform σ from 80 (where D ≈ 0, so the first-order warm-up step costs nothing) to 0.05;
# lower_order_final off so that every later step runs at the method's order.
ORDERS = {
    'unipc-1': (samplers.unipc, dict(order=1), (1.7, 2.4)),
    'unipc-2': (samplers.unipc, dict(order=2), (2.6, 3.5)),
    'unipc-3': (samplers.unipc, dict(order=3), (3.3, 4.6)),
    'unip-2 (no corrector)': (samplers.unipc, dict(order=2, corrector=False), (1.7, 2.4)),
    'deis-2': (samplers.deis, dict(order=2), (1.7, 2.4)),
    'deis-3': (samplers.deis, dict(order=3), (2.7, 4.6)),
}


@functools.lru_cache(maxsize=None)
def gaussian_errors(name):
  fn, kwargs, _ = ORDERS[name]
  latents = np.random.RandomState(0).randn(16, 1)
  errors = []
  with jax.enable_x64(True):
    for n in (32, 64):
      sigmas = schedules.exponential(n + 1, 0.05, 80.0)[:-1]
      x0 = latents * sigmas[0]
      out = np.asarray(fn(gaussian_denoiser, jnp.asarray(x0), sigmas, lower_order_final=False,
                          **kwargs))
      exact = gaussian_solution(x0, sigmas[0], sigmas[-1])
      errors.append(np.max(np.abs(out - exact)) / np.max(np.abs(exact)))
  return errors


@pytest.mark.parametrize('name', ORDERS)
def test_order_of_convergence_on_gaussian_data(name):
  errors = gaussian_errors(name)
  order = convergence_orders(errors)[-1]
  lo, hi = ORDERS[name][2]
  assert lo < order < hi, (errors, order)


def test_corrector_raises_the_order():
  """UniC turns UniP-p (order p) into UniPC-p (order p + 1) at no extra evaluation."""
  with_c = convergence_orders(gaussian_errors('unipc-2'))[-1]
  without = convergence_orders(gaussian_errors('unip-2 (no corrector)'))[-1]
  assert with_c > without + 0.7
