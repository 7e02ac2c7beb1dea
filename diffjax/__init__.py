"""diffjax: diffusion models in JAX/Flax, one denoiser view of EDM, DDPM, Score SDE and their kin.

    import diffjax as dj
    sigmas = dj.schedules.karras(n=18)
    run = dj.load('runs/digits')                 # config, EMA params, denoiser
    x0 = dj.samplers.heun(run.denoise_fn(labels), latents * sigmas[0], sigmas)

The package reads bottom-up (docs/architecture.md): `processes` (noise processes and σ-grids),
`models` (networks) and `precond` (network → denoiser), `samplers`, `likelihood`, `objectives`,
`data`, `build` (config → parts), `runs` (the run on disk), `sampling`, `training`, `evaluation`.
"""

__version__ = '0.1.0'

from diffjax import (  # noqa: F401
  ema,
  objectives,
  precond,
  processes,
  registry,
  runs,
  samplers,
  sampling,
)
from diffjax.processes import schedules  # noqa: F401  (dj.schedules)
from diffjax.runs import load  # noqa: F401
from diffjax.sampling import sample_run  # noqa: F401
