"""Bad input ends in one clear sentence, a non-zero exit code, no traceback — and loses nothing.

A table of bad inputs to train.py, sample.py, evaluate.py (each run as a real process, through the
fork server) and to the Python API. Every entry point case must exit with the expected code and
print, as its last stderr line, `error: <what is wrong>; <what to do>` — no traceback unless
--debug — and every workdir it touched must still hold what was saved there before.
"""

import concurrent.futures
import json
import os
import re
import shutil
from typing import Callable, NamedTuple, Optional

import forkserver
import jax.numpy as jnp
import numpy as np
import pytest

from configs import edm as edm_configs
from diffjax import build, registry, runs
from diffjax.runs import checkpoint as ckpt_lib
from diffjax.training import loop

TRAIN = ['--config=configs/edm.py:tiny', '--config.train.batch_size=8',
         '--config.train.total_images=40', '--config.train.checkpoint_every=1',
         '--config.train.log_every=1', '--config.train.num_preview=0', '--no_progress']


def tiny_config():
  c = edm_configs.get_config('tiny')
  c.train.batch_size = 8
  c.train.total_images = 40
  c.train.checkpoint_every = 1
  c.train.log_every = 1
  c.train.num_preview = 0
  return c


class Case(NamedTuple):
  id: str
  script: str                 # train.py, sample.py, evaluate.py
  argv: Callable[[dict], list]  # paths -> arguments
  pattern: str                # regex the `error: ...` line must match (what is wrong; what to do)
  rc: int = 2
  env: Optional[Callable[[dict], dict]] = None  # paths -> extra environment
  fault: Optional[Callable[[dict], str]] = None  # paths -> forkserver fault spec
  keeps: tuple = ()           # workdirs whose saved files must survive unchanged


