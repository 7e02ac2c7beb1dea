"""One process of the two-process training run in test_multihost.py (a helper, not a test).

Joins a 2-process JAX cluster over loopback (gloo CPU collectives, 2 fake devices per process) the
way a SLURM task does: `parallel.initialize_distributed()` with no arguments, the cluster found
from the SLURM_* variables the test sets. It trains the `tiny` config for --first_steps steps,
calls the train loop again so that it restores that checkpoint and trains on to --steps, then
samples the run (`sampling.sample_run`, as sample.py does). It records, for the test to check:

* the batches its input pipeline gave it (labels and pixel sums, with start step and process
  index), to compare with the single-process global batches;
* every file-system write it made under the workdir (Python-level opens for writing, renames,
  deletions), to check that only process 0 writes the run's files;
* its final parameters (and process 0 its samples, which sample_run returns there);
* the refusal of a last `loop.train` call while process 0 holds the lock as a live run would.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cache_on_every_process() -> None:
  """The persistent compilation cache ($DIFFJAX_CACHE), written by every process.

  Both processes must reach each collective within 30 s of each other (gloo's limit), so both
  must compile, or both load, each executable. JAX writes cache entries only from process 0, but
  their keys differ per process: process 0 would load what process 1 compiles again (for minutes,
  here) — also within one run, whose second `loop.train` call traces new functions. So process 1
  writes its own entries too (its keys are its own; nothing is shared).
  """
  import jax
  from jax._src import compilation_cache, compiler, distributed

  from diffjax import cli
  cli.enable_compilation_cache()
  real_write = getattr(compiler, '_cache_write', None)
  if real_write is None or not hasattr(compilation_cache, 'put_executable_and_time'):
    # These are JAX internals (0.10); without them, fall back to process 0 compiling each
    # executable and sending it to process 1 (correct, only slower to start).
    jax.config.update('jax_enable_compilation_cache', False)
    jax.config.update('jax_share_binary_between_hosts', True)
    return

  def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
    if distributed.global_state.process_id == 0:
      return real_write(cache_key, compile_time_secs, module_name, backend, executable,
                        host_callbacks)
    if (not host_callbacks and
        compile_time_secs >= jax.config.jax_persistent_cache_min_compile_time_secs):
      compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                int(compile_time_secs))

  compiler._cache_write = cache_write


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--process_id', type=int, required=True, help='names the output files only')
  p.add_argument('--workdir', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--steps', type=int, default=4)
  p.add_argument('--first_steps', type=int, default=2)
  p.add_argument('--dump_after', type=float, default=0, help='dump all stacks after N s (hangs)')
  args = p.parse_args()
  if os.environ.get('DIFFJAX_WORKER_DEBUG'):
    import logging
    logging.basicConfig(level=logging.WARNING)
    for name in ('jax._src.compiler', 'jax._src.compilation_cache'):
      logging.getLogger(name).setLevel(logging.DEBUG)
  if args.dump_after:
    import faulthandler
    faulthandler.dump_traceback_later(args.dump_after, exit=False)
  sys.path.insert(0, ROOT)

  import jax
  jax.config.update('jax_num_cpu_devices', 2)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  _cache_on_every_process()
  from diffjax import parallel
  parallel.initialize_distributed()  # the SLURM_* variables: jax.distributed's own detection

  import numpy as np

  from diffjax import data
  real_make_iterator = data.make_iterator
  batches = []

  class Recording:
    def __init__(self, iterator, start_step):
      self._it, self._step = iterator, start_step

    def __next__(self):
      batch = next(self._it)
      batches.append({'step': self._step, 'process_index': jax.process_index(),
                      'labels': np.asarray(batch['label']).tolist(),
                      'pixel_sum': float(np.asarray(batch['image'], np.float64).sum())})
      self._step += 1
      return batch

    def close(self):
      self._it.close()

  def make_iterator(*a, **k):
    return Recording(real_make_iterator(*a, **k), k.get('start_step', 0))

  data.make_iterator = make_iterator

  workdir = os.path.abspath(args.workdir)
  writes = []

  def audit(event, event_args):
    if event == 'open':
      path, mode, flags = event_args
      writing = (isinstance(mode, str) and any(c in mode for c in 'wax+')) or (
          mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
      paths = [path] if writing else []
    elif event in ('os.rename', 'os.replace'):
      paths = list(event_args[:2])
    elif event in ('os.remove', 'os.rmdir', 'os.mkdir', 'shutil.rmtree'):
      paths = [event_args[0]]
    else:
      return
    for path in paths:
      if isinstance(path, (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(workdir + os.sep):
          writes.append(os.path.relpath(path, workdir))

  sys.addaudithook(audit)

  from configs import edm
  from diffjax.training import loop
  c = edm.get_config('tiny')
  c.train.batch_size = 8
  c.train.total_images = 8 * args.steps
  c.train.checkpoint_every = args.first_steps
  c.train.log_every = 1
  c.train.num_preview = 0  # the second call draws one (its program is sample_run's too)
  c.sample.num_steps = 2
  loop.train(c, workdir, max_steps=args.first_steps, progress=False)
  c.train.num_preview = 4
  state = loop.train(c, workdir, progress=False)  # restores the checkpoint, trains on
  # The preview's seeds, batch and sampler: its compiled program is reused.
  from diffjax import sampling
  samples = sampling.sample_run(workdir, '0-3', batch_size=4)['images']
  # A live run holds the workdir (process 0 takes its lock, as another train.py would): a run
  # must be refused on both processes, not only on process 0 that sees the lock.
  from diffjax import runs
  held = runs.WorkdirLock(workdir, 'another run').acquire() if jax.process_index() == 0 else None
  try:
    loop.train(c, workdir, progress=False)
    refused = None
  except runs.WorkdirLocked as e:
    refused = str(e)
  finally:
    if held is not None:
      held.release()
  params = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}
  os.makedirs(args.out, exist_ok=True)
  np.savez(os.path.join(args.out, f'params_{args.process_id}.npz'), **params)
  if samples is not None:
    np.save(os.path.join(args.out, f'samples_{args.process_id}.npy'), samples)
  with open(os.path.join(args.out, f'process_{args.process_id}.json'), 'w') as f:
    json.dump({'process_index': jax.process_index(), 'process_count': jax.process_count(),
               'local_devices': jax.local_device_count(), 'devices': jax.device_count(),
               'step': int(state.step), 'batches': batches, 'writes': writes,
               'refused': refused}, f)


if __name__ == '__main__':
  main()
