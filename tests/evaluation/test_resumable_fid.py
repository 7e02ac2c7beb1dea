"""evaluate.py fid resumes: per-shard feature statistics on disk, a SIGKILLed evaluation rerun gives
the uninterrupted result; and evaluate.py's advice for runs of the wrong kind.

The shard merge is checked against one-pass statistics (and np.cov); the edm3 resume runs in-process
with a tiny feature function in place of Inception (FID of 2048² covariances costs ~10 s each here);
the SIGKILL test runs evaluate.py as real processes with the same tiny features (a run with the
golden Inception weights took 476 s here under load; the Inception plumbing is test_evaluate.py's).
"""

import json
import os
import pathlib
import re
import shutil
import signal

import forkserver
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saved_runs

from configs import distill as distill_configs
from configs import edm as edm_configs
from diffjax import evaluation as ev
from diffjax import runs
from diffjax.evaluation import feature_shards
from diffjax.evaluation import features as features_lib
from diffjax.evaluation import fid as fidlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
BATCH = 4


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """The tiny EDM config saved at its initialization (any weights do: two evaluations are compared)."""
  return saved_runs.save_initialized_run(
      edm_configs.get_config('tiny'), str(tmp_path_factory.mktemp('fid') / 'run'))


# --------------------------------------------------------------------------------------------------------
# Shards of statistics merge to the one-pass statistics.


def test_merged_shards_equal_one_pass_statistics(tmp_path):
  rng = np.random.default_rng(0)
  features = (rng.standard_normal((40, 8)) * [1, 2, 3, 4, 5, 6, 7, 8] + 100).astype(np.float32)
  one_pass = fidlib.StreamingStats()
  for lo in range(0, 40, BATCH):
    one_pass.update(features[lo:lo + BATCH])
  store = feature_shards.FeatureShards(str(tmp_path / 'shards'), {'a': 1})
  assert store.open() == []
  groups = feature_shards.shard_groups(40, 12)
  assert [len(g) for g in groups] == [12, 12, 12, 4]
  for g in groups:
    part = fidlib.StreamingStats()
    for lo in range(0, len(g), BATCH):
      part.update(features[g[lo:lo + BATCH]])
    again = fidlib.StreamingStats.from_state(part.state())  # persistence is exact
    np.testing.assert_array_equal(again.scatter, part.scatter)
    store.write(g + 1000, {f'inception_{k}': v for k, v in part.state().items()})
  (tmp_path / 'shards' / '.tmp-1-shard.npz').write_bytes(b'cut short')
  reopened = feature_shards.FeatureShards(str(tmp_path / 'shards'), {'a': 1})
  assert len(reopened.open()) == 4 and not list((tmp_path / 'shards').glob('.tmp-*'))
  merged = fidlib.StreamingStats()
  for g in groups:
    state = reopened.read(g + 1000)
    merged.merge(fidlib.StreamingStats.from_state(
        {k.removeprefix('inception_'): v for k, v in state.items()}))
  a, b = merged.statistics(), one_pass.statistics()
  assert a.n == b.n == 40
  np.testing.assert_allclose(a.mu, b.mu, rtol=1e-10, atol=0)
  np.testing.assert_allclose(a.sigma, b.sigma, rtol=1e-10, atol=1e-10 * np.abs(b.sigma).max())
  direct = fidlib.statistics_from_features(features)  # float64 np.cov: float32 batch moments agree
  np.testing.assert_allclose(a.sigma, direct.sigma, rtol=1e-4, atol=1e-4 * np.abs(direct.sigma).max())
  with pytest.raises(ValueError, match=r'holds feature statistics made with other settings \(a\); '
                                       r'pass another --out, or delete .* to start over\.'):
    feature_shards.FeatureShards(str(tmp_path / 'shards'), {'a': 2}).open()
  with pytest.raises(ValueError, match='--shard_size must be at least 1'):
    feature_shards.shard_groups(5, 0)


# --------------------------------------------------------------------------------------------------------
# edm3 resumes (a tiny feature function instead of Inception).


@pytest.fixture
def tiny_features(monkeypatch):
  w = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)

  @jax.jit
  def fn(images):
    f = jnp.tanh(images.reshape(images.shape[0], -1).astype(jnp.float32) / 64.0 @ w)
    return {'pool3': f, 'logits_unbiased': 3 * f[:, :10]}

  monkeypatch.setattr(features_lib, '_inception_fn', lambda variables, outputs, mesh: fn)
  return fn


