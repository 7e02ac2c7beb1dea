"""The workdir is the run: its config.json, its checkpoints, and `load` of a trained run.

`save_config`/`read_config` write and read the config a run was started with (what resumes,
`load`, sample.py and evaluate.py read back); `load(workdir)` rebuilds the parts from it through
`diffjax.build` and restores the newest checkpoint that verifies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from diffjax import build
from diffjax import precond as precond_lib
from diffjax import state as state_lib
from diffjax.runs import checkpoint as ckpt_lib
from diffjax.runs import files

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'


def save_config(config, workdir: files.PathLike) -> None:
  """Writes config.json into the workdir (what `load` and resumes read back).

  Args:
    config: the run's ConfigDict.
    workdir: a local path or a URL such as gs://bucket/run (through etils.epath).
  """
  root = files.path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  # Atomic: a run killed mid-write must not leave a truncated config.json.
  files.write_atomic(root / CONFIG_FILE, config.to_json_best_effort(indent=2))


def read_config(workdir: files.PathLike) -> ml_collections.ConfigDict:
  """The config.json of a run's workdir (local path or URL), with its missing fields dealt with.

  A field missing inside a section (an older diffjax wrote the file, or it was edited) is filled
  from `FILLED_DEFAULTS` with a warning where nothing saved depends on it (sampling defaults, the
  optimizer's hyperparameters, memory and data-location settings), and refused in one sentence
  (`MissingConfigField`) where the checkpoints do (`REQUIRED_FIELDS`: the network, the
  preconditioning, the loss, the data). Missing sections are left to `check_run_config`, and a
  distillation root's config (no model of its own) is returned as it is.

  Raises:
    FileNotFoundError: no config.json there.
    MissingConfigField: a field the checkpoints depend on is missing.
  """
  path = files.path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f'{workdir} is not a diffjax run (no {CONFIG_FILE}); pass the --workdir of a train.py run.')
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  if not _is_distill_root(config):
    _complete(config, os.fspath(path))
  return config


# Fields a checkpoint depends on (its network's shape and meaning, what it was trained on): a
# config.json without one cannot be rebuilt from, and is refused.
REQUIRED_FIELDS = ('data.name', 'data.conditional', 'model.preset', 'model.kwargs',
                   'precond.name', 'precond.kwargs', 'loss.name', 'loss.kwargs', 'augment.p',
                   'train.batch_size')

# Fields nothing saved depends on, filled (with a warning) when a config.json lacks them: what
# configs/common.base_config gives every run (a test keeps the two in step).
FILLED_DEFAULTS = {
    'data.data_dir': '', 'data.x_flip': False, 'data.skip_bad_images': False,
    'model.remat': 'none',
    'optim.lr': 1e-3, 'optim.b1': 0.9, 'optim.b2': 0.999, 'optim.eps': 1e-8,
    'optim.lr_rampup_images': 10e6, 'optim.grad_clip': 0.0,
    'train.compute_dtype': 'float32',
    'sample.sampler': 'heun', 'sample.num_steps': 18,
    'sample.kwargs': {'s_churn': 0.0, 's_tmin': 0.0, 's_tmax': float('inf'), 's_noise': 1.0},
    'sample.guidance': 0.0,
}


class MissingConfigField(KeyError):
  """A run's config.json lacks a field its checkpoints depend on (the message says which)."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else super().__str__()


_warned: set = set()  # (file, field) already warned about in this process


def _complete(config, where: str) -> None:
  """Fills `FILLED_DEFAULTS` missing from `config`'s sections (warning once per file and field)
  and refuses a missing `REQUIRED_FIELDS` one; sections that are missing are left as they are."""

  def section(key: str):
    node = config.get(key.split('.')[0])
    return node if hasattr(node, 'keys') else None

  missing = [k for k in REQUIRED_FIELDS
             if section(k) is not None and k.split('.')[1] not in section(k)]
  if missing:
    them, values = ('them', 'values') if len(missing) > 1 else ('it', 'value')
    raise MissingConfigField(
        f'{where} has no {", ".join(missing)}; it was written by an older diffjax or edited, and '
        f'the run\'s checkpoints depend on {them}: add {them} with the {values} the run was '
        'trained with (its configs/FILE.py preset), or train a new run.')
  filled = []
  for key, value in FILLED_DEFAULTS.items():
    node, name = section(key), key.split('.')[1]
    if node is not None and name not in node:
      node[name] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
      if (where, key) not in _warned:
        _warned.add((where, key))
        filled.append(f'{key}={value!r}')
  if filled:
    log.warning('%s has no %s; it was written by an older diffjax or edited: using the default%s '
                '(add the key%s to it to keep another value).', where, ', '.join(filled),
                's' if len(filled) > 1 else '', 's' if len(filled) > 1 else '')


def _is_distill_root(config) -> bool:
  """True for distill.py's WORKDIR config (the pipeline's, not a model's: its runs are stages)."""
  return 'distill' in config and 'stage' not in config.distill


# The sections `load` and sample.py read (configs/common.base_config has them all).
RUN_SECTIONS = ('data', 'model', 'precond', 'loss', 'augment', 'optim', 'train', 'sample')


def check_run_config(config, workdir: str) -> None:
  """Raises one sentence unless `config` (WORKDIR/config.json) is a trained run's.

  A distillation root (distill.py's WORKDIR) holds the pipeline's config, not a model: its runs
  are its stage folders (`training.distill.plan`), and the sentence lists those there.
  """
  if _is_distill_root(config):
    root = files.path(workdir)
    stages = sorted((d.name for d in root.iterdir() if (d / CONFIG_FILE).is_file()),
                    key=_stage_order)
    listed = (f'pass one of its stage folders, e.g. --workdir={os.path.join(workdir, stages[-1])} '
              f'(stages: {", ".join(stages)})' if stages else
              'no stage has been trained yet; run distill.py first, then pass a stage folder '
              '(WORKDIR/round_<k>_<N>steps)')
    raise ValueError(f'{workdir} is a distillation root (distill.py\'s WORKDIR), not a trained '
                     f'run; {listed}.')
  missing = [name for name in RUN_SECTIONS if not hasattr(config.get(name), 'keys')]
  if missing:
    raise ValueError(f'{os.path.join(workdir, CONFIG_FILE)} has no {", ".join(missing)} '
                     f'section{"s" if len(missing) > 1 else ""}, which every run\'s config has; '
                     'restore it from the config the run was trained with (configs/FILE.py).')


def _stage_order(name: str) -> tuple:
  """Stage folders in training order: teacher, stage1, round_1…, encoder_round_1…."""
  head = {'teacher': 0, 'stage1': 1}.get(name, 3 if name.startswith('encoder_') else 2)
  digits = ''.join(c if c.isdigit() else ' ' for c in name).split()
  return head, int(digits[0]) if digits else 0, name


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
    return build.num_classes(self.config, self.spec)

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
  config = read_config(workdir)
  check_run_config(config, workdir)
  spec = build.dataset_spec(config)
  denoiser = build.build_denoiser(config, spec)
  tx = build.build_optimizer(config)

  objective = build.build_objective(config, spec, denoiser)

  def make_state():
    params = build.init_params(denoiser.network, spec, jax.random.key(0))
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
