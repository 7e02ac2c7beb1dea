"""FID, KID and Inception Score, with streaming feature statistics that sum over devices and hosts.

FID (Heusel et al. 2017) compares Gaussians fitted to features of two image sets:

  FID = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

The statistics are streamed: every batch is centred on its own mean before its Gram product is formed
(per-device partial sums in float32), and batches are combined on the host in float64 with the pairwise
update of Chan et al. (1979) for the mean and the centred scatter sum (f - mu)^T (f - mu). So a 50k-image
evaluation never keeps the features, any batch size or device count gives the same result, and features
with a large common offset do not lose the covariance to cancellation (raw moments sum f^T f - n mu mu^T
in float32 can leave eigenvalues of -1e-2 and FIDs below 0). The covariance is the unbiased one (divisor
n - 1), as in pytorch-fid, torch-fidelity and EDM's reference statistics.

KID (Binkowski et al. 2018) is the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y/d + 1)^3,
averaged over random subsets; IS (Salimans et al. 2016) is exp(E_x KL(p(y|x) || p(y))) over 10 splits. Both
follow torch-fidelity's conventions (subsets of 1000, 100 subsets, seed 2020 for the subset draws and the
IS shuffle) so that the same features give the same numbers.
"""

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax.runs import files

__all__ = [
  'Statistics',
  'StreamingStats',
  'batch_moments',
  'fid_from_statistics',
  'frechet_distance',
  'inception_score',
  'kernel_inception_distance',
  'load_statistics',
  'quantize_images',
  'save_statistics',
  'statistics_from_features',
  'trace_sqrt_product',
]

# --------------------------------------------------------------------------------------------------------
# Images.


def quantize_images(x: jax.Array) -> jax.Array:
  """Model output in [-1, 1] -> uint8 as written to PNG: round(x * 127.5 + 127.5), clipped (REFERENCE §6).

  Args:
    x: [..., C] float.

  Returns:
    Same shape, uint8.
  """
  return jnp.clip(jnp.round(x * 127.5 + 127.5), 0, 255).astype(jnp.uint8)


# --------------------------------------------------------------------------------------------------------
# Statistics.


@dataclasses.dataclass(frozen=True)
class Statistics:
  """A Gaussian fitted to features.

  Attributes:
    mu: [D] float64 mean.
    sigma: [D, D] float64 covariance (unbiased, divisor n - 1).
    n: number of samples, if known (reference files from NVlabs/edm do not record it).
  """

  mu: np.ndarray
  sigma: np.ndarray
  n: int | None = None


def statistics_from_features(features: np.ndarray) -> Statistics:
  """Mean and unbiased covariance of [N, D] features, in float64 (the direct, non-streaming way)."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f'Need [N >= 2, D] features for statistics, got shape {f.shape}.')
  return Statistics(f.mean(0), np.cov(f, rowvar=False), f.shape[0])


def save_statistics(path: files.PathLike, stats: Statistics) -> None:
  """Writes statistics as `.npz` with keys `mu`, `sigma` (NVlabs/edm's reference format), plus `n` if known."""
  arrays = {'mu': np.asarray(stats.mu, np.float64), 'sigma': np.asarray(stats.sigma, np.float64)}
  if stats.n is not None:
    arrays['n'] = np.int64(stats.n)
  # Written whole (aside and renamed; one object on a store): never a truncated reference file.
  files.write_npz(path, **arrays)


def load_statistics(path: str | os.PathLike) -> Statistics:
  """Reads a `.npz` with `mu` [D] and `sigma` [D, D] (ours, or NVlabs/edm's published reference files).

  Raises:
    FileNotFoundError / ValueError: with the path and what is wrong.
  """
  path = os.fspath(path)
  if not files.path(path).is_file():
    raise FileNotFoundError(
      f'No reference statistics at {path}. Make them with `evaluate.py ref --dataset=... --out={path}`, or '
      'download the NVlabs/edm reference .npz for the dataset.'
    )
  with files.read_npz(path) as data:
    if 'mu' not in data or 'sigma' not in data:
      raise ValueError(
        f'{path} has keys {sorted(data.files)}; reference statistics need `mu` and `sigma`.'
      )
    mu, sigma = np.asarray(data['mu'], np.float64), np.asarray(data['sigma'], np.float64)
    n = int(data['n']) if 'n' in data else None
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f'{path}: mu {mu.shape} and sigma {sigma.shape} do not describe one Gaussian.')
  return Statistics(mu, sigma, n)


