"""bfloat16 and float16 training against float32 on digits: loss curves over 200 steps (issue 21).

    python scripts/mixed_precision_curve.py --root=/tmp/mp_curve [--steps=200 --batch=32]

Trains the digits EDM preset (configs/edm.py:digits) four times through `loop.train`, as train.py
does: float32 with seed 0, float32 with seed 1, bfloat16 with seed 0, float16 (dynamic loss
scaling) with seed 0; every step logged. Mixed precision keeps parameters, Adam and EMA in
float32 and computes activations and matmuls in the low precision (`build.compute_dtype`), so with
the same seed (same data order, σ and noise draws) a low-precision run differs from float32 only by
rounding and what it does to the trajectory. "Within noise" is measured, not assumed: the
float32 run with another seed says how much two equally good runs differ. For windows of `--window`
steps it prints the mean loss of each run and the differences bf16 − f32 and f16 − f32 against
f32(seed 1) − f32(seed 0); writes docs/mixed_precision_loss.png. Each run is kept in ROOT/NAME and
a rerun reuses finished ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

RUNS = (('float32', 0), ('float32', 1), ('bfloat16', 0), ('float16', 0))


def name_of(dtype: str, seed: int, strict: bool = False) -> str:
  return f'{dtype}_seed{seed}' + ('_strict' if strict and dtype != 'float32' else '')


def train_one(root: str, dtype: str, seed: int, steps: int, batch: int, strict: bool) -> list:
  """Trains (or reuses) one run; returns its per-step losses (non-finite ones as NaN)."""
  from configs import edm as edm_configs
  from diffjax.training import loop
  workdir = os.path.join(root, name_of(dtype, seed, strict))
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(os.path.join(workdir, 'done')):
    c = edm_configs.get_config('digits')
    c.seed = seed
    c.train.compute_dtype = dtype
    c.train.batch_size = batch
    c.train.total_images = batch * steps
    c.train.log_every = 1
    c.train.checkpoint_every = steps
    c.train.num_preview = 0
    c.train.sample_every = 0
    loop.train(c, workdir, progress=True)
    open(os.path.join(workdir, 'done'), 'w').close()
  rows = [json.loads(line) for line in open(metrics)]
  return [float(r.get('loss', float('nan'))) for r in sorted(rows, key=lambda r: r['step'])]


def window_means(losses, window: int) -> np.ndarray:
  x = np.asarray(losses, np.float64)
  n = len(x) // window
  return x[:n * window].reshape(n, window).mean(axis=1)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--root', default='/tmp/mp_curve', help='folder of the four runs')
  p.add_argument('--steps', type=int, default=200)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--window', type=int, default=25)
  p.add_argument('--plot', default=os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'docs', 'mixed_precision_loss.png'))

  p.add_argument('--strict_rounding', action='store_true',
                 help='XLA_FLAGS=--xla_allow_excess_precision=false: round every bf16/f16 value '
                      'as a GPU does (XLA:CPU otherwise keeps float32 between fused ops)')
  args = p.parse_args()
  if args.strict_rounding:  # before jax starts its backend (it is imported only in train_one)
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + ' --xla_allow_excess_precision=false').strip()
  names = {d: name_of(d, s, args.strict_rounding) for d, s in RUNS if s == 0}
  losses = {name_of(d, s, args.strict_rounding): train_one(
      args.root, d, s, args.steps, args.batch, args.strict_rounding) for d, s in RUNS}
  for name, x in losses.items():
    bad = int(np.sum(~np.isfinite(x)))
    print(f'{name}: {len(x)} steps, {bad} non-finite losses')
  means = {k: window_means(v, args.window) for k, v in losses.items()}
  ref, other = means['float32_seed0'], means['float32_seed1']
  print('\n| steps | f32 seed 0 | f32 seed 1 | bf16 | f16 | seed 1 − seed 0 | bf16 − f32 | '
        'f16 − f32 |\n|---|---|---|---|---|---|---|---|')
  for i in range(len(ref)):
    lo, hi = i * args.window + 1, (i + 1) * args.window
    b, h = means[names['bfloat16']][i], means[names['float16']][i]
    print(f'| {lo}–{hi} | {ref[i]:.4f} | {other[i]:.4f} | {b:.4f} | {h:.4f} | '
          f'{other[i] - ref[i]:+.4f} | {b - ref[i]:+.4f} | {h - ref[i]:+.4f} |')
  seed_gap = np.abs(other - ref)
  for name in (names['bfloat16'], names['float16']):
    gap = np.abs(means[name] - ref)
    print(f'{name}: mean |Δ| over windows {gap.mean():.4f} against the seed-to-seed '
          f'{seed_gap.mean():.4f} (ratio {gap.mean() / seed_gap.mean():.2f})')

  import digits_nfe_sweep  # its PIL line plot: no plotting package needed
  series = {}
  for name in losses:
    w = means[name]
    series[name.replace('_seed', ', seed ')] = [((i + 0.5) * args.window, float(v))
                                                for i, v in enumerate(w)]
  digits_nfe_sweep.plot_lines(
      series, args.plot, f'digits EDM, batch {args.batch}: loss ({args.window}-step means) '
      'in mixed precision against float32', 'step', 'loss', log_x=False, log_y=False,
      x_ticks=[i * args.window for i in range(len(ref) + 1)])
  print(f'Wrote {args.plot}')


if __name__ == '__main__':
  main()
