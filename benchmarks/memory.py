"""Resident memory of one train step, stage by stage, diffjax against the PyTorch reference.

    python benchmarks/memory.py                    # every variant below, each in a fresh process
    python benchmarks/memory.py --side=jax --no-donate           # one variant, one JSON line
    python benchmarks/memory.py --torch-python=/tmp/kd/bin/python  # the interpreter with torch

The network and step are the benchmark table's (benchmarks/bench_jax.py, bench_torch.py): Ho et
al.'s CIFAR-10 U-Net, 35.7M parameters, batch 16, float32, ε loss, Adam, clipping, EMA. Unlike the
table, which reports the peak of a process that also ran the forward and the sampler, each process
here does the train step only, so both sides' peaks are the step's.

Stages (diffjax): imports → CPU backend started → parameters initialized (one jitted init) → train
state built (params, EMA, Adam m and v) → step lowered → step compiled (plus XLA's
`memory_analysis()`: argument, output, temporary, aliased and generated-code bytes) → first step →
three steps. PyTorch: imports → model built → Adam and EMA created → first step (Adam allocates
its moments there) → three steps. At each stage the process's resident set (VmRSS) and its peak so
far (VmHWM, what `ru_maxrss` reports) are read from /proc/self/status.

XLA:CPU allocates buffers with the C library's aligned malloc (there is no BFC allocator on CPU:
the `XLA_PYTHON_CLIENT_*` variables are read by the GPU client only), so the allocator knobs that
apply are glibc's (`MALLOC_ARENA_MAX`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`) or a
preloaded allocator; the variants below try them. Figures are in benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 2**20

# name -> (side, extra arguments, extra environment). XLA_FLAGS given here are added to the ones
# diffjax's entry points set (cli.tune_xla_cpu), as a user's would be.
VARIANTS = {
    'jax': ('jax', [], {}),
    'jax, no donation': ('jax', ['--no-donate'], {}),
    'jax, concurrency-optimized scheduler off':
        ('jax', [], {'XLA_FLAGS': '--xla_cpu_enable_concurrency_optimized_scheduler=false'}),
    'jax, codegen split 1': ('jax', [], {'XLA_FLAGS': '--xla_cpu_parallel_codegen_split_count=1'}),
    'jax, copy insertion region analysis':
        ('jax', [], {'XLA_FLAGS': '--xla_cpu_copy_insertion_use_region_analysis=true'}),
    'jax, MALLOC_ARENA_MAX=2': ('jax', [], {'MALLOC_ARENA_MAX': '2'}),
    'jax, MALLOC_TRIM_THRESHOLD_=0': ('jax', [], {'MALLOC_TRIM_THRESHOLD_': '0',
                                                  'MALLOC_MMAP_THRESHOLD_': '1048576'}),
    'jax, malloc_trim at each stage': ('jax', ['--trim'], {}),
    # Where diffjax's train loop calls parallel.release_host_memory(): state built, step compiled
    # (the loop compiles the step ahead of its first call for this); and without the second.
    'jax, malloc_trim where the train loop trims':
        ('jax', ['--trim-at=train state built,step compiled'], {}),
    'jax, as the train loop, and the init executable dropped':
        ('jax', ['--trim-at=train state built,step compiled', '--clear-caches'], {}),
    'jax, malloc_trim after the state and after the first step':
        ('jax', ['--trim-at=train state built,first step'], {}),
    'torch': ('torch', [], {}),
    'torch, malloc_trim at each stage': ('torch', ['--trim'], {}),
}


def rss() -> tuple[int, int]:
  """(VmRSS, VmHWM) of this process in bytes."""
  with open('/proc/self/status') as f:
    fields = dict(line.split(':', 1) for line in f if line.startswith(('VmRSS', 'VmHWM')))
  return tuple(int(fields[k].split()[0]) * 1024 for k in ('VmRSS', 'VmHWM'))


class Stages:
  """Records (name, RSS, peak RSS, seconds since start) at each stage."""

  def __init__(self, trim: bool = False, trim_at: tuple = ()):
    self.t0, self.rows, self.trim, self.trim_at = time.perf_counter(), [], trim, trim_at

  def __call__(self, name: str) -> None:
    now, peak = rss()
    row = [name, now, peak, time.perf_counter() - self.t0]
    if self.trim or name in self.trim_at:
      # What glibc holds freed but not returned to the system, against what is live.
      import ctypes
      ctypes.CDLL('libc.so.6').malloc_trim(0)
    if self.trim:
      row.append(rss()[0])
    self.rows.append(row)


def copy_bytes(hlo: str) -> int:
  """Bytes written by every `copy` instruction of a compiled module's text (fusion bodies too)."""
  import re
  sizes = {'f32': 4, 's32': 4, 'u32': 4, 'f16': 2, 'bf16': 2, 'pred': 1, 'u8': 1}
  total = 0
  for dtype, dims in re.findall(r'= (\w+)\[([\d,]*)\](?:\{[^}]*\})? copy\(', hlo):
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    total += n * sizes.get(dtype, 4)
  return total


