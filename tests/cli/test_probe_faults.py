"""Issue 20's probe faults 4 and 5 as real processes: one `error:` line, exit 2, no traceback.

A distillation root given to sample.py and evaluate.py, and a sampler that does not fit the model
(train.py, before it trains); the other bad inputs of these kinds are tested through the Python
API (tests/sampling/test_sampler_fit.py, tests/data/test_image_folder_faults.py). None of these
reads weights, so no run is trained: the workdirs hold only config.json files, and must be left as
they were.
"""

import concurrent.futures
import os
import re

import forkserver
import pytest

from configs import distill as distill_configs
from configs import edm as edm_configs
from diffjax import runs

STAGES = ('teacher', 'round_1_4steps', 'round_2_2steps', 'round_3_1steps')


@pytest.fixture(scope='module')
def paths(tmp_path_factory):
  root = tmp_path_factory.mktemp('probe')
  p = {name: str(root / name) for name in ('distill', 'new')}
  runs.save_config(distill_configs.get_config('tiny'), p['distill'])
  for stage in STAGES[::-1]:  # listed in training order whatever the directory order
    runs.save_config(edm_configs.get_config('tiny'), os.path.join(p['distill'], stage))
  return p


CASES = [
    ('sample-distill-root', 'sample.py', lambda p: [f'--workdir={p["distill"]}'],
     r"is a distillation root \(distill\.py's WORKDIR\), not a trained run; pass one of its stage "
     r'folders, e\.g\. --workdir=.*/round_3_1steps \(stages: ' + ', '.join(STAGES) + r'\)\.$'),
    ('evaluate-distill-root', 'evaluate.py', lambda p: ['digits', f'--workdir={p["distill"]}'],
     r'is a distillation root .*pass one of its stage folders'),
    ('train-sampler-does-not-fit', 'train.py', lambda p: [
        '--config=configs/edm.py:tiny', '--config.sample.sampler=ddpm', f'--workdir={p["new"]}',
        '--no_progress'],
     r"Sampler 'ddpm' does not fit this model \(the DDPM samplers need a discrete model .*"
     r'--config\.sample\.sampler=NAME \(train\.py\)\.$'),
]


def _tree(root):
  return {os.path.join(d, f): open(os.path.join(d, f), 'rb').read()
          for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope='module')
def results(paths):
  server = forkserver.get()
  before = {name: _tree(paths[name]) for name in ('distill',)}
  env = forkserver.child_env()  # no case reads data
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    children = dict(zip([c[0] for c in CASES], pool.map(
        lambda case: server.run(case[1], case[2](paths), env=env, timeout=300), CASES)))
  return children, before


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_probe_fault(case, results, paths):
  children, before = results
  child = children[case[0]]
  lines = [line for line in child.stderr.splitlines() if line.strip()]
  assert 'Traceback' not in child.stderr, child.stderr[-3000:]
  assert lines and lines[-1].startswith('error: '), child.stderr[-3000:]
  assert re.search(case[3], lines[-1]), lines[-1]
  assert child.rc == 2, child.stderr[-3000:]
  print(f'\n{case[0]}: {lines[-1]}')
  for name, files in before.items():  # nothing written, nothing lost
    assert _tree(paths[name]) == files, name
  assert not os.path.exists(paths['new'])
