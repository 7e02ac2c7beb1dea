"""What every converter shares: the config of a converted run, the dataset it names, and writing it.

A converted checkpoint becomes an ordinary diffjax run: `config.json` (what `diffjax.load`,
sample.py, evaluate.py and distill.py read), one verified Orbax checkpoint at step 0 whose params and
EMA params are both the published (EMA) weights, and `convert.json`, a record of where the weights
came from. Before anything is written the converted parameter tree is checked against the network
the config builds, name by name and shape by shape, so a mapping error fails here with the name of
the first parameter that differs instead of surfacing as noise in samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from diffjax import build, runs
from diffjax import state as state_lib
from diffjax.precond import Denoiser

log = logging.getLogger(__name__)

PROVENANCE_FILE = 'convert.json'

# Registered datasets a converted run names when several have the right shape and classes: the
# sets the published models were trained on first (unconditional ImageNet-64 before FFHQ, as
# improved-diffusion's unconditional 64² model is the better-known one).
_DATASET_ORDER = ('cifar10', 'imagenet64', 'downsampled_imagenet64', 'ffhq64', 'afhqv2_64',
                  'celeb_a', 'digits', 'digits16')


class ConversionError(ValueError):
  """A checkpoint cannot be converted as asked; the message says what to change."""


def base_config() -> ml_collections.ConfigDict:
  """The fields of every diffjax run (configs/common.base_config), for a run made by conversion.

  Kept in step with `configs/common.py` (a test compares the keys): the library cannot import the
  repository's configs package. Training fields keep their defaults so that train.py can
  fine-tune a converted run; augmentation is off because a published network is sampled without
  augmentation labels.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(
      {'name': 'cifar10', 'data_dir': '', 'conditional': True, 'x_flip': False,
       'skip_bad_images': False})
  c.model = ml_collections.ConfigDict()
  c.model.preset = 'ddpmpp_cifar10'
  c.model.kwargs = ml_collections.ConfigDict({'dropout': 0.0, 'label_dropout': 0.0,
                                              'dtype': 'float32'})
  c.model.remat = 'none'
  c.precond = ml_collections.ConfigDict({'name': 'edm', 'kwargs': {'sigma_data': 0.5}})
  c.loss = ml_collections.ConfigDict({'name': 'edm', 'kwargs': {'p_mean': -1.2, 'p_std': 1.2,
                                                                'sigma_data': 0.5}})
  c.augment = ml_collections.ConfigDict({'p': 0.0})
  c.optim = ml_collections.ConfigDict({'lr': 1e-3, 'b1': 0.9, 'b2': 0.999, 'eps': 1e-8,
                                       'lr_rampup_images': 10e6, 'grad_clip': 0.0})
  c.train = ml_collections.ConfigDict({
      'batch_size': 512, 'total_images': 200e6, 'ema_halflife_images': 0.5e6,
      'ema_rampup_ratio': 0.05, 'log_every': 100, 'checkpoint_every': 5000,
      'keep_checkpoints': 3, 'sample_every': 10000, 'num_preview': 64,
      'skip_nonfinite': False, 'compute_dtype': 'float32', 'loss_scale_init': 2.0**15,
      'loss_scale_period': 2000})
  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = 'heun'
  c.sample.num_steps = 18
  c.sample.kwargs = ml_collections.ConfigDict({'s_churn': 0.0, 's_tmin': 0.0,
                                               's_tmax': float('inf'), 's_noise': 1.0})
  c.sample.guidance = 0.0
  return c


def discrete_parts(c: ml_collections.ConfigDict, *, beta_schedule: str, num_timesteps: int,
                   rescale_timesteps: bool, variance: str, loss_type: str, clip_denoised: bool,
                   sample_steps: int, predict_xstart: bool = False) -> None:
  """Sets an ε-model's (or with predict_xstart an x_0-model's) 'ddpm' preconditioning, loss and
  ancestral sampler (as configs/iddpm.py)."""
  c.precond.name = 'ddpm'
  c.precond.kwargs = {'beta_schedule': beta_schedule, 'num_timesteps': int(num_timesteps),
                      'rescale_timesteps': bool(rescale_timesteps)}
  if predict_xstart:
    c.precond.kwargs.predict_xstart = True
  c.loss.name = 'ddpm'
  c.loss.kwargs = {'loss_type': loss_type, 'variance': variance, 'vlb_weight': 0.001,
                   'schedule_sampler': 'uniform'}
  c.model.out_channel_mult = 2 if variance == 'learned' else 1
  c.sample.sampler = 'ddpm'
  c.sample.num_steps = int(sample_steps)
  c.sample.kwargs = {'variance': variance, 'clip_denoised': bool(clip_denoised)}


