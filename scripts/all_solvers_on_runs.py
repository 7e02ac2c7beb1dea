"""Every registered sampler, compiled and run through sampling.sample_run on three kinds of run.

Issue 18: "every sampler runs from sample.py on an EDM, a DDPM/iDDPM and a distilled run". This
builds three tiny runs at their initialization (tests/saved_runs.py: any weights do; no train step
is compiled) — EDM (configs/edm.py 'tiny'), iDDPM (configs/iddpm.py 'tiny': discrete σ table,
learned variance) and a w-conditioned distilled student (the first stage of configs/distill.py
'tiny', as training/distill.py makes it) — and for every name in the sampler registry:

  * asks `build.sampler_fn`, which runs `samplers.fit.check`, whether it fits the run: if not, the
    row says 'refused' and the one sentence it gave;
  * else calls `sampling.sample_run` for real (what sample.py calls: checks, shards, samples.npz,
    grid.png), two seeds in one batch, few steps, and checks the float samples it generated
    (before the uint8 conversion) for shape and finiteness: 'ok', else 'FAILED' and why.

    python scripts/all_solvers_on_runs.py [--steps=3] [--kinds=edm,iddpm,distilled]
        [--samplers=a,b] [--markdown]

Prints the table sampler × run kind, with each cell's wall time (compile included), then the
refusal sentences. Exit status 1 if any cell failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
import types

# As the tests do: the tiny programs cost more to compile than to run (LLVM -O0).
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]

import numpy as np  # noqa: E402
import saved_runs  # noqa: E402  (tests/saved_runs.py)

from configs import distill as distill_configs  # noqa: E402
from configs import edm as edm_configs  # noqa: E402
from configs import iddpm as iddpm_configs  # noqa: E402
from diffjax import build, runs, samplers, sampling  # noqa: E402
from diffjax.training import distill as distill_lib  # noqa: E402


def _student_config():
  """The first stage of the tiny progressive distillation: a student of the tiny teacher."""
  c = distill_configs.get_config('tiny')
  stage = types.SimpleNamespace(kind='round', name='round_1', num_steps=2, teacher_workdir='')
  return distill_lib.stage_config(c, stage, c.teacher)


KINDS = {'edm': lambda: edm_configs.get_config('tiny'),
         'iddpm': lambda: iddpm_configs.get_config('tiny'),
         'distilled': _student_config}


class _Recorder:
  """Wraps sampling.generate_batches to keep the float samples sample_run writes as uint8."""

  def __init__(self):
    self.batches = []
    self._inner = sampling.generate_batches

  def __call__(self, *args, **kwargs):
    for positions, x in self._inner(*args, **kwargs):
      self.batches.append(np.asarray(x))
      yield positions, x


def _first_sentence(e: BaseException) -> str:
  """The error's first line, without fit.check's list of the samplers that do fit."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  cause, cut, _ = text.partition('; pick one that fits')
  return cause + ('; pick one that fits (…)' if cut else '')


def run_cell(workdir: str, config, name: str, steps: int, out: str) -> tuple[str, str, float]:
  """('ok' | 'refused' | 'FAILED', detail, seconds) for sampler `name` on the run."""
  start = time.perf_counter()
  try:
    build.sampler_fn(config, build.build_precond(config), name, steps)
  except ValueError as e:
    return 'refused', _first_sentence(e), time.perf_counter() - start
  recorder = _Recorder()
  sampling.generate_batches = recorder
  try:
    sampling.sample_run(workdir, '0-1', out=out, sampler=name, num_steps=steps, batch_size=2)
  except Exception as e:  # noqa: BLE001 - every failure is a row of the table.
    traceback.print_exc(limit=3)
    return 'FAILED', f'{type(e).__name__}: {_first_sentence(e)}', time.perf_counter() - start
  finally:
    sampling.generate_batches = recorder._inner
  seconds = time.perf_counter() - start
  spec = build.dataset_spec(config)
  want = (2, spec.resolution, spec.resolution, spec.channels)
  x = np.concatenate(recorder.batches) if recorder.batches else np.zeros((0,))
  if x.shape != want:
    return 'FAILED', f'samples of shape {x.shape}, expected {want}', seconds
  if not np.all(np.isfinite(x)):
    return 'FAILED', f'{np.sum(~np.isfinite(x))} non-finite values', seconds
  return 'ok', '', seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--kinds', default=','.join(KINDS))
  parser.add_argument('--samplers', default='')
  parser.add_argument('--markdown', action='store_true', help='print the table as Markdown')
  args = parser.parse_args()
  names = args.samplers.split(',') if args.samplers else samplers.names()
  kinds = args.kinds.split(',')
  root = tempfile.mkdtemp(prefix='all_solvers_')
  from diffjax.data import digits
  os.environ.setdefault('TFDS_DATA_DIR', os.path.join(root, 'tfds'))
  digits.prepare_digits(os.environ['TFDS_DATA_DIR'])
  table, sentences = {}, {}
  t0 = time.perf_counter()
  for kind in kinds:
    config = KINDS[kind]()
    workdir = saved_runs.save_initialized_run(config, os.path.join(root, kind))
    config = runs.read_config(workdir)
    for name in names:
      status, detail, seconds = run_cell(workdir, config, name, args.steps,
                                         os.path.join(root, 'out', kind, name))
      table[name, kind] = (status, detail, seconds)
      print(f'{kind:10s} {name:20s} {status:8s} {seconds:6.1f} s  {detail}', flush=True)
  total = time.perf_counter() - t0

  def cell(name, kind):
    status, detail, seconds = table[name, kind]
    if status == 'refused':
      mark = sentences.setdefault(detail, len(sentences) + 1)
      return f'refused [{mark}]'
    return f'{status} ({seconds:.0f} s)' if status == 'ok' else f'**{status}**: {detail}'

  cells = {(n, k): cell(n, k) for n in names for k in kinds}
  sep = ' | ' if args.markdown else '  '
  print()
  print(('| ' if args.markdown else '') + sep.join(['sampler'] + kinds)
        + (' |' if args.markdown else ''))
  if args.markdown:
    print('|' + '---|' * (len(kinds) + 1))
  for n in names:
    row = [f'`{n}`' if args.markdown else f'{n:20s}'] + [
        cells[n, k] if args.markdown else f'{cells[n, k]:28s}' for k in kinds]
    print(('| ' if args.markdown else '') + sep.join(row) + (' |' if args.markdown else ''))
  print()
  for sentence, mark in sentences.items():
    print(f'[{mark}] {sentence}')
  failed = [key for key, (status, _, _) in table.items() if status == 'FAILED']
  print(f'\n{len(table)} cells in {total:.0f} s ({args.steps} steps, 2 images per cell); '
        f'{len(failed)} failed.')
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  main()
