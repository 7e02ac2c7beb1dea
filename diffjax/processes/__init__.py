"""Noise processes and their grids, as pure functions of arrays; nothing here knows of networks.

`schedules` (σ(t), s(t) and the σ-grids of EDM Table 1), `discrete` (β tables, posteriors,
respacing), `alpha_sigma` (the log-SNR form of the cosine process), `sde` (VP, sub-VP and VE SDEs),
`corruptions` (Soft Diffusion's linear operators and schedules) and `soft_levels` (choosing them).
"""

from diffjax.processes import alpha_sigma, corruptions, discrete, schedules, sde, soft_levels  # noqa: F401
