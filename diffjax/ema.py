"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, EDM2 §3 and App. C).

A power-function EMA profile averages the training trajectory θ(τ), τ ∈ [0, t], with weights

    p_{t,γ}(τ) = (γ + 1)/t · (τ/t)^γ                                                  (EDM2 Eq. 121)

Its width relative to the training time is the relative standard deviation

    σ_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3)))                                        (EDM2 Eq. 123)

so σ_rel measures the EMA length in units that do not depend on how long the run is. Training
tracks a profile with the per-step decay β(t) = (1 − Δt/t)^{γ+1} (Eq. 127, t = images seen after
the step, Δt = the batch). Snapshots of two tracked profiles (σ_rel 0.05 and 0.10 by default) at
several times are a basis from which any other profile (t_out, σ_rel,out) is reconstructed after
training as a least-squares combination (Algorithm 3): with the inner products of profiles

    ⟨p_a, p_b⟩ = (γ_a+1)(γ_b+1)·(t_a/t_b)^e / ((γ_a+γ_b+1)·max(t_a, t_b)),
    e = γ_b if t_a < t_b else −γ_a,                                                   (EDM2 Eq. 151)

A_ij = ⟨p_i, p_j⟩ over the snapshots, B_ij = ⟨p_i, q_j⟩ against the targets, X = A⁻¹B with each
column normalized to sum 1; the reconstruction of target j is Σ_i X_ij · θ̂_i.

All of this is float64 NumPy (the Gram matrices of many snapshots are badly conditioned), except
`power_function_beta`, which also takes traced JAX times so the train step can call it. The exponent
γ is always computed in NumPy from a concrete σ_rel. This module imports only NumPy: it sits on the
ground floor with `state`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# EDM2 tracks these two profiles during training (train_edm2.py's default).
DEFAULT_STDS = (0.050, 0.100)
# The widest profile EDM2 allows: σ_rel = sqrt(1/12) ≈ 0.2887 is γ = 0, the uniform average of the
# whole run. Below it the largest root of Eq. 126 is positive (weights that grow with τ); above it
# the root would be a γ in (−1, 0), weighting the start of training most, which no one wants.
MAX_STD = float(np.sqrt(1.0 / 12.0))


def profile_key(std: float) -> str:
  """The name of a tracked profile in the train state and snapshots: σ_rel 0.05 → 'std_0.050'."""
  return f'std_{float(std):.3f}'


def key_to_std(key: str) -> float:
  """σ_rel of a `profile_key` name."""
  if not key.startswith('std_'):
    raise ValueError(f'{key!r} is not a post-hoc EMA profile name (std_<σ_rel>).')
  return float(key[len('std_'):])


def exp_to_std(exp: Any) -> np.ndarray:
  """σ_rel of the power-function profile with exponent γ (EDM2 Eq. 123).

  Args:
    exp: γ > −1, scalar or array.

  Returns:
    σ_rel, float64, the shape of `exp`.
  """
  exp = np.asarray(exp, np.float64)
  return np.sqrt((exp + 1) / ((exp + 2)**2 * (exp + 3)))


def std_to_exp(std: Any) -> np.ndarray:
  """The exponent γ of the power-function profile with relative width σ_rel (EDM2 Eq. 126, Alg. 2).

  γ is the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0, the cubic that
  Eq. 123 becomes once squared and cleared of its denominator.

  Args:
    std: σ_rel ∈ (0, sqrt(1/12)), scalar or array (concrete: not a traced JAX value).

  Returns:
    γ, float64, the shape of `std`.

  Raises:
    ValueError: if some σ_rel is outside (0, sqrt(1/12)), where no power function has that width.
  """
  std = np.asarray(std, np.float64)
  if np.any(~(std > 0)) or np.any(std >= MAX_STD):
    raise ValueError(f'A power-function EMA needs 0 < σ_rel < {MAX_STD:.4f} (a uniform average of '
                     f'the whole run), got {std.tolist()}.')
  inv = std.reshape(-1)**-2
  exp = [np.roots([1.0, 7.0, 16.0 - v, 12.0 - v]).real.max() for v in inv]
  return np.asarray(exp, np.float64).reshape(std.shape)