CASES = [
    # train.py: configs.
    Case('train-unknown-preset', 'train.py', lambda p: ['--config=configs/edm.py:nope',
                                                        f'--workdir={p["new"]}'],
         r"Unknown preset 'nope'; known presets: .*tiny"),
    Case('train-unknown-option', 'train.py', lambda p: ['--config=configs/edm.py:tiny,huge',
                                                        f'--workdir={p["new"]}'],
         r"Unknown option 'huge' for preset 'tiny'; known options: .*uncond"),
    Case('train-unknown-key', 'train.py', lambda p: TRAIN + [f'--workdir={p["new"]}',
                                                              '--config.train.batchsize=8'],
         r"Unknown config field 'train.batchsize' .*fields of train: .*batch_size"),
    Case('train-wrong-type-int', 'train.py', lambda p: TRAIN + [f'--workdir={p["new"]}',
                                                                 '--config.train.batch_size=eight'],
         r"Cannot set config field train.batch_size to 'eight' \(.*\); pass an int, e.g. "
         r"--config.train.batch_size=\d+\."),
    Case('train-wrong-type-float', 'train.py', lambda p: TRAIN + [f'--workdir={p["new"]}',
                                                                   '--config.optim.lr=fast'],
         r"Cannot set config field optim.lr to 'fast' .*; pass a float, e.g. --config.optim.lr="),
    Case('train-missing-config-file', 'train.py', lambda p: ['--config=configs/nope.py:tiny',
                                                             f'--workdir={p["new"]}'],
         r'Config file configs/nope.py does not exist; pass --config=configs/FILE.py:PRESET'),
    Case('train-broken-config-file', 'train.py', lambda p: [f'--config={p["broken_config"]}',
                                                            f'--workdir={p["new"]}'],
         r"Cannot load the config .*broken.py \(.*was never closed.*\); fix the file or pass "
         r"another --config\."),
    Case('train-no-workdir', 'train.py', lambda p: TRAIN,
         r'Pass --config=configs/FILE.py:PRESET and --workdir=DIR\.'),
    Case('train-workdir-is-a-file', 'train.py', lambda p: TRAIN + [f'--workdir={p["file"]}'],
         r'--workdir .* is a file, not a directory; pass a directory'),
    Case('train-batch-not-divisible', 'train.py', lambda p: TRAIN + [
        f'--workdir={p["new"]}', '--config.train.batch_size=6'],
         r'global batch size 6 must be divisible by the 4 devices .*; set '
         r'--config.train.batch_size to a multiple of 4'),
    Case('train-batch-zero', 'train.py', lambda p: TRAIN + [f'--workdir={p["new"]}',
                                                             '--config.train.batch_size=0'],
         r'batch size must be positive, got 0; set --config.train.batch_size'),
    Case('train-dataset-not-prepared', 'train.py', lambda p: TRAIN + [
        f'--workdir={p["new"]}', '--config.data.name=cifar10'],
         r"Dataset 'cifar10' .*is not prepared in .*: prepare it once with `tfds build cifar10",
         env=lambda p: {'TFDS_DATA_DIR': p['empty_tfds']}),
    Case('train-image-size-network-cannot-take', 'train.py', lambda p: [
        f'--config={p["deep_net_config"]}', f'--workdir={p["new"]}', '--no_progress'],
         r'img_resolution 8 must be divisible by 2\^4 for channel_mult \(1, 2, 2, 2, 2\); use '
         r'fewer levels or a larger image'),
    # train.py: runs and checkpoints.
    Case('train-every-checkpoint-damaged', 'train.py', lambda p: TRAIN + [
        f'--workdir={p["damaged"]}'],
         r'No checkpoint in .* could be restored \(tried step\(s\) 2, 1\): .*move the directory '
         r'aside to train from scratch', keeps=('damaged',)),
    Case('train-checkpoints-of-another-model', 'train.py', lambda p: [
        '--config=configs/edm.py:digits', f'--workdir={p["other_model"]}', '--no_progress'],
         r'The config differs from the one the checkpoints in .* were trained with, in '
         r'model\.kwargs\.dropout, model\.preset, .*pass --allow_config_change',
         keeps=('other_model',)),
    Case('train-checkpoints-of-another-model-allowed', 'train.py', lambda p: [
        '--config=configs/edm.py:digits', f'--workdir={p["other_model_allowed"]}', '--no_progress',
        '--allow_config_change'],
         r'could be restored .*belong to a different model or optimizer config\. Rerun with the '
         r'config they were trained with', keeps=('other_model_allowed',)),
    Case('train-disk-full-during-save', 'train.py', lambda p: TRAIN + [f'--workdir={p["full"]}'],
         r'Could not write checkpoint step 3 to .*: the disk is full \(.*No space left on device'
         r'.*\)\. Free disk space, then rerun the same command: it resumes from step 2, the newest '
         r'verified checkpoint\.',
         fault=lambda p: f'enospc:{p["full"]}/checkpoints', keeps=('full',)),
    Case('train-read-only-disk', 'train.py', lambda p: TRAIN + [f'--workdir={p["read_only"]}'],
         r'Cannot write to .* \(Read-only file system\); pass a --workdir on a writable disk',
         fault=lambda p: f'erofs:{p["read_only"]}', keeps=('read_only',)),
    Case('train-diverges', 'train.py', lambda p: TRAIN + [f'--workdir={p["diverges"]}',
                                                           '--config.optim.lr=nan'],
         r'non-finite between step 2 and step 3; the last good checkpoint is step 2\. Rerun the '
         r'same command with a lower learning rate \(e\.g\. --config\.optim\.lr=1e-4\) to resume',
         rc=1, keeps=('diverges',)),
    # sample.py.
    Case('sample-no-checkpoint', 'sample.py', lambda p: [f'--workdir={p["no_checkpoint"]}'],
         r'No checkpoint in .*; train first \(train.py\)', keeps=('no_checkpoint',)),
    Case('sample-not-a-run', 'sample.py', lambda p: [f'--workdir={p["not_a_run"]}'],
         r'is not a diffjax run \(no config.json\); pass the --workdir of a train.py run'),
    Case('sample-foreign-files-as-checkpoints', 'sample.py', lambda p: [
        f'--workdir={p["foreign"]}', '--seeds=0-3'],
         r'No checkpoint in .* could be restored \(tried step\(s\) 2, 1\)', keeps=('foreign',)),
    Case('sample-seeds-backwards', 'sample.py', lambda p: [f'--workdir={p["run"]}',
                                                           '--seeds=5-1'],
         r"Seed range '5-1' runs backwards; write it as 1-5\."),
    Case('sample-seeds-unreadable', 'sample.py', lambda p: [f'--workdir={p["run"]}',
                                                            '--seeds=five'],
         r"Cannot read seeds 'five'; write them like 0-63 or 0,5,10-19\."),
    Case('sample-guidance-unconditional', 'sample.py', lambda p: [
        f'--workdir={p["unconditional"]}', '--guidance=2', '--seeds=0-3'],
         r'Guidance needs a class-conditional model; this one is unconditional, so drop '
         r'--guidance'),
    Case('sample-class-out-of-range', 'sample.py', lambda p: [f'--workdir={p["run"]}',
                                                              '--class=12', '--seeds=0-3'],
         r'Class 12 is out of range; this model has classes 0\.\.9\.'),
    Case('sample-unknown-sampler', 'sample.py', lambda p: [f'--workdir={p["run"]}',
                                                           '--sampler=magic', '--seeds=0-3'],
         r"Unknown sampler 'magic'; known samplers: .*heun"),
    Case('sample-zero-steps', 'sample.py', lambda p: [f'--workdir={p["run"]}', '--steps=0',
                                                      '--seeds=0-3'],
         r'number of sampling steps must be at least 1, got 0; pass --steps=N'),
    # evaluate.py.
    Case('evaluate-no-mode', 'evaluate.py', lambda p: [f'--workdir={p["run"]}'],
         r'No mode given; name one of ref, fid, digits.* first'),
    Case('evaluate-unknown-mode', 'evaluate.py', lambda p: ['fdi', f'--workdir={p["run"]}'],
         r"Unknown mode 'fdi'; name one of ref, fid, digits.* first"),
    Case('evaluate-no-checkpoint', 'evaluate.py', lambda p: [
        'digits', f'--workdir={p["no_checkpoint"]}'],
         r'No checkpoint in .*; train first', keeps=('no_checkpoint',)),
    Case('evaluate-missing-step', 'evaluate.py', lambda p: ['digits', f'--workdir={p["run"]}',
                                                            '--step=7'],
         r'There is no checkpoint step 7 in .* \(steps: 1, 2\); pass one of them'),
    Case('evaluate-foreign-weights', 'evaluate.py', lambda p: [
        'fid', f'--images={p["images_npz"]}', f'--ref={p["images_npz"]}',
        f'--inception={p["not_weights"]}'],
         r'not the FID Inception weights: pass --inception=PATH of '
         r'weights-inception-2015-12-05-6726825d.pth'),
    Case('evaluate-foreign-images', 'evaluate.py', lambda p: [
        'fid', f'--images={p["foreign_npz"]}', f'--ref={p["images_npz"]}'],
         r'has no `images` array \(keys: x\); an image .npz needs uint8 `images`'),
    Case('evaluate-missing-reference', 'evaluate.py', lambda p: [
        'fid', f'--workdir={p["run"]}', f'--ref={p["missing"]}'],
         r'No reference at .*: pass statistics made with `evaluate.py ref'),
]