def _moments(features, mask, axes=None):
  """Per-batch moments about the batch mean, float32.

  Args:
    features: [B, D] (one shard of the batch when `axes` is given).
    mask: [B] 0/1 weights or None.
    axes: mesh axes to psum over (inside shard_map), or None.

  Returns:
    (n, centre [D], sum w (f - centre) [D], sum w (f - centre)^T (f - centre) [D, D]), each summed over
    `axes`. `centre` is the batch mean as computed in float32; the small sum of residuals lets the host
    correct for its round-off exactly.
  """
  psum = (lambda x: x) if axes is None else functools.partial(jax.lax.psum, axis_name=axes)
  f = features.astype(jnp.float32)
  w = jnp.ones(f.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
  n, s = psum((jnp.sum(w), jnp.sum(f * w[:, None], axis=0)))
  centre = s / jnp.maximum(n, 1.0)
  fc = (f - centre) * w[:, None]  # masked rows contribute 0 to both sums (w is 0/1)
  # HIGHEST: TPU matmuls would otherwise round the features to bfloat16 before the Gram product.
  scatter = jnp.einsum('bi,bj->ij', fc, fc, precision=jax.lax.Precision.HIGHEST)
  return n, centre, *psum((jnp.sum(fc, axis=0), scatter))


@functools.cache
def _sharded_moments_fn(mesh, axes, with_mask: bool):
  """shard_map'ed moments: every device reduces its shard; psums give the batch mean and the sums."""

  def local(features, *mask):
    return _moments(features, mask[0] if mask else None, axes)

  spec = P(axes)
  in_specs = (spec, spec) if with_mask else (spec,)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P()))


_plain_moments = jax.jit(_moments)


def _batch_axes(x: jax.Array):
  """The mesh and mesh axes that shard dim 0 of a jax.Array, or (None, None)."""
  sharding = getattr(x, 'sharding', None)
  if not isinstance(sharding, NamedSharding) or not sharding.spec or sharding.spec[0] is None:
    return None, None
  axes = sharding.spec[0]
  axes = tuple(axes) if isinstance(axes, tuple | list) else (axes,)
  # Other dims must be unsharded for the per-device Gram product to be a partial sum.
  if any(s is not None for s in sharding.spec[1:]):
    return None, None
  return sharding.mesh, axes


def batch_moments(features: Any, mask: Any = None) -> tuple[float, np.ndarray, np.ndarray]:
  """Count, mean and centred scatter of one batch, reduced over all devices (and hosts), in float64.

  If `features` is a jax.Array sharded over a mesh on its batch dimension (as produced by a data-parallel
  feature function), every device computes the moments of its own shard and `psum`s add them, so a
  global batch spread over several hosts is reduced without gathering the features. Otherwise the moments
  are computed by one jitted function on the default device. The Gram product is formed of features
  centred on the batch mean, so its float32 round-off scales with the spread of the features, not with
  their offset.

  Args:
    features: [B, D] float (jax.Array, possibly sharded on B, or numpy).
    mask: optional [B] bool/0-1, sharded like `features`; rows with 0 (padding of a last partial batch)
      are left out.

  Returns:
    (n, mean [D], scatter [D, D] = sum (f - mean)^T (f - mean)) as float64 host values.
  """
  if features.ndim != 2:
    raise ValueError(f'Features must be [B, D], got shape {features.shape}.')
  mesh, axes = _batch_axes(features)
  if mesh is not None:
    fn = _sharded_moments_fn(mesh, axes, mask is not None)
    if mask is not None and not isinstance(mask, jax.Array):
      mask = jax.device_put(np.asarray(mask), NamedSharding(mesh, P(axes)))
    n, centre, s, g = fn(features, *(() if mask is None else (mask,)))
  else:
    n, centre, s, g = _plain_moments(features, None if mask is None else jnp.asarray(mask))
  n = float(n)
  if n == 0:
    d = centre.shape[0]
    return 0.0, np.zeros(d), np.zeros((d, d))
  # Exact in float64: sum (f-c)(f-c)^T = sum (f-m)(f-m)^T + n (m-c)(m-c)^T, with m - c = s / n.
  delta = np.asarray(s, np.float64) / n
  scatter = np.asarray(g, np.float64) - n * np.outer(delta, delta)
  return n, np.asarray(centre, np.float64) + delta, scatter


