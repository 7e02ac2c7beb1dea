"""FD_DINOv2's network (diffjax.evaluation.dinov2, dinov2_weights) against facebookresearch/dinov2 and
NVlabs/edm2, and `--metrics=fd_dinov2` end to end.

The fixtures `tests/golden/dinov2_*` come from `scripts/make_dinov2_golden.py`, which runs dinov2's own
ViT (seeded random weights, a tiny configuration, saved by torch.save) behind edm2's own
`DINOv2Detector.__call__` (its resize and normalisation), and lists the real ViT-L/14 state-dict layout
from dinov2's hub constructor on torch's meta device. The published 1.2 GB weights can't be downloaded
here, so the end-to-end test uses a tiny random network in their place.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax import parallel
from diffjax.evaluation import dinov2, dinov2_weights
from diffjax.evaluation import features as features_lib
from diffjax.pth import load_pth

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / 'golden'
TINY = dinov2.DINOv2Config(embed_dim=32, depth=2, num_heads=2, patch_size=14, pos_grid=7)


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN / 'dinov2_golden.npz') as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope='module')
def tiny_variables():
  return dinov2_weights.dinov2_params_from_state_dict(load_pth(GOLDEN / 'dinov2_tiny.pth'), TINY)


def test_vitl14_layout_is_the_reference_state_dict():
  with open(GOLDEN / 'dinov2_vitl14_layout.json') as f:
    reference = {k: tuple(v) for k, v in json.load(f).items()}
  layout = dinov2_weights.dinov2_state_dict_layout(dinov2.VITL14)
  assert layout == reference
  assert sum(int(np.prod(s)) for s in layout.values()) == 304_368_640  # ViT-L/14's 304M parameters


@pytest.mark.parametrize('name', ['aa_28', 'aa_64', 'aa_512', 'aa_224', 'pos_37_16', 'pos_7_16',
                                  'pos_7_4'])
def test_interpolation_matrices_are_torch(golden, name):
  kind, *sizes = name.split('_')
  if kind == 'aa':  # edm2's image resize: interpolate(bicubic, antialias=True) to 224
    ours = dinov2.bicubic_antialias_matrix(int(sizes[0]), 224)
  else:  # dinov2's positional embedding: interpolate(bicubic, scale_factor=(grid + 0.1) / M)
    m, grid = int(sizes[0]), int(sizes[1])
    ours = dinov2.bicubic_matrix(m, grid, (grid + 0.1) / m)
  assert ours.shape == golden[name].shape
  np.testing.assert_allclose(ours, golden[name], rtol=0, atol=2e-6)
  if name == 'aa_64':
    # A second, independent implementation of PIL's filter: jax.image.resize, up to float32 rounding.
    n = int(sizes[0])
    theirs = jax.image.resize(jnp.eye(n), (224, n), 'bicubic', antialias=True)
    np.testing.assert_allclose(ours, np.asarray(theirs), rtol=0, atol=5e-6)


def test_features_match_reference(golden, tiny_variables):
  """edm2's detector (resize 28 → 224, normalise) + dinov2's ViT: float32 agreement, computed sharded."""
  mesh = Mesh(np.array(jax.devices()[:4]), ('data',))
  fn = dinov2_weights.make_dinov2_fn(tiny_variables, config=TINY, mesh=mesh)
  out = fn(jax.device_put(golden['images'], NamedSharding(mesh, P('data'))))
  assert len(out.sharding.device_set) == 4  # every device computed its shard; the output stays sharded
  features = np.asarray(out)
  ref = golden['features']
  assert features.shape == ref.shape == (4, 32)
  assert np.abs(features - ref).max() / ref.std() < 1e-5  # measured 1.0e-6
  # Straight into the network at 56 px: the 7x7 positional grid is downsampled to 4x4.
  out = jax.jit(dinov2.DINOv2(TINY).apply)(tiny_variables, jnp.asarray(golden['x56'], jnp.float32))
  ref = golden['features56']
  assert np.abs(np.asarray(out) - ref).max() / ref.std() < 1e-5  # measured 8.4e-7


def test_grey_images_are_repeated_to_rgb(golden):
  grey = golden['images'][:2, ..., :1]
  np.testing.assert_array_equal(np.asarray(dinov2.preprocess(grey, size=42)),
                                np.asarray(dinov2.preprocess(np.repeat(grey, 3, axis=-1), size=42)))
  with pytest.raises(ValueError, match='DINOv2 expects'):
    dinov2.preprocess(grey[..., 0])


def test_config_from_state_dict_and_bad_files(tmp_path):
  sd = load_pth(GOLDEN / 'dinov2_tiny.pth')
  assert dinov2_weights.config_from_state_dict(sd, head_dim=16) == TINY
  with pytest.raises(ValueError, match=r'missing.*dinov2_vitl14_pretrain\.pth'):
    dinov2_weights.dinov2_params_from_state_dict(sd)  # the tiny file is not ViT-L/14
  extra = dict(sd, register_tokens=np.zeros((1, 4, 32), np.float32))  # a *_reg4 backbone
  with pytest.raises(ValueError, match='1 unexpected .*register_tokens'):
    dinov2_weights.dinov2_params_from_state_dict(extra, TINY)
  with pytest.raises(FileNotFoundError, match='dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/'):
    dinov2_weights.find_dinov2_weights(tmp_path / 'none.pth')
  junk = tmp_path / 'junk.pth'
  junk.write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='not the DINOv2 ViT-L/14 weights'):
    dinov2_weights.load_dinov2_params(junk)


# --------------------------------------------------------------------------------------------------------
# --metrics=fd_dinov2 end to end, with a tiny random network standing in for ViT-L/14.


@pytest.fixture(scope='module')
def stand_in():
  """Random DINOv2 variables with 64-d heads, so their config is read back from the shapes."""
  config = dinov2.DINOv2Config(embed_dim=64, depth=1, num_heads=1, patch_size=14, pos_grid=4)
  shapes = jax.eval_shape(dinov2.DINOv2(config).init, jax.random.key(0), jnp.zeros((1, 56, 56, 3)))
  rng = np.random.default_rng(1)  # numpy, not an eager Flax init (seconds on a CPU at -O0)
  variables = jax.tree_util.tree_map(
    lambda s: (rng.standard_normal(s.shape) / np.sqrt(s.shape[0] if len(s.shape) == 2 else 1)
               ).astype(np.float32), shapes)
  assert dinov2_weights.config_from_variables(variables) == config
  return variables


def test_fd_dinov2_of_images_against_references(stand_in, golden, tmp_path):
  from diffjax import evaluation as ev
  from diffjax.evaluation import fid as fidlib
  rng = np.random.default_rng(0)
  ref_images = golden['images']
  # 6 images with batch 4: the second batch is padded and the padding masked out.
  images = np.concatenate([ref_images[::-1], ref_images[:2]]) // 2 + rng.integers(0, 64, (6, 28, 28, 3),
                                                                                     dtype=np.uint8)
  np.savez(tmp_path / 'ref_images.npz', images=ref_images)
  # Features straight from the network, in unpadded batches of 4 (the jit the evaluation also uses).
  mesh = parallel.make_mesh()
  fn = features_lib._dinov2_fn(stand_in, mesh)
  net = lambda x: np.asarray(fn(jax.device_put(x, parallel.batch_sharding(mesh))))
  direct = lambda x: fidlib.statistics_from_features(
    np.concatenate([net(x[:4]), net(x[-4:])[8 - len(x):]]) if len(x) > 4 else net(x))
  expected = fidlib.fid_from_statistics(direct(images), direct(ref_images))
  assert expected > 0.1  # measured 0.47: the two sets differ

  kw = dict(metrics='fd_dinov2', batch_size=4, dinov2_variables=stand_in)
  result = ev.evaluate_images(images, str(tmp_path / 'ref_images.npz'), **kw)
  assert 'fid' not in result and result['num_images'] == 6
  np.testing.assert_allclose(result['fd_dinov2'], expected, rtol=1e-4)

  # A statistics file with DINOv2's moments (what `evaluate.py ref --metrics=fid,fd_dinov2` writes).
  ref = ev.load_reference(str(tmp_path / 'ref_images.npz'), batch_size=4, networks=('dinov2',),
                          dinov2_variables=stand_in)
  assert ref.stats is None and ref.dinov2.mu.shape == (64,)
  ev.save_reference(str(tmp_path / 'ref_stats.npz'), ref.stats, dinov2=ref.dinov2)
  again = ev.evaluate_images(images, str(tmp_path / 'ref_stats.npz'), **kw)
  np.testing.assert_allclose(again['fd_dinov2'], expected, rtol=1e-4)

  # An Inception-only statistics file cannot give FD_DINOv2, nor a DINOv2-only one FID: one sentence each.
  fidlib.save_statistics(tmp_path / 'inception_only.npz', direct(ref_images))
  with pytest.raises(ValueError, match='FD_DINOv2 needs DINOv2 statistics'):
    ev.evaluate_images(images, str(tmp_path / 'inception_only.npz'), **kw)
  with pytest.raises(ValueError, match='holds only DINOv2 statistics'):
    ev.check_reference(str(tmp_path / 'ref_stats.npz'), need_inception=True)
  with pytest.raises(ValueError, match='known: fid, is, kid, fd_dinov2'):
    ev.parse_metrics('fd_dino')