SHARED = ('run', 'unconditional', 'no_checkpoint', 'foreign', 'not_a_run')


@pytest.fixture(scope='module')
def paths(tmp_path_factory):
  from diffjax.data import digits
  root = tmp_path_factory.mktemp('bad')
  p = {k: str(root / k) for k in ('tfds', 'empty_tfds', 'new', 'not_a_run', 'missing')}
  digits.prepare_digits(p['tfds'])
  os.makedirs(p['empty_tfds'])
  os.makedirs(p['not_a_run'])
  old = os.environ.get('TFDS_DATA_DIR')
  os.environ['TFDS_DATA_DIR'] = p['tfds']
  try:
    # One trained run (steps 1 and 2); every other workdir is derived from it.
    p['run'] = str(root / 'run')
    loop.train(tiny_config(), p['run'], max_steps=2, progress=False)
  finally:
    if old is None:
      os.environ.pop('TFDS_DATA_DIR', None)
    else:
      os.environ['TFDS_DATA_DIR'] = old
  # Cases run two at a time, so two cases never share a workdir (the lock would refuse one).
  for name in ('unconditional', 'damaged', 'other_model', 'other_model_allowed', 'full',
               'read_only', 'diverges', 'foreign'):
    p[name] = str(root / name)
    shutil.copytree(p['run'], p[name])
  config_path = os.path.join(p['unconditional'], runs.CONFIG_FILE)
  config = json.load(open(config_path))
  config['data']['conditional'] = False
  json.dump(config, open(config_path, 'w'))
  for step in (1, 2):
    step_dir = os.path.join(p['damaged'], 'checkpoints', str(step))
    for f in _files(os.path.join(step_dir, 'state')):  # every data file cut in half
      with open(f, 'r+b') as fh:
        fh.truncate(os.path.getsize(f) // 2)
    foreign_dir = os.path.join(p['foreign'], 'checkpoints', str(step))
    shutil.rmtree(foreign_dir)
    os.makedirs(foreign_dir)
    with open(os.path.join(foreign_dir, 'notes.txt'), 'w') as f:
      f.write('not a checkpoint\n')
  p['no_checkpoint'] = str(root / 'no_checkpoint')
  os.makedirs(p['no_checkpoint'])
  shutil.copy(os.path.join(p['run'], runs.CONFIG_FILE), p['no_checkpoint'])
  p['file'] = str(root / 'a_file')
  open(p['file'], 'w').write('x')
  p['not_weights'] = str(root / 'weights.pth')
  open(p['not_weights'], 'w').write('these are not weights')
  p['foreign_npz'] = str(root / 'foreign.npz')
  np.savez(p['foreign_npz'], x=np.zeros(3))
  p['images_npz'] = str(root / 'images.npz')
  np.savez(p['images_npz'], images=np.zeros((4, 8, 8, 1), np.uint8))
  p['deep_net_config'] = str(root / 'deep_net.py')
  with open(p['deep_net_config'], 'w') as f:
    f.write('from configs import edm\n\n\ndef get_config():\n  c = edm.get_config("tiny")\n'
            '  c.model.kwargs.channel_mult = (1, 2, 2, 2, 2)\n  return c\n')
  p['broken_config'] = str(root / 'broken.py')
  with open(p['broken_config'], 'w') as f:
    f.write('from configs import edm\n\n\ndef get_config():\n  return edm.get_config("tiny"\n')
  return p


def _files(root):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def _saved(workdir):
  """What a run has saved: committed checkpoint files, config.json (parsed), metrics rows."""
  out = {}
  for f in _files(os.path.join(workdir, 'checkpoints')):
    rel = os.path.relpath(f, workdir)
    if re.match(r'checkpoints/\d+/', rel):
      out[rel] = open(f, 'rb').read()
  config = os.path.join(workdir, runs.CONFIG_FILE)
  if os.path.exists(config):
    out['config.json'] = json.load(open(config))
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics):
    out['metrics.jsonl'] = open(metrics).read().splitlines()
  return out


