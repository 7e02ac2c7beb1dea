"""diffjax: diffusion models in JAX/Flax, one denoiser view of EDM, DDPM, Score SDE and their kin.

    import diffjax as dj
    sigmas = dj.schedules.karras(n=18)
    run = dj.load('runs/digits')                 # config, EMA params, denoiser
    x0 = dj.samplers.heun(run.denoise_fn(labels), latents * sigmas[0], sigmas)
"""

__version__ = '0.1.0'

from diffjax import losses, precond, registry, samplers, schedules  # noqa: E402,F401
from diffjax import corruptions, losses_soft  # noqa: E402,F401  (Soft Diffusion parts)


def load(workdir, step=None):
  """Loads a trained run (see `diffjax.build.load`)."""
  from diffjax import build
  return build.load(workdir, step)


def sample_run(workdir, seeds, **kwargs):
  """Samples a trained run to a PNG grid and an .npz (see `diffjax.sampling.sample_run`)."""
  from diffjax import sampling
  return sampling.sample_run(workdir, seeds, **kwargs)
