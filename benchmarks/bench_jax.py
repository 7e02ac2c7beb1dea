"""diffjax's side of the benchmark table (run by benchmarks/run.py in its own process).

Measures, for one network preset and batch, in float32 (or bf16 compute with --dtype=bfloat16):
  matmul peak          GFLOP/s of a 2048² float32 matmul: the ceiling the other figures are held to
  forward              img/s of the jitted U-Net forward; GFLOP/s from XLA's cost analysis
  train                img/s of diffjax's own train step (the config's loss, Adam, clipping, EMA),
                       jitted with the state donated, as train.py runs it
  heun                 img/s of EDM's 18-step Heun sampler (35 network evaluations), one lax.scan
  overhead             the same sampler with a trivial denoiser, at 18 and 256 steps: µs per network
                       evaluation (the slope) and µs per call (the intercept)
  memory               XLA's buffer plan of the train step (arguments + outputs + temporaries −
                       aliased) and the process's peak resident memory

Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead  # noqa: E402


def best_time(fn, *args, repeats: int = 5, min_time: float = 1.0) -> float:
  """Best mean wall time of fn(*args), blocking on its result, over `repeats` rounds."""
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


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled executable according to XLA's cost analysis."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', 0.0)) if cost else 0.0


def matmul_peak(n: int = 2048) -> float:
  """GFLOP/s of an n×n float32 matmul: the practical compute ceiling of this machine."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  return 2 * n**3 / best_time(f, a) / 1e9


def heun_overhead(shape, steps: int = 18, long_steps: int = overhead.LONG_STEPS) -> dict:
  """Overhead of the Heun sampler around a trivial denoiser D(x) = x/2, at two step counts."""
  from diffjax import samplers
  from diffjax.processes import schedules
  x = jax.random.normal(jax.random.key(0), shape)
  trivial = lambda x, sigma: 0.5 * x
  times = []
  for n in (steps, long_steps):
    sigmas = jnp.asarray(schedules.karras(n), jnp.float32)
    sample = jax.jit(lambda x, sigmas: samplers.heun(trivial, x * sigmas[0], sigmas))
    times.append(best_time(sample, x, sigmas, repeats=10, min_time=2.0))
  return overhead.split_overhead(times[0], 2 * steps - 1, times[1], 2 * long_steps - 1)


def config_for(preset: str, batch: int, dtype: str):
  """The training config whose network and loss the table measures (DDPM's for ddpm_cifar10)."""
  if preset == 'ddpm_cifar10':
    from configs import ddpm
    c = ddpm.get_config('cifar10')
    spec = types.SimpleNamespace(resolution=32, channels=3, num_classes=10)
  else:
    from configs import edm
    c = edm.get_config('digits')
    c.model.preset = preset
    spec = types.SimpleNamespace(resolution=8, channels=1, num_classes=10)
  c.train.batch_size = batch
  if dtype != 'float32':
    c.model.kwargs.dtype = dtype
  return c, spec


def setup(preset: str, batch: int, dtype: str) -> types.SimpleNamespace:
  """What the figures measure, built as train.py builds it.

  Returns a namespace with: config, spec, network, denoiser, params, x (a [B, H, W, C] batch),
  labels (one-hot or None), forward (jitted `(params, x) -> D_θ output` at a mid-range noise
  label), and the library's train step compiled with its state donated: train, state, data, key.
  The state holds a copy of params, so params stay usable after train steps.
  """
  from diffjax import build
  from diffjax import state as state_lib
  from diffjax.training import step as step_lib

  config, spec = config_for(preset, batch, dtype)
  network = build.build_network(config, spec)
  denoiser = build.build_denoiser(config, spec)
  params = build.init_params(network, spec, jax.random.key(1))
  shape = (batch, spec.resolution, spec.resolution, spec.channels)
  x = jax.random.normal(jax.random.key(0), shape)
  labels = (jax.nn.one_hot(jnp.arange(batch) % spec.num_classes, spec.num_classes)
            if network.label_dim else None)
  noise = jnp.full((batch,), 500.0)
  forward = jax.jit(lambda p, x: network.apply({'params': p}, x, noise, labels))

  tx = build.build_optimizer(config)
  objective = build.build_objective(config, spec, denoiser)
  step = step_lib.make_train_step(objective, tx, batch_size=batch,
                                  ema_halflife_images=config.train.ema_halflife_images,
                                  ema_rampup_ratio=config.train.ema_rampup_ratio or None)
  state = state_lib.create_train_state(jax.tree.map(jnp.copy, params), tx,
                                       extra=objective.init_extra())
  data = {'image': x, 'label': jnp.arange(batch) % spec.num_classes}
  key = jax.random.key(2)
  train = jax.jit(step, donate_argnums=0).lower(state, data, key).compile()
  return types.SimpleNamespace(config=config, spec=spec, network=network, denoiser=denoiser,
                               params=params, x=x, labels=labels, forward=forward, train=train,
                               state=state, data=data, key=key)