# ------------------------------------------------------------------------------------------------
# The dataset a converted run names.


def _squash(text: str) -> str:
  return re.sub(r'[^a-z0-9]', '', text.lower())


def choose_dataset(resolution: int, channels: int, label_dim: int, *,
                   dataset: Optional[str] = None, hints: Iterable[str] = ()) -> str:
  """The registered dataset a converted network's run names (its shape, classes and FID stats).

  Args:
    resolution, channels: the network's image size and channels.
    label_dim: its number of classes (0 = unconditional).
    dataset: a name the user asked for; checked against the network.
    hints: text that may name the training set (e.g. EDM's dataset path 'cifar10-32x32.zip').

  Returns:
    A registered dataset name whose images have the network's shape and, for a conditional
    network, exactly its number of classes; when none has, the generic name of that shape
    ('images256x256x3', 'images128x128x3_1000classes': `data.generic_spec`).

  Raises:
    ConversionError: the named dataset does not fit, or none registered does.
  """
  from diffjax import data  # imports TensorFlow Datasets: only a conversion needs it

  def fits(spec) -> bool:
    return (spec.resolution == resolution and spec.channels == channels and
            (label_dim == 0 or spec.num_classes == label_dim))

  shape = f'{resolution}×{resolution}×{channels}' + (f' with {label_dim} classes' if label_dim
                                                      else '')
  if dataset:
    spec = data.get_dataset_spec(dataset)
    if not fits(spec):
      raise ConversionError(
          f'Dataset {dataset!r} has {spec.resolution}×{spec.resolution}×{spec.channels} images and '
          f'{spec.num_classes} classes but the network takes {shape}; name a dataset that matches.')
    return dataset
  specs = [data.get_dataset_spec(n) for n in data.list_datasets()]
  candidates = [s for s in specs if s.num_classes is not None and fits(s)]
  if not candidates:
    # A shape-only name (data.generic_spec): sampling needs no data, FID a reference the user
    # passes (e.g. openai's reference batch); a registered dataset can still be named instead.
    generic = f'images{resolution}x{resolution}x{channels}' + (f'_{label_dim}classes' if label_dim
                                                               else '')
    if channels in (1, 3):
      log.info('No registered dataset has %s images; the run names the generic %s.', shape,
               generic)
      return generic
    raise ConversionError(
        f'No registered dataset has {shape} images, and diffjax images have 1 or 3 channels; '
        'register one (diffjax.data.register_dataset) and pass dataset=NAME.')
  squashed = [_squash(h) for h in hints if h]

  def rank(spec) -> Tuple:
    named = any(_squash(spec.name) in h for h in squashed)
    order = _DATASET_ORDER.index(spec.name) if spec.name in _DATASET_ORDER else len(_DATASET_ORDER)
    return (not named, label_dim == 0 and spec.num_classes != 0, order, spec.name)

  return min(candidates, key=rank).name


# ------------------------------------------------------------------------------------------------
# Parameters.