def _unchanged(before, after):
  """Everything saved before is still there, unchanged (metrics may have grown at the end)."""
  for key, value in before.items():
    if key == 'metrics.jsonl':
      assert after.get(key, [])[:len(value)] == value, key
    else:
      assert after.get(key) == value, key


@pytest.fixture(scope='module')
def results(paths):
  """Runs every entry-point case (two at a time: most of a case is single-threaded start-up)."""
  server = forkserver.get()
  before = {name: _saved(paths[name]) for name in set(SHARED) | {
      k for case in CASES for k in case.keeps}}

  def run(case):
    env = forkserver.child_env(**{'TFDS_DATA_DIR': paths['tfds'],
                                  **(case.env(paths) if case.env else {})})
    fault = case.fault(paths) if case.fault else None
    return server.run(case.script, case.argv(paths), env=env, fault=fault, timeout=600)

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    children = dict(zip([c.id for c in CASES], pool.map(run, CASES)))
  return children, before


@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_entry_point_bad_input(case, results, paths):
  children, before = results
  child = children[case.id]
  stderr = child.stderr
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert 'Traceback' not in stderr, stderr[-3000:]
  assert lines and lines[-1].startswith('error: '), stderr[-3000:]
  assert re.search(case.pattern, lines[-1]), lines[-1]
  print(f'\n{case.id}: exit {child.rc}: {lines[-1]}')
  assert child.rc == case.rc, stderr[-3000:]
  for name in case.keeps + SHARED:
    _unchanged(before[name], _saved(paths[name]))


