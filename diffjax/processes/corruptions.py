"""Linear corruptions for Soft Diffusion (Daras et al. 2022, arXiv 2209.05442; REFERENCE §5).

Soft Diffusion generalizes the forward process of a diffusion model from "add noise" to

    x_t = C_t x_0 + σ_t η,   η ~ N(0, I),   t ∈ [0, 1],                                 (forward)

with C_t a linear corruption (blur, masking, or the identity of plain VE diffusion) and σ_t a noise
level. Every corruption here is *diagonal in a fixed orthonormal basis* V:

    C_t = Vᵀ diag(d(ℓ(t))) V,

so it is symmetric, cheap to apply, and the Gaussian fits of the level-selection tool stay diagonal:

  * 'blur':     V = the orthonormal 2-D DCT-II per channel over (H, W) (what `jax.scipy.fft.dctn(
                norm='ortho')` computes; applied as matmuls, see `to_basis`),
                d[k1, k2] = exp(−π²(k1²/H² + k2²/W²)·ℓ²/2) with ℓ = σ_B(t) the blur std in pixels.
                The DCT-II diagonalizes the heat equation with reflecting boundaries, so this is a
                Gaussian blur of std σ_B with mirrored edges: a delta keeps mass 1 (d[0, 0] = 1) and spreads
                to spatial std σ_B (for N = H = W this is REFERENCE §5's exp(−π²(k1² + k2²)/N²·σ_B²/2)).
  * 'mask':     V = the pixel basis, d[i, j] = clip(P·(r_ij − ℓ) + 1, 0, 1) with ℓ ∈ [0, 1] the masked
                fraction, P = H·W and r_ij ∈ {0, 1/P, …} the rank of pixel (i, j) in the masking order
                (farthest from the centre first). Each pixel fades out over a 1/P-wide interval of ℓ, so
                C_t is continuous in t; ℓ = 1 masks everything.
  * 'identity': d = 1 (C_t = I): the forward process is VE diffusion, the Momentum Sampler becomes the
                reverse-diffusion sampler of Song et al. (2021).

Schedules. A `SoftSchedule` holds the level ℓ(t) and the noise σ(t) at knots t_0 = 0 < … < t_{L−1} = 1
and interpolates linearly in between (REFERENCE §5: "interpolate linearly for continuous t"); level
ℓ(0) = 0 makes C_0 = I. It also carries the Gaussian fit that defines the sampler's start p_1 (below).

Level selection (REFERENCE §5, the paper's scheduling tool). Consecutive corrupted distributions should
be at most ε apart in Wasserstein-2. With a Gaussian fit of the data that is diagonal in V (mean μ_k,
variance v_k per coefficient, from a dataset sample), the corrupted distribution at (ℓ, σ) is the
diagonal Gaussian N(d_k μ_k, d_k² v_k + σ²) and W2 between two such Gaussians is closed form:

    W2² = Σ_k (m_k − m'_k)² + (s_k − s'_k)²,   m = d μ,  s = sqrt(d² v + σ²).

`wasserstein_schedule` lays `num_candidates` candidate levels along a path from (0, σ_min) to
(ℓ_max, σ_max), takes the fewest-hop path through them whose hops are all ≤ ε, and tunes ε (the
smallest that needs at most `num_levels` − 1 hops) so that the path has `num_levels` levels; the
levels are then spaced uniformly in t. `scripts/soft_levels.py` writes the result to the JSON file a
config reads (`configs/soft.py`).

The starting distribution p_1 (a documented choice: Algorithm 2 leaves it open). The sampler starts
from the Gaussian fit of the fully corrupted data,

    x_1 = Vᵀ( d_1 μ + sqrt(d_1² v + σ_1²) ⊙ z ),   z ~ N(0, I),                              (p_1)

i.e. the law of C_1 x̃_0 + σ_1 η with x̃_0 drawn from the data's diagonal Gaussian fit. For blur, the
DC coefficient (d = 1 at every level) and any low frequency that survives the largest blur keep their
data mean and variance, which a "noise only" start would lose; for full masking it is N(0, σ_1² I).
Only the coefficients that matter at t = 1 are stored: the lowest K1×K2 block of the basis outside of
which d_1·sqrt(μ² + v) ≤ `p1_tol`·σ_1 (outside it μ = v = 0). Without a fit, p_1 = N(0, σ_1² I).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

CORRUPTIONS = ('identity', 'blur', 'mask')
_BASIS = {'identity': 'pixel', 'blur': 'dct', 'mask': 'pixel'}


# ------------------------------------------------------------------------------------------------
# Bases and diagonals.


def basis_of(corruption: str) -> str:
  """'dct' or 'pixel': the orthonormal basis in which `corruption` is diagonal."""
  _check_corruption(corruption)
  return _BASIS[corruption]


@functools.lru_cache(maxsize=None)
def dct_matrix(n: int) -> np.ndarray:
  """The orthonormal DCT-II matrix V [n, n] (float64): V[k, i] = sqrt(2/n)·c_k·cos(π(2i + 1)k/(2n)),
  c_0 = 1/sqrt(2), c_k = 1 otherwise. V x equals `jax.scipy.fft.dct(x, norm='ortho')`; Vᵀ = V⁻¹."""
  k, i = np.meshgrid(np.arange(n), np.arange(n), indexing='ij')
  v = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
  v[0] /= np.sqrt(2.0)
  return v


def to_basis(x, basis: str):
  """V x: the coefficients of images x [..., H, W, C] in `basis` (orthonormal DCT-II per channel).

  The 2-D DCT is applied as two matmuls with `dct_matrix` — the same numbers as
  `jax.scipy.fft.dctn(x, axes=(-3, -2), norm='ortho')` (tested), but several times faster than the
  FFT route on CPU for image-sized axes, and MXU work on TPU (at full float32 precision).
  """
  if basis == 'dct':
    vh, vw = (jnp.asarray(dct_matrix(n), jnp.float32) for n in x.shape[-3:-1])
    return jnp.einsum('kh,lw,...hwc->...klc', vh, vw, x, precision=jax.lax.Precision.HIGHEST)
  return x


def from_basis(coefficients, basis: str):
  """Vᵀ X: images [..., H, W, C] from their coefficients in `basis` (inverse of `to_basis`)."""
  if basis == 'dct':
    vh, vw = (jnp.asarray(dct_matrix(n), jnp.float32) for n in coefficients.shape[-3:-1])
    return jnp.einsum('kh,lw,...klc->...hwc', vh, vw, coefficients,
                      precision=jax.lax.Precision.HIGHEST)
  return coefficients


def blur_multipliers(level, height: int, width: int, xp=jnp):
  """d[k1, k2] = exp(−π²(k1²/H² + k2²/W²)·σ_B²/2): the DCT-domain diagonal of a Gaussian blur.

  Args:
    level: blur std σ_B in pixels, [...] (any shape, e.g. [B] or a scalar).
    height, width: H, W of the images.
    xp: `jnp` (jittable) or `np` (float64, for the level-selection tool).

  Returns:
    [..., H, W] multipliers in (0, 1]; d[0, 0] = 1 keeps the image mean (the blur preserves mass).
  """
  level = xp.asarray(level)
  k1 = xp.arange(height)[:, None] / height
  k2 = xp.arange(width)[None, :] / width
  freq2 = math.pi**2 * (k1**2 + k2**2)  # ω² of DCT-II basis function (k1, k2), in rad²/pixel²
  return xp.exp(-0.5 * freq2 * level[..., None, None]**2)


def mask_order(height: int, width: int) -> np.ndarray:
  """Normalized ranks r_ij ∈ {0, 1/P, …, (P−1)/P} [H, W]: pixels farther from the centre mask first.

  Ties (equal distance) are broken in raster order, so the order is a fixed permutation.
  """
  i, j = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  dist = (i - (height - 1) / 2)**2 + (j - (width - 1) / 2)**2
  order = np.lexsort((np.arange(height * width), -dist.reshape(-1)))  # farthest first, then raster
  ranks = np.empty(height * width, np.float64)
  ranks[order] = np.arange(height * width)
  return (ranks / (height * width)).reshape(height, width)


def mask_multipliers(level, height: int, width: int, xp=jnp):
  """d_ij = clip(P·(r_ij − ℓ) + 1, 0, 1): the pixel-domain diagonal of a mask hiding fraction ℓ.

  Args:
    level: masked fraction ℓ ∈ [0, 1], [...].
    height, width: H, W.
    xp: `jnp` or `np`.

  Returns:
    [..., H, W] multipliers in [0, 1]: all ones at ℓ = 0, all zeros at ℓ = 1.
  """
  level = xp.asarray(level)
  ranks = xp.asarray(mask_order(height, width))
  p = height * width
  return xp.clip(p * (ranks - level[..., None, None]) + 1.0, 0.0, 1.0)


def identity_multipliers(level, height: int, width: int, xp=jnp):
  """d = 1 [..., H, W]: C_t = I whatever the level."""
  level = xp.asarray(level)
  return xp.ones(level.shape + (height, width))


_MULTIPLIERS: dict[str, Callable] = {
    'identity': identity_multipliers,
    'blur': blur_multipliers,
    'mask': mask_multipliers,
}


def multipliers(corruption: str, level, height: int, width: int, xp=jnp):
  """The diagonal d(ℓ) [..., H, W] of C in its basis (see `basis_of`)."""
  _check_corruption(corruption)
  return _MULTIPLIERS[corruption](level, height, width, xp=xp)


def apply(corruption: str, x, level):
  """C x for a batch: x [B, H, W, C], level ℓ [B] (per example) or a scalar (whole batch).

  The same operator acts on every channel. Returns [B, H, W, C] in x's dtype.
  """
  x = jnp.asarray(x)
  if corruption == 'identity':
    return x
  basis = basis_of(corruption)
  level = jnp.asarray(level, jnp.float32)
  d = multipliers(corruption, level, x.shape[-3], x.shape[-2])
  if level.ndim == 1:
    d = d.reshape(d.shape + (1,))          # [B, H, W, 1]
  else:
    d = d[..., None]                        # [H, W, 1]
  return from_basis(to_basis(x, basis) * d.astype(x.dtype), basis).astype(x.dtype)


def apply_inverse(corruption: str, x, level, rcond: float = 1e-6):
  """C⁻¹ x where C is invertible: coefficients with |d| < rcond are left at zero.

  Blur is invertible in exact arithmetic (d > 0) but badly conditioned at large σ_B; masking is not
  (d = 0 on masked pixels). Used to check round trips, not by the samplers.
  """
  x = jnp.asarray(x)
  basis = basis_of(corruption)
  level = jnp.asarray(level, jnp.float32)
  d = multipliers(corruption, level, x.shape[-3], x.shape[-2])
  d = d.reshape(d.shape + (1,)) if level.ndim == 1 else d[..., None]
  inv = jnp.where(jnp.abs(d) >= rcond, 1.0 / jnp.where(jnp.abs(d) >= rcond, d, 1.0), 0.0)
  return from_basis(to_basis(x, basis) * inv.astype(x.dtype), basis)


def _check_corruption(corruption: str) -> None:
  if corruption not in CORRUPTIONS:
    raise ValueError(f'Unknown corruption {corruption!r}; known corruptions: '
                     f'{", ".join(CORRUPTIONS)}.')


# ------------------------------------------------------------------------------------------------
# Schedules ℓ(t), σ(t) and the start distribution p_1.


def _as_array(value, name: str, ndim: Optional[int] = None) -> Optional[np.ndarray]:
  if value is None:
    return None
  array = np.asarray(value, np.float64)
  if ndim is not None and array.ndim != ndim:
    raise ValueError(f'{name} must have {ndim} dimension(s), got shape {array.shape}.')
  return array


@dataclasses.dataclass(frozen=True, eq=False)
class SoftSchedule:
  """A Soft Diffusion forward process: corruption C_t, level ℓ(t), noise σ(t), start fit p_1.

  ℓ(t) and σ(t) are piecewise linear through the knots. Arrays are numpy float64 constants of the
  model (a config holds them as lists); the methods are jittable.

  Attributes:
    corruption: 'blur' (ℓ = σ_B in pixels), 'mask' (ℓ = masked fraction) or 'identity'.
    t: knots [L], increasing from t_0 = 0 to t_{L−1} = 1.
    level: ℓ at the knots [L], non-decreasing; ℓ(0) = 0 means C_0 = I.
    sigma: σ at the knots [L], non-decreasing, ≥ 0.
    p1_mean, p1_std: the data's Gaussian fit in the corruption's basis, lowest [K1, K2, C] block, or
      None (p_1 = N(0, σ_1² I)); see the module docstring.
  """
  corruption: str
  t: np.ndarray
  level: np.ndarray
  sigma: np.ndarray
  p1_mean: Optional[np.ndarray] = None
  p1_std: Optional[np.ndarray] = None

  def __post_init__(self):
    _check_corruption(self.corruption)
    for name in ('t', 'level', 'sigma'):
      object.__setattr__(self, name, _as_array(getattr(self, name), name, ndim=1))
    for name in ('p1_mean', 'p1_std'):
      object.__setattr__(self, name, _as_array(getattr(self, name), name, ndim=3))
    t, level, sigma = self.t, self.level, self.sigma
    if not len(t) == len(level) == len(sigma) or len(t) < 2:
      raise ValueError(f'A soft schedule needs t, level and sigma of one length ≥ 2; got '
                       f'{len(t)}, {len(level)} and {len(sigma)} knots.')
    if abs(t[0]) > 1e-9 or abs(t[-1] - 1) > 1e-9 or np.any(np.diff(t) <= 0):
      raise ValueError('Soft schedule knots t must increase strictly from 0 to 1.')
    if np.any(np.diff(level) < 0) or np.any(np.diff(sigma) < 0) or np.any(sigma < 0):
      raise ValueError('Soft schedule levels and noise levels must be non-decreasing in t and σ ≥ 0 '
                       '(the forward process only ever corrupts more).')
    if (self.p1_mean is None) != (self.p1_std is None) or (
        self.p1_mean is not None and self.p1_mean.shape != self.p1_std.shape):
      raise ValueError('p1_mean and p1_std must be given together, with one shape [K1, K2, C].')

  @property
  def basis(self) -> str:
    return basis_of(self.corruption)

  @property
  def num_levels(self) -> int:
    return len(self.t)

  def level_at(self, t):
    """ℓ(t) by linear interpolation, shaped like t (float32)."""
    return jnp.interp(jnp.asarray(t, jnp.float32), jnp.asarray(self.t, jnp.float32),
                      jnp.asarray(self.level, jnp.float32))

  def sigma_at(self, t):
    """σ(t) by linear interpolation, shaped like t (float32)."""
    return jnp.interp(jnp.asarray(t, jnp.float32), jnp.asarray(self.t, jnp.float32),
                      jnp.asarray(self.sigma, jnp.float32))

  def corrupt(self, x, t):
    """C_t x: x [B, H, W, C], t [B] or a scalar → [B, H, W, C]."""
    return apply(self.corruption, x, self.level_at(t))

  def forward(self, x0, t, eta):
    """x_t = C_t x_0 + σ_t η (the forward process) for x0, eta [B, H, W, C] and t [B]."""
    sigma = self.sigma_at(t)
    return self.corrupt(x0, t) + _per_example(sigma, eta) * eta

  def start(self, latents):
    """x_1 ~ p_1 from standard normals: Vᵀ(d_1 μ + sqrt(d_1² v + σ_1²) ⊙ V z) (module docstring).

    Args:
      latents: z [B, H, W, C] standard normal (V z is standard normal too: V is orthonormal).

    Returns:
      x_1 [B, H, W, C].
    """
    latents = jnp.asarray(latents, jnp.float32)
    height, width, channels = latents.shape[-3:]
    sigma1 = jnp.float32(self.sigma[-1])
    if self.p1_mean is None:
      return sigma1 * latents
    mean = np.zeros((height, width, channels))
    var = np.zeros((height, width, channels))
    k1, k2, kc = self.p1_mean.shape
    if kc not in (channels, 1) or k1 > height or k2 > width:
      raise ValueError(f'The p_1 fit has shape {self.p1_mean.shape}, which does not fit images '
                       f'{height}×{width}×{channels}; rerun scripts/soft_levels.py for this data.')
    mean[:k1, :k2] = self.p1_mean
    var[:k1, :k2] = self.p1_std**2
    d1 = multipliers(self.corruption, self.level[-1], height, width, xp=np)[..., None]
    loc = jnp.asarray(d1 * mean, jnp.float32)
    scale = jnp.asarray(np.sqrt(d1**2 * var + self.sigma[-1]**2), jnp.float32)
    return from_basis(loc + scale * to_basis(latents, self.basis), self.basis)

  def to_dict(self) -> dict:
    """Plain lists, as a config or the JSON of scripts/soft_levels.py holds them."""
    out = {'corruption': self.corruption, 't': self.t.tolist(), 'level': self.level.tolist(),
           'sigma': self.sigma.tolist()}
    if self.p1_mean is not None:
      out.update(p1_mean=self.p1_mean.tolist(), p1_std=self.p1_std.tolist())
    return out

  @classmethod
  def from_dict(cls, d) -> 'SoftSchedule':
    d = dict(d)
    return cls(corruption=d['corruption'], t=d['t'], level=d['level'], sigma=d['sigma'],
               p1_mean=d.get('p1_mean'), p1_std=d.get('p1_std'))


def _per_example(c, x):
  """A per-example [B] (or scalar) coefficient shaped to broadcast against x [B, ...]."""
  c = jnp.asarray(c, jnp.float32)
  return jnp.reshape(c, c.shape + (1,) * (x.ndim - c.ndim))


def interpolated_schedule(corruption: str, level_max: float, sigma_min: float, sigma_max: float,
                          num_levels: int = 32, level_min: Optional[float] = None) -> SoftSchedule:
  """An analytic schedule for when no level-selection file exists (a documented fallback).

  ℓ(t_j) rises geometrically from `level_min` (default level_max/1000) at t_1 to `level_max` at
  t = 1 with ℓ(0) = 0; σ(t) rises geometrically from σ_min to σ_max; knots uniform in t. The
  Wasserstein tool (`wasserstein_schedule`) replaces it with a data-driven spacing and adds p_1.
  """
  t = np.linspace(0.0, 1.0, num_levels)
  if corruption == 'identity':
    level = np.zeros(num_levels)
  else:
    lo = level_max / 1000.0 if level_min is None else level_min
    level = np.concatenate([[0.0], np.geomspace(lo, level_max, num_levels - 1)])
  sigma = np.geomspace(sigma_min, sigma_max, num_levels) if sigma_min > 0 else (
      np.linspace(sigma_min, sigma_max, num_levels))
  return SoftSchedule(corruption, t, level, sigma)


# ------------------------------------------------------------------------------------------------
# The Soft Diffusion model: residual parameterization as a preconditioning.