def test_edm3_resumes_to_the_uninterrupted_result(run_dir, tiny_features, tmp_path, capsys):
  rng = np.random.default_rng(2)
  ref_stats = fidlib.statistics_from_features(rng.uniform(-1, 1, (32, 16)))
  ref = ev.save_reference(str(tmp_path / 'ref.npz'), ref_stats)
  out = str(tmp_path / 'eval' / 'r.json')
  kw = dict(num_images=6, protocol='edm3', batch_size=BATCH, shard_size=4, num_steps=2, out=out)
  full = ev.evaluate_fid(run_dir, ref, **kw)
  shard_dir = tmp_path / 'eval' / 'r' / 'shards'
  names = sorted(p.name for p in shard_dir.glob('shard-*.npz'))
  assert len(names) == 6 and full['found'] == 0  # 3 sets of 6 seeds in shards of 4 + 2
  fids = [s['fid'] for s in full['sets']]
  assert [s['seeds'] for s in full['sets']] == ['0-5', '6-11', '12-17'] and len(set(fids)) == 3
  assert full['fid'] == min(fids) and full['reported_set'] == int(np.argmin(fids))
  assert full['protocol'] == 'edm3' and full['num_images'] == 6
  # One-pass statistics of a set (all its seeds in one group) equal its merged shards'.
  run = runs.load(run_dir)
  for k, s in enumerate(full['sets'][1:2]):
    lo, hi = map(int, s['seeds'].split('-'))
    one = ev.generated_features(run, range(lo, hi + 1), batch_size=BATCH, num_steps=2).stats
    merged = fidlib.StreamingStats()
    for g in feature_shards.shard_groups(6, 4):
      state = feature_shards.FeatureShards(str(shard_dir), {}).read(np.arange(lo, hi + 1)[g])
      merged.merge(fidlib.StreamingStats.from_state(
          {k.removeprefix('inception_'): v for k, v in state.items() if k.startswith('inception_')}))
    np.testing.assert_allclose(merged.statistics().sigma, one.sigma, rtol=1e-10, atol=1e-12)
    assert s['fid'] == pytest.approx(fidlib.fid_from_statistics(one, ref_stats), abs=1e-6), k

  # A kill: the result never written, set 2's second shard and all of set 3 lost, a write cut short.
  os.remove(out)
  for name in names[3:]:
    os.remove(shard_dir / name)
  (shard_dir / f'.tmp-99-{names[3]}').write_bytes(b'half')
  kept = {n: os.stat(shard_dir / n).st_mtime_ns for n in names[:3]}
  capsys.readouterr()
  resumed = ev.evaluate_fid(run_dir, ref, **kw)
  assert f'Found 10 of 18 images already evaluated in {shard_dir}; evaluating the other 8.' in (
      capsys.readouterr().out)
  assert resumed['found'] == 10 and sorted(p.name for p in shard_dir.glob('shard-*')) == names
  assert {n: os.stat(shard_dir / n).st_mtime_ns for n in names[:3]} == kept  # not redone
  assert not list(shard_dir.glob('.tmp-*'))
  for a, b in zip(resumed['sets'], full['sets']):
    assert a['fid'] == pytest.approx(b['fid'], abs=1e-6) and a['seeds'] == b['seeds']
  assert resumed['fid'] == full['fid'] and resumed['reported_set'] == full['reported_set']
  assert json.loads(pathlib.Path(out).read_text())['sets'] == resumed['sets']

  with pytest.raises(ValueError, match=r'other settings \(metrics\)'):
    ev.evaluate_fid(run_dir, ref, metrics='fid,is', **kw)  # refused before anything is sampled


# --------------------------------------------------------------------------------------------------------
# evaluate.py fid SIGKILLed and rerun (real processes).

WRAPPER = '''import runpy, sys
import jax, jax.numpy as jnp, numpy as np
from diffjax import evaluation
from diffjax.evaluation import features
w = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
fn = jax.jit(lambda images: (lambda f: {{'pool3': f, 'logits_unbiased': 3 * f[:, :10]}})(
    jnp.tanh(images.reshape(images.shape[0], -1).astype(jnp.float32) / 64.0 @ w)))
# A tiny feature network instead of Inception: a FID of 2048² covariances costs ~10 s each here.
features._inception_fn = lambda variables, outputs, mesh: fn
evaluation.load_inception = lambda path=None: {{'tiny': w}}
sys.argv[0] = {evaluate!r}
runpy.run_path({evaluate!r}, run_name='__main__')
'''
SEEDS, SHARD = 48, 4  # 12 shards: the kill lands while some are left


def _fid_argv(workdir, ref, out):
  return ['fid', f'--workdir={workdir}', f'--ref={ref}', f'--seeds=0-{SEEDS - 1}',
          f'--batch={BATCH}', f'--shard_size={SHARD}', '--steps=2', '--metrics=fid,is,kid',
          f'--out={out}', '--no_progress']


