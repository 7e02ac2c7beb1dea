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
import json
import math
import os
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import registry
from diffjax.precond import Coefficients, Preconditioning

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


def soft_coefficients(t, noise_label_scale: float = 1000.0) -> Coefficients:
  """x̂_0 = φ_θ(x_t | t) + x_t (REFERENCE §5's residual parameterization) as EDM coefficients.

  c_skip = c_out = c_in = 1 and c_noise = `noise_label_scale`·t: the network sees x_t as it is and
  is conditioned on the diffusion time (scaled like VP's (M − 1)·t so that a positional embedding
  resolves it).
  """
  t = jnp.asarray(t, jnp.float32)
  one = jnp.ones_like(t)
  return Coefficients(c_skip=one, c_out=one, c_in=one, c_noise=noise_label_scale * t)


@dataclasses.dataclass(frozen=True)
class SoftPreconditioning(Preconditioning):
  """The preconditioning of a Soft Diffusion model, carrying its forward process.

  With it `precond.Denoiser(network, precond)` is x̂_0(x_t, t) = x_t + φ_θ(x_t, t): the second
  argument of its `denoise_fn(x, level)` is the **diffusion time t ∈ [0, 1]**, not an EDM σ
  (sigma_min = 0 and sigma_max = 1 record that range). The Soft Score Matching loss (`losses_soft`)
  and the Momentum/naive samplers (`samplers.momentum`) read the corruption and noise schedule from
  `schedule`, so one config entry (config.precond.kwargs) defines the process for training and
  sampling alike. EDM's σ-grid samplers do not apply to such a model.
  """
  schedule: Optional[SoftSchedule] = None


def make_soft(corruption: str = 'blur', t: Sequence[float] = (0.0, 1.0),
              level: Sequence[float] = (0.0, 1.0), sigma: Sequence[float] = (0.01, 0.1),
              p1_mean=None, p1_std=None, noise_label_scale: float = 1000.0,
              info: Optional[dict] = None) -> SoftPreconditioning:
  """The registered 'soft' preconditioning built from a schedule's lists (config.precond.kwargs).

  Args:
    corruption, t, level, sigma, p1_mean, p1_std: the `SoftSchedule` fields.
    noise_label_scale: c_noise = noise_label_scale·t.
    info: the level-selection tool's notes when a levels file is passed whole (ignored).
  """
  del info
  schedule = SoftSchedule(corruption, t, level, sigma, p1_mean, p1_std)
  return SoftPreconditioning(
      name='soft', coefficients=lambda s: soft_coefficients(s, noise_label_scale), sigma_min=0.0,
      sigma_max=1.0, schedule=schedule)


registry.add('precond', 'soft', make_soft)


def schedule_of(precond) -> SoftSchedule:
  """The `SoftSchedule` of a Soft Diffusion preconditioning; one clear error for any other."""
  schedule = getattr(precond, 'schedule', None)
  if not isinstance(schedule, SoftSchedule):
    name = getattr(precond, 'name', type(precond).__name__)
    raise ValueError(f'This needs a Soft Diffusion model (config.precond.name = "soft"), but the '
                     f'preconditioning is {name!r}; use configs/soft.py or an EDM sampler.')
  return schedule


# ------------------------------------------------------------------------------------------------
# Wasserstein level selection.


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