def unflatten(flat: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """{'a/b/kernel': x} -> {'a': {'b': {'kernel': x}}}."""
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _flat_shapes(tree, prefix: str = '') -> Dict[str, Tuple[int, ...]]:
  out: Dict[str, Tuple[int, ...]] = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(_flat_shapes(value, path + '/'))
    else:
      out[path] = tuple(value.shape)
  return out


def check_params(flat: Mapping[str, np.ndarray], expected, sources: Mapping[str, str],
                 network_name: str, hint=lambda source: '') -> None:
  """Fails with one sentence on the first parameter the converted tree and the network disagree on.

  Args:
    flat: converted parameters, flax path -> array.
    expected: the network's parameter tree (arrays or ShapeDtypeStructs).
    sources: flax path -> the checkpoint's name of that tensor (for messages).
    network_name: e.g. "diffjax's ADMUNet".
    hint: source name -> a clause naming the flag that likely sets its shape ('' if none).
  """
  want = _flat_shapes(expected)
  # In the checkpoint's own order, so "the first tensor that differs" is the one a reader of its
  # layout would meet first (flax sorts its tree by name).
  for path, value in flat.items():
    if path in want and tuple(value.shape) != want[path]:
      source = sources.get(path, path)
      raise ConversionError(
          f'Checkpoint tensor {source} does not fit {network_name}: as {path} it has shape '
          f'{tuple(value.shape)} where the network has {want[path]}{hint(source)}.')
  for path, shape in want.items():
    if path not in flat:
      raise ConversionError(
          f'The checkpoint has no tensor for {network_name} parameter {path} {shape}; the '
          'architecture options do not describe this checkpoint.')
  extra = [p for p in flat if p not in want]
  if extra:
    raise ConversionError(
        f'Checkpoint tensor {sources.get(extra[0], extra[0])} has no place in {network_name} '
        f'({len(extra)} such tensors); the architecture options do not describe this checkpoint.')


def expected_params(config) -> Tuple[Any, Any]:
  """(the network the config builds, its parameter tree of ShapeDtypeStructs)."""
  spec = build.dataset_spec(config)
  network = build.build_network(config, spec)
  shapes = jax.eval_shape(lambda: build.init_params(network, spec, jax.random.key(0)))
  return network, shapes


# ------------------------------------------------------------------------------------------------
# Writing the run.


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def _check_workdir(workdir: str) -> None:
  if os.path.exists(os.path.join(workdir, runs.CONFIG_FILE)) or os.path.isdir(
      os.path.join(workdir, runs.CHECKPOINT_DIR)):
    raise ConversionError(
        f'{workdir} already holds a diffjax run; pass a new or empty --workdir for the conversion.')


def _jsonable(value):
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value if isinstance(value, (str, int, float, bool)) or value is None else repr(value)


@dataclasses.dataclass
class Conversion:
  """A checkpoint read and mapped onto diffjax, not yet written: what every converter returns.

  Attributes:
    config: the converted run's config.
    flat: parameters, flax path -> float array.
    sources: flax path -> the checkpoint's name of that tensor (for messages).
    network_name: how errors name the network, e.g. "diffjax's SongUNet".
    provenance: what convert.json records (source, format, options).
    hint: source tensor name -> a clause naming the option that likely sets its shape.
  """
  config: ml_collections.ConfigDict
  flat: Dict[str, np.ndarray]
  sources: Dict[str, str]
  network_name: str
  provenance: Dict[str, Any]
  hint: Callable[[str], str] = lambda source: ''

  def params(self) -> Dict[str, Any]:
    """The checked float32 parameter tree of the config's network.

    Raises:
      ConversionError: naming the first tensor the checkpoint and the network disagree on.
    """
    _, expected = expected_params(self.config)
    check_params(self.flat, expected, self.sources, self.network_name, self.hint)
    # np.array, not np.ascontiguousarray, which makes EDM2's scalar gains [1].
    return unflatten({k: np.array(v, dtype=np.float32, order='C') for k, v in self.flat.items()})

  def denoiser(self) -> Tuple[Denoiser, Dict[str, Any]]:
    """(the converted run's `Denoiser`, its params), in memory: `denoiser.bind(params, labels)`."""
    params = self.params()
    return build.build_denoiser(self.config, build.dataset_spec(self.config)), params

  def write(self, workdir: str) -> str:
    """Checks the parameters against the config's network and writes the run.

    The checkpoint is written first and config.json last (atomically), so an interrupted
    conversion never leaves something that looks like a finished run.

    Args:
      workdir: the new run's directory (created; must not hold a run already).

    Returns:
      The run's absolute directory.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    _check_workdir(workdir)
    params = self.params()
    config = self.config
    spec = build.dataset_spec(config)
    denoiser = build.build_denoiser(config, spec)
    tx = build.build_optimizer(config)
    objective = build.build_objective(config, spec, denoiser)
    # The published weights are an EMA; they are both the params (so train.py fine-tunes from
    # them) and the EMA params (what every sampler reads). One jit: built eagerly, the copies and
    # the optimizer's zeros are hundreds of separately compiled ops (4 s for a tiny network).
    state = jax.jit(lambda p, extra: state_lib.create_train_state(p, tx, extra))(
        params, objective.init_extra())
    checkpointer = runs.checkpoint.Checkpointer(os.path.join(workdir, runs.CHECKPOINT_DIR),
                                                max_to_keep=1, async_save=False)
    try:
      checkpointer.save(0, state)
      checkpointer.wait()
    finally:
      checkpointer.close()
    with open(os.path.join(workdir, PROVENANCE_FILE), 'w') as f:
      json.dump(_jsonable(dict(self.provenance, dataset=config.data.name)), f, indent=2)
    runs.save_config(config, workdir)
    log.info('Wrote %s (dataset %s, %d parameters).', workdir, config.data.name,
             sum(int(np.prod(v.shape)) for v in self.flat.values()))
    return workdir


def as_list(value: Sequence) -> list:
  """A tuple/list of numbers as a JSON-friendly list of Python numbers."""
  return [v.item() if isinstance(v, np.generic) else v for v in value]