def test_killed_evaluate_py_fid_resumes_to_the_uninterrupted_result(run_dir, tmp_path):
  wrapper = tmp_path / 'golden_evaluate.py'
  wrapper.write_text(WRAPPER.format(evaluate=str(ROOT / 'evaluate.py')))
  rng = np.random.default_rng(3)
  ref_features = rng.uniform(-1, 1, (8, 16)).astype(np.float32)
  ref = ev.save_reference(str(tmp_path / 'ref.npz'),
                          fidlib.statistics_from_features(ref_features), ref_features)
  server, env = forkserver.get(), forkserver.child_env()
  ref_out, out = tmp_path / 'reference.json', tmp_path / 'killed.json'
  shard_dir = tmp_path / 'killed' / 'shards'
  shards = lambda: sorted(shard_dir.glob('shard-*.npz')) if shard_dir.is_dir() else []
  reference = server.spawn(str(wrapper), _fid_argv(run_dir, ref, ref_out), env=env)
  killed = server.spawn(str(wrapper), _fid_argv(run_dir, ref, out), env=env)
  try:
    assert forkserver.wait_for(lambda: shards(), 300, child=killed), killed.stderr[-3000:]
    killed.kill()
    assert killed.wait(60) == -signal.SIGKILL, killed.stderr[-3000:]
    assert reference.wait(300) == 0, reference.stderr[-3000:]
  finally:
    killed.kill()
    reference.kill()
  done = len(shards())
  assert 0 < done < SEEDS // SHARD and not out.exists()
  kept = {p.name: os.stat(p).st_mtime_ns for p in shards()}

  rerun = server.run(str(wrapper), _fid_argv(run_dir, ref, out), env=env, timeout=300)
  assert rerun.rc == 0, rerun.stderr[-3000:]
  found = done * SHARD
  assert re.search(rf'^Found {found} of {SEEDS} images already evaluated in '
                   rf'{re.escape(str(shard_dir))}; evaluating the other {SEEDS - found}\.$',
                   rerun.stdout, re.M), rerun.stdout
  assert {p.name: os.stat(p).st_mtime_ns for p in shards()
          if p.name in kept} == kept and len(shards()) == SEEDS // SHARD
  want, got = json.loads(ref_out.read_text()), json.loads(out.read_text())
  for key in ('fid', 'is_mean', 'is_std', 'kid_mean', 'kid_std'):
    assert abs(got[key] - want[key]) <= 1e-6, (key, got[key], want[key])
  assert got['num_images'] == SEEDS and got['found'] == found and want['found'] == 0
  assert (tmp_path / 'killed.png').exists()


# --------------------------------------------------------------------------------------------------------
# Runs of the wrong kind: one sentence with what to pass instead.


def test_wrong_kind_of_run_gets_the_command_that_works(run_dir, tmp_path):
  root = tmp_path / 'distill'
  for stage in ('stage1', 'round_1_4steps'):
    (root / stage).mkdir(parents=True)
    shutil.copy(os.path.join(run_dir, runs.CONFIG_FILE), root / stage / runs.CONFIG_FILE)
  runs.save_config(distill_configs.get_config('digits'), str(root))
  ref = ev.save_reference(str(tmp_path / 'ref.npz'), fidlib.Statistics(np.zeros(3), np.eye(3), 4))
  cases = [
      (['digits', f'--workdir={root}'], r'distillation root.*--workdir=.*round_1_4steps.*stage1'),
      (['fid', f'--workdir={root}', f'--ref={ref}'],
       r'distillation root.*--workdir=.*round_1_4steps.*stage1'),
      (['bpd', f'--workdir={run_dir}'],
       rf"uses the 'edm' preconditioning, which carries no SDE; .*`evaluate\.py bpd "
       rf"--workdir={re.escape(run_dir)} --sde=ve`"),
      (['bpd', f'--workdir={run_dir}', '--sde=nope'], r"nope.*vp"),  # the flag reaches the SDE
      (['bpd_vlb', f'--workdir={run_dir}'],
       rf"The VLB needs a discrete model .*'edm'; score it by the probability-flow ODE instead: "
       rf"`evaluate\.py bpd --workdir={re.escape(run_dir)} --sde=ve`\."),
  ]
  server, env = forkserver.get(), forkserver.child_env()
  children = [(server.spawn('evaluate.py', argv, env=env), pattern) for argv, pattern in cases]
  for child, pattern in children:
    assert child.wait(300) != 0
    lines = [line for line in child.stderr.splitlines() if line.strip()]
    assert 'Traceback' not in child.stderr, child.stderr[-3000:]
    assert lines and lines[-1].startswith('error: ') and re.search(pattern, lines[-1]), lines[-1:]
