"""A field missing inside a section of a run's config.json (an older diffjax wrote it, or it was
edited): filled from the defaults with a warning where nothing saved depends on it, and one
sentence naming the file, the fields and what to do where the checkpoints do — from sample.py,
evaluate.py and a train.py resume alike (real processes, no traceback)."""

import json
import logging
import os

import forkserver
import ml_collections
import numpy as np
import pytest

from configs import common
from configs import edm as edm_configs
from diffjax import build, runs
from diffjax.runs import run as run_lib

TINY = ['--config=configs/edm.py:tiny', '--config.train.batch_size=8',
        '--config.train.num_preview=0', '--no_progress']


def _drop(workdir, *keys):
  """Deletes `section.field` keys from WORKDIR/config.json; returns the file's path."""
  path = os.path.join(workdir, runs.CONFIG_FILE)
  config = json.load(open(path))
  for key in keys:
    section, name = key.split('.')
    del config[section][name]
  with open(path, 'w') as f:
    json.dump(config, f)
  return path


def test_the_field_tables_match_the_base_config():
  """What is filled is what configs/common gives every run; what is required, every run has."""
  base = common.base_config()
  for key, value in run_lib.FILLED_DEFAULTS.items():
    got = base[key.split('.')[0]][key.split('.')[1]]
    assert (got.to_dict() if isinstance(got, ml_collections.ConfigDict) else got) == value, key
  for key in run_lib.REQUIRED_FIELDS:
    assert key.split('.')[1] in base[key.split('.')[0]], key
  assert not set(run_lib.FILLED_DEFAULTS) & set(run_lib.REQUIRED_FIELDS)


def test_a_missing_sampling_field_is_filled_with_one_warning(tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  runs.save_config(edm_configs.get_config('tiny'), workdir)
  path = _drop(workdir, 'sample.num_steps', 'optim.b1')
  with caplog.at_level(logging.WARNING, logger=run_lib.__name__):
    config = runs.read_config(workdir)
    runs.read_config(workdir)  # warned once per file and field
  assert (config.sample.num_steps, config.optim.b1) == (18, 0.9)
  warnings = [r.getMessage() for r in caplog.records]
  assert warnings == [f'{path} has no optim.b1=0.9, sample.num_steps=18; it was written by an older '
                      'diffjax or edited: using the defaults (add the keys to it to keep another '
                      'value).']
  build.sampler_fn(config, build.build_precond(config))  # usable as it is
  build.build_optimizer(config)


def test_a_missing_field_the_checkpoints_depend_on_is_one_sentence(tmp_path):
  """sample.py, evaluate.py digits and fid, and a train.py resume: real processes, exit 2, the
  one sentence, no traceback, nothing written."""
  workdir = str(tmp_path / 'run')
  runs.save_config(edm_configs.get_config('tiny'), workdir)
  path = _drop(workdir, 'model.preset', 'precond.kwargs')
  # A committed checkpoint step makes train.py's run a resume, which reads config.json back.
  # (Its contents do not matter: the config is refused before anything is restored.)
  checkpointer = runs.checkpoint.Checkpointer(os.path.join(workdir, runs.CHECKPOINT_DIR))
  checkpointer.save(1, {'w': np.zeros(2, np.float32)})
  checkpointer.close()
  with pytest.raises(run_lib.MissingConfigField, match=r'has no model\.preset, precond\.kwargs'):
    runs.load(workdir)
  before = sorted(os.listdir(workdir))
  server, env = forkserver.get(), forkserver.child_env()
  commands = [('sample.py', [f'--workdir={workdir}', '--seeds=0-3']),
              ('evaluate.py', ['digits', f'--workdir={workdir}']),
              ('evaluate.py', ['fid', f'--workdir={workdir}', '--ref=digits:test']),
              ('train.py', TINY + [f'--workdir={workdir}'])]
  children = [server.spawn(script, argv, env=env) for script, argv in commands]
  sentence = (f'error: {path} has no model.preset, precond.kwargs; it was written by an older '
              "diffjax or edited, and the run's checkpoints depend on them: add them with the "
              'values the run was trained with (its configs/FILE.py preset), or train a new run.')
  for (script, argv), child in zip(commands, children):
    assert child.wait(120) == 2, (script, argv, child.stderr[-3000:])
    assert child.stderr.strip().splitlines()[-1] == sentence, (script, argv, child.stderr[-3000:])
    assert 'Traceback' not in child.stderr
  assert sorted(os.listdir(workdir)) == before  # nothing written
