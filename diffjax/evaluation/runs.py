"""Evaluating trained runs: sample a workdir's model and score the samples, results to JSON."""

from __future__ import annotations

import json
import os
from typing import Optional

from diffjax import build, images as images_lib, sampling


def evaluate_digits(
  workdir: str,
  *,
  num_images: int = 1000,
  first_seed: int = 0,
  sampler: Optional[str] = None,
  num_steps: Optional[int] = None,
  guidance: float = 0.0,
  batch_size: int = 500,
  step: Optional[int] = None,
  progress: bool = False,
  **sampler_kwargs,
) -> dict:
  """Scores a digits run with the digits evaluator (classifier Fréchet distance and accuracy).

  Samples `num_images` images from seeds first_seed… with classes cycling (seed mod 10), then
  reports the evaluator's Fréchet distance to the train split, the accuracy of the classifier on
  the intended classes, and its mean confidence. Writes WORKDIR/eval/digits_<step>.json.

  Returns:
    The metrics dict (also with 'step', 'sampler', 'num_steps', 'nfe'-relevant settings).
  """
  from diffjax.evaluation import digits_classifier

  run = build.load(workdir, step)
  if run.config.data.name != 'digits':
    raise ValueError(
      f'The digits evaluator scores digits runs; {workdir} trained on {run.config.data.name!r}.'
    )
  seeds = list(range(first_seed, first_seed + num_images))
  labels = sampling.default_labels(seeds, run.num_classes)
  name = sampler or run.config.sample.sampler
  steps = int(num_steps or run.config.sample.num_steps)
  fn = build.sampler_fn(run.config, run.denoiser.precond, name, steps, **sampler_kwargs)
  shape = (run.spec.resolution, run.spec.resolution, run.spec.channels)
  sample_fn = sampling.make_sample_fn(run.denoiser, fn, shape, run.num_classes, guidance)
  x = sampling.generate(
    sample_fn, run.ema_params, seeds, labels, batch_size=batch_size, progress=progress
  )
  images = images_lib.to_uint8(x)
  metrics = digits_classifier.digits_metrics(images, labels)
  metrics.update(
    step=run.step,
    sampler=name,
    num_steps=steps,
    guidance=guidance,
    first_seed=first_seed,
    **{k: float(v) for k, v in sampler_kwargs.items()},
  )
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'digits_{run.step:08d}.json'), 'w') as f:
    json.dump(metrics, f, indent=2)
  images_lib.save_grid(images[:100], os.path.join(out_dir, f'digits_{run.step:08d}.png'), ncols=10)
  return metrics
