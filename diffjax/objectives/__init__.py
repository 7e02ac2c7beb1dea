"""Training objectives: each paper's loss as an `Objective` of the one train step.

`base` (the protocol), `edm` (the EDM family: p(σ), λ(σ)), `edm2` (EDM2's learned uncertainty),
`sde` (score_sde's), `alpha_sigma`
(Salimans & Ho's), `ddpm` (L_simple, L_hybrid, L_vlb with importance sampling), `soft` (Soft Score
Matching) and `distill` (progressive and guided distillation targets).
"""

from diffjax.objectives import alpha_sigma, base, ddpm, distill, edm, edm2, sde, soft  # noqa: F401
from diffjax.objectives.base import Objective, as_objective  # noqa: F401
