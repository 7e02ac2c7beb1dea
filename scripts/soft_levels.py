"""Selects Soft Diffusion corruption levels for a config and writes the file that config reads.

  python scripts/soft_levels.py --config=configs/soft.py:digits        # ~10 s on 2 CPU cores
  python scripts/soft_levels.py --config=configs/soft.py:celeba64 --config.soft.num_levels=64

Reads config.data (the dataset) and config.soft (corruption, number of levels and candidates, level
and noise ranges, p_1 truncation, sample size), fits a diagonal Gaussian to the data in the
corruption's basis, picks the levels whose consecutive corrupted fits are at most ε apart in W2 with ε
tuned to give config.soft.num_levels levels (`diffjax.processes.soft_levels.wasserstein_schedule`), and writes
config.soft.levels_file (or --out). `configs/soft.py` inlines that file into the run's config.
It also prints (and stores under info) an audit of the levels: the output variance per coefficient of
the Momentum and naive samplers, one step per level, driven by the exact model of the data's Gaussian
fit (1 = the data's variance); a value far below 1 means some step is too coarse (raise sigma_max or
num_levels).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffjax import cli  # noqa: E402
from diffjax.processes import soft_levels

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Soft Diffusion config: FILE.py:PRESET.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the levels (default config.soft.levels_file).')
_DEBUG = flags.DEFINE_bool('debug', False, 'Show full tracebacks.')


def main(argv):
  del argv
  cli.quiet_logs()

  def run():
    import numpy as np

    from diffjax import data
    from diffjax.samplers import momentum
    config = _CONFIG.value
    if config is None or 'soft' not in config:
      raise ValueError('Pass a Soft Diffusion config: --config=configs/soft.py:PRESET.')
    s = config.soft
    images, _ = data.load_split_as_array(config.data.name, 'train',
                                         config.data.data_dir or None, int(s.max_images))
    images = np.asarray(images, np.float32) / 127.5 - 1.0  # uint8 → [-1, 1], as training sees it
    schedule, info = soft_levels.wasserstein_schedule(
        images, s.corruption, num_levels=int(s.num_levels), num_candidates=int(s.num_candidates),
        level_min=float(s.level_min), level_max=float(s.level_max),
        sigma_min=float(s.sigma_min), sigma_max=float(s.sigma_max), p1_tol=float(s.p1_tol))
    # The audit: what the samplers would return, per coefficient, on the data's Gaussian fit with
    # its exact model, in one step per level (see samplers.momentum.gaussian_variance_ratio).
    fit = soft_levels.fit_gaussian(images, s.corruption)
    audit = {method: momentum.gaussian_variance_ratio(fit, schedule, schedule.num_levels - 1, method)
             for method in momentum.METHODS}
    info.update(dataset=config.data.name, corruption=s.corruption, gaussian_variance_ratio={
        method: [float(r.min()), float(r.max())] for method, r in audit.items()})
    path = soft_levels.save_schedule(_OUT.value or s.levels_file, schedule, info)
    steps = np.asarray(info['w2_steps'])
    print(f'{config.data.name}: {schedule.num_levels} {s.corruption} levels from '
          f'{info["num_images"]} images, ε = {info["eps"]:.4g} (W2 steps {steps.min():.3g}…'
          f'{steps.max():.3g}), p_1 fit block {list(np.shape(schedule.p1_mean))} → {path}')
    print('levels:', ' '.join(f'{v:.3g}' for v in schedule.level))
    print('sigmas:', ' '.join(f'{v:.3g}' for v in schedule.sigma))
    for method, r in audit.items():
      print(f'{method} sampler on the Gaussian fit, {schedule.num_levels - 1} steps: output/data '
            f'variance per coefficient {r.min():.2f}…{r.max():.2f} (1 = exact)')

  raise SystemExit(cli.run(run, _DEBUG.value))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