def run_jax(args, stages: Stages) -> dict:
  import types

  sys.path.insert(0, os.path.dirname(HERE))
  import jax
  import jax.numpy as jnp

  from diffjax import build, cli
  from diffjax import state as state_lib
  from diffjax.training import step as step_lib
  stages('imports')
  if not args.no_xla_tuning:
    cli.tune_xla_cpu()  # before the backend starts, as the entry points do
  jax.devices()
  stages('CPU backend started')

  from configs import ddpm
  config = ddpm.get_config('cifar10')
  config.train.batch_size = args.batch
  spec = types.SimpleNamespace(resolution=32, channels=3, num_classes=10)
  network = build.build_network(config, spec)
  params = jax.block_until_ready(build.init_params(network, spec, jax.random.key(1)))
  stages('parameters initialized')

  tx = build.build_optimizer(config)
  objective = build.build_objective(config, spec, build.build_denoiser(config, spec))
  # As train.py: the state owns the parameters, nothing else keeps a second copy.
  state = jax.block_until_ready(
      state_lib.create_train_state(params, tx, extra=objective.init_extra()))
  del params
  if args.clear_caches:
    jax.clear_caches()  # drops the init's executable (nothing else is compiled yet)
  stages('train state built')

  step = step_lib.make_train_step(objective, tx, batch_size=args.batch,
                                  ema_halflife_images=config.train.ema_halflife_images,
                                  ema_rampup_ratio=config.train.ema_rampup_ratio or None)
  data = {'image': jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3)),
          'label': jnp.arange(args.batch) % spec.num_classes}
  key = jax.random.key(2)
  lowered = jax.jit(step, donate_argnums=() if args.no_donate else 0).lower(state, data, key)
  stages('step lowered')
  compiled = lowered.compile()
  del lowered
  stages('step compiled')
  m = compiled.memory_analysis()
  plan = {k: int(getattr(m, f'{k}_size_in_bytes')) for k in
          ('argument', 'output', 'temp', 'alias', 'generated_code')} if m is not None else {}
  copies = copy_bytes(compiled.as_text())
  for i in range(args.steps):
    state, metrics = compiled(state, data, key)
    jax.block_until_ready(metrics)
    if i == 0:
      stages('first step')
  stages(f'{args.steps} steps')
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  return {'xla_plan': plan, 'state_bytes': n_bytes, 'copy_bytes': copies, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'framework': f'jax {jax.__version__}'}


def run_torch(args, stages: Stages) -> dict:
  sys.path.insert(0, HERE)
  import torch
  from bench_torch import DDPM_CIFAR10
  from diffusers import UNet2DModel
  stages('imports')
  torch.manual_seed(0)
  b = args.batch
  model = UNet2DModel(**DDPM_CIFAR10)
  stages('model built')
  model.train()
  params = list(model.parameters())
  opt = torch.optim.Adam(params, lr=2e-4, foreach=True)
  ema = [p.detach().clone() for p in params]
  alphas_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()
  x0 = torch.randn(b, 3, 32, 32)
  stages('Adam and EMA created')

  def train_step():  # bench_torch.py's step
    steps = torch.randint(0, 1000, (b,))
    noise = torch.randn_like(x0)
    ab = alphas_bar[steps].view(b, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    loss = torch.nn.functional.mse_loss(model(xt, steps).sample, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1 - 0.9999)
    return loss.item()

  for i in range(args.steps):
    train_step()
    if i == 0:
      stages('first step')
  stages(f'{args.steps} steps')
  return {'framework': f'torch {torch.__version__}', 'threads': torch.get_num_threads(),
          'state_bytes': sum(t.nbytes for t in [*params, *ema] + [
              v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)])}


