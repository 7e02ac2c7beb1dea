"""Samples a trained run: `python sample.py --workdir=runs/digits --seeds=0-99 --out=out/`.

Writes OUT/grid.png and OUT/samples.npz (uint8 images, seeds, class labels). Finished batches are
kept in OUT/shards/, so rerunning the same command after a kill (a preempted machine) samples only
the seeds still missing, and ends with the same samples as an uninterrupted run. On several hosts
(SLURM, Open MPI, Cloud TPU, or DIFFJAX_* variables) every host runs the same command; only
process 0 writes OUT.
"""

from absl import app, flags

from diffjax import cli, parallel, sampling

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of a train.py run.')
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: WORKDIR/samples/cli).')
_SEEDS = flags.DEFINE_string('seeds', '0-63', 'Seeds, e.g. 0-63 or 0,5,10-19.')
_SAMPLING = cli.define_sampler_flags()
_GUIDANCE = cli.define_guidance_flags()
_CLASS = flags.DEFINE_integer('class', None, 'Class label for every image (default: seed mod classes).')
_BATCH = flags.DEFINE_integer('batch', 64, 'Images per batch.')
_DEBUG = cli.define_debug()


def main(argv):
  del argv

  def run():
    if not _WORKDIR.value:
      raise ValueError('Pass --workdir=DIR of a train.py run.')
    out = sampling.sample_run(
        _WORKDIR.value, _SEEDS.value, out=_OUT.value, sampler=_SAMPLING.sampler.value,
        num_steps=_SAMPLING.steps.value, class_label=_CLASS.value,
        guidance=_SAMPLING.guidance.value, batch_size=_BATCH.value, progress=True,
        return_images=False, **_GUIDANCE.options(), **_SAMPLING.options())
    if parallel.is_main_process():
      print(f'Wrote {out["grid"]} and {out["npz"]}', flush=True)

  cli.main(run, _DEBUG, multihost=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
