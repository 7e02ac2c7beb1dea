"""Using distilled students: sampling them, DDIM style transfer, and the digits evaluation of stages."""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import build, runs, sampling
from diffjax import images as images_lib
from diffjax.evaluation import digits_classifier
from diffjax.objectives import distill as distill_lib
from diffjax.runs import files
from diffjax.samplers import distilled as distilled_samplers
from diffjax.training import distill as distill_loop


def load_denoise_fn(run, labels, guidance: float):
  """`denoise_fn(x, σ)` of a loaded run with guidance w: through the network for a w-student,
  classifier-free guidance for a conditional teacher, plain otherwise."""
  one_hot = run.one_hot(labels)
  mode = distill_lib.guidance_mode(run.denoiser, run.num_classes, guided=bool(guidance))
  return distill_lib.guided_denoise_fn(run.denoiser, run.ema_params, one_hot,
                           jnp.full((len(labels),), guidance, jnp.float32), mode)


def style_transfer(encoder_run, decoder_run, images, source_labels, target_labels, *,
                   encode_steps: int, decode_steps: int, guidance: float = 0.0) -> jax.Array:
  """Translates images from class A to class B (Meng et al. §5): encode, then decode.

  Args:
    encoder_run: a loaded run that encodes (an encoder round, or any model: its DDIM encoder).
    decoder_run: a loaded run that samples (a round's student, or any model).
    images: [B, H, W, C] in [−1, 1].
    source_labels, target_labels: int [B], classes A and B.
    encode_steps, decode_steps: numbers of encoder and decoder steps.
    guidance: w for both.

  Returns:
    translated images [B, H, W, C].
  """
  enc = load_denoise_fn(encoder_run, source_labels, guidance)
  dec = load_denoise_fn(decoder_run, target_labels, guidance)
  z = jax.jit(lambda x: distilled_samplers.encode(enc, x, num_steps=encode_steps))(images)
  return jax.jit(lambda z: distilled_samplers.ddim(dec, z, num_steps=decode_steps))(z)


def sample_images(run, seeds, labels, *, sampler: str, num_steps: int, guidance: float,
                  batch_size: int = 500) -> np.ndarray:
  """uint8 samples [N, H, W, C] of a loaded run with a registered sampler and guidance w."""
  fn = build.sampler_fn(run.config, run.denoiser.precond, sampler, num_steps)
  shape = (run.spec.resolution, run.spec.resolution, run.spec.channels)
  sample_fn = sampling.make_sample_fn(run.denoiser, fn, shape, run.num_classes, guidance)
  x = sampling.generate(sample_fn, run.ema_params, seeds, labels, batch_size=batch_size)
  return images_lib.to_uint8(x)


