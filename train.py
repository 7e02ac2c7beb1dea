"""Trains a diffusion model: `python train.py --config=configs/edm.py:digits --workdir=runs/digits`.

Rerunning the same command resumes from the newest checkpoint in --workdir.
"""

from absl import app, flags
from ml_collections import config_flags

from diffjax import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config: FILE.py:PRESET.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the run (checkpoints, logs, samples).')
_MAX_STEPS = flags.DEFINE_integer('max_steps', None, 'Stop after this step (the run can go on).')
_DEBUG = flags.DEFINE_bool('debug', False, 'Show full tracebacks.')
_NO_PROGRESS = flags.DEFINE_bool('no_progress', False, 'Hide the progress bar.')


def main(argv):
  del argv
  cli.quiet_logs()
  cli.tune_xla_cpu()

  def run():
    if _CONFIG.value is None or not _WORKDIR.value:
      raise ValueError('Pass --config=configs/FILE.py:PRESET and --workdir=DIR.')
    from diffjax.training import loop, parallel
    parallel.initialize_distributed()
    cli.enable_compilation_cache()
    loop.train(_CONFIG.value, _WORKDIR.value, max_steps=_MAX_STEPS.value,
               progress=not _NO_PROGRESS.value)
    print(f'Done: {_WORKDIR.value}', flush=True)

  raise SystemExit(cli.run(run, _DEBUG.value))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
