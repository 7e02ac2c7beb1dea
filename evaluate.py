"""Evaluates a trained run.

  python evaluate.py digits --workdir=runs/digits [--num=1000 --sampler=heun --steps=18]

Results go to WORKDIR/eval/*.json (and a PNG of the first 100 samples).
"""

import json

from absl import app, flags

from diffjax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of a train.py run.')
_NUM = flags.DEFINE_integer('num', 1000, 'Number of images to generate.')
_FIRST_SEED = flags.DEFINE_integer('first_seed', 0, 'Seed of the first image.')
_SAMPLER = flags.DEFINE_string('sampler', None, 'Sampler name (default: the config\'s).')
_STEPS = flags.DEFINE_integer('steps', None, 'Sampling steps (default: the config\'s).')
_CHURN = flags.DEFINE_float('churn', None, 'S_churn of the stochastic EDM sampler.')
_GUIDANCE = flags.DEFINE_float('guidance', 0.0, 'Classifier-free guidance weight w.')
_BATCH = flags.DEFINE_integer('batch', 500, 'Images per batch.')
_DEBUG = flags.DEFINE_bool('debug', False, 'Show full tracebacks.')

MODES = ('digits',)


def main(argv):
  cli.quiet_logs()

  def run():
    mode = argv[1] if len(argv) > 1 else None
    if mode not in MODES:
      raise ValueError(f'Name an evaluation mode first ({", ".join(MODES)}), e.g. '
                       '`evaluate.py digits --workdir=runs/digits`.')
    if not _WORKDIR.value:
      raise ValueError('Pass --workdir=DIR of a train.py run.')
    from diffjax.evaluation import runs
    cli.enable_compilation_cache()
    options = {} if _CHURN.value is None else {'s_churn': _CHURN.value}
    metrics = runs.evaluate_digits(_WORKDIR.value, num_images=_NUM.value,
                                   first_seed=_FIRST_SEED.value, sampler=_SAMPLER.value,
                                   num_steps=_STEPS.value, guidance=_GUIDANCE.value,
                                   batch_size=_BATCH.value, progress=True, **options)
    print(json.dumps(metrics, indent=2), flush=True)

  raise SystemExit(cli.run(run, _DEBUG.value))


if __name__ == '__main__':
  app.run(main)
