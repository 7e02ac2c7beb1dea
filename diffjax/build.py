"""The one place a config becomes parts: network, preconditioning, loss, optimizer, data, sampler.

Every entry point (train.py, sample.py, evaluate.py) and `diffjax.load(workdir)` go through these
functions, so a config means the same thing everywhere. Parts are looked up by name in the generic
registry (`diffjax.registry`); an unknown name fails with the list of known ones. Networks receive
typed keyword arguments, never the config.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from diffjax import models
from diffjax import precond as precond_lib
from diffjax import samplers as samplers_lib
from diffjax import state as state_lib
from diffjax.objectives import base as objectives_base
from diffjax.objectives import ddpm as losses_ddpm  # noqa: F401  (registers the 'ddpm' loss and precond)
from diffjax.objectives import edm as losses_lib


def _kwargs(node) -> dict:
  """A ConfigDict (or None) as a plain dict of keyword arguments."""
  if node is None:
    return {}
  return node.to_dict() if hasattr(node, 'to_dict') else dict(node)


def dataset_spec(config):
  """The registered dataset's spec (resolution, channels, classes)."""
  from diffjax import data  # Lazy: tensorflow_datasets loads only when data is read.
  return data.get_dataset_spec(config.data.name, data_dir=config.data.data_dir or None)


def num_classes(config, spec) -> int:
  """Label dimension the network is conditioned on: the dataset's classes, or 0 if unconditional."""
  return int(spec.num_classes) if config.data.conditional else 0


COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def _dtype(name: str, flag: str):
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'Unknown compute dtype {name!r} ({flag}); known: '
                     f'{", ".join(COMPUTE_DTYPES)}.')
  return COMPUTE_DTYPES[name]


def compute_dtype(config) -> str:
  """The name of the run's compute dtype: config.train.compute_dtype, else config.model.kwargs.dtype.

  Parameters, optimizer state and EMA are float32 whatever it is; only the network's activations
  and matmuls use it. The two fields may not name two different non-float32 dtypes.
  """
  train = config.get('train') or {}
  kwargs = _kwargs(config.model.get('kwargs'))
  wanted = str(train.get('compute_dtype', 'float32') or 'float32')
  legacy = kwargs.get('dtype', 'float32')
  legacy = legacy if isinstance(legacy, str) else jnp.dtype(legacy).name
  _dtype(wanted, '--config.train.compute_dtype')
  _dtype(legacy, '--config.model.kwargs.dtype')
  if wanted != 'float32' and legacy != 'float32' and wanted != legacy:
    raise ValueError(f'config.train.compute_dtype={wanted} and config.model.kwargs.dtype={legacy} '
                     'disagree; set only --config.train.compute_dtype.')
  return wanted if wanted != 'float32' else legacy


def build_network(config, spec):
  """The Flax network of config.model (a preset plus keyword overrides) for this dataset.

  Its compute dtype is `compute_dtype(config)`; config.model.remat ('none', 'blocks', 'full')
  rematerializes its blocks in the backward pass (`models.layers.REMAT_POLICIES`).
  """
  kwargs = _kwargs(config.model.get('kwargs'))
  kwargs['dtype'] = COMPUTE_DTYPES[compute_dtype(config)]
  remat = str(config.model.get('remat', 'none') or 'none')
  if remat != 'none':  # Networks built without it keep their defaults (and their hash).
    kwargs['remat'] = remat
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
  """The `objectives.base.Objective` of config.loss.

  A registered loss either is a `losses.DenoisingLoss` (the EDM family) or provides
  `objective(denoiser, num_classes=..., augment_fn=...)` itself (other papers' losses).
  """
  loss = build_loss(config)
  kwargs = dict(num_classes=num_classes(config, spec), augment_fn=build_augment(config))
  if isinstance(loss, losses_lib.DenoisingLoss):
    return losses_lib.denoising_objective(denoiser, loss, **kwargs)
  return objectives_base.as_objective(loss.objective(denoiser, **kwargs))


def build_denoiser(config, spec) -> precond_lib.Denoiser:
  return precond_lib.Denoiser(build_network(config, spec), build_precond(config))