class StreamingStats:
  """Accumulates feature statistics batch by batch (count, mean and centred scatter, float64 on the host).

  Example:
    stats = StreamingStats()
    for images in batches:
      stats.update(inception_fn(images)['pool3'])
    save_statistics('ref.npz', stats.statistics())
  """

  def __init__(self):
    self.n = 0.0
    self.mean: np.ndarray | None = None
    self.scatter: np.ndarray | None = None

  def update(self, features: Any, mask: Any = None) -> 'StreamingStats':
    """Adds a batch [B, D] (see `batch_moments` for sharded batches and `mask`). Returns self."""
    return self.add_centred(*batch_moments(features, mask))

  def add_centred(self, n: float, mean: np.ndarray, scatter: np.ndarray) -> 'StreamingStats':
    """Adds a group's count, mean [D] and scatter about its mean [D, D] (Chan et al.'s pairwise update)."""
    mean, scatter = np.asarray(mean, np.float64), np.asarray(scatter, np.float64)
    if self.mean is None:
      self.mean, self.scatter = np.zeros_like(mean), np.zeros_like(scatter)
    if mean.shape != self.mean.shape:
      raise ValueError(f'Feature dimension changed from {self.mean.shape[0]} to {mean.shape[0]}.')
    n = float(n)
    if n == 0:
      return self
    total = self.n + n
    delta = mean - self.mean
    self.mean = self.mean + delta * (n / total)
    self.scatter = self.scatter + scatter + np.outer(delta, delta) * (self.n * n / total)
    self.n = total
    return self

  def add_moments(self, n: float, s: np.ndarray, g: np.ndarray) -> 'StreamingStats':
    """Adds raw moments (n, sum [D], sum of outer products [D, D]); prefer `add_centred`, which does not
    lose precision to the cancellation in g - n mean mean^T."""
    n = float(n)
    if n == 0:
      return self.add_centred(0.0, np.zeros_like(s, np.float64), np.zeros_like(g, np.float64))
    mean = np.asarray(s, np.float64) / n
    return self.add_centred(n, mean, np.asarray(g, np.float64) - n * np.outer(mean, mean))

  def merge(self, other: 'StreamingStats') -> 'StreamingStats':
    """Adds another accumulator's statistics (e.g. one per shard of a dataset). Returns self."""
    if other.mean is not None:
      self.add_centred(other.n, other.mean, other.scatter)
    return self

  def state(self) -> dict[str, np.ndarray]:
    """The accumulator as float64 arrays, to persist it (a shard of a resumable evaluation).

    {'n': count, 'mean': [D], 'scatter': [D, D]} (just {'n': 0} while empty): the sums Σf = n·mean and
    Σffᵀ = scatter + n·mean·meanᵀ in the centred form, which does not lose the covariance to
    cancellation. `from_state` gives back an accumulator equal to this one bit for bit.
    """
    if self.mean is None:
      return {'n': np.float64(self.n)}
    return {'n': np.float64(self.n), 'mean': np.asarray(self.mean, np.float64),
            'scatter': np.asarray(self.scatter, np.float64)}

  @classmethod
  def from_state(cls, state: Any) -> 'StreamingStats':
    """An accumulator from `state()`'s arrays (a dict, or an open `.npz`).

    Raises:
      ValueError: arrays that do not describe one accumulator.
    """
    stats = cls()
    stats.n = float(np.asarray(state['n']))
    if 'mean' in state:
      mean, scatter = np.asarray(state['mean'], np.float64), np.asarray(state['scatter'], np.float64)
      if mean.ndim != 1 or scatter.shape != mean.shape * 2:
        raise ValueError(f'Saved statistics of mean {mean.shape} and scatter {scatter.shape} do not '
                         'describe one set of features.')
      stats.mean, stats.scatter = mean, scatter
    elif stats.n:
      raise ValueError(f'Saved statistics count {stats.n:g} features but hold no mean.')
    return stats

  def statistics(self) -> Statistics:
    """Mean and unbiased covariance of everything added so far."""
    if self.mean is None or self.n < 2:
      raise ValueError(f'Need at least 2 samples for statistics, have {int(self.n)}.')
    sigma = self.scatter / (self.n - 1)
    return Statistics(self.mean.copy(), 0.5 * (sigma + sigma.T), int(round(self.n)))


