"""The Objective protocol: what every paper's training loss is to the one train step.

An objective is a loss of (params, batch, key, extra) plus, optionally, its own training state
(`extra`, e.g. iDDPM's loss history), which the train state checkpoints and resumes with the params.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp


class Objective(NamedTuple):
  """A training objective.

  Attributes:
    loss: (params, batch, key, extra) -> (scalar loss, aux); `extra` is the objective's own
      training state (e.g. a loss history), aux any pytree of arrays.
    init_extra: () -> the initial extra state (a pytree of arrays; {} when there is none). It is
      part of TrainState, so it is checkpointed and resumed with the params.
    update_extra: (extra, aux) -> extra after each step; aux comes from the whole global batch, so
      the result is identical on every device and host.
  """
  loss: Callable
  init_extra: Callable[[], Any] = dict
  update_extra: Callable[[Any, Any], Any] = lambda extra, aux: extra


def as_objective(objective) -> Objective:
  """Accepts an Objective or a plain `loss_fn(params, batch, key) -> (loss, aux)`."""
  if isinstance(objective, Objective):
    return objective
  return Objective(loss=lambda params, batch, key, extra: objective(params, batch, key))


def one_hot_labels(batch, num_classes: int) -> Optional[jax.Array]:
  """The batch's class labels one-hot [B, num_classes] float32, or None for an unconditional model."""
  if num_classes <= 0:
    return None
  return jax.nn.one_hot(batch['label'], num_classes, dtype=jnp.float32)


def conditioned_batch(batch, key, *, num_classes: int = 0, augment_fn: Optional[Callable] = None):
  """What every image objective feeds its network: (images, class labels, augmentation labels).

  Args:
    batch: {'image': [B, H, W, C], 'label': int [B]}.
    key: the augmentation's key (unused without `augment_fn`).
    num_classes: > 0 for a class-conditional network (one-hot labels), else labels are None.
    augment_fn: (key, images) -> (augmented images, augment_labels [B, A]), or None.

  Returns:
    (images [B, H, W, C], class_labels [B, num_classes] or None, augment_labels [B, A] or None).
  """
  images, augment_labels = batch['image'], None
  if augment_fn is not None:
    images, augment_labels = augment_fn(key, images)
  return images, one_hot_labels(batch, num_classes), augment_labels