def one(args) -> None:
  stages = Stages(args.trim, tuple(filter(None, args.trim_at.split(','))))
  stages('python started')
  extra = (run_jax if args.side == 'jax' else run_torch)(args, stages)
  print(json.dumps({'side': args.side, 'stages': stages.rows, **extra}))


def table(name: str, result: dict) -> list[str]:
  trim = len(result['stages'][0]) > 4
  rows = [f"### {name} ({result['framework']}; XLA_FLAGS {result.get('xla_flags') or '-'})", '',
          '| stage | RSS MiB | Δ MiB | peak so far MiB | s |' + (' after malloc_trim MiB |' * trim),
          '|---|---|---|---|---|' + '---|' * trim]
  last = 0
  for stage, now, peak, t, *trimmed in result['stages']:
    rows.append(f'| {stage} | {now / MiB:.0f} | {(now - last) / MiB:+.0f} | {peak / MiB:.0f} '
                f'| {t:.1f} |' + ''.join(f' {v / MiB:.0f} |' for v in trimmed))
    last = trimmed[0] if trimmed else now
  plan = result.get('xla_plan')
  if plan:
    rows.append('')
    rows.append('XLA plan, MiB: ' + ', '.join(f'{k} {v / MiB:.1f}' for k, v in plan.items())
                + f"; arg + out + temp − alias = "
                  f"{(plan['argument'] + plan['output'] + plan['temp'] - plan['alias']) / MiB:.0f}")
  rows.append(f"state (params, EMA, optimizer): {result['state_bytes'] / MiB:.0f} MiB")
  if 'copy_bytes' in result:
    rows.append(f"bytes copied by the compiled step's `copy` ops: {result['copy_bytes'] / MiB:.0f} MiB")
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--side', choices=('jax', 'torch'), default=None,
                 help='Measure one side in this process (default: run every variant).')
  p.add_argument('--variants', default=None,
                 help=f'Semicolon-separated subset of: {"; ".join(VARIANTS)}.')
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--no-donate', action='store_true', help='Jit the step without donating its state.')
  p.add_argument('--no-xla-tuning', action='store_true', help="Skip diffjax's XLA:CPU flags.")
  p.add_argument('--trim', action='store_true',
                 help="Call glibc's malloc_trim(0) after each stage and record RSS after it too.")
  p.add_argument('--clear-caches', action='store_true',
                 help='jax.clear_caches() once the state is built (frees the init executable).')
  p.add_argument('--trim-at', default='',
                 help="Comma-separated stages after which to call malloc_trim(0) (not recorded).")
  p.add_argument('--torch-python', default=sys.executable,
                 help='The interpreter that has torch and diffusers (for the torch variant).')
  args = p.parse_args()
  if args.side:
    return one(args)
  names = args.variants.split(';') if args.variants else list(VARIANTS)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise SystemExit(f'Unknown variant(s) {unknown}; choose from: {"; ".join(VARIANTS)}.')
  for name in names:
    side, extra, env = VARIANTS[name]
    python = args.torch_python if side == 'torch' else sys.executable
    full_env = dict(os.environ, **env)
    if 'XLA_FLAGS' in env and os.environ.get('XLA_FLAGS'):
      full_env['XLA_FLAGS'] = f"{os.environ['XLA_FLAGS']} {env['XLA_FLAGS']}"
    cmd = [python, os.path.abspath(__file__), f'--side={side}', f'--batch={args.batch}',
           f'--steps={args.steps}', *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env)
    if proc.returncode:
      print(f'### {name}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}', flush=True)
      continue
    print('\n'.join(table(name, json.loads(proc.stdout.strip().splitlines()[-1]))), '\n',
          flush=True)


if __name__ == '__main__':
  main()
