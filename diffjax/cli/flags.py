"""The flags the entry points share, defined once: sampler options, workdir, progress, debug.

Each entry point calls the `define_*` functions it needs at import time (absl flags are global),
then `main(body, debug)` runs its body with the process set-up and one-sentence errors.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from absl import flags

from diffjax import parallel
from diffjax.cli import errors, xla


@dataclasses.dataclass(frozen=True)
class SamplerFlags:
  """The sampling flags shared by sample.py and evaluate.py (fid, digits)."""
  sampler: flags.FlagHolder
  steps: flags.FlagHolder
  churn: flags.FlagHolder
  s_tmin: flags.FlagHolder
  s_tmax: flags.FlagHolder
  s_noise: flags.FlagHolder
  guidance: flags.FlagHolder
  grid: flags.FlagHolder | None = None

  def options(self) -> dict:
    """The sampler options that were given (stochasticity, σ-grid), as keyword arguments."""
    given = {'s_churn': self.churn.value, 's_tmin': self.s_tmin.value,
             's_tmax': self.s_tmax.value, 's_noise': self.s_noise.value,
             'grid': self.grid.value if self.grid is not None else None}
    return {k: v for k, v in given.items() if v is not None}


def define_sampler_flags() -> SamplerFlags:
  """--sampler --steps --churn --s_tmin --s_tmax --s_noise --guidance --grid."""
  return SamplerFlags(
      sampler=flags.DEFINE_string('sampler', None, 'Sampler name (default: the config\'s).'),
      steps=flags.DEFINE_integer('steps', None, 'Sampling steps (default: the config\'s).'),
      churn=flags.DEFINE_float('churn', None, 'S_churn of the stochastic EDM sampler.'),
      s_tmin=flags.DEFINE_float('s_tmin', None, 'S_tmin.'),
      s_tmax=flags.DEFINE_float('s_tmax', None, 'S_tmax.'),
      s_noise=flags.DEFINE_float('s_noise', None, 'S_noise.'),
      guidance=flags.DEFINE_float('guidance', 0.0, 'Classifier-free guidance weight w.'),
      grid=flags.DEFINE_string(
          'grid', None, 'σ-grid of a σ-grid sampler (heun, euler, dpmpp_2m, unipc, …): karras '
          '(the default, clamped to the network), exponential, polyexponential, vp, '
          'linear_logsnr, ve, iddpm.'))


@dataclasses.dataclass(frozen=True)
class GuidanceFlags:
  """sample.py's guidance flags beyond --guidance: the guidance interval and autoguidance."""
  interval: flags.FlagHolder
  guide_workdir: flags.FlagHolder
  guide_step: flags.FlagHolder

  def options(self) -> dict:
    """guidance_interval, guide_workdir, guide_step as `sampling.sample_run` keyword arguments.

    Raises:
      ValueError: when --guidance_interval is not two numbers lo,hi.
    """
    interval = None
    if self.interval.value:
      parts = str(self.interval.value).split(',')
      try:
        interval = tuple(float(p) for p in parts)
      except ValueError:
        interval = ()
      if len(interval) != 2:
        raise ValueError(f'Cannot read --guidance_interval={self.interval.value}; write two noise '
                         'levels lo,hi, e.g. --guidance_interval=0.28,5.42.')
    return {'guidance_interval': interval, 'guide_workdir': self.guide_workdir.value,
            'guide_step': self.guide_step.value}


def define_guidance_flags() -> GuidanceFlags:
  """--guidance_interval --guide_workdir --guide_step."""
  return GuidanceFlags(
      interval=flags.DEFINE_string(
          'guidance_interval', None, 'Guide only for noise levels lo < σ <= hi, e.g. 0.28,5.42 '
          '(Kynkäänniemi et al. 2024); the conditional model elsewhere.'),
      guide_workdir=flags.DEFINE_string(
          'guide_workdir', None, 'Autoguidance (Karras et al. 2024): a weaker run of the same task '
          'guides this one, (1 + w)·D_main − w·D_guide with w = --guidance (their g = 1 + w).'),
      guide_step=flags.DEFINE_integer(
          'guide_step', None, 'Checkpoint step of --guide_workdir (default: newest).'))


def define_debug() -> flags.FlagHolder:
  return flags.DEFINE_bool('debug', False, 'Show full tracebacks.')


def define_no_progress() -> flags.FlagHolder:
  return flags.DEFINE_bool('no_progress', False, 'Hide progress bars (logs, CI).')


def main(body: Callable[[], int | None], debug: flags.FlagHolder, *,
         multihost: bool = False) -> None:
  """Runs an entry point's body: quiet logs and XLA:CPU flags first, then (optionally) joining a
  multi-host run, the compilation cache, and `errors.run`'s one-sentence errors; exits with its code.

  Args:
    body: the entry point's work; it raises ValueError & co. with a sentence for the user.
    debug: the --debug flag (full tracebacks).
    multihost: join a multi-host run (`parallel.initialize_distributed`) before the body.
  """
  xla.quiet_logs()
  xla.tune_xla_cpu()

  def run():
    if multihost:
      parallel.initialize_distributed()
    xla.enable_compilation_cache()
    return body()

  raise SystemExit(errors.run(run, debug.value))
