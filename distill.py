"""Distills a diffusion model: `python distill.py --config=configs/distill.py:digits --workdir=runs/d`.

Progressive distillation (Salimans & Ho 2022) or guided distillation (Meng et al. 2022): each stage
(teacher, stage1, round_<k>_<N>steps, encoder_round_<k>_<N>steps) is a run in its own subdirectory
that sample.py can use. Rerunning the same command skips finished stages and resumes the current one
at its saved step. --evaluate scores the finished stages of a digits run with the digits evaluator.
"""

from absl import app, flags
from ml_collections import config_flags

from diffjax import cli
from diffjax.evaluation import distill as distill_eval
from diffjax.training import distill

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Distillation config: FILE.py:PRESET.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the distillation run.')
_TEACHER = flags.DEFINE_string('teacher', None, 'Workdir of the trained teacher (overrides '
                               'config.distill.teacher_workdir).')
_MAX_STEPS = flags.DEFINE_integer('max_steps', None, 'Stop after this many training steps, counted '
                                  'over all stages (the run can go on).')
_EVALUATE = flags.DEFINE_bool('evaluate', False, 'Score the finished stages (digits runs) instead '
                              'of training.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 1000, 'Images per evaluation.')
_GUIDANCE = flags.DEFINE_float('guidance', None, 'Guidance weight w for --evaluate (default: '
                               'config.distill.sample_guidance).')
_ALLOW_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False, 'Resume stages even if their config differs in what their '
    'checkpoints depend on (network, preconditioning, loss, data, batch size).')
_DEBUG = cli.define_debug()
_NO_PROGRESS = cli.define_no_progress()


def main(argv):
  del argv

  def run():
    if _CONFIG.value is None or not _WORKDIR.value:
      raise ValueError('Pass --config=configs/distill.py:PRESET and --workdir=DIR.')
    config = _CONFIG.value
    if 'distill' not in config:
      raise ValueError('This is not a distillation config; use configs/distill.py:PRESET (teacher '
                       'presets ending in _teacher are for train.py).')
    if _TEACHER.value:
      config.distill.teacher_workdir = _TEACHER.value
    if _EVALUATE.value:
      distill_eval.evaluate_digits(_WORKDIR.value, num_images=_NUM_IMAGES.value,
                              guidance=_GUIDANCE.value)
      return
    report = distill.run(config, _WORKDIR.value, max_steps=_MAX_STEPS.value,
                         progress=not _NO_PROGRESS.value,
                         allow_config_change=_ALLOW_CHANGE.value)
    done = all(stage['done'] for stage in report) and len(report) == len(
        distill.plan(config, _WORKDIR.value))
    print(('Done: ' if done else 'Stopped (rerun to resume): ') + _WORKDIR.value, flush=True)

  cli.main(run, _DEBUG, multihost=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
