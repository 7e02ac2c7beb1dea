"""Samples a trained run: `python sample.py --workdir=runs/digits --seeds=0-99 --out=out/`.

Writes OUT/grid.png and OUT/samples.npz (uint8 images, seeds, class labels).
"""

from absl import app, flags

from diffjax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of a train.py run.')
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: WORKDIR/samples/cli).')
_SEEDS = flags.DEFINE_string('seeds', '0-63', 'Seeds, e.g. 0-63 or 0,5,10-19.')
_SAMPLER = flags.DEFINE_string('sampler', None, 'Sampler name (default: the config\'s).')
_STEPS = flags.DEFINE_integer('steps', None, 'Number of sampling steps (default: the config\'s).')
_CHURN = flags.DEFINE_float('churn', None, 'S_churn of the stochastic EDM sampler.')
_S_TMIN = flags.DEFINE_float('s_tmin', None, 'S_tmin.')
_S_TMAX = flags.DEFINE_float('s_tmax', None, 'S_tmax.')
_S_NOISE = flags.DEFINE_float('s_noise', None, 'S_noise.')
_CLASS = flags.DEFINE_integer('class', None, 'Class label for every image (default: seed mod classes).')
_GUIDANCE = flags.DEFINE_float('guidance', 0.0, 'Classifier-free guidance weight w.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Images per batch.')
_DEBUG = flags.DEFINE_bool('debug', False, 'Show full tracebacks.')


def main(argv):
  del argv
  cli.quiet_logs()
  cli.tune_xla_cpu()

  def run():
    if not _WORKDIR.value:
      raise ValueError('Pass --workdir=DIR of a train.py run.')
    from diffjax import sample_run
    options = {k: v for k, v in {'s_churn': _CHURN.value, 's_tmin': _S_TMIN.value,
                                 's_tmax': _S_TMAX.value, 's_noise': _S_NOISE.value}.items()
               if v is not None}
    cli.enable_compilation_cache()
    out = sample_run(_WORKDIR.value, _SEEDS.value, out=_OUT.value, sampler=_SAMPLER.value,
                     num_steps=_STEPS.value, class_label=_CLASS.value, guidance=_GUIDANCE.value,
                     batch_size=_BATCH.value, progress=True, **options)
    print(f'Wrote {out["grid"]} and {out["npz"]}', flush=True)

  raise SystemExit(cli.run(run, _DEBUG.value))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
