"""The one place a config becomes parts: network, preconditioning, loss, optimizer, data, sampler.

Every entry point (train.py, sample.py, evaluate.py) and `diffjax.load(workdir)` go through these
functions, so a config means the same thing everywhere. Parts are looked up by name in the generic
registry (`diffjax.registry`); an unknown name fails with the list of known ones. Networks receive
typed keyword arguments, never the config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from diffjax import losses as losses_lib
from diffjax import losses_ddpm  # noqa: F401  (registers the 'ddpm' loss and precond)
from diffjax import precond as precond_lib
from diffjax import samplers as samplers_lib
from diffjax.training import state as state_lib

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'


def _kwargs(node) -> dict:
  """A ConfigDict (or None) as a plain dict of keyword arguments."""
  if node is None:
    return {}
  return node.to_dict() if hasattr(node, 'to_dict') else dict(node)


def dataset_spec(config):
  """The registered dataset's spec (resolution, channels, classes)."""
  from diffjax import data  # TensorFlow is imported only when data is needed.
  return data.get_dataset_spec(config.data.name, data_dir=config.data.data_dir or None)


def num_classes(config, spec) -> int:
  """Label dimension the network is conditioned on: the dataset's classes, or 0 if unconditional."""
  return int(spec.num_classes) if config.data.conditional else 0


def build_network(config, spec):
  """The Flax network of config.model (a preset plus keyword overrides) for this dataset."""
  from diffjax import models
  kwargs = _kwargs(config.model.get('kwargs'))
  if 'dtype' in kwargs and isinstance(kwargs['dtype'], str):
    kwargs['dtype'] = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[kwargs['dtype']]
  out_channels = spec.channels * int(config.model.get('out_channel_mult', 1))
  return models.create_network(
      config.model.preset, img_resolution=spec.resolution, in_channels=spec.channels,
      out_channels=out_channels, label_dim=num_classes(config, spec),
      augment_dim=9 if config.augment.p > 0 else int(config.model.get('augment_dim', 0)), **kwargs)


def build_precond(config) -> precond_lib.Preconditioning:
  return precond_lib.get_preconditioning(config.precond.name, **_kwargs(config.precond.kwargs))


def build_loss(config) -> losses_lib.DenoisingLoss:
  return losses_lib.get_loss(config.loss.name, **_kwargs(config.loss.kwargs))


def build_objective(config, spec, denoiser: precond_lib.Denoiser):
  """The `training.step.Objective` of config.loss.

  A registered loss either is a `losses.DenoisingLoss` (the EDM family) or provides
  `objective(denoiser, num_classes=..., augment_fn=...)` itself (other papers' losses).
  """
  from diffjax.training import step as step_lib
  loss = build_loss(config)
  kwargs = dict(num_classes=num_classes(config, spec), augment_fn=build_augment(config))
  if isinstance(loss, losses_lib.DenoisingLoss):
    return step_lib.denoising_objective(denoiser, loss, **kwargs)
  return step_lib.as_objective(loss.objective(denoiser, **kwargs))


def build_denoiser(config, spec) -> precond_lib.Denoiser:
  return precond_lib.Denoiser(build_network(config, spec), build_precond(config))


def build_optimizer(config):
  o = config.optim
  return state_lib.make_optimizer(
      o.lr, config.train.batch_size, rampup_images=o.lr_rampup_images, b1=o.b1, b2=o.b2,
      eps=o.eps, grad_clip=o.grad_clip)


def build_augment(config) -> Optional[Callable]:
  """EDM's non-leaking augmentation with probability config.augment.p, or None when p = 0."""
  if config.augment.p <= 0:
    return None
  from diffjax.data import augment as augment_lib
  p = float(config.augment.p)
  return lambda key, images: augment_lib.augment(key, images, p=p)


