"""Preconditionings: a network F becomes a denoiser D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise).

`core` holds the contract (`Coefficients`, `Preconditioning`, `Denoiser`) and EDM Table 1's VP, VE,
iDDPM and EDM wrappers; the other modules wrap each process's networks: `discrete` (DDPM/iDDPM ε
models), `sde` (score_sde), `alpha_sigma` (x/ε/v parameterizations), `soft` (Soft Diffusion).
"""

from diffjax.precond import alpha_sigma, discrete, sde, soft  # noqa: F401  (register their names)
from diffjax.precond.core import (  # noqa: F401
                                  Coefficients,
                                  Denoiser,
                                  Preconditioning,
                                  edm,
                                  get_preconditioning,
                                  iddpm,
                                  make_edm,
                                  make_iddpm,
                                  make_ve,
                                  make_vp,
                                  ve,
                                  vp,
)
