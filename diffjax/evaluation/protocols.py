"""Evaluating trained runs and image sets: FID / IS / KID with Inception, reference statistics, digits.

What `evaluate.py` calls; every function here is usable (and tested) from Python.

    stats = reference_statistics('cifar10', out='refs/cifar10-train.npz')       # evaluate.py ref
    result = evaluate_fid('runs/cifar10', 'refs/cifar10-train.npz', num_images=50_000,
                          protocol='edm3')                                      # evaluate.py fid
    result = evaluate_images('samples.npz', 'refs/cifar10-train.npz')           # evaluate.py fid --images

Images reach Inception as uint8 NHWC. Generated images are quantized as EDM writes its PNGs,
round(x·127.5 + 127.5) clipped (REFERENCE §6), on device, so sampling → quantize → Inception → feature
moments never leaves the accelerators: each batch is sharded over every device, and `StreamingStats`
sums the per-device moments (float64 on the host), so 50k images never sit in memory. Greyscale images
(1 channel, e.g. the digits) are fed to Inception with the grey channel repeated to RGB — the same as
converting a greyscale PNG to RGB — so a folder of grey PNGs and the same images as an array agree.

The reference (`ref=`) of a FID evaluation may be
  * an `.npz` of statistics with `mu`, `sigma` (ours or NVlabs/edm's published files); written by
    `reference_statistics(..., keep_features=True)` it also holds the pool3 `features`, which KID needs;
  * an `.npz` with `images` (uint8 [N, H, W, C]) or a folder of PNG/JPEG files (searched recursively);
  * a registered dataset name, optionally with a split: 'cifar10' (train split) or 'digits:test'.
KID needs reference *features*, so it works with every form except a statistics-only `.npz`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from diffjax import build, parallel, runs, sampling
from diffjax import images as images_lib
from diffjax.evaluation import digits_classifier, feature_shards
from diffjax.evaluation.features import (
  _FeatureSink,
  _seed_text,
  generated_feature_groups,
  source_features,
)
from diffjax.evaluation.references import (
  check_reference,
  compute_metrics,
  feature_networks,
  load_reference,
  parse_metrics,
)
from diffjax.evaluation.sources import array_source, file_source
from diffjax.runs import files

PROTOCOLS = ('edm3',)


# --------------------------------------------------------------------------------------------------------
# Evaluations.


def seed_sets(num_images: int, *, seeds: Optional[Sequence[int] | str] = None, first_seed: int = 0,
              protocol: Optional[str] = None) -> list[list[int]]:
  """The seed sets of an evaluation.

  Without a protocol: `seeds` (a list or text like '0-49999'), else first_seed … first_seed+N−1.
  `protocol='edm3'` is EDM's: three sets first_seed + [0, N), [N, 2N), [2N, 3N), whose minimum FID
  is reported (Karras et al. 2022, §5 / Table 2 footnote).

  Raises:
    ValueError: malformed seeds, an unknown protocol, or seeds together with edm3.
  """
  if protocol:
    if protocol not in PROTOCOLS:
      raise ValueError(f'Unknown protocol {protocol!r}; known: {", ".join(PROTOCOLS)}.')
    if seeds:
      raise ValueError('--protocol=edm3 picks its seeds itself (0 to N−1, N to 2N−1, 2N to 3N−1); '
                       'pass --num (and --first_seed) instead of --seeds.')
  if seeds:
    seeds = sampling.parse_seeds(seeds) if isinstance(seeds, str) else [int(s) for s in seeds]
    if len(seeds) < 2:
      raise ValueError('FID needs at least 2 seeds.')
    return [seeds]
  if num_images < 2:
    raise ValueError(f'--num must be at least 2 for FID, got {num_images}.')
  if first_seed < 0:
    raise ValueError(f'--first_seed must be non-negative, got {first_seed}.')
  sets = 3 if protocol == 'edm3' else 1
  return [list(range(first_seed + k * num_images, first_seed + (k + 1) * num_images))
          for k in range(sets)]


def _option_values(options: dict) -> dict:
  """Sampler options as JSON values: numbers as floats, names (--grid) as they are."""
  return {k: v if isinstance(v, str) else float(v) for k, v in options.items()}


def _fmt(x: float | str) -> str:
  """A number or a name (e.g. --grid=exponential) as a file-name-safe part: 0.5 -> 0p5, -1 -> m1."""
  text = re.sub(r'[^0-9A-Za-z]+', '', x) if isinstance(x, str) else f'{x:g}'
  return text.replace('.', 'p').replace('-', 'm')


def _result_name(step: int, sampler: str, steps: int, guidance: float, kwargs: dict,
                 num_images: int, protocol: Optional[str]) -> str:
  """fid_<step>_<sampler><steps>[_w<g>][_<option><v>]_n<N>[_edm3]: one file per setting, not per call."""
  parts = [f'fid_{step:08d}', f'{sampler}{steps}']
  if guidance:
    parts.append(f'w{_fmt(guidance)}')
  parts += [f'{k.removeprefix("s_")}{_fmt(v)}' for k, v in sorted(kwargs.items())]
  parts.append(f'n{num_images}')
  if protocol:
    parts.append(protocol)
  return '_'.join(parts)


def _digits_result_name(step: int, sampler: str, steps: int, guidance: float, kwargs: dict,
                        num_images: int = 1000, first_seed: int = 0) -> str:
  """digits_<step>_<sampler><steps>[_w<g>][_<option><v>][_n<N>][_seed<k>], e.g. digits_00001200_heun18.

  Guidance, sampler options, the number of images and the first seed appear only when they are set
  (not 0, not the defaults 1000 and 0), so that two evaluations of one checkpoint with different settings
  never overwrite each other's file and the common case stays short.
  """
  parts = [f'digits_{step:08d}', f'{sampler}{steps}']
  if guidance:
    parts.append(f'w{_fmt(guidance)}')
  parts += [f'{k.removeprefix("s_")}{_fmt(v)}' for k, v in sorted(kwargs.items())]
  if num_images != 1000:
    parts.append(f'n{num_images}')
  if first_seed:
    parts.append(f'seed{first_seed}')
  return '_'.join(parts)


def _write_json(path: str, result: dict) -> None:
  """Process 0 writes the result whole (local or an object store, through `runs.files`)."""
  if parallel.is_main_process():
    files.write_json(path, result)


def evaluate_fid(workdir: str, ref: str, *, num_images: int = 50_000,
                 seeds: Optional[Sequence[int] | str] = None, first_seed: int = 0,
                 protocol: Optional[str] = None, metrics: Sequence[str] | str = ('fid',),
                 sampler: Optional[str] = None, num_steps: Optional[int] = None,
                 guidance: float = 0.0, batch_size: int = 128, step: Optional[int] = None,
                 split: str = 'train', data_dir: Optional[str] = None, out: Optional[str] = None,
                 is_splits: int = 10, kid_subset_size: int = 1000,
                 shard_size: int = feature_shards.DEFAULT_SHARD_SIZE,
                 inception_variables: Optional[Mapping[str, Any]] = None, mesh=None,
                 progress: bool = False, dinov2_variables: Optional[Mapping[str, Any]] = None,
                 **sampler_kwargs) -> dict:
  """FID (IS, KID) of a trained run's samples against a reference; results to WORKDIR/eval/*.json.

  Resumable: each seed set is evaluated in shards of `shard_size` seeds whose feature statistics go
  to OUT/shards/ as they finish (`feature_shards`; OUT is the result's path without `.json`). The
  same call after a kill skips the shards already there (it says how many images it found) and
  gives the same result as an uninterrupted one; shards of other settings are refused.

  Args:
    workdir: a train.py run.
    ref: the reference (module docstring): statistics `.npz`, images, or a dataset name.
    num_images: N, images per seed set.
    seeds: explicit seeds (list or '0-999,2000-2999'); overrides num_images / first_seed.
    first_seed: first seed of the (first) set.
    protocol: None, or 'edm3' (three sets of N seeds; the set of minimum FID is reported).
    metrics: 'fid', 'is', 'kid', 'fd_dinov2' (list or comma-separated text).
    sampler, num_steps, guidance, sampler_kwargs: sampling settings (default: the run's config).
    batch_size: images per device batch, over all devices.
    step: checkpoint step (default: the newest).
    split, data_dir: for a dataset reference.
    out: the JSON path (default WORKDIR/eval/fid_<step>_<settings>.json; a PNG preview goes beside,
      the shards in the folder of the same name).
    is_splits, kid_subset_size: see `compute_metrics`.
    shard_size: seeds per shard (what a kill can lose; each shard's file holds a D×D float64 scatter,
      32 MB for Inception's 2048 features).
    inception_variables: Inception weights (tests pass random ones); None loads the published file.
    mesh, progress: devices and progress bar.
    dinov2_variables: DINOv2 weights for fd_dinov2 (tests pass tiny random ones); None loads the
      published file.

  Returns:
    The result dict (as written): the metrics of the reported set at the top level ('fid', …), with
    'sets' holding every set's metrics and seeds when the protocol has several; plus the settings,
    'step', 'ref', 'seconds', 'found' (images whose shards were already done), 'shards' (their
    folder) and 'json' (the path written).
  """
  metrics = parse_metrics(metrics)
  sets = seed_sets(num_images, seeds=seeds, first_seed=first_seed, protocol=protocol)
  feature_shards.shard_groups(1, shard_size)  # a bad --shard_size fails before anything is read
  need_kid, networks = 'kid' in metrics, feature_networks(metrics)
  ref_kind = check_reference(ref, need_features=need_kid, split=split,  # before loading, sampling
                             need_dinov2='dinov2' in networks,
                             need_inception='inception' in networks)
  start = time.time()
  run = runs.load(workdir, step)
  name = sampler or run.config.sample.sampler
  steps = int(num_steps or run.config.sample.num_steps)
  kwargs = _option_values(sampler_kwargs)
  out = out or os.path.join(workdir, 'eval', _result_name(run.step, name, steps, guidance, kwargs,
                                                          len(sets[0]), protocol) + '.json')
  shards = feature_shards.FeatureShards(
      os.path.join(os.path.splitext(out)[0], feature_shards.SHARD_DIR),
      _shard_settings(run, name, steps, guidance, kwargs, sets, protocol, metrics,
                      feature_shards.reference_id(ref, ref_kind, split),
                      {'inception': inception_variables, 'dinov2': dinov2_variables},
                      shard_size))

  def open_shards() -> list:
    try:
      return shards.open()
    except OSError as e:
      raise OSError(f'Cannot write feature statistics to {shards.dir} ({e.strerror or e}); pass an '
                    '--out on a writable disk with free space.') from e

  done = set(parallel.on_main(open_shards))  # every process: the same shards to skip
  # After the settings check: a refusal comes before the reference's images go through a network.
  reference = load_reference(ref, need_features=need_kid, split=split, data_dir=data_dir,
                             batch_size=batch_size, inception_variables=inception_variables,
                             mesh=mesh, progress=progress, networks=networks,
                             dinov2_variables=dinov2_variables)
  plans = []
  for set_seeds in sets:
    set_seeds = np.asarray(set_seeds, np.int64)
    groups = feature_shards.shard_groups(len(set_seeds), shard_size)
    todo = [g for g in groups if feature_shards.shard_name(set_seeds[g]) not in done]
    plans.append((set_seeds, groups, todo))
  total = sum(len(s) for s in sets)
  found = total - sum(len(g) for _, _, todo in plans for g in todo)
  if found and parallel.is_main_process():
    print(f'Found {found} of {total} images already evaluated in {shards.dir}; evaluating the '
          f'other {total - found}.', flush=True)

  def write(seeds_done: np.ndarray, state: dict) -> None:
    try:
      shards.write(seeds_done, state)
    except OSError as e:
      raise OSError(f'Cannot write feature statistics to {shards.dir} ({e.strerror or e}); free '
                    'disk space or fix the permissions, then rerun the same command: the '
                    f'{len(shards.done)} shards there are kept.') from e

  keep = dict(keep_pool3=need_kid, keep_logits='is' in metrics, networks=networks,
              dinov2_variables=dinov2_variables)
  results = []
  for k, (set_seeds, groups, todo) in enumerate(plans):
    for group, sink in generated_feature_groups(
        run, set_seeds, todo, sampler=name, num_steps=steps, guidance=guidance,
        batch_size=batch_size, inception_variables=inception_variables, mesh=mesh,
        progress=progress, **keep, **sampler_kwargs):
      state = sink.state()
      # Through on_main: a failed write stops every process at once, not at the next collective.
      parallel.on_main(lambda done=set_seeds[group], state=state: write(done, state))

    def score(k=k, set_seeds=set_seeds, groups=groups) -> dict:
      # Every shard read back and merged in seed order, as in an uninterrupted run: the same
      # numbers whichever shards this call computed.
      merged = _FeatureSink(inception_variables, mesh or parallel.make_mesh(), **keep)
      for group in groups:
        merged.absorb(shards.read(set_seeds[group]))
      features = merged.result()
      if k == 0 and features.preview is not None and len(features.preview):
        files.write_png(os.path.splitext(out)[0] + '.png',
                        images_lib.make_grid(features.preview, ncols=10))
      entry = compute_metrics(features, reference, metrics, is_splits=is_splits,
                              kid_subset_size=kid_subset_size)
      entry['seeds'] = _seed_text(set_seeds)
      return entry

    results.append(parallel.on_main(score))  # process 0 holds the shards; all get the metrics
  best = min(range(len(results)), key=lambda i: results[i].get('fid', 0.0))
  result = dict(results[best])
  if len(results) > 1:
    result.update(sets=results, reported_set=best)
  result.update(
    step=run.step, workdir=workdir, ref=reference.description, sampler=name, num_steps=steps,
    guidance=float(guidance), protocol=protocol, metrics=list(metrics), batch_size=batch_size,
    seconds=round(time.time() - start, 1), found=found, shards=shards.dir, **kwargs,
  )
  result['json'] = out
  _write_json(out, result)
  return result


def _shard_settings(run, sampler: str, steps: int, guidance: float, options: dict,
                    sets: Sequence[Sequence[int]], protocol: Optional[str],
                    metrics: Sequence[str], reference_id: dict, weights: Mapping[str, Any],
                    shard_size: int) -> dict:
  """What an evaluation's feature statistics depend on (`feature_shards.FeatureShards` settings).

  The batch size and device count are left out: image k depends on seed k only, and they change
  the statistics by float32 round-off only. The reference is in (`feature_shards.reference_id`)
  although the shards hold generated images' statistics only: a result is never assembled from
  shards of an evaluation against something else.
  """
  return {
      'format': feature_shards.FORMAT, 'config': run.config.to_dict(), 'step': int(run.step),
      'sampler': sampler, 'num_steps': int(steps), 'options': options, 'guidance': float(guidance),
      'seeds': [_seed_text(s) for s in sets], 'protocol': protocol, 'metrics': sorted(metrics),
      'reference': reference_id,
      'weights': {name: feature_shards.weights_id(w) for name, w in weights.items()},
      'shard_size': int(shard_size)}


def evaluate_images(images: str | np.ndarray, ref: str, *, metrics: Sequence[str] | str = ('fid',),
                    split: str = 'train', data_dir: Optional[str] = None, out: Optional[str] = None,
                    batch_size: int = 128, is_splits: int = 10, kid_subset_size: int = 1000,
                    inception_variables: Optional[Mapping[str, Any]] = None, mesh=None,
                    progress: bool = False,
                    dinov2_variables: Optional[Mapping[str, Any]] = None) -> dict:
  """FID (IS, KID) of a set of images against a reference.

  Args:
    images: an `.npz` with `images` (uint8 NHWC), a folder of image files, or a uint8 array.
    ref: the reference (module docstring).
    metrics, split, data_dir, batch_size, is_splits, kid_subset_size, inception_variables, mesh,
      progress, dinov2_variables: as in `evaluate_fid`.
    out: a JSON path to write the result to (None: only returned).

  Returns:
    {'fid', …, 'num_images', 'images', 'ref', 'seconds'} (+ 'json' when written).
  """
  metrics = parse_metrics(metrics)
  need_kid, networks = 'kid' in metrics, feature_networks(metrics)
  if isinstance(images, (str, os.PathLike)):
    source = file_source(os.fspath(images), batch_size)
  else:
    source = array_source(images, batch_size=batch_size)
  check_reference(ref, need_features=need_kid, split=split, need_dinov2='dinov2' in networks,
                  need_inception='inception' in networks)
  start = time.time()
  reference = load_reference(ref, need_features=need_kid, split=split, data_dir=data_dir,
                             batch_size=batch_size, inception_variables=inception_variables,
                             mesh=mesh, progress=progress, networks=networks,
                             dinov2_variables=dinov2_variables)
  features = source_features(source, keep_pool3=need_kid, keep_logits='is' in metrics,
                             batch_size=batch_size, inception_variables=inception_variables,
                             mesh=mesh, progress=progress, networks=networks,
                             dinov2_variables=dinov2_variables)
  result = compute_metrics(features, reference, metrics, is_splits=is_splits,
                           kid_subset_size=kid_subset_size)
  result.update(images=source.description, ref=reference.description, metrics=list(metrics),
                seconds=round(time.time() - start, 1))
  if out:
    result['json'] = out
    _write_json(out, result)
  return result


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
  the intended classes, and its mean confidence. Writes WORKDIR/eval/<name>.json and a 100-image grid
  <name>.png, the name saying what was evaluated (see `_digits_result_name`): e.g.
  digits_00001200_heun18.json, or digits_00001200_heun18_w0p5.json with guidance 0.5.

  Returns:
    The metrics dict (also with 'step', 'sampler', 'num_steps', 'nfe'-relevant settings, and 'json',
    the path written).
  """

  run = runs.load(workdir, step)
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
    **_option_values(sampler_kwargs),
  )
  base = os.path.join(workdir, 'eval', _digits_result_name(run.step, name, steps, guidance,
                                                           sampler_kwargs, num_images, first_seed))
  _write_json(base + '.json', metrics)
  if parallel.is_main_process():
    files.write_png(base + '.png', images_lib.make_grid(images[:100], ncols=10))
  metrics['json'] = base + '.json'
  return metrics
