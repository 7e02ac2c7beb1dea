"""A checkpoint write that fails says why — another writer, a vanished directory, permissions, a
full disk — names the newest good step, and leaves that step intact and loadable.

Each cause is simulated: the tests may run as root, for whom chmod blocks nothing, so permission
and disk-full errors are raised by the write probe a save makes before Orbax starts.
"""

import errno
import os
import shutil
import time

import jax
import numpy as np
import pytest

from diffjax.runs import checkpoint as ckpt_lib

TREE = {'w': np.arange(12, dtype=np.float32), 'n': np.int32(3)}
ABSTRACT = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), TREE)


def _first_saved(tmp_path, async_save=True):
  c = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), async_save=async_save)
  c.save(1, TREE)
  return c


def _restored_step(directory):
  c = ckpt_lib.Checkpointer(directory, async_save=False)
  try:
    tree, step = c.restore(ABSTRACT)
  finally:
    c.close()
  np.testing.assert_array_equal(tree['w'], TREE['w'])
  return step


def _raise_on_probe(monkeypatch, code):
  def probe(self):
    raise OSError(code, os.strerror(code), self.directory)
  monkeypatch.setattr(ckpt_lib.Checkpointer, '_probe', probe)


@pytest.mark.parametrize('code,says', [
    (errno.ENOSPC, 'the disk is full'),
    (errno.EACCES, 'the directory is not writable'),
    (errno.EROFS, 'the directory is not writable'),
])
def test_disk_full_and_permissions_name_the_cause_and_the_last_good_step(tmp_path, monkeypatch,
                                                                         code, says):
  c = _first_saved(tmp_path)
  _raise_on_probe(monkeypatch, code)
  t = time.time()
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    c.save(2, TREE)
  c.close()
  message = str(e.value)
  assert f'Could not write checkpoint step 2 to {c.directory}: {says}' in message
  # Step 1 was committed but not yet read back: the error verifies it before naming it.
  assert 'rerun the same command: it resumes from step 1, the newest verified checkpoint' in message
  assert time.time() - t < 10
  with pytest.raises(ckpt_lib.CheckpointSaveError, match='An earlier checkpoint save failed'):
    c.save(3, TREE)  # nothing more is written after the first failure
  monkeypatch.undo()
  assert _restored_step(c.directory) == 1


def test_a_vanished_directory_is_an_error_not_a_fresh_start(tmp_path):
  c = _first_saved(tmp_path)
  c.wait()
  shutil.rmtree(c.directory)  # Orbax alone would quietly recreate it and save step 2 alone
  with pytest.raises(ckpt_lib.CheckpointSaveError,
                     match='the directory has vanished .*: no checkpoint of this run is left there'):
    c.save(2, TREE)
  c.close()
  assert not os.path.exists(c.directory)


def test_directory_replaced_by_a_file_fails_fast_without_orbax_timeouts(tmp_path):
  # A save Orbax starts into a path it cannot create hung ~300 s on its own signals (measured).
  c = _first_saved(tmp_path)
  c.wait()
  aside = c.directory + '.aside'
  os.rename(c.directory, aside)
  open(c.directory, 'w').close()
  t = time.time()
  with pytest.raises(ckpt_lib.CheckpointSaveError, match='vanished|Not a directory'):
    c.save(2, TREE)
  c.close()
  assert time.time() - t < 10
  os.remove(c.directory)
  os.rename(aside, c.directory)
  assert _restored_step(c.directory) == 1


def test_saving_a_step_already_on_disk_is_another_writer(tmp_path):
  c = _first_saved(tmp_path)
  c.close()
  other = ckpt_lib.Checkpointer(c.directory)  # a second writer of the same directory
  with pytest.raises(ckpt_lib.StepExistsError,
                     match='step 1 already exists .*another run is writing this directory'):
    other.save(1, {'w': TREE['w'] + 1, 'n': np.int32(9)})
  other.close()
  assert _restored_step(c.directory) == 1  # the first writer's step is untouched


def test_errno_is_found_through_wrapping_exceptions():
  try:
    try:
      raise OSError(errno.ENOSPC, 'No space left on device')
    except OSError as inner:
      raise RuntimeError('tensorstore write failed') from inner
  except RuntimeError as outer:
    assert ckpt_lib._errno(outer) == errno.ENOSPC
  assert ckpt_lib._errno(ValueError('x')) is None
