"""Likelihoods: `ode` (the probability-flow ODE's exact log-likelihood) and `vlb` (the discrete
variational bound, term by term)."""

from diffjax.likelihood import ode, vlb  # noqa: F401