def train_runner(s: types.SimpleNamespace):
  """A no-argument call of one train step that threads the donated state through `s.state`."""

  def one_step():
    s.state, metrics = s.train(s.state, s.data, s.key)
    return metrics['loss']

  return one_step


def add_common_arguments(p: argparse.ArgumentParser) -> None:
  """--preset, --batch, --dtype and --no-xla-tuning, as every benchmark script takes them."""
  p.add_argument('--preset', default='ddpm_cifar10')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--no-xla-tuning', action='store_true',
                 help="Run without diffjax's XLA:CPU flags (cli.tune_xla_cpu), for before/after.")


def measure(preset: str, batch: int, dtype: str, heun_steps: int) -> dict:
  from diffjax import samplers

  s = setup(preset, batch, dtype)
  params, x, labels, denoiser = s.params, s.x, s.labels, s.denoiser
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  out = {'preset': preset, 'params': n_params, 'batch': batch, 'dtype': dtype}

  # Forward: the bare network at a mid-range noise label.
  compiled = s.forward.lower(params, x).compile()
  t = best_time(compiled, params, x, repeats=3, min_time=9.0)  # ≥ 2 calls a round
  out.update(forward_img_s=batch / t, forward_gflop_per_img=compiled_flops(compiled) / batch / 1e9)

  # Train: the library's step exactly as train.py builds it.
  memory = s.train.memory_analysis()
  train_flops = compiled_flops(s.train)
  one_step = train_runner(s)

  t = best_time(one_step, repeats=3, min_time=3.0)
  out.update(train_img_s=batch / t, train_gflop_per_img=train_flops / batch / 1e9)
  if memory is not None:
    out['train_xla_bytes'] = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                                 + memory.temp_size_in_bytes - memory.alias_size_in_bytes)

  # Heun: EDM's 18-step sampler over the config's preconditioning, one compiled scan.
  sigmas = jnp.asarray(samplers.edm_grid_for(denoiser.precond, heun_steps), jnp.float32)
  sample = jax.jit(lambda p, x: samplers.heun(denoiser.bind(p, labels), x * sigmas[0], sigmas))
  t = best_time(sample, params, x, repeats=2, min_time=1.0)
  out.update(heun_img_s=batch / t, heun_nfe=2 * heun_steps - 1)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  add_common_arguments(p)
  p.add_argument('--heun_steps', type=int, default=18)
  args = p.parse_args()
  from diffjax import cli
  # As the entry points run: the flags must be in place before JAX creates its CPU backend.
  if not args.no_xla_tuning:
    cli.tune_xla_cpu()
  cli.enable_compilation_cache()
  result = {'framework': f'jax {jax.__version__}', 'device': str(jax.devices()[0].device_kind),
            'xla_flags': os.environ.get('XLA_FLAGS', '')}
  result['matmul_gflops'] = matmul_peak()
  shape = (args.batch, 32, 32, 3) if args.preset == 'ddpm_cifar10' else (args.batch, 8, 8, 1)
  result.update(heun_overhead(shape, args.heun_steps))
  result.update(measure(args.preset, args.batch, args.dtype, args.heun_steps))
  result['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps(result))


if __name__ == '__main__':
  main()
