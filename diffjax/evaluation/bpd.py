"""Bits/dim of a trained run on a dataset split through the probability-flow ODE (`evaluate.py bpd`).

    result = evaluate_bpd('runs/sde_digits', split='test')   # {'bpd': mean, 'bpd_stderr': …}

Every example of the split (optionally the first N) is uniformly dequantized and scored with
`diffjax.likelihood.ode.bpd` under the run's SDE (from its sde_* preconditioning, or EDM's 'vp'/'ve'),
with a Hutchinson–Skilling divergence by default. Batches are sharded over every device (padded to a
multiple of the device count; the padding is dropped). Example k of repeat r uses the key of seed
r·N + k, so the result does not depend on the batch size or device count. score_sde averages five
repeats over the test split (fresh dequantization and probes each time). The reported uncertainty is
the standard error of the mean over all N·repeats scores (which treats repeats of an example as
independent, so it slightly understates the spread of a data-set mean). A class-conditional run is
scored with the true labels, i.e. this is −log₂ p(x | c) per dimension.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import parallel, runs
from diffjax.likelihood import ode as likelihood
from diffjax.likelihood.vlb import bits_per_dim
from diffjax.precond import discrete as precond_discrete
from diffjax.precond import sde as precond_sde
from diffjax.processes import sde as sde_lib
from diffjax.runs import files
from diffjax.samplers import noise


def evaluate_bpd(workdir: str, *, split: str = 'test', num_examples: Optional[int] = None,
                 repeats: int = 1, batch_size: int = 128, divergence: str = 'hutchinson',
                 probe: str = 'rademacher', rtol: float = 1e-5, atol: float = 1e-5,
                 epsilon: Optional[float] = None, solver: str = 'tsit5', sde: Any = None,
                 step: Optional[int] = None, data_dir: Optional[str] = None, ema: bool = True,
                 mesh=None, out: Optional[str] = None, progress: bool = False) -> dict:
  """Mean ± standard error of the bits/dim of a run's model on a dataset split.

  Args:
    workdir: a train.py run.
    split: the split to score ('test' by default, as score_sde).
    num_examples: score only the first N examples.
    repeats: passes over the examples with fresh dequantization noise and probes.
    batch_size: examples per batch over all devices.
    divergence, probe, rtol, atol, solver: see `likelihood.log_likelihood`.
    epsilon: the ODE's lower limit (default 1e-5).
    sde: override the run's SDE (name or `sde.SDE`).
    step: checkpoint step (default: the newest).
    data_dir: TFDS data directory.
    ema: score the EMA parameters (default) or the raw ones.
    mesh: devices (default: all).
    out: JSON path (default WORKDIR/eval/bpd_<step>_<split>.json).
    progress: show a progress bar.

  Returns:
    {'bpd', 'bpd_stderr', 'bpd_std', 'num_examples', 'repeats', 'mean_solver_steps', 'step',
     'split', 'sde', settings…, 'seconds', 'json'}.
  """
  from diffjax import data  # Lazy: tensorflow_datasets loads only when data is read.

  start = time.time()
  if repeats < 1:
    raise ValueError(f'--repeats must be at least 1, got {repeats}.')
  run = runs.load(workdir, step)
  the_sde = _resolve_sde(sde, run.denoiser.precond, workdir)
  images, labels = data.load_split_as_array(run.config.data.name, split, data_dir, num_examples)
  n = len(images)
  if n == 0:
    raise ValueError(f'The {split} split of {run.config.data.name} is empty.')
  mesh = mesh or parallel.make_mesh()
  n_dev = mesh.devices.size
  batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
  shard, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  num_classes = run.num_classes
  kwargs = dict(divergence=divergence, probe=probe, rtol=rtol, atol=atol, solver=solver)
  if epsilon is not None:
    kwargs['epsilon'] = float(epsilon)

  def score(params, x, label, keys):
    one_hot = jax.nn.one_hot(label, num_classes, dtype=jnp.float32) if num_classes else None
    denoise_fn = run.denoiser.bind(params, one_hot)
    bpd, info = likelihood.bpd(denoise_fn, x, keys, sde=the_sde, **kwargs)
    return bpd, info['num_steps']

  fn = jax.jit(score, in_shardings=(rep, shard, shard, shard), out_shardings=(shard, rep))
  params = jax.device_put(run.ema_params if ema else run.params, rep)
  scores, steps = [], []
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=n * repeats, desc='bits/dim', unit='img')
  for r in range(repeats):
    for lo in range(0, n, batch_size):
      idx = np.arange(lo, min(lo + batch_size, n))
      pad = (-len(idx)) % n_dev
      idx_padded = np.concatenate([idx, np.repeat(idx[-1:], pad)])
      keys = noise.seed_keys(r * n + idx_padded)
      out_bpd, out_steps = fn(params, jax.device_put(images[idx_padded], shard),
                              jax.device_put(labels[idx_padded].astype(np.int32), shard),
                              jax.device_put(keys, shard))
      scores.append(np.asarray(out_bpd)[:len(idx)])
      steps.append(int(out_steps))
      if bar is not None:
        bar.update(len(idx))
  if bar is not None:
    bar.close()
  scores = np.concatenate(scores).astype(np.float64)
  if not np.all(np.isfinite(scores)):
    raise FloatingPointError(f'{np.sum(~np.isfinite(scores))} bits/dim scores are not finite; '
                             'check the checkpoint (a diverged run?) or loosen --rtol/--atol.')
  result = {
      'bpd': float(scores.mean()),
      'bpd_stderr': float(scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else 0.0,
      'bpd_std': float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
      'num_examples': n, 'repeats': repeats, 'mean_solver_steps': float(np.mean(steps)),
      'step': run.step, 'split': split, 'dataset': run.config.data.name,
      'sde': repr(the_sde), 'conditional': bool(num_classes), 'divergence': divergence,
      'probe': probe, 'rtol': rtol, 'atol': atol, 'solver': solver,
      'epsilon': kwargs.get('epsilon', sde_lib.TRAIN_EPSILON), 'ema': ema,
      'seconds': round(time.time() - start, 1),
  }
  out = out or os.fspath(files.path(workdir) / 'eval' / f'bpd_{run.step:08d}_{split}.json')
  result['json'] = out
  if jax.process_index() == 0:
    files.write_json(out, result)
  return result


def _resolve_sde(sde: Any, precond, workdir: str):
  """The run's SDE, or one sentence naming the flag that picks one when it carries none."""
  try:
    return precond_sde.resolve_sde(sde, precond)
  except ValueError as e:
    if sde is not None:
      raise
    raise ValueError(
        f'{workdir} uses the {precond.name!r} preconditioning, which carries no SDE; name the one '
        f'whose probability-flow ODE scores it: `evaluate.py bpd --workdir={workdir} --sde=ve` '
        "(or vp, subvp; sde='ve' from Python).") from e


