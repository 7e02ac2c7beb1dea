"""Classifier-free guidance against autoguidance on digits: the digits evaluator's FD and accuracy
against the guidance scale (docs/samplers.md).

    python scripts/digits_guidance_sweep.py --workdir=MAIN --guide_workdir=GUIDE \
        [--scales=1,1.25,1.5,2,3 --num=500 --steps=18 --interval=0.28,5.42]

MAIN is a class-conditional digits run trained with label dropout (its unconditional branch is
what CFG needs: configs/edm.py:digits with --config.model.kwargs.label_dropout=0.1); GUIDE a
weaker run of the same task (smaller and/or shorter trained, Karras et al. 2024). For each
guidance scale g (the papers' common axis: D_ref + g·(D_main − D_ref), g = 1 is no guidance;
diffjax's weight is w = g − 1) the script samples `--num` images (seeds 0…num−1, class = seed
mod 10, the same latents for every setting) with Heun on EDM's Karras grid (`--steps` steps, 2N − 1
NFE; 18 → 35, each NFE paying two network calls when guided) and scores them with the digits
evaluator (`diffjax.evaluation.digits_classifier.digits_metrics`: Fréchet distance to the train
split in the digits classifier's feature space, and the classifier's accuracy on the intended
classes), for

  cfg            (1 + w)·D(x; σ, c) − w·D(x; σ, ∅) on MAIN (∅: the null label of label dropout);
  autoguidance   (1 + w)·D_main(x; σ, c) − w·D_guide(x; σ, c);
  …, σ in (lo, hi]   the same, guided only for σ_lo < σ ≤ σ_hi (Kynkäänniemi et al. 2024),
                 with `--interval=lo,hi`.

These are what `sample.py --guidance=w [--guide_workdir=GUIDE] [--guidance_interval=lo,hi]`
samples (the sampling function is `diffjax.sampling.make_sample_fn`); the plot is drawn by
scripts/digits_nfe_sweep.py's `plot_lines`. Results go to `--results` (default MAIN/eval/guidance_sweep.json)
as they come; a rerun skips the points already there (`--plot_only` samples nothing and draws
every series the results hold at the given scales). Writes a two-panel PNG (FD and accuracy
against g; docs/digits_guidance.png by default) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import digits_nfe_sweep as common  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

SCALES = (1.0, 1.25, 1.5, 2.0, 3.0)
METHODS = ('cfg', 'autoguidance')


def score(main, guide, method: str, scale: float, steps: int, num: int, batch: int,
          interval=None) -> dict:
  """Digits evaluator metrics of `num` Heun samples of `main` guided by `method` at scale g.

  Args:
    main, guide: loaded runs (`diffjax.runs.load`); `guide` is used by 'autoguidance' only.
    method: 'cfg' or 'autoguidance'.
    scale: g; the guidance weight is w = g − 1 (g = 1: the unguided main model).
    interval: (σ_lo, σ_hi) or None.
  """
  from diffjax import build, sampling
  from diffjax import images as images_lib
  from diffjax.evaluation import digits_classifier

  w = scale - 1.0
  seeds = list(range(num))
  labels = sampling.default_labels(seeds, main.num_classes)
  shape = (main.spec.resolution, main.spec.resolution, main.spec.channels)
  fn = build.sampler_fn(main.config, main.denoiser.precond, 'heun', steps)
  auto = method == 'autoguidance' and w != 0.0
  sample_fn = sampling.make_sample_fn(
      main.denoiser, fn, shape, main.num_classes, w,
      guidance_interval=interval if w else None,
      guide=guide.denoiser if auto else None, guide_classes=guide.num_classes if auto else 0)
  params = (main.ema_params, guide.ema_params) if auto else main.ema_params
  x = sampling.generate(sample_fn, params, seeds, labels, batch_size=batch)
  return digits_classifier.digits_metrics(images_lib.to_uint8(x), labels)


def reference_metrics(num: int) -> dict:
  """FD and accuracy of class-balanced real test images, as many as the samples (at most 359).

  FD is biased upward at small n, so the sweep is read against real images of the same count
  (`digits_nfe_sweep.reference_fd`); the accuracy is the classifier's on held-out real digits.
  """
  from diffjax.evaluation import digits_classifier
  images, labels = digits_classifier.load_digits_split('test')
  per_class = min(num // 10, min(np.bincount(labels)))
  idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
  m = digits_classifier.digits_metrics(images[idx], labels[idx])
  return dict(fd=float(m['fd']), accuracy=float(m['accuracy']), n=len(idx))


def interval_label(method: str, interval) -> str:
  """The results' name of a method guided only for σ in (σ_lo, σ_hi]."""
  return f'{method}, σ in ({interval[0]:g}, {interval[1]:g}]'