# --------------------------------------------------------------------------------------------------------
# FID.


def _psd_eigh(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Eigen-decomposition of the symmetric part of sigma, round-off negative eigenvalues clipped to 0."""
  sigma = np.asarray(sigma, np.float64)
  w, v = np.linalg.eigh(0.5 * (sigma + sigma.T))
  return np.clip(w, 0, None), v


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a PSD matrix; round-off negative eigenvalues are clipped to 0."""
  w, v = _psd_eigh(sigma)
  return (v * np.sqrt(w)) @ v.T


def _trace_sqrt_from_roots(root1: np.ndarray, root2: np.ndarray) -> float:
  """tr((S1 S2)^(1/2)) given the symmetric square roots of S1, S2: the nuclear norm of root2 @ root1."""
  return float(np.sum(np.linalg.svd(root2 @ root1, compute_uv=False)))


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2, stable when either is (near) singular.

  S1 S2 is not symmetric, and a general `sqrtm` of it (pytorch-fid's scipy call) loses accuracy or returns
  complex values when the covariances are rank deficient (fewer samples than dimensions). Instead: S1 S2
  has the eigenvalues of S1^(1/2) S2 S1^(1/2) = B^T B with B = S2^(1/2) S1^(1/2), so the trace is the sum
  of B's singular values (its nuclear norm). Taking singular values of B, rather than square roots of the
  eigenvalues of B^T B, avoids sqrt's amplification of round-off near 0: an eigenvalue error of
  eps * ||B||^2 would become sqrt(eps) * ||B|| per null direction. The square roots are those of S1 and
  S2 with round-off negative eigenvalues clipped to 0, i.e. of the nearest PSD matrices.

  Args:
    sigma1, sigma2: [D, D] covariances.

  Returns:
    The trace, a Python float.
  """
  return _trace_sqrt_from_roots(_psd_sqrt(sigma1), _psd_sqrt(sigma2))


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64, never below 0.

  Covariances estimated in finite precision can have tiny negative eigenvalues. The cross term uses the
  square roots of the covariances with those clipped to 0, so the traces tr(sigma) are taken of the same
  clipped matrices (sums of the clipped eigenvalues): mixing the two would add 2 x (sum of negative
  eigenvalues) to the result, which is how FID(x, x) came out at -1e-2 instead of 0. With the clipped
  matrices the distance is the squared 2-Wasserstein distance between two genuine Gaussians, >= 0 in
  exact arithmetic. What is left is the round-off of eigh and svd, under 2 D ulps of the traces in our
  tests: a negative result within 64 D ulps is clamped to 0 (FID(x, x) is then exactly 0, not -1e-13). A
  larger negative cannot come from round-off (it would mean non-finite or corrupted statistics) and is
  returned unchanged so that it is not hidden.

  Args:
    mu1, mu2: [D] means.
    sigma1, sigma2: [D, D] covariances.

  Returns:
    ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), a Python float.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
      f'Statistics of different feature spaces: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs '
      f'{sigma2.shape}. Were the reference statistics made with the same network?'
    )
  (w1, v1), (w2, v2) = _psd_eigh(sigma1), _psd_eigh(sigma2)
  root1, root2 = (v1 * np.sqrt(w1)) @ v1.T, (v2 * np.sqrt(w2)) @ v2.T
  diff = mu1 - mu2
  mean_term, trace1, trace2 = float(diff @ diff), float(np.sum(w1)), float(np.sum(w2))
  fd = mean_term + trace1 + trace2 - 2.0 * _trace_sqrt_from_roots(root1, root2)
  round_off = 64 * mu1.shape[0] * np.finfo(np.float64).eps * (mean_term + trace1 + trace2)
  return 0.0 if -round_off <= fd < 0 else float(fd)


def fid_from_statistics(stats1: Statistics, stats2: Statistics) -> float:
  """FID between two `Statistics` (e.g. generated vs a reference `.npz`)."""
  return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)


# --------------------------------------------------------------------------------------------------------
# KID.


def _polynomial_kernel(
  x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float
) -> np.ndarray:
  return (x @ y.T * gamma + coef0) ** degree


def _mmd2_unbiased(kxx: np.ndarray, kxy: np.ndarray, kyy: np.ndarray) -> float:
  """Unbiased MMD^2 (Gretton et al. 2012, Lemma 6): within-set sums drop the diagonal; the cross term
  averages over all m^2 pairs (the estimator of Binkowski et al. 2018 and torch-fidelity)."""
  m = kxx.shape[0]
  within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
  return float(within - 2.0 * kxy.sum() / (m * m))


def kernel_inception_distance(
  features1: np.ndarray,
  features2: np.ndarray,
  *,
  num_subsets: int = 100,
  subset_size: int = 1000,
  degree: int = 3,
  gamma: float | None = None,
  coef0: float = 1.0,
  seed: int = 2020,
) -> tuple[float, float]:
  """KID: unbiased MMD^2 with a polynomial kernel, averaged over random subsets.

  Args:
    features1: [N1, D] features of one set.
    features2: [N2, D] of the other.
    num_subsets: number of subset pairs drawn.
    subset_size: m, images per subset (without replacement); capped at min(N1, N2) with a warning.
    degree, gamma, coef0: kernel (x.y * gamma + coef0)^degree; gamma None means 1/D.
    seed: numpy RandomState seed for the subset draws (torch-fidelity's default 2020).

  Returns:
    (mean, std) over subsets. Slightly negative values are valid and mean "indistinguishable".
  """
  x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f'KID needs [N, D] features of equal D, got {x.shape} and {y.shape}.')
  m = min(subset_size, x.shape[0], y.shape[0])
  if m < 2:
    raise ValueError('KID needs at least 2 samples in each set.')
  if m < subset_size:
    logging.warning('KID subset size %d > number of samples; using subsets of %d.', subset_size, m)
  gamma = 1.0 / x.shape[1] if gamma is None else gamma
  kernel = functools.partial(_polynomial_kernel, degree=degree, gamma=gamma, coef0=coef0)
  rng = np.random.RandomState(seed)
  mmds = np.empty(num_subsets)
  for i in range(num_subsets):
    a = x[rng.choice(x.shape[0], m, replace=False)]
    b = y[rng.choice(y.shape[0], m, replace=False)]
    mmds[i] = _mmd2_unbiased(kernel(a, a), kernel(a, b), kernel(b, b))
  return float(mmds.mean()), float(mmds.std())


# --------------------------------------------------------------------------------------------------------
# Inception Score.


def inception_score(
  logits: np.ndarray, *, splits: int = 10, shuffle: bool = True, seed: int = 2020
) -> tuple[float, float]:
  """Inception Score exp(E_x KL(p(y|x) || p(y))), mean and std over splits.

  Args:
    logits: [N, K] class logits; for the standard IS, Inception's 1008 logits *without* the output bias
      (`logits_unbiased`), as in the original TF code and torch-fidelity.
    splits: the data is cut into this many consecutive chunks (rows i*N//splits .. (i+1)*N//splits - 1),
      p(y) being the chunk's mean prediction.
    shuffle: permute rows first with RandomState(seed), as torch-fidelity does.
    seed: seed of that permutation.

  Returns:
    (mean, std) of the per-split scores.
  """
  z = np.asarray(logits, np.float64)
  n = z.shape[0]
  if z.ndim != 2 or n < splits:
    raise ValueError(f'Inception Score needs [N >= splits={splits}, K] logits, got {z.shape}.')
  if shuffle:
    z = z[np.random.RandomState(seed).permutation(n)]
  z = z - z.max(axis=1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    lo, hi = i * n // splits, (i + 1) * n // splits
    p_y = p[lo:hi].mean(axis=0)
    kl = np.sum(p[lo:hi] * (log_p[lo:hi] - np.log(p_y)), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))
