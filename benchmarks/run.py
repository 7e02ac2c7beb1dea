"""Speed figures of diffjax on this machine, as ratios and as a fraction of the measured peak.

    python benchmarks/run.py                       # digits network, quick (~1–2 min on 2 CPU cores)
    python benchmarks/run.py --preset=ddpmpp_cifar10 --resolution=32 --channels=3 --batch=16

Prints one table:
  matmul peak         GFLOP/s of a large float32 matmul (the machine's ceiling we compare against)
  sampler overhead    µs per network evaluation of the 18-step Heun sampler with a trivial denoiser
  U-Net forward       img/s and achieved GFLOP/s (XLA cost analysis) / matmul peak
  train step          img/s (EDM loss, Adam, EMA) and achieved GFLOP/s / matmul peak
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import diffjax as dj  # noqa: E402
from diffjax import losses, models, precond  # noqa: E402
from diffjax.training import state as state_lib  # noqa: E402
from diffjax.training import step as step_lib  # noqa: E402


def best_time(fn, *args, repeats: int = 5, min_time: float = 0.5) -> float:
  """Best wall time of fn(*args) (blocking on the result) over repeats, after one warm-up call."""
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(repeats):
    n, t0 = 0, time.perf_counter()
    while True:
      jax.block_until_ready(fn(*args))
      n += 1
      if time.perf_counter() - t0 >= min_time / repeats:
        break
    best = min(best, (time.perf_counter() - t0) / n)
  return best


def flops_of(jitted, *args) -> float:
  """FLOPs of one call according to XLA's cost analysis of the compiled program."""
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', 0.0)) if cost else 0.0


def matmul_peak(n: int = 2048) -> float:
  """GFLOP/s of an n×n float32 matmul: the practical compute ceiling of this machine."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  return 2 * n**3 / best_time(f, a) / 1e9


def sampler_overhead(batch: int = 8, steps: int = 18) -> dict:
  """µs per NFE of heun() with a trivial denoiser, minus the cost of the trivial denoiser alone."""
  shape = (batch, 8, 8, 1)
  sigmas = jnp.asarray(dj.schedules.karras(steps), jnp.float32)
  x = jax.random.normal(jax.random.key(0), shape) * sigmas[0]
  trivial = lambda x, sigma: 0.5 * x
  sample = jax.jit(lambda x: dj.samplers.heun(trivial, x, sigmas))
  per_call = best_time(sample, x, repeats=10, min_time=1.0)
  nfe = 2 * steps - 1
  alone = jax.jit(lambda x: trivial(x, sigmas[0]))
  t_alone = best_time(alone, x, repeats=10, min_time=0.5)
  return {'us_per_nfe': per_call / nfe * 1e6, 'us_trivial_call': t_alone * 1e6, 'nfe': nfe}


def network_figures(preset: str, resolution: int, channels: int, batch: int, label_dim: int,
                    peak: float) -> dict:
  """U-Net forward and train-step throughput and FLOP utilization."""
  net = models.create_network(preset, img_resolution=resolution, in_channels=channels,
                              out_channels=channels, label_dim=label_dim)
  x = jax.random.normal(jax.random.key(0), (batch, resolution, resolution, channels))
  noise = jnp.zeros((batch,))
  labels = jax.nn.one_hot(jnp.arange(batch) % max(label_dim, 1), label_dim) if label_dim else None
  params = jax.jit(lambda k: net.init({'params': k}, x, noise, labels))(jax.random.key(1))['params']
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

  forward = jax.jit(lambda p, x: net.apply({'params': p}, x, noise, labels))
  t_fwd = best_time(forward, params, x)
  flops_fwd = flops_of(forward, params, x)

  denoiser = precond.Denoiser(net, precond.make_edm())
  tx = state_lib.make_optimizer(1e-4, batch)
  objective = step_lib.denoising_objective(denoiser, losses.get_loss('edm'), num_classes=label_dim)
  step = step_lib.make_train_step(objective, tx, batch_size=batch, ema_halflife_images=1e4)
  state = state_lib.create_train_state(params, tx)
  batch_data = {'image': x, 'label': jnp.arange(batch) % max(label_dim, 1)}
  train = jax.jit(step)
  key = jax.random.key(2)
  t_train = best_time(lambda s: train(s, batch_data, key)[1]['loss'], state, repeats=3,
                      min_time=1.0)
  flops_train = flops_of(train, state, batch_data, key)
  return {
      'preset': preset, 'params': n_params, 'batch': batch,
      'forward_img_s': batch / t_fwd, 'forward_gflops': flops_fwd / t_fwd / 1e9,
      'forward_frac_peak': flops_fwd / t_fwd / 1e9 / peak,
      'forward_gflop_per_img': flops_fwd / batch / 1e9,
      'train_img_s': batch / t_train, 'train_gflops': flops_train / t_train / 1e9,
      'train_frac_peak': flops_train / t_train / 1e9 / peak,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--preset', default='digits')
  parser.add_argument('--resolution', type=int, default=8)
  parser.add_argument('--channels', type=int, default=1)
  parser.add_argument('--label_dim', type=int, default=10)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--json', default=None, help='Also write the figures to this JSON file.')
  args = parser.parse_args()

  peak = matmul_peak()
  overhead = sampler_overhead()
  net = network_figures(args.preset, args.resolution, args.channels, args.batch, args.label_dim,
                        peak)
  rows = [
      ('device', f'{jax.devices()[0].platform} × {jax.device_count()}'),
      ('matmul peak (float32)', f'{peak:.1f} GFLOP/s'),
      ('sampler overhead (heun, 18 steps)', f"{overhead['us_per_nfe']:.1f} µs per NFE "
       f"(trivial denoiser alone: {overhead['us_trivial_call']:.1f} µs)"),
      (f"U-Net forward ({net['preset']}, {net['params']:,} params, batch {net['batch']})",
       f"{net['forward_img_s']:.1f} img/s, {net['forward_gflops']:.1f} GFLOP/s = "
       f"{net['forward_frac_peak']:.0%} of peak ({net['forward_gflop_per_img']:.3f} GFLOP/img)"),
      ('train step (EDM loss, Adam, EMA)',
       f"{net['train_img_s']:.1f} img/s, {net['train_gflops']:.1f} GFLOP/s = "
       f"{net['train_frac_peak']:.0%} of peak"),
  ]
  width = max(len(r[0]) for r in rows)
  for name, value in rows:
    print(f'{name:<{width}}  {value}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'matmul_peak_gflops': peak, **overhead, **net}, f, indent=2)


if __name__ == '__main__':
  main()
