"""gs://bucket/... routed to a local folder through etils.epath's own backend, with no network.

`with mock_gs(tmp_path) as local:` makes every `epath.Path('gs://bucket/x')` read and write
`tmp_path/bucket/x` through epath's backend interface, so the code under test sees a non-local
path, as on GCS; `local(url)` is where a URL's object lies. TensorFlow's GCS client is kept out.
"""

import contextlib
import os
from unittest import mock

from etils.epath import gpath
from etils.epath import testing as epath_testing


@contextlib.contextmanager
def mock_gs(root):
  root = os.fspath(root)

  def local(p):
    p = os.fspath(p)
    return root + '/' + p[len('gs://'):] if p.startswith('gs://') else p

  def one(fn, p, *args, **kwargs):
    return fn(local(p), *args, **kwargs)

  def two(fn, a, b, *args, **kwargs):
    return fn(local(a), local(b), *args, **kwargs)

  one_path = ('exists', 'glob', 'isdir', 'listdir', 'makedirs', 'mkdir', 'open', 'remove',
              'rmtree', 'stat', 'walk')
  with epath_testing.mock_epath(**{n: one for n in one_path},
                                **{n: two for n in ('copy', 'rename', 'replace')}), \
      mock.patch.object(gpath, '_is_tf_installed', lambda: False):
    yield local
