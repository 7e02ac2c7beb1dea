"""Noise-level embeddings: sinusoidal positional (DDPM++, ADM) and random Fourier features (NCSN++).

Both map a batch of scalars c_noise [B] to [B, num_channels] laid out as [cos(...), sin(...)], and
both are computed in float32 (large arguments such as DDPM step indices lose their phase in bf16).
Neither has trainable parameters.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def positional_frequencies(
  num_channels: int, max_positions: int = 10000, endpoint: bool = False
) -> np.ndarray:
  """Frequencies (1 / max_positions)^(i / d), i = 0..num_channels/2 - 1, float32 [num_channels // 2].

  d = num_channels/2 - 1 when `endpoint` (the last frequency is exactly 1/max_positions, as in EDM's
  SongUNet), else num_channels/2 (Vaswani et al. 2017; ADM).
  """
  half = num_channels // 2
  if half < 1 or (endpoint and half < 2):
    raise ValueError(
      f'A positional embedding needs at least {4 if endpoint else 2} channels, got {num_channels}.'
    )
  i = np.arange(half, dtype=np.float64)
  return ((1 / max_positions) ** (i / (half - (1 if endpoint else 0)))).astype(np.float32)


def positional_embedding(
  x: Array, num_channels: int, max_positions: int = 10000, endpoint: bool = False
) -> Array:
  """Sinusoidal embedding [cos(x·ω), sin(x·ω)] of a batch of scalars.

  Args:
    x: [B] positions (noise labels).
    num_channels: output width (even).
    max_positions: the longest period, in units of x, is 2π·max_positions.
    endpoint: see `positional_frequencies`.

  Returns:
    [B, num_channels] float32.
  """
  freqs = positional_frequencies(num_channels, max_positions, endpoint)
  arg = jnp.asarray(x, jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


def fourier_frequencies(num_channels: int, scale: float = 16.0, seed: int = 0) -> np.ndarray:
  """The fixed random frequencies of `FourierEmbedding`: N(0, scale²) draws, float32 [num_channels // 2]."""
  return (np.random.default_rng(seed).standard_normal(num_channels // 2) * scale).astype(np.float32)


class PositionalEmbedding(nn.Module):
  """Sinusoidal noise-level embedding (no parameters); see `positional_embedding`.

  Attributes:
    num_channels: output width.
    max_positions: the longest period is 2π·max_positions.
    endpoint: EDM's SongUNet uses True, ADM False.
  """

  num_channels: int
  max_positions: int = 10000
  endpoint: bool = False

  def __call__(self, x: Array) -> Array:
    """Maps [B] to [B, num_channels] float32."""
    return positional_embedding(x, self.num_channels, self.max_positions, self.endpoint)


class FourierEmbedding(nn.Module):
  """Random Fourier features [cos(2π·x·ω), sin(2π·x·ω)], ω ~ N(0, scale²) (Tancik et al. 2020; NCSN++).

  The frequencies are *not trainable* (a buffer in EDM). Rather than a parameter or an extra variable
  collection, they are a constant drawn from a fixed numpy seed when the module is traced: they never
  appear in `params` (so parameter counts match the published ones and optimizers cannot touch
  them), `apply` needs no extra collection, and a checkpoint plus the module's fields determine the
  network exactly. A converted PyTorch NCSN++ checkpoint (`diffjax.convert`) brings its own stored
  buffer as `freqs`, which then replaces the seeded draw.

  Attributes:
    num_channels: output width (even).
    scale: standard deviation of the frequencies (16 in NCSN++ / EDM).
    seed: numpy seed of the frequencies; part of the architecture, keep it fixed.
    freqs: explicit frequencies ω (num_channels // 2 floats), e.g. a published network's buffer;
      None draws them from `seed`.
  """

  num_channels: int
  scale: float = 16.0
  seed: int = 0
  freqs: Optional[Sequence[float]] = None

  def __call__(self, x: Array) -> Array:
    """Maps [B] to [B, num_channels] float32."""
    if self.freqs is None:
      omega = fourier_frequencies(self.num_channels, self.scale, self.seed)
    else:
      omega = np.asarray(self.freqs, np.float32)
      if omega.shape != (self.num_channels // 2,):
        raise ValueError(f'FourierEmbedding of {self.num_channels} channels needs '
                         f'{self.num_channels // 2} frequencies, got {omega.size}.')
    freqs = 2 * np.pi * omega
    arg = jnp.asarray(x, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


def conditioning_labels(class_labels, label_dim: int, batch: int, *, label_dropout: float = 0.0,
                        dropout_key=None) -> jax.Array:
  """The class labels a conditional network embeds: checked, float32, with label dropout.

  Args:
    class_labels: one-hot [B, label_dim], or None for the null (all-zero) label that label dropout
      substitutes and classifier-free guidance conditions on.
    label_dim: the number of classes.
    batch: B.
    label_dropout: probability of replacing a label by the null label (training only: pass a key).
    dropout_key: PRNG key of the dropout; None applies no dropout (evaluation).

  Returns:
    float32 [B, label_dim].

  Raises:
    ValueError: in one sentence, for labels of another shape.
  """
  if class_labels is None:
    return jnp.zeros((batch, label_dim), jnp.float32)
  if class_labels.shape != (batch, label_dim):
    raise ValueError(f'class_labels must be one-hot of shape [{batch}, {label_dim}], got '
                     f'{tuple(class_labels.shape)}; use jax.nn.one_hot(labels, {label_dim}).')
  labels = jnp.asarray(class_labels, jnp.float32)
  if dropout_key is not None and label_dropout:
    labels = labels * (jax.random.uniform(dropout_key, (batch, 1)) >= label_dropout)
  return labels
