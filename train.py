"""Trains a diffusion model: `python train.py --config=configs/edm.py:digits --workdir=runs/digits`.

Rerunning the same command resumes from the newest checkpoint in --workdir.
"""

from absl import app, flags
from ml_collections import config_flags

from diffjax import cli
from diffjax.training import loop

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config: FILE.py:PRESET.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the run (checkpoints, logs, samples).')
_MAX_STEPS = flags.DEFINE_integer('max_steps', None, 'Stop after this step (the run can go on).')
_ALLOW_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Resume even if the config differs from the run\'s config.json '
    'in what its checkpoints depend on (network, preconditioning, loss, data, batch size).')
_DEBUG = cli.define_debug()
_NO_PROGRESS = cli.define_no_progress()


def main(argv):
  del argv

  def run():
    if _CONFIG.value is None or not _WORKDIR.value:
      raise ValueError('Pass --config=configs/FILE.py:PRESET and --workdir=DIR.')
    loop.train(_CONFIG.value, _WORKDIR.value, max_steps=_MAX_STEPS.value,
               progress=not _NO_PROGRESS.value, allow_config_change=_ALLOW_CHANGE.value)
    print(f'Done: {_WORKDIR.value}', flush=True)

  cli.main(run, _DEBUG, multihost=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
