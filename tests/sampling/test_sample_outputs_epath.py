"""sample.py's outputs through etils.epath: OUT may be a gs:// URL, an epath.Path or a local str.

The gs:// case runs through `epath_gs.mock_gs` (epath's backend routed to a temporary folder, no
network), so the code under test sees a non-local path as on GCS. `sample_run`'s output side is
driven directly (the OUT check, the shards of two batches, a rerun's index of them, the final npz
and grid), on a gs:// OUT and on a local epath.Path OUT: the files must land where each path
points, hold the images given, and be the same in both places (byte for byte but for the .npz
zip layout: an upload to a store is a stream, which zipfile writes with data descriptors). (Sampling itself,
which these files do not depend on, is test_sample_run.py's.)
"""

import os

import numpy as np
import pytest
from epath_gs import mock_gs
from etils import epath
from PIL import Image

from diffjax import images as images_lib
from diffjax import sampling

SETTINGS = {'config': {'model': 'tiny'}, 'step': 1, 'num_steps': 2}


def _files(folder):
  return sorted(os.path.relpath(os.path.join(d, n), folder)
                for d, _, names in os.walk(folder) for n in names)


def _contents(path):
  if path.endswith('.npz'):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  return open(path, 'rb').read()


def test_shards_npz_and_grid_land_on_a_gs_out_and_a_local_epath_out(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
  seeds, labels = np.arange(100, 112), np.arange(12) % 10
  written = []
  with mock_gs(tmp_path / 'gs') as local:
    for out in ('gs://bucket/samples/run1', epath.Path(tmp_path) / 'local' / 'out'):
      sampling._check_out(out)  # before sampling: writable, and nothing left behind
      shards = sampling._Shards(out, SETTINGS)
      shards.open()
      shards.write(seeds[:8], labels[:8], images[:8])
      shards.write(seeds[8:], labels[8:], images[8:])
      rerun = sampling._Shards(out, SETTINGS)  # a rerun after a kill reads them back
      rerun.open()
      assert sorted(rerun.index) == seeds.tolist()
      np.testing.assert_array_equal(rerun.assemble(seeds, labels, (8, 8, 1), keep=True), images)
      folder = local(os.fspath(out))
      names = _files(folder)
      assert names[:2] == ['grid.png', 'samples.npz'] and len(names) == 5, names
      assert 'shards/settings.json' in names and not [n for n in names if '.tmp-' in n]
      with np.load(os.path.join(folder, 'samples.npz')) as z:
        np.testing.assert_array_equal(z['images'], images)
        np.testing.assert_array_equal(z['arr_1'], labels)
        assert z['seeds'].tolist() == seeds.tolist()
      np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(folder, 'grid.png'))),
                                    images_lib.make_grid(images))
      written.append({n: _contents(os.path.join(folder, n)) for n in names})
      with pytest.raises(ValueError, match=r'holds samples made with other settings \(step\)'):
        sampling._Shards(out, {**SETTINGS, 'step': 2}).open()
    assert written[0].keys() == written[1].keys()  # the same files, holding the same
    for name, value in written[0].items():
      if isinstance(value, dict):  # .npz: streamed to the store (no seek there), so other bytes
        assert value.keys() == written[1][name].keys()
        for k in value:
          np.testing.assert_array_equal(value[k], written[1][name][k], err_msg=f'{name}:{k}')
      else:
        assert value == written[1][name], name
    assert not os.path.exists('gs:')  # nothing went to a local folder named after the URL

    (tmp_path / 'gs' / 'bucket' / 'a_file').write_bytes(b'')
    with pytest.raises(ValueError, match=r'^--out gs://bucket/a_file is a file; pass a directory'):
      sampling._check_out('gs://bucket/a_file')