def sweep(main_dir: str, guide_dir: str, scales, methods, num: int, steps: int, batch: int,
          interval, results_path: str, plot_only: bool = False):
  """Samples and scores every (method, g) not yet in the results (none with `plot_only`).

  Returns:
    ({label: [{g, fd, accuracy, seconds}, ...] sorted by g}, the setting's key in the results,
    the guide's own unguided {fd, accuracy, step} or None). Labels are the methods, then (with an
    interval) `interval_label(method, interval)`, then with `plot_only` every other label the
    results hold for this setting (e.g. other intervals).
  """
  from diffjax import runs, sampling

  main_config = runs.read_config(main_dir)
  if main_config.data.name != 'digits':
    raise SystemExit(f'{main_dir} trained on {main_config.data.name!r}; the digits evaluator '
                     'scores digits runs (train one with configs/edm.py:digits).')
  main = runs.load(main_dir)
  guide = runs.load(guide_dir)
  sampling.check_guide(main.spec, main.num_classes, guide.spec, guide.num_classes, guide_dir)
  results = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  key = f'main{main.step}_guide{guide.step}_heun{steps}_n{num}'
  done = results.setdefault(key, {})
  todo = [(m, m, None) for m in methods]
  todo += [(interval_label(m, interval), m, interval) for m in methods] if interval else []

  def save():
    os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
    with open(results_path, 'w') as f:
      json.dump(results, f, indent=1)

  k = 0
  for label, method, sigmas in [] if plot_only else todo:
    for scale in scales:
      k += 1
      if any(p['g'] == scale for p in done.get(label, [])):
        continue
      unguided = [p for name, pts in done.items() if name != 'guide alone' for p in pts
                  if p['g'] == 1.0]
      if scale == 1.0 and unguided:  # g = 1 is the unguided main model, whatever the method
        done.setdefault(label, []).append(dict(unguided[0]))
        continue
      t0 = time.time()
      m = score(main, guide, method, scale, steps, num, batch, sigmas)
      point = dict(g=scale, fd=float(m['fd']), accuracy=float(m['accuracy']),
                   seconds=round(time.time() - t0, 1))
      done.setdefault(label, []).append(point)
      print(f'[{k}/{len(todo) * len(scales)}] {label:32s} g {scale:5.2f}: FD {point["fd"]:8.3f} '
            f'accuracy {point["accuracy"]:.3f} ({point["seconds"]} s)', flush=True)
      save()
  if 'guide alone' not in done and not plot_only:  # how much weaker the guide is, on its own
    t0 = time.time()
    m = score(guide, None, 'cfg', 1.0, steps, num, batch)
    done['guide alone'] = dict(step=int(guide.step), fd=float(m['fd']),
                               accuracy=float(m['accuracy']), seconds=round(time.time() - t0, 1))
    print(f'guide alone: FD {m["fd"]:.3f} accuracy {m["accuracy"]:.3f}', flush=True)
    save()
  labels = [label for label, _, _ in todo]
  labels += [name for name in done if plot_only and name not in labels and name != 'guide alone']
  data = {label: sorted((p for p in done[label] if p['g'] in scales), key=lambda p: p['g'])
          for label in labels if label in done}
  return {k: v for k, v in data.items() if v}, key, done.get('guide alone')


def plot(data: dict, reference: dict, path: str, title: str) -> None:
  """FD (top) and accuracy (bottom) against g, drawn by `digits_nfe_sweep.plot_lines`."""
  with tempfile.TemporaryDirectory() as tmp:
    panels = []
    for field, ylabel in (('fd', 'FD'), ('accuracy', 'accuracy')):
      part = os.path.join(tmp, f'{field}.png')
      ref = reference[field]
      common.plot_lines(
          {k: [(p['g'], p[field]) for p in v] for k, v in data.items()}, part,
          title if field == 'fd' else 'Classifier accuracy on the intended class',
          'guidance scale g (w = g − 1; g = 1: no guidance)', ylabel, log_x=False,
          log_y=field == 'fd', hline=(ref, f'{reference["n"]} real test images: {ref:.3g}'))
      panels.append(Image.open(part).convert('RGB'))
    image = Image.new('RGB', (panels[0].width, sum(p.height for p in panels)), 'white')
    for k, panel in enumerate(panels):
      image.paste(panel, (0, k * panels[0].height))
    image.save(path)


