"""The digits evaluator's FD and accuracy against NFE for every σ-grid solver on a trained run (docs).

    python scripts/digits_nfe_sweep.py --workdir=runs/digits [--num=1000 --nfe=5,10,20,35]

samples `--num` images (seeds 0…num−1, class = seed mod 10, the same latents and keys for every
solver) from the run's EMA network with each solver of `SOLVERS` on EDM's Karras grid (clamped to
the network, as `sample.py` does) at about each target NFE, scores them with the digits evaluator
(`diffjax.evaluation.digits_classifier.digits_metrics`: Fréchet distance to the train split in
the digits classifier's feature space, and the classifier's accuracy on the intended classes), and
writes log-log plots of FD against NFE (docs/digits_nfe_sweep.png for the ODE solvers and
docs/digits_nfe_sweep_stochastic.png for the others, by default) and prints markdown
tables. Results go to `--results` (default WORKDIR/eval/nfe_sweep.json) as they come, and a rerun
skips the points already there, so an interrupted sweep resumes.

NFE per run of N steps on a grid ending in σ = 0 (the last step costs one evaluation): heun,
dpm_2, dpm_2_ancestral, dpmpp_2s_ancestral and dpmpp_sde spend 2N − 1, so a target T uses
N = (T + 1) // 2 (NFE 5, 9, 19, 35 for 5, 10, 20, 35); every other solver here spends N (dpm_fast:
N − 1 solver evaluations and the final denoising). DDIM (η = 0) is not listed: on an EDM run it is
Euler on the PF-ODE in σ (EDM §3), i.e. the `euler` row; the `ddim` sampler itself is for discrete
(DDPM) runs. dpm_adaptive is not listed: its NFE is set by its tolerances, per sample, not by a
grid. The stochastic rows (η=1) run with their defaults (Brownian-tree noise for the SDE solvers,
gaussian for the ancestral ones), from the same per-seed keys.

The figure is drawn with PIL (as scripts/solver_error_curves.py): no plotting package needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# label: (registered sampler, options, denoiser evaluations per step (the last step costs one)).
SOLVERS = {
    'heun': ('heun', {}, 2),
    'euler': ('euler', {}, 1),
    'dpm_2': ('dpm_2', {}, 2),
    'lms (order 4)': ('lms', {}, 1),
    'dpmpp_2m': ('dpmpp_2m', {}, 1),
    'unipc-2 bh2': ('unipc', {'order': 2}, 1),
    'unipc-3 bh2': ('unipc', {'order': 3}, 1),
    'deis-2': ('deis', {'order': 2}, 1),
    'deis-3': ('deis', {'order': 3}, 1),
    'unipc-3 bh1': ('unipc', {'order': 3, 'solver_type': 'bh1'}, 1),
    'dpm_fast': ('dpm_fast', {}, 1),
    'euler_ancestral (η=1)': ('euler_ancestral', {}, 1),
    'dpm_2_ancestral (η=1)': ('dpm_2_ancestral', {}, 2),
    'dpmpp_2s_ancestral (η=1)': ('dpmpp_2s_ancestral', {}, 2),
    'dpmpp_sde (η=1)': ('dpmpp_sde', {}, 2),
    'dpmpp_2m_sde (η=1)': ('dpmpp_2m_sde', {}, 1),
    'dpmpp_2m_sde_heun (η=1)': ('dpmpp_2m_sde_heun', {}, 1),
    'dpmpp_3m_sde (η=1)': ('dpmpp_3m_sde', {}, 1),
}


def steps_for(target_nfe: int, calls_per_step: int) -> tuple[int, int]:
  """(steps N, actual NFE) nearest a target NFE for a solver with `calls_per_step` evaluations."""
  if calls_per_step == 1:
    return target_nfe, target_nfe
  n = max(1, (target_nfe + 1) // 2)
  return n, 2 * n - 1


# ------------------------------------------------------------------------------------------------
# A line plot in PIL, log x and log or linear y.

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
          (0, 0, 128), (128, 0, 0), (0, 128, 128), (128, 128, 0), (0, 0, 0)]


def _font(size):
  try:
    return ImageFont.truetype('DejaVuSans.ttf', size)
  except OSError:
    return ImageFont.load_default()


def plot_lines(series: dict, path: str, title: str, xlabel: str, ylabel: str, *,
               log_x: bool = True, log_y: bool = True, x_ticks=(), hline=None) -> None:
  """Writes a PNG of `series` {name: [(x, y), ...]}; `hline` = (y, label) draws a dashed level."""
  width, height, left, right, top, bottom = 1100, 640, 100, 300, 40, 60
  image = Image.new('RGB', (width, height), 'white')
  pen = ImageDraw.Draw(image)
  font, small = _font(14), _font(12)
  xs = [x for pts in series.values() for x, _ in pts]
  ys = [y for pts in series.values() for _, y in pts] + ([hline[0]] if hline else [])
  fx = math.log10 if log_x else float
  fy = math.log10 if log_y else float
  x_lo, x_hi = fx(min(xs)), fx(max(xs))
  pad = 0.04 * (x_hi - x_lo or 1.0)
  x_lo, x_hi = x_lo - pad, x_hi + pad
  if log_y:
    y_lo, y_hi = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    y_ticks = [m * 10.0**e for e in range(y_lo, y_hi + 1) for m in (1, 2, 5)
               if y_lo <= math.log10(m * 10.0**e) <= y_hi]
  else:
    span = max(ys) - min(ys) or 1.0
    step = 10 ** math.floor(math.log10(span / 4))
    y_lo, y_hi = math.floor(min(ys) / step) * step, math.ceil(max(ys) / step) * step
    y_ticks = list(np.arange(y_lo, y_hi + step / 2, step))

  def to_px(x, y):
    u = (fx(x) - x_lo) / (x_hi - x_lo)
    v = (fy(y) - y_lo) / (y_hi - y_lo)
    return left + u * (width - left - right), height - bottom - v * (height - top - bottom)

  pen.rectangle((left, top, width - right, height - bottom), outline='black')
  for t in y_ticks:
    _, y = to_px(min(xs), t)
    pen.line([(left, y), (width - right, y)], fill=(225, 225, 225))
    pen.text((left - 8, y), f'{t:g}', fill='black', font=small, anchor='rm')
  for t in x_ticks or sorted(set(xs)):
    x, _ = to_px(t, y_ticks[0])
    pen.line([(x, top), (x, height - bottom)], fill=(225, 225, 225))
    pen.text((x, height - bottom + 8), f'{t:g}', fill='black', font=small, anchor='mt')
  pen.text(((left + width - right) / 2, height - 22), xlabel, fill='black', font=font,
           anchor='mm')
  pen.text((8, (top + height - bottom) / 2), ylabel, fill='black', font=font, anchor='lm')
  pen.text((left, 12), title, fill='black', font=font)
  if hline:
    _, y = to_px(min(xs), hline[0])
    for x in range(left, width - right, 12):
      pen.line([(x, y), (min(x + 6, width - right), y)], fill='black', width=1)
    pen.text((width - right - 4, y - 4), hline[1], fill='black', font=small, anchor='rb')
  for k, (name, pts) in enumerate(series.items()):
    color = COLORS[k % len(COLORS)]
    xy = [to_px(x, y) for x, y in sorted(pts)]
    if len(xy) > 1:
      pen.line(xy, fill=color, width=2)
    for x, y in xy:
      pen.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    y = top + 10 + 22 * k
    pen.line([(width - right + 15, y), (width - right + 45, y)], fill=color, width=3)
    pen.text((width - right + 52, y), name, fill='black', font=small, anchor='lm')
  image.save(path)


# ------------------------------------------------------------------------------------------------


def reference_fd(num: int) -> tuple[float, int]:
  """(FD, n) of n real test images, balanced over the classes as the samples are, vs the train split.

  The level a perfect sampler scores near with as many images: FD is biased upward at small n
  (and by class imbalance), so a 100-image sweep is read against 10 real images per class, not
  the whole split (all 359 test images: FD 2.21).
  """
  from diffjax.evaluation import digits_classifier
  images, labels = digits_classifier.load_digits_split('test')
  per_class = min(num // 10, min(np.bincount(labels)))
  idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
  return float(digits_classifier.digits_metrics(images[idx], labels[idx])['fd']), len(idx)


def score(run, sampler: str, steps: int, num: int, batch: int, cache=None, **options) -> dict:
  """Digits evaluator metrics of `num` samples (seeds 0…num−1, class seed mod 10) of a loaded run.

  `cache` (a dict) keeps the compiled sampling function per setting, for calls on runs with the
  same network and different weights (the post-hoc EMA sweep): one compilation, not one per run.
  """
  from diffjax import build, sampling
  from diffjax import images as images_lib
  from diffjax.evaluation import digits_classifier

  seeds = list(range(num))
  labels = sampling.default_labels(seeds, run.num_classes)
  shape = (run.spec.resolution, run.spec.resolution, run.spec.channels)
  key = (sampler, steps, tuple(sorted(options.items())))
  sample_fn = (cache or {}).get(key)
  if sample_fn is None:
    fn = build.sampler_fn(run.config, run.denoiser.precond, sampler, steps, **options)
    sample_fn = sampling.make_sample_fn(run.denoiser, fn, shape, run.num_classes)
    if cache is not None:
      cache[key] = sample_fn
  x = sampling.generate(sample_fn, run.ema_params, seeds, labels, batch_size=batch)
  return digits_classifier.digits_metrics(images_lib.to_uint8(x), labels)


def sweep(workdir: str, targets, solvers, num: int, batch: int, results_path: str):
  """Samples and scores every (solver, target NFE).

  Returns:
    ({label: [{nfe, steps, fd, accuracy, seconds}, ...]}, the run's step).
  """
  from diffjax import runs

  results = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  run = runs.load(workdir)
  if run.config.data.name != 'digits':
    raise SystemExit(f'{workdir} trained on {run.config.data.name!r}; the digits evaluator scores '
                     'digits runs (train one with configs/edm.py:digits).')
  key = f'step{run.step}_n{num}'
  done = results.setdefault(key, {})
  total = len(solvers) * len(targets)
  k = 0
  for label in solvers:
    name, options, calls = SOLVERS[label]
    for target in targets:
      k += 1
      steps, nfe = steps_for(target, calls)
      if any(p['nfe'] == nfe for p in done.get(label, [])):
        continue
      t0 = time.time()
      m = score(run, name, steps, num, batch, **options)
      point = dict(nfe=nfe, steps=steps, fd=float(m['fd']), accuracy=float(m['accuracy']),
                   seconds=round(time.time() - t0, 1))
      done.setdefault(label, []).append(point)
      print(f'[{k}/{total}] {label:24s} steps {steps:3d} NFE {nfe:3d}: FD {point["fd"]:8.3f} '
            f'accuracy {point["accuracy"]:.3f} ({point["seconds"]} s)', flush=True)
      os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
      with open(results_path, 'w') as f:
        json.dump(results, f, indent=1)
  return {label: sorted(done[label], key=lambda p: p['nfe']) for label in solvers
          if label in done}, run.step


def table(data: dict, targets, field: str, fmt: str) -> str:
  lines = ['| solver | ' + ' | '.join(f'NFE {t}' for t in targets) + ' |',
           '|---|' + '---|' * len(targets)]
  for label, pts in data.items():
    cells = []
    for t in targets:
      p = min(pts, key=lambda p: abs(p['nfe'] - t))
      cells.append(format(p[field], fmt) + ('' if p['nfe'] == t else f' ({p["nfe"]})'))
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='a digits run (configs/edm.py:digits)')
  parser.add_argument('--num', type=int, default=1000, help='images per point (seeds 0..num-1)')
  parser.add_argument('--nfe', default='5,10,20,35', help='target NFEs, comma-separated')
  parser.add_argument('--solvers', default=','.join(SOLVERS),
                      help=f'comma-separated labels among: {", ".join(SOLVERS)}')
  parser.add_argument('--batch', type=int, default=500, help='images per sampling batch')
  parser.add_argument('--results', default=None,
                      help='JSON of results (resumed from); default WORKDIR/eval/nfe_sweep.json')
  parser.add_argument('--out', default=os.path.join(ROOT, 'docs', 'digits_nfe_sweep.png'))
  args = parser.parse_args()
  targets = [int(t) for t in args.nfe.split(',')]
  solvers = [s.strip() for s in args.solvers.split(',') if s.strip()]
  unknown = [s for s in solvers if s not in SOLVERS]
  if unknown:
    raise SystemExit(f'Unknown solver label(s) {unknown}; pick among: {", ".join(SOLVERS)}.')
  from diffjax import cli
  cli.tune_xla_cpu()
  results = args.results or os.path.join(args.workdir, 'eval', 'nfe_sweep.json')
  data, step = sweep(args.workdir, targets, solvers, args.num, args.batch, results)
  floor, n_real = reference_fd(args.num)
  # Two figures, ODE and stochastic solvers, so that no two lines of one figure share a colour.
  stochastic = {k: v for k, v in data.items() if 'η=' in k}
  outs = []
  for kind, part, out in (('ODE', {k: v for k, v in data.items() if k not in stochastic}, args.out),
                          ('stochastic', stochastic,
                           os.path.splitext(args.out)[0] + '_stochastic.png')):
    if not part:
      continue
    plot_lines({k: [(p['nfe'], p['fd']) for p in v] for k, v in part.items()}, out,
               f'Digits evaluator FD against NFE, {kind} solvers: '
               f'{os.path.basename(os.path.normpath(args.workdir))} at step {step}, {args.num} '
               'images per point, Karras σ', 'NFE (denoiser evaluations)', 'FD',
               x_ticks=(3, 5, 9, 10, 19, 20, 35),
               hline=(floor, f'{n_real} real test images: FD {floor:.2f}'))
    outs.append(out)
  print(f'wrote {", ".join(outs)}; {n_real} real test images score FD {floor:.2f}\n')
  print(table(data, targets, 'fd', '.2f') + '\n')
  print(table(data, targets, 'accuracy', '.3f') + '\n')
  near10 = [(min(v, key=lambda p: abs(p['nfe'] - 10)), k) for k, v in data.items()]
  best, label = min(near10, key=lambda pk: pk[0]['fd'])
  heun35 = [p for p in data.get('heun', []) if p['nfe'] == 35]
  if heun35:
    print(f'best at ~10 NFE: {label} (NFE {best["nfe"]}) FD {best["fd"]:.2f} / accuracy '
          f'{best["accuracy"]:.3f}; heun at 35 NFE: FD {heun35[0]["fd"]:.2f} / accuracy '
          f'{heun35[0]["accuracy"]:.3f}')


if __name__ == '__main__':
  main()
