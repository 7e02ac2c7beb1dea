"""evaluate.py's outputs through etils.epath: FID shard statistics, reference statistics and result
JSONs on a gs:// path (epath's backend routed to a temporary folder by `epath_gs.mock_gs`, no
network) and on a local epath.Path."""

import json
import os

import numpy as np
import pytest
from epath_gs import mock_gs
from etils import epath

from diffjax import evaluation as ev
from diffjax.evaluation import feature_shards, protocols
from diffjax.evaluation import fid as fidlib

SETTINGS = {'model': 'tiny', 'seeds': [0, 6]}


def test_fid_shards_on_gs_resume_refuse_and_drop_a_bad_shard(tmp_path):
  url = 'gs://bucket/run/eval/fid_x/shards'
  rng = np.random.default_rng(0)
  state = {'n': np.int64(3), 'mean': rng.normal(size=4), 'scatter': rng.normal(size=(4, 4))}
  with mock_gs(tmp_path) as local:
    shards = feature_shards.FeatureShards(url, SETTINGS)
    assert shards.open() == [] and shards.dir == url  # kept as given: the result JSON names it
    shards.write([0, 1, 2], state)
    shards.write([3, 4, 5], state)
    assert sorted(os.listdir(local(url))) == sorted([feature_shards.shard_name([0, 1, 2]),
                                                     feature_shards.shard_name([3, 4, 5]),
                                                     feature_shards.SETTINGS_FILE])
    again = feature_shards.FeatureShards(url, SETTINGS)  # a rerun reads them back through epath
    assert again.open() == sorted([feature_shards.shard_name([0, 1, 2]),
                                   feature_shards.shard_name([3, 4, 5])])
    read = again.read([3, 4, 5])
    assert sorted(read) == sorted(state)
    for k in state:
      np.testing.assert_array_equal(read[k], state[k])
    with pytest.raises(ValueError, match=r'^gs://bucket/.*/shards holds feature statistics made '
                                         r'with other settings \(seeds\); pass another --out'):
      feature_shards.FeatureShards(url, {**SETTINGS, 'seeds': [0, 9]}).open()
    bad = os.path.join(local(url), feature_shards.shard_name([0, 1, 2]))
    with open(bad, 'r+b') as f:
      f.truncate(20)
    with pytest.raises(OSError, match=r'^Cannot read the feature shard gs://.*; it was removed'):
      again.read([0, 1, 2])
    assert not os.path.exists(bad)  # gone through epath, so the rerun evaluates its seeds again


@pytest.mark.parametrize('where', ['gs', 'epath'])
def test_statistics_references_and_json_land_through_epath(tmp_path, where):
  stats = fidlib.Statistics(np.arange(3.0), np.diag([1.0, 2.0, 3.0]), 7)
  features = np.ones((7, 3), np.float32)
  with mock_gs(tmp_path / 'gs') as local:
    root = 'gs://bucket/refs' if where == 'gs' else epath.Path(tmp_path) / 'refs'
    fidlib.save_statistics(f'{root}/a.npz', stats)  # the folder is made through epath
    back = fidlib.load_statistics(f'{root}/a.npz')
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert back.n == 7
    ev.save_reference(f'{root}/b.npz', stats, features)
    protocols._write_json(f'{root}/eval/r.json', {'fid': 1.5})  # how fid/digits write results
    folder = local(os.fspath(root))
    assert sorted(os.listdir(folder)) == ['a.npz', 'b.npz', 'eval']  # nothing left aside
    with np.load(os.path.join(folder, 'b.npz')) as z:
      np.testing.assert_array_equal(z['features'], features)
      np.testing.assert_array_equal(z['mu'], stats.mu)
    assert json.load(open(os.path.join(folder, 'eval', 'r.json'))) == {'fid': 1.5}
