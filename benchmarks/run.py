"""diffjax against the PyTorch reference on this machine, in one run, as one table.

    python benchmarks/run.py                      # DDPM CIFAR-10 U-Net, batch 16, float32
    python benchmarks/run.py --dtype=bfloat16     # bf16 compute (fp32 params) on both sides
    python benchmarks/run.py --preset=digits --batch=128 --no-torch   # the quickstart network

The PyTorch side needs the optional extra (`pip install -e '.[bench]'`: torch, diffusers, and
k-diffusion's sampler with `pip install --no-deps k-diffusion torchdiffeq torchsde`; `make bench`
installs all of it). Without it the table has diffjax's column only.

Each side runs in its own process (benchmarks/bench_jax.py, benchmarks/bench_torch.py), one after
the other, so their thread pools never compete and each reports its own peak memory. GFLOP/s are
the network's FLOPs per image from XLA's cost analysis (the same network on both sides, so the
same count) times the measured img/s; the fraction is of the matmul peak measured by the JAX side
in the same run. Figures and what each optimization bought are kept in benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_jax  # noqa: E402


def run_side(script: str, args: list[str]) -> dict:
  """Runs one side in a fresh process and returns the JSON it prints last."""
  proc = subprocess.run([sys.executable, os.path.join(HERE, script), *args],
                        capture_output=True, text=True)
  if proc.returncode:
    sys.stderr.write(proc.stderr[-4000:])
    raise SystemExit(f'{script} failed (exit {proc.returncode}); its error is above.')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def torch_available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ('torch', 'diffusers'))


def table(jx: dict, pt: dict | None) -> list[tuple[str, str, str, str]]:
  """Rows (measure, diffjax, PyTorch, diffjax/PyTorch)."""
  peak = jx['matmul_gflops']
  rows = []

  def row(name, key, fmt, higher_better=True, extra=None):
    a = jx.get(key)
    b = pt.get(key) if pt else None
    ratio = ''
    if a is not None and b:
      ratio = f'{a / b:.2f}×' if higher_better else f'{b / a:.1f}× less'
    rows.append((name, fmt(a, jx) if a is not None else '—',
                 fmt(b, pt) if b is not None else '—', extra or ratio))

  ips = lambda v, side: f'{v:.2f} img/s'
  rows.append(('framework', jx['framework'], pt['framework'] if pt else 'not run', ''))
  row('matmul peak (2048², float32)', 'matmul_gflops', lambda v, s: f'{v:.0f} GFLOP/s')
  row('parameters', 'params', lambda v, s: f'{v:,}', extra='equal' if pt and
      pt['params'] == jx['params'] else ('DIFFERENT' if pt else ''))
  row(f"U-Net forward (batch {jx['batch']}, {jx['dtype']})", 'forward_img_s', ips)
  row('  GFLOP/s, fraction of matmul peak', 'forward_img_s',
      lambda v, s: f"{v * jx['forward_gflop_per_img']:.0f} = "
                   f"{v * jx['forward_gflop_per_img'] / peak:.0%}", extra=' ')
  row('train step (ε loss, Adam, clip, EMA)', 'train_img_s', ips)
  row('  GFLOP/s, fraction of matmul peak', 'train_img_s',
      lambda v, s: f"{v * jx['train_gflop_per_img']:.0f} = "
                   f"{v * jx['train_gflop_per_img'] / peak:.0%}", extra=' ')
  row(f"Heun sampling ({jx['heun_nfe']} NFE)", 'heun_img_s', ips)
  row('sampler overhead per NFE, trivial denoiser', 'overhead_us_per_nfe',
      lambda v, s: f'{v:.1f} µs/NFE', higher_better=False)
  row('  per call (fixed: dispatch, waking the caller)', 'overhead_call_us',
      lambda v, s: f'{v:.0f} µs', higher_better=False)
  row(f"  all in, {jx['nfe']} NFE in one call", 'overhead_all_in_us_per_nfe',
      lambda v, s: f'{v:.1f} µs/NFE', higher_better=False)
  row('train step memory, XLA buffer plan', 'train_xla_bytes', lambda v, s: f'{v / 2**20:.0f} MiB',
      extra=' ')
  row('peak resident memory (process)', 'peak_rss_bytes', lambda v, s: f'{v / 2**20:.0f} MiB',
      higher_better=False)
  if pt:
    rows.append(('PyTorch Heun sampler', '', pt['heun_source'], ''))
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  bench_jax.add_common_arguments(p)  # importing jax starts no backend or thread pool
  p.add_argument('--no-torch', action='store_true', help='Measure diffjax only.')
  p.add_argument('--json', default=None, help='Also write both sides\' figures to this file.')
  args = p.parse_args()
  common = [f'--batch={args.batch}', f'--dtype={args.dtype}']
  jx = run_side('bench_jax.py', [f'--preset={args.preset}', *common,
                                 *(['--no-xla-tuning'] if args.no_xla_tuning else [])])
  pt = None
  if not args.no_torch and args.preset == 'ddpm_cifar10':
    if torch_available():
      pt = run_side('bench_torch.py', common)
    else:
      print("PyTorch side skipped: pip install -e '.[bench]' (torch, diffusers) to compare.")
  rows = table(jx, pt)
  header = ('', 'diffjax', 'PyTorch reference', 'diffjax vs PyTorch')
  widths = [max(len(r[i]) for r in (header, *rows)) for i in range(4)]
  for r in (header, *rows):
    print('  '.join(f'{c:<{w}}' for c, w in zip(r, widths)).rstrip())
  print(f"diffjax's XLA_FLAGS: {jx.get('xla_flags') or '(none)'}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'diffjax': jx, 'pytorch': pt}, f, indent=2)


if __name__ == '__main__':
  main()