def init_params(network, spec, key, batch: int = 1) -> Any:
  """Initializes the network's parameters with one jitted `init` (eager init is very slow)."""
  x = jnp.zeros((batch, spec.resolution, spec.resolution, spec.channels), jnp.float32)
  noise = jnp.zeros((batch,), jnp.float32)
  labels = jnp.zeros((batch, network.label_dim), jnp.float32) if network.label_dim else None
  aug = jnp.zeros((batch, network.augment_dim), jnp.float32) if network.augment_dim else None
  init = jax.jit(lambda k: network.init({'params': k}, x, noise, labels, aug, train=False))
  return init(key)['params']


def sampler_fn(config, precond, sampler: Optional[str] = None, num_steps: Optional[int] = None,
               **overrides) -> Callable:
  """(denoise_fn, latents, keys) -> images for config.sample (or the given overrides)."""
  name = sampler or config.sample.sampler
  fn = samplers_lib.get_sampler(name)
  kwargs = _kwargs(config.sample.get('kwargs')) if name == config.sample.sampler else {}
  kwargs.update(overrides)
  steps = int(config.sample.num_steps if num_steps is None else num_steps)
  if steps < 1:
    raise ValueError(f'The number of sampling steps must be at least 1, got {steps}; pass '
                     '--steps=N with N >= 1 (or leave it out for the config\'s).')
  return lambda denoise_fn, latents, keys: fn(denoise_fn, latents, keys, precond=precond,
                                              num_steps=steps, **kwargs)


def save_config(config, workdir: str) -> None:
  """Writes config.json into the workdir (what `load` and resumes read back)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  # Written aside and renamed: a run killed mid-write must not leave a truncated config.json.
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{workdir} is not a diffjax run (no {CONFIG_FILE}); pass the --workdir of a train.py run.')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


@dataclasses.dataclass
class Run:
  """A trained run, ready to sample from Python.

  Attributes:
    config: the run's config.
    step: the checkpoint step that was restored.
    params, ema_params: the network's raw and EMA parameters.
    denoiser: the preconditioned network.
    spec: the dataset spec (resolution, channels, classes).
  """
  config: Any
  step: int
  params: Any
  ema_params: Any
  denoiser: precond_lib.Denoiser
  spec: Any

  @property
  def num_classes(self) -> int:
    return num_classes(self.config, self.spec)

  def denoise_fn(self, class_labels=None, ema: bool = True) -> Callable:
    """`denoise_fn(x, sigma)` of the EMA (default) or raw params, for the given class labels.

    Args:
      class_labels: int [B] or one-hot [B, num_classes]; None for an unconditional model.
    """
    params = self.ema_params if ema else self.params
    return self.denoiser.bind(params, self.one_hot(class_labels))

  def one_hot(self, class_labels):
    if class_labels is None:
      return None
    labels = jnp.asarray(class_labels)
    if labels.ndim == 1:
      labels = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)
    return labels


def load(workdir: str, step: Optional[int] = None) -> Run:
  """Loads a trained run: config, EMA params and a ready denoiser (`run.denoise_fn(labels)`).

  Args:
    workdir: the --workdir of a train.py run.
    step: a checkpoint step; the newest one that restores by default.
  """
  from diffjax.training import checkpoint as ckpt_lib
  config = read_config(workdir)
  spec = dataset_spec(config)
  denoiser = build_denoiser(config, spec)
  tx = build_optimizer(config)

  objective = build_objective(config, spec, denoiser)

  def make_state():
    params = init_params(denoiser.network, spec, jax.random.key(0))
    return state_lib.create_train_state(params, tx, objective.init_extra())

  abstract = jax.eval_shape(make_state)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), async_save=False)
  try:
    # An objective may keep state the config cannot rebuild (a distillation round keeps its
    # teacher's params in TrainState.extra): restore `extra` as it was saved.
    saved = checkpointer.saved_structure(step)
    if isinstance(saved, dict) and saved.get('extra'):
      abstract = abstract.replace(extra=saved['extra'])
    state, restored_step = checkpointer.restore(abstract, step)
  finally:
    checkpointer.close()
  return Run(config=config, step=restored_step, params=state.params, ema_params=state.ema_params,
             denoiser=denoiser, spec=spec)
