"""Post-hoc EMA sweep on a digits EDM2 run: the digits evaluator's FD against σ_rel (docs/edm2.md).

    python scripts/phema_sweep.py --workdir=runs/edm2_digits [--stds=0.02,0.03,...,0.20]

For each σ_rel, `diffjax.phema.reconstruct` solves EDM2's Algorithm 3 over the run's snapshots of
its tracked power-function EMAs (configs/edm2.py: σ_rel 0.05 and 0.10) at the newest step and
`write_run` writes the result as a run under `--runs` (what `python -m diffjax.phema --workdir=W
--std=S --out=W2` does, one per σ_rel; an existing one is reused). Each is then loaded like any
run and scored with the digits evaluator (`--num` images, seeds 0…num−1, class = seed mod 10,
`--sampler`/`--steps`, default Heun 18 steps = 35 NFE, the configs' measuring protocol). The run's
own traditional EMA is scored too, as a reference line. Writes the FD-vs-σ_rel plot
(docs/edm2_sigma_rel.png) and prints a markdown table; results are kept in `--results` (default
WORKDIR/eval/phema_sweep.json) so that a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import digits_nfe_sweep as common  # noqa: E402

STDS = (0.02, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='a digits run trained with configs/edm2.py')
  parser.add_argument('--stds', default=','.join(f'{s:g}' for s in STDS), help='σ_rel values')
  parser.add_argument('--runs', default=None,
                      help='folder of the reconstructed runs (default WORKDIR_phema/)')
  parser.add_argument('--num', type=int, default=1000, help='images per point')
  parser.add_argument('--sampler', default='heun')
  parser.add_argument('--steps', type=int, default=18)
  parser.add_argument('--batch', type=int, default=500)
  parser.add_argument('--results', default=None,
                      help='JSON of results (resumed from); default WORKDIR/eval/phema_sweep.json')
  parser.add_argument('--out', default=os.path.join(common.ROOT, 'docs', 'edm2_sigma_rel.png'))
  args = parser.parse_args()
  stds = [float(s) for s in args.stds.split(',')]
  from diffjax import cli
  cli.tune_xla_cpu()
  from diffjax import phema, runs

  workdir = os.path.normpath(args.workdir)
  out_root = args.runs or workdir + '_phema'
  results_path = args.results or os.path.join(workdir, 'eval', 'phema_sweep.json')
  results = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  setting = f'{args.sampler}{args.steps}_n{args.num}'
  done = results.setdefault(setting, {})
  compiled = {}  # One network, many weights: one compiled sampler.

  def record(name, run, extra):
    t0 = time.time()
    m = common.score(run, args.sampler, args.steps, args.num, args.batch, cache=compiled)
    done[name] = dict(step=int(run.step), fd=float(m['fd']), accuracy=float(m['accuracy']),
                      seconds=round(time.time() - t0, 1), **extra)
    print(f'{name:>12s}: FD {m["fd"]:.3f} accuracy {m["accuracy"]:.3f} '
          f'({done[name]["seconds"]} s)', flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
    with open(results_path, 'w') as f:
      json.dump(results, f, indent=1)

  if 'traditional' not in done:
    record('traditional', runs.load(workdir), {})
  for std in stds:
    name = f'{std:.3f}'
    if name in done:
      continue
    out = os.path.join(out_root, f'sigma_rel_{name}')
    if not os.path.exists(os.path.join(out, runs.CONFIG_FILE)):
      rec = phema.reconstruct(workdir, std)
      phema.write_run(rec, out, source=workdir)
      weights = ', '.join(f'{s}@{p:.2f}: {c:+.3f}' for s, p, c in rec.snapshots)
      print(f'σ_rel {std:.3f}: wrote {out} ({weights})', flush=True)
    record(name, runs.load(out), {'std': std})

  points = sorted((v['std'], v['fd']) for v in done.values() if 'std' in v)
  trad = done['traditional']
  common.plot_lines(
      {'post-hoc EMA (reconstructed)': points}, args.out,
      f'Digits evaluator FD against post-hoc EMA σ_rel: {os.path.basename(workdir)} at step '
      f'{trad["step"]}, {args.sampler} {args.steps} steps, {args.num} images', 'σ_rel', 'FD',
      log_x=True, log_y=False, x_ticks=[p[0] for p in points],
      hline=(trad['fd'], f'traditional EMA: FD {trad["fd"]:.2f}'))
  print(f'wrote {args.out}\n')
  print('| σ_rel | ' + ' | '.join(f'{s:g}' for s, _ in points) + ' | traditional EMA |')
  print('|---|' + '---|' * (len(points) + 1))
  rows = [v for v in sorted((v for v in done.values() if 'std' in v), key=lambda v: v['std'])]
  print('| FD | ' + ' | '.join(f'{v["fd"]:.2f}' for v in rows) + f' | {trad["fd"]:.2f} |')
  print('| accuracy | ' + ' | '.join(f'{v["accuracy"]:.3f}' for v in rows)
        + f' | {trad["accuracy"]:.3f} |')


if __name__ == '__main__':
  main()
