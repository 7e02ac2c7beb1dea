"""Choosing Soft Diffusion's corruption levels: Gaussian fits of the data, W2 distances between
corrupted distributions, and the fewest-hops path through them (Daras et al. 2022, App.)."""

from __future__ import annotations

import json
import os
from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from diffjax.processes.corruptions import SoftSchedule, basis_of, multipliers, to_basis


class GaussianFit(NamedTuple):
  """A diagonal Gaussian fit of images in a corruption's basis (float64 numpy).

  Attributes:
    mean: μ [H, W, C], the mean of each coefficient.
    std: sqrt(v) [H, W, C], the standard deviation of each coefficient.
    basis: 'dct' or 'pixel'.
  """
  mean: np.ndarray
  std: np.ndarray
  basis: str


def fit_gaussian(images, corruption: str = 'blur', batch: int = 1024) -> GaussianFit:
  """Per-coefficient mean and std of images in the basis where `corruption` is diagonal.

  Args:
    images: [N, H, W, C] float images in [-1, 1] (quantize-free; uint8 callers convert first).
    corruption: picks the basis ('blur' → DCT, 'mask'/'identity' → pixels).
    batch: images transformed at a time.
  """
  images = np.asarray(images)
  if images.ndim != 4 or len(images) < 2:
    raise ValueError(f'fit_gaussian needs images [N ≥ 2, H, W, C], got shape {images.shape}.')
  basis = basis_of(corruption)
  total = np.zeros(images.shape[1:])
  total2 = np.zeros(images.shape[1:])
  for start in range(0, len(images), batch):
    c = np.asarray(to_basis(jnp.asarray(images[start:start + batch], jnp.float32), basis),
                   np.float64)
    total += c.sum(0)
    total2 += (c**2).sum(0)
  n = len(images)
  mean = total / n
  var = np.maximum(total2 / n - mean**2, 0.0) * n / (n - 1)
  return GaussianFit(mean, np.sqrt(var), basis)


def corrupted_fit(fit: GaussianFit, corruption: str, level: float, sigma: float):
  """(mean, std) [H, W, C] of the Gaussian fit of C x_0 + σ η: d μ and sqrt(d² v + σ²)."""
  height, width = fit.mean.shape[:2]
  d = multipliers(corruption, float(level), height, width, xp=np)[..., None]
  return d * fit.mean, np.sqrt(d**2 * fit.std**2 + sigma**2)


def w2_diagonal(mean1, std1, mean2, std2) -> float:
  """Wasserstein-2 distance between two diagonal Gaussians (closed form, any matching shapes)."""
  return float(np.sqrt(np.sum((mean1 - mean2)**2) + np.sum((std1 - std2)**2)))


def w2_distances(fit: GaussianFit, corruption: str, levels, sigmas) -> np.ndarray:
  """W2 between the corrupted fits at every pair of candidate levels: [M, M], symmetric.

  Args:
    fit: the data's Gaussian fit (`fit_gaussian`).
    corruption: its corruption.
    levels, sigmas: the candidate (ℓ, σ) pairs [M].
  """
  pairs = [corrupted_fit(fit, corruption, l, s) for l, s in zip(levels, sigmas)]
  means = np.stack([m.reshape(-1) for m, _ in pairs])
  stds = np.stack([s.reshape(-1) for _, s in pairs])

  def squared(a):  # ‖a_i − a_j‖² for all pairs by the Gram identity (one matmul, [M, M]).
    sq = np.sum(a**2, axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * a @ a.T, 0.0)

  dist = np.sqrt(squared(means) + squared(stds))
  np.fill_diagonal(dist, 0.0)
  return dist


def fewest_hops(dist: np.ndarray, eps: float) -> Optional[list[int]]:
  """The fewest-hop path 0 → M−1 through candidates (increasing index) whose hops are all ≤ eps.

  Returns:
    the candidate indices on the path, or None when no path exists.
  """
  m = len(dist)
  hops = np.full(m, np.inf)
  prev = np.full(m, -1)
  hops[0] = 0
  for j in range(1, m):
    ok = np.nonzero(dist[:j, j] <= eps)[0]
    if len(ok):
      i = ok[np.argmin(hops[ok])]  # ties: the earliest such candidate
      hops[j], prev[j] = hops[i] + 1, i
  if not np.isfinite(hops[-1]):
    return None
  path = [m - 1]
  while path[-1] != 0:
    path.append(int(prev[path[-1]]))
  return path[::-1]


def select_levels(dist: np.ndarray, num_levels: int) -> tuple[list[int], float]:
  """Candidate indices of `num_levels` levels whose consecutive W2 distances are at most ε.

  ε is the smallest threshold whose fewest-hop path needs at most `num_levels` − 1 hops (found by
  bisection over the pairwise distances). When that path has fewer levels than asked, the longest
  hops are split at the candidate that best balances them until there are `num_levels`.

  Returns:
    (indices [num_levels] increasing from 0 to M−1, ε).

  Raises:
    ValueError: if there are fewer candidates than levels.
  """
  m = len(dist)
  if num_levels < 2 or num_levels > m:
    raise ValueError(f'Cannot pick {num_levels} levels from {m} candidates; use 2 ≤ num_levels ≤ '
                     'num_candidates.')
  values = np.unique(dist[np.triu_indices(m, 1)])
  lo, hi = 0, len(values) - 1  # the largest distance always allows the one-hop path
  while lo < hi:
    mid = (lo + hi) // 2
    path = fewest_hops(dist, values[mid])
    if path is not None and len(path) <= num_levels:
      hi = mid
    else:
      lo = mid + 1
  eps = float(values[lo])
  path = fewest_hops(dist, eps)
  while len(path) < num_levels:
    gaps = [(dist[a, b], k) for k, (a, b) in enumerate(zip(path[:-1], path[1:])) if b - a >= 2]
    _, k = max(gaps)
    a, b = path[k], path[k + 1]
    c = min(range(a + 1, b), key=lambda c: max(dist[a, c], dist[c, b]))
    path.insert(k + 1, c)
  return path, eps