def _bpd_command(precond, workdir: str) -> str:
  """The `evaluate.py bpd` command that scores this run (with --sde when it needs one)."""
  try:
    precond_sde.resolve_sde(None, precond)
    return f'`evaluate.py bpd --workdir={workdir}`'
  except ValueError:
    return f'`evaluate.py bpd --workdir={workdir} --sde=ve`'


def model_variance(config) -> str:
  """The reverse variance a run's model was trained with (its config.loss.kwargs.variance)."""
  kwargs = config.loss.get('kwargs', None) or {}
  variance = kwargs.get('variance', None)
  if variance is None:
    variance = 'learned' if int(config.model.get('out_channel_mult', 1)) == 2 else 'fixed_large'
  return str(variance)


def evaluate_bpd_vlb(workdir: str, *, split: str = 'test', num_images: Optional[int] = None,
                 batch_size: int = 256, clip_denoised: bool = True, step: Optional[int] = None,
                 progress: bool = False, out: Optional[str] = None, seed: int = 0) -> dict:
  """bits/dim of a discrete run on a dataset split (`evaluate.py bpd_vlb`).

  Writes WORKDIR/eval/bpd_vlb_<step>.json (the summary) and .npz (per-t terms, per-image bpd).

  Args:
    workdir: a train.py run with a discrete ('ddpm' or 'iddpm') preconditioning.
    split: the dataset split ('test' by default).
    num_images: evaluate the first N images of the split (all by default).
    batch_size: global batch size, rounded to a multiple of the device count.
    clip_denoised: clip x̂_0 to [−1, 1].
    step: checkpoint step (newest by default).
    progress: show a progress bar.
    out: the JSON path (default WORKDIR/eval/bpd_vlb_<step>.json).
    seed: noise seed.

  Returns:
    The summary dict (bpd, prior_bpd, vb_bpd, num_images, num_timesteps, step, split, …).
  """
  from diffjax import data  # Lazy: tensorflow_datasets loads only when data is read.

  run = runs.load(workdir, step)
  try:
    schedule = precond_discrete.schedule_of(run.denoiser.precond)
  except ValueError as e:  # its advice is for samplers; here the likelihood of the ODE is the way
    raise ValueError(
        f'The VLB needs a discrete model (precond ddpm or iddpm), and {workdir} uses '
        f'{run.denoiser.precond.name!r}; score it by the probability-flow ODE instead: '
        f'{_bpd_command(run.denoiser.precond, workdir)}.') from e
  variance = model_variance(run.config)
  mesh = parallel.make_mesh()
  n_dev = mesh.devices.size
  batch_size = max(n_dev, (int(batch_size) // n_dev) * n_dev)
  iterator = data.make_iterator(run.config.data.name, split=split, global_batch_size=batch_size,
                                seed=0, data_dir=run.config.data.data_dir or None, shuffle=False,
                                repeat=False, prefetch=0)
  try:
    result = bits_per_dim(run.denoiser, run.ema_params, iterator, variance=variance,
                          schedule=schedule, clip_denoised=clip_denoised,
                          num_classes=run.num_classes, batch_size=batch_size,
                          num_images=num_images, mesh=mesh, progress=progress, seed=seed)
  finally:
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()
  summary: dict[str, Any] = {k: v for k, v in result.items() if not isinstance(v, np.ndarray)}
  summary.update(step=run.step, split=split, variance=variance, clip_denoised=clip_denoised,
                 dataset=run.config.data.name)
  if jax.process_index() == 0:
    path = out or os.fspath(files.path(workdir) / 'eval' / f'bpd_vlb_{run.step:08d}.json')
    files.write_json(path, summary)
    files.write_npz(os.path.splitext(path)[0] + '.npz',
                    **{k: v for k, v in result.items() if isinstance(v, np.ndarray)})
    summary['out'] = path
  return summary
