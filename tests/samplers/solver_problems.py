"""Problems with closed-form answers for the σ-grid solver tests (k-diffusion family, UniPC, DEIS).

* The Gaussian mixture of scripts/make_kdiffusion_golden.py: data Σ_k π_k N(μ_k, s_k² I) in R^3
  has the exact denoiser D(x; σ) = Σ_k w_k(x)(μ_k + s_k²/(s_k² + σ²)(x − μ_k)), with
  w_k ∝ π_k N(x; μ_k, (s_k² + σ²) I). The golden files hold its constants.
* Gaussian data N(0, S²I): D(x; σ) = S²/(S² + σ²)·x, and the PF-ODE dx/dσ = (x − D)/σ is solved
  by x(σ) = x(σ₀)·sqrt((S² + σ²)/(S² + σ₀²)), so a solver's error is known exactly.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'golden')
S = 0.5  # std of the Gaussian problem


def load_golden(name: str) -> dict:
  """tests/golden/<name>.npz as a dict of numpy arrays."""
  with np.load(os.path.join(GOLDEN_DIR, f'{name}.npz')) as f:
    return {k: f[k] for k in f.files}


def mixture_denoiser(means, stds, weights):
  """The exact D(x [B, 3], σ [B]) -> [B, 3] of the mixture (jnp; any float dtype)."""
  means, stds, weights = (np.asarray(a, np.float64) for a in (means, stds, weights))

  def denoise(x, sigma):
    var = stds**2 + sigma[:, None].astype(x.dtype)**2  # [B, K]
    diff = x[:, None, :] - means.astype(x.dtype)  # [B, K, 3]
    logits = jnp.log(weights) - 1.5 * jnp.log(var) - 0.5 * jnp.sum(diff**2, -1) / var
    w = jax.nn.softmax(logits, axis=1)
    posterior = means + (stds**2 / var)[..., None] * diff
    return jnp.sum(w[..., None] * posterior, axis=1).astype(x.dtype)

  return denoise


def gaussian_denoiser(x, sigma):
  """Exact D(x; σ) = S²/(S² + σ²)·x for data N(0, S²I); x [B, ...], σ [B]."""
  sigma = jnp.reshape(sigma, sigma.shape + (1,) * (x.ndim - 1)).astype(x.dtype)
  return S**2 / (S**2 + sigma**2) * x


def gaussian_solution(x0, sigma0, sigma):
  """The exact PF-ODE solution x(σ) from x(σ₀) = x0 on Gaussian data."""
  return np.asarray(x0, np.float64) * np.sqrt((S**2 + sigma**2) / (S**2 + sigma0**2))


def convergence_orders(errors):
  """log2 of successive error ratios for grids doubling in size: the observed orders."""
  errors = np.asarray(errors, np.float64)
  return np.log2(errors[:-1] / errors[1:])