def build_optimizer(config, *, step0: int = 0, images_at_step0: float = 0.0):
  """Adam of config.optim; EDM2's lr decay (optim.lr_decay_images) and forced weight norm.

  step0, images_at_step0: where the lr schedule's image count starts (`state.images_seen`); a
  run resumed with another batch size passes its segment's (`runs.progress`).

  In float16 (`compute_dtype`) the whole chain is wrapped in `state.dynamic_loss_scale`.

  A network class with a `project_params(params) -> params` (EDM2UNet) gets it as the optimizer's
  last link (`state.project_updates`): that is where the train step keeps its stored weights
  projected.
  """
  o = config.optim
  project = getattr(models.network_class(config.model.preset), 'project_params', None)
  tx = state_lib.make_optimizer(
      o.lr, config.train.batch_size, rampup_images=o.lr_rampup_images, b1=o.b1, b2=o.b2,
      eps=o.eps, grad_clip=o.grad_clip, decay_images=float(o.get('lr_decay_images', 0.0)),
      project=project, step0=step0, images_at_step0=images_at_step0)
  if compute_dtype(config) == 'float16':
    # float16 gradients underflow without a loss scale (bfloat16 has float32's exponent range).
    t = config.train
    tx = state_lib.dynamic_loss_scale(tx, init_scale=float(t.get('loss_scale_init', 2.0**15)),
                                      period=int(t.get('loss_scale_period', 2000)))
  return tx


def build_augment(config) -> Optional[Callable]:
  """EDM's non-leaking augmentation with probability config.augment.p, or None when p = 0."""
  if config.augment.p <= 0:
    return None
  # Lazy: tensorflow_datasets loads only when data is read.
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
  """(denoise_fn, latents, keys) -> images for config.sample (or the given overrides).

  A `grid` option (sample.py --grid=NAME) names the σ-grid of a σ-grid sampler (one with a `grid`
  option: heun, euler, the k-diffusion family, unipc, deis); it is checked here, so that a typo or
  a sampler with its own time steps fails in one sentence before any weights are read.
  """
  name = sampler or config.sample.sampler
  fn = samplers_lib.get_sampler(name)
  kwargs = _kwargs(config.sample.get('kwargs')) if name == config.sample.sampler else {}
  kwargs.update(overrides)
  steps = int(config.sample.num_steps if num_steps is None else num_steps)
  if steps < 1:
    raise ValueError(f'The number of sampling steps must be at least 1, got {steps}; pass '
                     '--steps=N with N >= 1 (or leave it out for the config\'s).')
  if kwargs.get('grid') is not None:
    import inspect

    from diffjax import registry
    registry.get('discretization', kwargs['grid'])  # unknown: one sentence with the known grids
    if 'grid' not in inspect.signature(fn).parameters:
      takes = [n for n in samplers_lib.names()
               if 'grid' in inspect.signature(samplers_lib.get_sampler(n)).parameters]
      raise ValueError(f'Sampler {name!r} chooses its own time steps, so --grid does not apply; '
                       f'pick a σ-grid sampler ({", ".join(takes)}) or leave --grid out.')
  check_sampler(config, precond, name, steps, kwargs, [k for k in kwargs if k not in overrides])
  return lambda denoise_fn, latents, keys: fn(denoise_fn, latents, keys, precond=precond,
                                              num_steps=steps, **kwargs)


def check_sampler(config, precond, name: str, num_steps: int, options: dict,
                  config_options=()) -> None:
  """Raises one sentence unless sampler `name` takes `options` and can sample this model.

  Called by `sampler_fn`, so train.py (before its first step), sample.py and evaluate.py (before
  any weights are read) refuse a sampler that does not fit — not after a whole training run.
  `samplers.fit.check` says what is wrong; precond None checks the options only.
  """
  from diffjax.samplers import fit
  # The image shape matters to some samplers (Soft Diffusion's blur); a config without a data
  # section (a bare sampling config) is checked on a small stand-in image.
  shape = dataset_spec(config).shape if precond is not None and 'data' in config else (8, 8, 3)
  fit.check(name, precond, num_steps, options, shape, config_options=config_options)
