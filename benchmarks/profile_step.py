"""Where the time of one jitted call goes, per XLA operation, on this machine.

    python benchmarks/profile_step.py                  # the DDPM CIFAR-10 train step, batch 16
    python benchmarks/profile_step.py --what=forward   # the bare U-Net forward
    python benchmarks/profile_step.py --no-xla-tuning  # without diffjax's XLA:CPU flags

Traces a few calls with `jax.profiler`, reads the trace back with `jax.profiler.ProfileData` and
joins each event to its instruction in the compiled HLO, so the time can be grouped by what the op
is (convolution, reduction, elementwise loop fusion...), whether it is forward or backward (the
`transpose(` in its op_name), and which library runs it (`__ynn_fusion` for YNNPACK). Times are the
executor threads' wall time: with two threads running ops side by side they add up to more than the
call. Ops XLA runs through Eigen's own thread pool (convolutions with the tuned flags) do not
appear as events; their time is the call's time not covered by events.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_jax  # noqa: E402


def hlo_instructions(text: str) -> dict[str, tuple[str, str, bool]]:
  """name -> (op, op_name metadata, runs in YNNPACK) for every instruction of a compiled module."""
  out = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = \S+ (\w+)\((.*)$', text, re.M):
    name, op, rest = m.groups()
    op_name = re.search(r'op_name="([^"]*)"', rest)
    out[name] = (op, op_name.group(1) if op_name else '', '__ynn_fusion' in rest)
  return out


def fused_ops(text: str) -> dict[str, str]:
  """fusion name -> the heaviest op inside it (convolution > dot > reduce > elementwise)."""
  bodies = {m.group(1): m.group(0) for m in re.finditer(r'^%([\w.\-]+) .*?\n\}', text, re.M | re.S)}
  out = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%([\w.\-]+) = \S+ fusion\(.*?calls=%([\w.\-]+)', text, re.M):
    body = bodies.get(m.group(2), '')
    out[m.group(1)] = next((k for k in ('convolution', 'dot', 'reduce') if f' {k}(' in body),
                           'elementwise')
  return out


def category(name: str, hlo: dict, fusions: dict) -> str:
  if name not in hlo:
    return f'runtime: {re.sub(r"[.0-9]+$", "", name)}'
  op, op_name, ynn = hlo[name]
  kind = fusions.get(name, op)
  if op == 'fusion' and kind == 'convolution' and 'conv_general_dilated' not in op_name:
    kind = 'convolution (weight gradient)'  # XLA's rewrite drops the op_name
  direction = 'backward' if 'transpose(' in op_name else 'forward'
  return f"{'YNNPACK' if ynn else 'XLA'} {kind} {direction}"


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  bench_jax.add_common_arguments(p)
  p.add_argument('--what', default='train', choices=('train', 'forward'))
  p.add_argument('--calls', type=int, default=3)
  p.add_argument('--top', type=int, default=25)
  args = p.parse_args()
  from diffjax import cli
  if not args.no_xla_tuning:
    cli.tune_xla_cpu()  # before the first computation creates the CPU backend
  import jax

  s = bench_jax.setup(args.preset, args.batch, args.dtype)
  if args.what == 'forward':
    compiled = s.forward.lower(s.params, s.x).compile()
    run = lambda: compiled(s.params, s.x)
  else:
    compiled, run = s.train, bench_jax.train_runner(s)

  text = compiled.as_text()
  hlo, fusions = hlo_instructions(text), fused_ops(text)
  jax.block_until_ready(run())
  with tempfile.TemporaryDirectory() as trace_dir:
    t0 = time.perf_counter()
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.calls):
      jax.block_until_ready(run())
    jax.profiler.stop_trace()
    per_call = (time.perf_counter() - t0) / args.calls
    path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))[-1]
    profile = jax.profiler.ProfileData.from_file(path)
    totals = collections.defaultdict(float)
    for plane in profile.planes:
      for line in plane.lines:
        if 'XLAEigen' not in line.name:  # the executor threads
          continue
        for event in line.events:
          if not event.name.startswith(('ThunkExecutor', 'SlinkyThreadPool')):
            totals[category(event.name, hlo, fusions)] += event.duration_ns / 1e6 / args.calls
  covered = sum(totals.values())
  print(f'{args.what}: {per_call * 1e3:.0f} ms per call (traced); op events {covered:.0f} ms '
        f"(executor threads' time); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f'  {ms:8.1f} ms  {100 * ms / covered:5.1f}%  {name}')


if __name__ == '__main__':
  main()
