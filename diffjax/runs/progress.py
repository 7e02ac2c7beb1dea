"""A run's position in images seen, across resumes with other batch sizes (WORKDIR/progress.json).

EDM counts training in images (App. F.1): the lr ramp and decay, the EMA half-life ramp, the
post-hoc EMA's power-function profiles and kimg are functions of n_img, the number of images seen,
not of the step. While a run keeps one batch size B, n_img = step·B; a resume with another batch
size starts a new *segment*. progress.json lists the segments, `[(from_step, batch_size), ...]`
with strictly increasing from_step, the first at step 0:

  n_img(s) = Σ_i batch_i · (min(s, from_{i+1}) − from_i)   over the segments with from_i < s.

Segments that begin at or after a step do not count towards it, so a restored checkpoint older
than the record's last segment (newer ones moved aside) gets the right n_img, and the resumed run
drops those segments (`continue_from`). The training loop writes the record whole
(`files.write_atomic`: local or gs://) at the first checkpoint of every run and resume, before
config.json and the checkpoint, so every checkpoint on disk is described by it. A run without the
record (trained before it existed, or converted) used one batch size: config.json's.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from diffjax.runs import files
from diffjax.runs import run as run_lib

PROGRESS_FILE = 'progress.json'

Segment = tuple  # (from_step: int, batch_size: int)


def _check(segments: Sequence[Segment], where: str) -> list:
  out = [(int(a), int(b)) for a, b in segments]
  if (not out or out[0][0] != 0 or any(b <= 0 for _, b in out)
      or any(x[0] >= y[0] for x, y in zip(out, out[1:]))):
    raise ValueError(f'{where} must list segments (from_step, batch_size) starting at step 0 with '
                     f'increasing steps and positive batch sizes, got {out}; restore it from a '
                     'backup or delete it (the batch size of config.json then counts for all '
                     'steps).')
  return out


def read_segments(workdir: files.PathLike, default_batch_size: Optional[int] = None) -> list:
  """The run's segments [(from_step, batch_size), ...] (see the module docstring).

  Args:
    workdir: the run's directory (local path or URL).
    default_batch_size: the batch size of a run with neither progress.json nor config.json.

  Returns:
    The record's segments; without it, [(0, config.json's train.batch_size)]; without either,
    [(0, default_batch_size)], or [] when that is None too.

  Raises:
    ValueError: progress.json is not a valid record (one sentence saying what to do).
  """
  path = files.path(workdir) / PROGRESS_FILE
  if path.exists():
    try:
      record = json.loads(path.read_text())
      segments = [(s['from_step'], s['batch_size']) for s in record['segments']]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f'{path} is not a progress record ({e}); restore it from a backup or '
                       'delete it (the batch size of config.json then counts for all steps).'
                       ) from e
    return _check(segments, str(path))
  try:
    return [(0, int(run_lib.read_config(workdir).train.batch_size))]
  except (FileNotFoundError, ValueError, AttributeError, KeyError):
    return [] if default_batch_size is None else [(0, int(default_batch_size))]


def images_at(segments: Sequence[Segment], step: int) -> int:
  """n_img(step): images seen in the first `step` steps (exact integer arithmetic)."""
  total = 0
  for i, (start, batch) in enumerate(segments):
    if start >= step:
      break
    end = segments[i + 1][0] if i + 1 < len(segments) else step
    total += batch * (min(step, end) - start)
  return total


def continue_from(segments: Sequence[Segment], step: int, batch_size: int) -> list:
  """The segments of a run resumed at `step` with `batch_size`: those before it, then its own.

  The last segment is the one the resumed run is in; it is new (from_step = step) only when the
  batch size changes, so a run that keeps its batch size keeps a single segment.
  """
  kept = [(int(a), int(b)) for a, b in segments if a < step]
  if not kept:  # A fresh run, or one with no record of its batch size: this one counts.
    return [(0, int(batch_size))]
  if kept[-1][1] != int(batch_size):
    kept.append((int(step), int(batch_size)))
  return kept


def write_segments(workdir: files.PathLike, segments: Sequence[Segment]) -> None:
  """Writes WORKDIR/progress.json whole (a reader sees the old record or the new one)."""
  segments = _check(segments, 'The progress record')
  record = {'segments': [{'from_step': a, 'batch_size': b} for a, b in segments]}
  root = files.path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  files.write_atomic(root / PROGRESS_FILE, json.dumps(record, indent=1) + '\n')


def images_seen(workdir: files.PathLike, step: int) -> int:
  """n_img at checkpoint `step` of the run in `workdir` (e.g. the post-hoc EMA snapshot times)."""
  return images_at(read_segments(workdir), step)