def table(data: dict, scales) -> str:
  """Markdown: one row per method, 'FD (accuracy)' per g."""
  lines = ['| method | ' + ' | '.join(f'g = {g:g}' for g in scales) + ' |',
           '|---|' + '---|' * len(scales)]
  for label, pts in data.items():
    by_g = {p['g']: p for p in pts}
    cells = [f'{by_g[g]["fd"]:.2f} ({by_g[g]["accuracy"]:.3f})' if g in by_g else '–'
             for g in scales]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True,
                      help='the main digits run, trained with label dropout (for CFG)')
  parser.add_argument('--guide_workdir', required=True,
                      help='the guide: a smaller / shorter-trained digits run')
  parser.add_argument('--scales', default=','.join(f'{g:g}' for g in SCALES),
                      help='guidance scales g (1 = no guidance), comma-separated')
  parser.add_argument('--methods', default=','.join(METHODS), help='cfg, autoguidance or both')
  parser.add_argument('--interval', default='',
                      help='σ_lo,σ_hi: also each method with guidance only in (σ_lo, σ_hi]')
  parser.add_argument('--num', type=int, default=500, help='images per point (seeds 0..num-1)')
  parser.add_argument('--steps', type=int, default=18, help='Heun steps (NFE 2N − 1)')
  parser.add_argument('--batch', type=int, default=500, help='images per sampling batch')
  parser.add_argument('--results', default=None, help='JSON of results (resumed from); default '
                      'WORKDIR/eval/guidance_sweep.json')
  parser.add_argument('--plot_only', action='store_true',
                      help='sample nothing: plot and tabulate the points --results holds')
  parser.add_argument('--out', default=os.path.join(common.ROOT, 'docs', 'digits_guidance.png'))
  args = parser.parse_args()
  scales = [float(g) for g in args.scales.split(',')]
  if any(g < 1 for g in scales):
    raise SystemExit(f'Guidance scales are g ≥ 1 (g = 1: no guidance; w = g − 1); got {scales}.')
  methods = [m.strip() for m in args.methods.split(',') if m.strip()]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise SystemExit(f'Unknown method(s) {unknown}; pick among: {", ".join(METHODS)}.')
  interval = tuple(float(s) for s in args.interval.split(',')) if args.interval else None
  if interval is not None and (len(interval) != 2 or not 0 <= interval[0] < interval[1]):
    raise SystemExit(f'--interval is σ_lo,σ_hi with 0 ≤ σ_lo < σ_hi; got {args.interval!r}.')
  from diffjax import cli
  cli.tune_xla_cpu()
  results = args.results or os.path.join(args.workdir, 'eval', 'guidance_sweep.json')
  try:
    data, key, guide_alone = sweep(args.workdir, args.guide_workdir, scales, methods, args.num,
                                   args.steps, args.batch, interval, results, args.plot_only)
  except ValueError as e:  # a run that cannot take this guidance (e.g. CFG without label dropout)
    raise SystemExit(str(e)) from None
  reference = reference_metrics(args.num)
  plot(data, reference, args.out,
       f'Digits evaluator FD against guidance scale: {key}, Heun {2 * args.steps - 1} NFE'
       + (f', interval ({interval[0]:g}, {interval[1]:g}]' if interval else ''))
  print(f'wrote {args.out}; {reference["n"]} real test images: FD {reference["fd"]:.2f}, '
        f'accuracy {reference["accuracy"]:.3f}\n')
  print(table(data, scales) + '\n')
  if guide_alone:
    print(f'the guide alone (unguided, step {guide_alone["step"]}): FD {guide_alone["fd"]:.2f}, '
          f'accuracy {guide_alone["accuracy"]:.3f}')
  for label, pts in data.items():
    best = min(pts, key=lambda p: p['fd'])
    print(f'{label}: best FD {best["fd"]:.2f} at g = {best["g"]:g} (w = {best["g"] - 1:g}), '
          f'accuracy {best["accuracy"]:.3f}')


if __name__ == '__main__':
  main()