def test_debug_flag_shows_the_traceback(paths):
  child = forkserver.get().run('sample.py', [f'--workdir={paths["run"]}', '--seeds=5-1',
                                             '--debug'],
                               env=forkserver.child_env(TFDS_DATA_DIR=paths['tfds']))
  assert child.rc != 0
  assert 'Traceback' in child.stderr and "Seed range '5-1' runs backwards" in child.stderr


def _api_cases(p):
  """(id, call, exception type, pattern) for the Python API."""
  import diffjax as dj
  from diffjax import sampling

  def train_with(**changes):
    def call():
      c = tiny_config()
      for path, value in changes.items():
        node, *keys = path.split('.')
        target = c[node]
        for k in keys[:-1]:
          target = target[k]
        target[keys[-1]] = value
      loop.train(c, os.path.join(p['new'], 'api'), progress=False)
    return call

  def wrong_image_size():
    run = dj.load(p['run'])
    run.denoise_fn(jnp.zeros((2,), jnp.int32))(jnp.zeros((2, 16, 16, 1)), jnp.ones((2,)))

  def guidance_unconditional():
    run = dj.load(p['run'])
    sampling.make_sample_fn(run.denoiser, lambda *a: None, (8, 8, 1), num_classes=0, guidance=1.)

  return [
      ('load-not-a-run', lambda: dj.load(p['missing']), FileNotFoundError,
       r'is not a diffjax run \(no config.json\); pass the --workdir of a train.py run'),
      ('load-missing-step', lambda: dj.load(p['run'], step=9), ckpt_lib.NoCheckpointError,
       r'There is no checkpoint step 9 .*\(steps: 1, 2\); pass one of them'),
      ('load-damaged', lambda: dj.load(p['damaged']), ckpt_lib.NoCheckpointError,
       r'could be restored \(tried step\(s\) 2, 1\).*move the directory aside'),
      ('sample-seeds-backwards', lambda: dj.sample_run(p['run'], '5-1'), ValueError,
       r"Seed range '5-1' runs backwards; write it as 1-5"),
      ('config-unknown-preset', lambda: edm_configs.get_config('cifar100'), ValueError,
       r"Unknown preset 'cifar100'; known presets: .*digits"),
      ('train-unknown-dataset', train_with(**{'data.name': 'mnist2'}), registry.UnknownNameError,
       r"Unknown dataset 'mnist2'.*known datasets: .*digits"),
      ('train-batch-not-divisible', train_with(**{'train.batch_size': 10}), ValueError,
       r'global batch size 10 must be divisible by the 4 devices'),
      ('denoiser-wrong-image-size', wrong_image_size, ValueError,
       r'expects x of shape \[B, 8, 8, 1\] \(NHWC\), got \(2, 16, 16, 1\)'),
      ('guidance-unconditional', guidance_unconditional, ValueError,
       r'Guidance needs a class-conditional model'),
      ('sampler-zero-steps', lambda: build.sampler_fn(tiny_config(), None, num_steps=0),
       ValueError, r'at least 1, got 0'),
  ]


def test_python_api_bad_input(paths):
  before = {name: _saved(paths[name]) for name in ('run', 'damaged')}
  cases = _api_cases(paths)
  for name, call, error, pattern in cases:
    with pytest.raises(error) as e:
      call()
    message = str(e.value.args[0] if isinstance(e.value, KeyError) else e.value)
    assert len(message.strip().splitlines()) == 1, (name, message)
    assert re.search(pattern, message), (name, message)
  for name, saved in before.items():
    _unchanged(saved, _saved(paths[name]))
  assert len(cases) + len(CASES) >= 20