def candidate_path(corruption: str, num_candidates: int, level_min: float, level_max: float,
                   sigma_min: float, sigma_max: float) -> tuple[np.ndarray, np.ndarray]:
  """Candidate (ℓ, σ) pairs [M] along which levels are selected.

  Candidate 0 is the clean level (ℓ = 0, σ = σ_min). Candidates 1 … M−1 rise geometrically in ℓ from
  level_min to level_max (REFERENCE §5's CelebA recipe: 256 blur levels from 0.01 to 23 pixels;
  geometric spacing is dense where small blurs change the distribution fastest) and in σ from σ_min
  to σ_max at the same fraction u = i/(M−1) of the path (a choice: noise and blur rise together).
  For 'identity' only σ moves.
  """
  u = np.linspace(0.0, 1.0, num_candidates)
  if corruption == 'identity':
    levels = np.zeros(num_candidates)
  else:
    levels = np.concatenate([[0.0], np.geomspace(level_min, level_max, num_candidates - 1)])
  if sigma_min > 0:
    sigmas = sigma_min * (sigma_max / sigma_min)**u
  else:
    sigmas = sigma_min + (sigma_max - sigma_min) * u
  return levels, sigmas


def p1_block(fit: GaussianFit, corruption: str, level1: float, sigma1: float,
             tol: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """The lowest [K1, K2, C] block of the fit that matters at t = 1 (module docstring, p_1).

  K1, K2 are the smallest such that every coefficient outside the block has
  d_1·sqrt(μ² + v) ≤ tol·σ_1 (in every channel); tol = 0 keeps the whole fit.
  """
  height, width = fit.mean.shape[:2]
  d1 = multipliers(corruption, float(level1), height, width, xp=np)
  size = d1 * np.sqrt(np.max(fit.mean**2 + fit.std**2, axis=-1))  # [H, W]
  rows, cols = np.nonzero(size > tol * sigma1)
  k1 = int(rows.max()) + 1 if len(rows) else 0
  k2 = int(cols.max()) + 1 if len(cols) else 0
  return fit.mean[:k1, :k2].copy(), fit.std[:k1, :k2].copy()


def wasserstein_schedule(images, corruption: str = 'blur', *, num_levels: int = 32,
                         num_candidates: int = 256, level_min: float = 0.01,
                         level_max: float = 23.0, sigma_min: float = 0.01,
                         sigma_max: float = 0.1, p1_tol: float = 0.1) -> tuple[SoftSchedule, dict]:
  """Selects corruption levels from a dataset sample (the paper's Wasserstein scheduling tool).

  Args:
    images: a data sample [N, H, W, C] in [-1, 1].
    corruption: 'blur', 'mask' or 'identity'.
    num_levels: L, the number of levels including the clean one (t = 0) and the last (t = 1).
    num_candidates: M candidates on `candidate_path`.
    level_min, level_max: candidate level range (σ_B in pixels, or masked fraction).
    sigma_min, sigma_max: noise at t = 0 and at t = 1.
    p1_tol: truncation of the stored p_1 fit (`p1_block`).

  Returns:
    (schedule with knots t_j = j/(L−1) and the p_1 fit, info) where info has 'eps', 'w2_steps'
    (the L − 1 consecutive W2 distances), 'candidates' and 'num_images'.
  """
  fit = fit_gaussian(images, corruption)
  levels, sigmas = candidate_path(corruption, num_candidates, level_min, level_max, sigma_min,
                                  sigma_max)
  dist = w2_distances(fit, corruption, levels, sigmas)
  path, eps = select_levels(dist, num_levels)
  mean, std = p1_block(fit, corruption, levels[-1], sigmas[-1], p1_tol)
  schedule = SoftSchedule(corruption, np.linspace(0.0, 1.0, len(path)), levels[path],
                          sigmas[path], mean, std)
  info = {'eps': eps, 'w2_steps': [float(dist[a, b]) for a, b in zip(path[:-1], path[1:])],
          'candidates': [int(i) for i in path], 'num_candidates': int(num_candidates),
          'num_images': int(len(images)), 'level_range': [float(level_min), float(level_max)],
          'sigma_range': [float(sigma_min), float(sigma_max)], 'p1_tol': float(p1_tol)}
  return schedule, info


def save_schedule(path: str, schedule: SoftSchedule, info: Optional[dict] = None) -> str:
  """Writes a schedule (and the tool's info) as the JSON file configs read (`load_schedule`)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump({**schedule.to_dict(), 'info': info or {}}, f, indent=1)
  return path


def load_schedule(path: str) -> dict:
  """The JSON written by `save_schedule`, as a dict of plain lists (SoftSchedule fields + 'info')."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'No soft-diffusion levels file at {path}; write it with '
                            'python scripts/soft_levels.py --config=configs/soft.py:PRESET.')
  with open(path) as f:
    data = json.load(f)
  SoftSchedule.from_dict(data)  # validates
  return data
