"""Per-NFE overhead of the σ-grid solvers: slope of call time between two step counts.

A trivial denoiser D(x) = x/2 at 16×32×32×3 on a traced grid (as benchmarks/bench_jax.py times
Heun), every solver measured in the same process, rounds interleaved so that the load of a shared
machine falls on all of them alike. Prints one line per solver: µs per NFE (median over rounds),
and its ratio to Heun's in the same round.

    python benchmarks/solver_overhead.py [--rounds=5] [--solvers=heun,dpmpp_2m,...] [--floor]

A solver named NAME:gaussian gets noise_sampler='gaussian' (the SDE solvers default to Brownian
noise). --floor adds what XLA:CPU's loop costs by itself at this size, as two more rows: a scan
whose body carries one scalar ('empty scan'), and one whose body carries one image, x ← a_i·x
('scan, 1 image').
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffjax import samplers  # noqa: E402
from diffjax.processes import schedules  # noqa: E402

# (NFE at n steps) per solver: two-evaluation solvers pay 2n − 1.
TWO_EVALUATIONS = {'heun', 'dpm_2', 'dpm_2_ancestral', 'dpmpp_2s_ancestral', 'dpmpp_sde'}
DEFAULT = ('heun', 'dpm_2', 'dpmpp_2m', 'lms', 'unipc', 'deis', 'dpmpp_3m_sde', 'euler_ancestral')


def timed(fn, *args, repeats: int = 3) -> float:
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', default='18,256')
  parser.add_argument('--solvers', default=','.join(DEFAULT))
  parser.add_argument('--floor', action='store_true')
  args = parser.parse_args()
  short, long = (int(s) for s in args.steps.split(','))
  x = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  keys = samplers.seed_keys(range(16))
  trivial = lambda z, sigma: 0.5 * z
  fns = {}
  for name in args.solvers.split(','):
    solver, _, noise = name.partition(':')
    solve = getattr(samplers, solver)
    options = {'key': keys} if solver not in ('heun', 'dpm_2', 'dpmpp_2m', 'lms', 'unipc',
                                              'deis') else {}
    if noise:
      options['noise_sampler'] = noise
    fns[name] = jax.jit(lambda z, s, solve=solve, options=options: solve(
        trivial, z * s[0], s, **options))
  if args.floor:
    fns['empty scan'] = jax.jit(lambda z, s: jax.lax.scan(
        lambda c, a: (c + a, None), jnp.zeros((), z.dtype), s[1:])[0])
    fns['scan, 1 image'] = jax.jit(lambda z, s: jax.lax.scan(
        lambda c, a: (c * a, None), z, s[1:])[0])
  grids = {n: jnp.asarray(schedules.karras(n), jnp.float32) for n in (short, long)}
  slopes = {name: [] for name in fns}
  for _ in range(args.rounds):
    for name, fn in fns.items():
      t = {n: timed(fn, x, grids[n]) for n in (short, long)}
      nfe = {n: (2 * n - 1 if name.partition(':')[0] in TWO_EVALUATIONS else n)
             for n in (short, long)}
      slopes[name].append((t[long] - t[short]) / (nfe[long] - nfe[short]) * 1e6)
  print(f'load average {os.getloadavg()[0]:.2f}')
  heun = slopes.get('heun')
  for name, s in slopes.items():
    ratio = (f'  {np.median(np.asarray(s) / np.asarray(heun)):6.1f}× heun' if heun else '')
    print(f'{name:22s} {np.median(s):8.1f} µs/NFE{ratio} (rounds: '
          f'{", ".join(f"{v:.1f}" for v in s)})')


if __name__ == '__main__':
  main()
