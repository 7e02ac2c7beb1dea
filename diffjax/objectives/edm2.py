"""The EDM2 loss with learned uncertainty (Karras et al. 2024, §2 and Eq. 21).

EDM2 keeps EDM's log-normal p(σ) and weighting λ(σ) = 1/c_out(σ)² but lets the network predict
how hard each noise level is: a log-variance u(σ) divides the weighted error and is penalized,

    L = E_{σ, y, n} [ (λ(σ)/e^{u(σ)}) · (D(y + n; σ) − y)² + u(σ) ],   ln σ ~ N(P_mean, P_std²).

Minimizing over u gives e^{u(σ)} = λ(σ)·E[(D − y)²], so every σ ends up contributing about equally
to the gradient (the loss is balanced over noise levels without hand tuning). As in EDM2's code the
expression is per element: summed over the N = H·W·C pixels of an example (as every diffjax loss
is) it is (λ/e^u)·‖D − y‖² + N·u, so u estimates the *per-pixel* log-variance and means the same as
an EDM2 network's. The mean over the batch follows.

u comes from the same network call as D: EDM2UNet appends it as one extra output channel
(broadcast over the pixels), which `precond.Denoiser.raw` returns as `extra`; the loss reads its
last channel at one pixel. Presets (train_edm2.py): ImageNet-64 P_mean −0.8, P_std 1.6;
ImageNet-512 latents P_mean −0.4, P_std 1.0; σ_data 0.5.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from diffjax import registry
from diffjax.objectives.base import Objective, conditioned_batch
from diffjax.objectives.edm import edm_sigma, edm_weight
from diffjax.precond import Denoiser

# P_mean, P_std of train_edm2.py's presets.
IMG64 = dict(p_mean=-0.8, p_std=1.6)
IMG512 = dict(p_mean=-0.4, p_std=1.0)


def uncertainty_loss(denoise_raw: Callable, y: jax.Array, key: jax.Array, *, p_mean: float,
                     p_std: float, sigma_data: float,
                     sigma: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """EDM2 Eq. 21 for one batch: draw σ and n, denoise, weight by λ/e^u, add u, sum, mean.

  Args:
    denoise_raw: (x_noisy [B,H,W,C], σ [B]) -> (D [B,H,W,C], extra [B,H,W,E]) with u(σ) in the
      last extra channel (constant over the pixels); labels and dropout keys already bound.
    y: clean images [B, H, W, C].
    key: PRNG key, split into (σ, noise) as `objectives.edm.denoising_loss` does.
    p_mean, p_std: ln σ ~ N(p_mean, p_std²).
    sigma_data: σ_d of λ(σ) = (σ² + σ_d²)/(σ·σ_d)².
    sigma: optional fixed noise levels [B] (tests, evaluation at given σ).

  Returns:
    (scalar loss, aux) with aux = {'per_example': [B], 'sigma': [B], 'logvar': [B]}.

  Raises:
    ValueError: if the network has no extra output channel to read u from.
  """
  key_sigma, key_noise = jax.random.split(key)
  if sigma is None:
    sigma = edm_sigma(key_sigma, y.shape[0], p_mean, p_std)
  n = jax.random.normal(key_noise, y.shape, jnp.float32)
  n = n * sigma.reshape((-1,) + (1,) * (y.ndim - 1))
  denoised, extra = denoise_raw(y + n, sigma)
  if extra.shape[-1] < 1:
    raise ValueError('The edm2 loss needs a network with a log-variance output channel (EDM2UNet '
                     'with logvar_channels > 0, e.g. model.preset=edm2-digits); this one has none.')
  logvar = extra[:, 0, 0, -1].astype(jnp.float32)
  err = jnp.sum(jnp.square(denoised.astype(jnp.float32) - y), axis=tuple(range(1, y.ndim)))
  pixels = y[0].size
  per_example = edm_weight(sigma, sigma_data) / jnp.exp(logvar) * err + pixels * logvar
  return jnp.mean(per_example), {'per_example': per_example, 'sigma': sigma, 'logvar': logvar}


@dataclasses.dataclass(frozen=True)
class EDM2Loss:
  """The EDM2 loss as a registered `loss`: `objective(denoiser, ...)` gives the Objective.

  Attributes:
    p_mean, p_std: ln σ ~ N(p_mean, p_std²) (ImageNet-64: −0.8, 1.6).
    sigma_data: σ_d of the weighting (and of the 'edm' preconditioning the config pairs it with).
  """
  p_mean: float = IMG64['p_mean']
  p_std: float = IMG64['p_std']
  sigma_data: float = 0.5
  name: str = 'edm2'

  def objective(self, denoiser: Denoiser, *, num_classes: int = 0,
                augment_fn: Optional[Callable] = None) -> Objective:
    """The train step's Objective.

    Args:
      denoiser: the preconditioned network; its network must output u as its last channel.
      num_classes: > 0 feeds one-hot class labels to the network.
      augment_fn: (key, images) -> (images, augment_labels) or None (EDM2 trains without).
    """

    def loss_fn(params, batch, key, extra):
      del extra  # No state between steps.
      key_aug, key_loss, key_dropout = jax.random.split(key, 3)
      y, class_labels, augment_labels = conditioned_batch(batch, key_aug, num_classes=num_classes,
                                                          augment_fn=augment_fn)

      def denoise_raw(x, sigma):
        return denoiser.raw(params, x, sigma, class_labels, augment_labels, train=True,
                            rngs={'dropout': key_dropout})

      return uncertainty_loss(denoise_raw, y, key_loss, p_mean=self.p_mean, p_std=self.p_std,
                              sigma_data=self.sigma_data)

    return Objective(loss=loss_fn)


def make_edm2(p_mean: float = IMG64['p_mean'], p_std: float = IMG64['p_std'],
              sigma_data: float = 0.5) -> EDM2Loss:
  """The EDM2 loss (config.loss.name = 'edm2', kwargs p_mean, p_std, sigma_data)."""
  return EDM2Loss(p_mean=float(p_mean), p_std=float(p_std), sigma_data=float(sigma_data))


registry.add('loss', 'edm2', make_edm2)