def power_function_beta(std: Any, t_next: Any, t_delta: Any):
  """Decay β = (1 − Δt/t)^{γ+1} of one tracking step of the profile σ_rel (EDM2 Eq. 127).

  ema ← β·ema + (1 − β)·θ after the step that brings the training time to t. At the first step
  (t = Δt) β = 0, so the average starts at the trained weights, not at their initialization.

  Args:
    std: σ_rel of the profile (concrete; a scalar or an array broadcasting against t).
    t_next: training time after the step (images seen), NumPy or JAX (may be traced).
    t_delta: the step's length in the same unit (the global batch size).

  Returns:
    β, broadcast over the inputs, in their array library (float64 for NumPy inputs).
  """
  return (1 - t_delta / t_next)**(std_to_exp(std) + 1)


def power_function_correlation(a_ofs: Any, a_std: Any, b_ofs: Any, b_std: Any) -> np.ndarray:
  """Inner products ⟨p_a, p_b⟩ = ∫₀^∞ p_{t_a,γ_a}(τ) p_{t_b,γ_b}(τ) dτ (EDM2 Eq. 151).

  Args:
    a_ofs, b_ofs: the profiles' times t (any common unit), broadcasting against each other.
    a_std, b_std: their σ_rel.

  Returns:
    float64, the broadcast shape.
  """
  a_ofs, b_ofs = np.asarray(a_ofs, np.float64), np.asarray(b_ofs, np.float64)
  a_exp, b_exp = std_to_exp(a_std), std_to_exp(b_std)
  # Written with the ratio t_a/t_b rather than the powers t^γ, which overflow for large γ and t.
  t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)
  num = (a_exp + 1) * (b_exp + 1) * (a_ofs / b_ofs)**t_exp
  return num / ((a_exp + b_exp + 1) * np.maximum(a_ofs, b_ofs))


def posthoc_coefficients(in_ofs: Any, in_std: Any, out_ofs: Any, out_std: Any) -> np.ndarray:
  """Weights of the snapshots that best reconstruct target EMA profiles (EDM2 Algorithm 3).

  Args:
    in_ofs: times of the N snapshots [N] (e.g. images seen), each > 0.
    in_std: σ_rel of the profile each snapshot tracked [N] (or a scalar for all).
    out_ofs: times of the M targets [M] (or a scalar), each > 0.
    out_std: σ_rel of the targets [M] (or a scalar).

  Returns:
    X, float64 [N, M]: target j ≈ Σ_i X[i, j] · snapshot_i; every column sums to 1.

  Raises:
    ValueError: on an empty or degenerate basis (e.g. the same snapshot twice, so A is singular).
  """
  in_ofs, in_std = np.broadcast_arrays(np.asarray(in_ofs, np.float64),
                                     np.asarray(in_std, np.float64))
  out_ofs, out_std = np.broadcast_arrays(np.asarray(out_ofs, np.float64),
                                         np.asarray(out_std, np.float64))
  if in_ofs.size == 0:
    raise ValueError('Post-hoc EMA needs at least one snapshot.')
  col = lambda v: v.reshape(-1, 1)
  row = lambda v: v.reshape(1, -1)
  a = power_function_correlation(col(in_ofs), col(in_std), row(in_ofs), row(in_std))
  b = power_function_correlation(col(in_ofs), col(in_std), row(out_ofs), row(out_std))
  try:
    x = np.linalg.solve(a, b)
  except np.linalg.LinAlgError as e:
    raise ValueError('The snapshots do not form a basis (a profile appears twice?); pass distinct '
                     '(time, σ_rel) snapshots.') from e
  # Least squares leaves the total weight free; EMA weights must sum to 1 (Algorithm 3, last line).
  return x / np.sum(x, axis=0, keepdims=True)