def evaluate_digits(workdir: str, *, num_images: int = 1000, guidance: Optional[float] = None,
                    teacher_steps: Optional[list[int]] = None, batch_size: int = 500,
                    stages: Optional[list[str]] = None) -> list[dict]:
  """Scores every finished stage of a digits distillation with the digits evaluator.

  Teacher: DDIM with classifier-free guidance (2 evaluations per step) at each of `teacher_steps`
  (default: its config's sample.num_steps, then start_steps halved down to 1 — the undistilled
  baseline); stage 1: DDIM with start_steps; each round of N steps: deterministic DDIM with N
  evaluations and, when trained with the stochastic grid, the stochastic sampler with 2N
  evaluations. Writes WORKDIR/eval/summary_w<w>.json and one sample grid per entry.

  Returns:
    One dict per (stage, sampler): stage, sampler, num_steps, nfe, fd, accuracy, confidence.
  """
  config = runs.read_config(workdir)
  d = config.distill
  w = float(d.sample_guidance if guidance is None else guidance)
  seeds = list(range(num_images))
  labels = np.asarray(seeds) % 10
  out_dir = files.path(workdir) / 'eval'
  rows = []
  for stage in distill_loop.plan(config, workdir):
    if stages is not None and stage.name not in stages:
      continue
    c = distill_loop.stage_config(config, stage, distill_loop._teacher_config(config, workdir))
    if distill_loop._finished_step(stage.workdir) < distill_loop.stage_steps(c, stage.workdir):
      continue
    run_ = runs.load(stage.workdir)
    jobs = []
    if stage.kind == 'teacher':
      steps = teacher_steps
      if steps is None:
        steps = [int(run_.config.sample.num_steps)] + [
            int(d.start_steps) >> k for k in range(int(np.log2(d.start_steps)) + 1)]
      for n in dict.fromkeys(steps):
        jobs.append(('distill_ddim', int(n), 2 * int(n) if w else int(n)))
    elif stage.kind == 'stage1':
      jobs.append(('distill_ddim', int(d.start_steps), int(d.start_steps)))
    elif stage.kind == 'round':
      jobs.append(('distill_ddim', stage.num_steps, stage.num_steps))
      if d.stochastic_grid:
        jobs.append(('distill_stochastic', 2 * stage.num_steps, 2 * stage.num_steps))
    for sampler, n, nfe in jobs:
      images = sample_images(run_, seeds, labels, sampler=sampler, num_steps=n, guidance=w,
                             batch_size=batch_size)
      metrics = digits_classifier.digits_metrics(images, labels)
      row = {'stage': stage.name, 'sampler': sampler, 'num_steps': n, 'nfe': nfe, 'guidance': w,
             **{k: float(v) for k, v in metrics.items()}}
      rows.append(row)
      files.write_png(out_dir / f'{stage.name}_{sampler}_{n}_w{w:g}.png',
                      images_lib.make_grid(images[:100], 10))
      print(json.dumps(row), flush=True)
  files.write_json(out_dir / f'summary_w{w:g}.json', rows)
  return rows


def evaluate_style_transfer_digits(workdir: str, *, encoder_stage: str, decoder_stage: str,
                                   encode_steps: int, decode_steps: int, guidance: float = 0.0,
                                   shift: int = 1, per_class: int = 20) -> dict:
  """Digits style transfer (Meng et al. §5): test digits of class A encoded with label A, decoded
  with label B = (A + shift) mod 10, scored by the digits classifier on B.

  Writes WORKDIR/eval/transfer_<encoder>_<decoder>.png (rows: a source row, then its translation).

  Returns:
    {'accuracy' (classifier says B), 'fd', 'source_accuracy' (still says A), settings...}.
  """
  images, labels = digits_classifier.load_digits_split('test')
  keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
  x = jnp.asarray(images[keep], jnp.float32) / 127.5 - 1.0
  source = np.asarray(labels[keep])
  target = (source + shift) % 10
  enc = runs.load(os.path.join(workdir, encoder_stage))
  dec = runs.load(os.path.join(workdir, decoder_stage))
  out = style_transfer(enc, dec, x, source, target, encode_steps=encode_steps,
                       decode_steps=decode_steps, guidance=guidance)
  out_u8 = images_lib.to_uint8(out)
  metrics = digits_classifier.digits_metrics(out_u8, target)
  logits = digits_classifier.digits_logits(out_u8)
  result = {'encoder': encoder_stage, 'decoder': decoder_stage, 'encode_steps': encode_steps,
            'decode_steps': decode_steps, 'guidance': guidance, 'shift': shift,
            'accuracy': float(metrics['accuracy']), 'fd': float(metrics['fd']),
            'source_accuracy': float(np.mean(np.argmax(np.asarray(logits), -1) == source))}
  out_dir = files.path(workdir) / 'eval'
  pick = np.concatenate([np.flatnonzero(source == c)[:2] for c in range(10)])
  src_u8 = images_lib.to_uint8(x)
  rows = np.concatenate([src_u8[pick][:10], out_u8[pick][:10], src_u8[pick][10:],
                         out_u8[pick][10:]])
  name = f'transfer_{encoder_stage}_{decoder_stage}_w{guidance:g}'
  files.write_png(out_dir / f'{name}.png', images_lib.make_grid(rows, 10))
  files.write_json(out_dir / f'{name}.json', result)
  return result
