"""Makes `tests/golden/inception_golden.npz`: torch-fidelity's Inception outputs under fixed random weights.

The test of diffjax's Flax Inception (`tests/test_evaluation.py`) needs only the files this script writes;
this script needs PyTorch and torch-fidelity, which diffjax itself never imports. Run it in a separate
environment, e.g.

  python3 -m venv /tmp/venv-golden
  /tmp/venv-golden/bin/pip install torch numpy
  /tmp/venv-golden/bin/pip install --no-deps torch-fidelity
  /tmp/venv-golden/bin/python scripts/make_inception_golden.py

What it does:
1. Builds torch-fidelity's `FeatureExtractorInceptionV3` module tree to read the names and shapes of the
   published weight file's state dict.
2. Fills that state dict with seeded random weights from `tests/golden/inception_weights.py` (numpy only,
   so the test regenerates the identical weights without torch) and `torch.save`s it — the same layout as
   `weights-inception-2015-12-05-6726825d.pth` — to a temporary file (95 MB: not committed).
3. Loads that file through torch-fidelity's own constructor (strict `load_state_dict`), runs it on a fixed
   uint8 batch at 32x32 and 64x64, and saves the 2048-d pool3 features and the 1008 logits with and
   without bias, the inputs, and the state-dict layout.
4. Also saves two small `.pth` files of a subset of the tensors (plus a transposed view, a slice, a
   float16 and an int64 tensor), in torch's zip format and its legacy format, to test diffjax's
   torch-free `.pth` reader; and torch-fidelity's TF1-style resize on small odd sizes.

torchvision: torch-fidelity's package `__init__` imports its CLIP/VGG extractors, which import
torchvision, and no torchvision build works beside the CPU torch here. The Inception extractor itself
does not need it, so we register an empty `torch_fidelity` package object in `sys.modules` whose
`__path__` points at the installed package directory; importing `torch_fidelity.feature_extractor_
inceptionv3` then loads that module (and its small helpers) without running the package `__init__`.
"""

import argparse
import collections
import importlib.util
import os
import sys
import tempfile
import types

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_GOLDEN = os.path.join(os.path.dirname(_HERE), 'tests', 'golden')
sys.path.insert(0, _GOLDEN)
from inception_weights import SEED, golden_state_dict  # noqa: E402

# The subset of tensors saved as small .pth files for the reader test.
SUBSET = (
  'Conv2d_1a_3x3.conv.weight',
  'Conv2d_1a_3x3.bn.weight',
  'Conv2d_1a_3x3.bn.bias',
  'Conv2d_1a_3x3.bn.running_mean',
  'Conv2d_1a_3x3.bn.running_var',
  'Conv2d_1a_3x3.bn.num_batches_tracked',
  'Conv2d_2a_3x3.conv.weight',
  'fc.bias',
)


def import_torch_fidelity_inception():
  """Imports torch_fidelity.feature_extractor_inceptionv3 without the package __init__ (see docstring)."""
  spec = importlib.util.find_spec('torch_fidelity')
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit('torch-fidelity is not installed: pip install --no-deps torch-fidelity')
  if 'torch_fidelity' not in sys.modules:
    package = types.ModuleType('torch_fidelity')
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules['torch_fidelity'] = package
  import torch_fidelity.feature_extractor_inceptionv3 as fe  # noqa: PLC0415
  from torch_fidelity.interpolate_compat_tensorflow import (  # noqa: PLC0415
    interpolate_bilinear_2d_like_tensorflow1x,
  )

  return fe, interpolate_bilinear_2d_like_tensorflow1x


def state_dict_layout(fe) -> collections.OrderedDict:
  """Names and shapes of FeatureExtractorInceptionV3's state dict, without loading any weights."""
  cls = fe.FeatureExtractorInceptionV3
  saved_load, saved_torch_load = cls.load_state_dict, fe.torch.load
  cls.load_state_dict = lambda self, *a, **k: None
  fe.torch.load = lambda *a, **k: None
  try:
    model = cls('inception-v3-compat', ['2048'], feature_extractor_weights_path='unused')
  finally:
    cls.load_state_dict, fe.torch.load = saved_load, saved_torch_load
  return collections.OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())


def golden_images(seed: int) -> dict[int, np.ndarray]:
  """Fixed uint8 NHWC batches: 2 images at 32x32 and 2 at 64x64, smooth structure plus noise."""
  rng = np.random.default_rng(seed)
  out = {}
  for size in (32, 64):
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing='ij')
    batch = []
    for _ in range(2):
      freq = rng.uniform(1, 4, size=(3, 2))
      phase = rng.uniform(0, 2 * np.pi, size=3)
      smooth = np.stack(
        [np.sin(2 * np.pi * (f[0] * yy + f[1] * xx) + p) for f, p in zip(freq, phase)], -1
      )
      img = 127.5 + 90 * smooth + rng.normal(0, 25, size=(size, size, 3))
      batch.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
    out[size] = np.stack(batch)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out_dir', default=_GOLDEN)
  parser.add_argument('--seed', type=int, default=SEED)
  parser.add_argument(
    '--pth_out', default=None, help='where to keep the full random-weight .pth (95 MB)'
  )
  args = parser.parse_args()

  torch.set_num_threads(max(1, os.cpu_count() or 1))
  fe, tf1_resize = import_torch_fidelity_inception()
  layout = state_dict_layout(fe)
  float_layout = {k: v for k, v in layout.items() if not k.endswith('num_batches_tracked')}
  weights = golden_state_dict(float_layout, args.seed)
  state_dict = collections.OrderedDict()
  for name, shape in layout.items():
    if name.endswith('num_batches_tracked'):
      state_dict[name] = torch.tensor(0, dtype=torch.int64)
    else:
      state_dict[name] = torch.from_numpy(weights[name])
      assert tuple(state_dict[name].shape) == shape

  with tempfile.TemporaryDirectory() as tmp:
    pth = args.pth_out or os.path.join(tmp, 'golden-inception-2015-12-05.pth')
    torch.save(state_dict, pth)
    model = fe.FeatureExtractorInceptionV3(
      'inception-v3-compat',
      ['2048', 'logits_unbiased', 'logits'],
      feature_extractor_weights_path=pth,
    )

  images = golden_images(args.seed)
  result = {}
  for size, batch in images.items():
    with torch.no_grad():
      pool3, unbiased, logits = model(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous())
    result[f'images_{size}'] = batch
    result[f'pool3_{size}'] = pool3.numpy()
    result[f'logits_unbiased_{size}'] = unbiased.numpy()
    result[f'logits_{size}'] = logits.numpy()
    print(
      f'{size}x{size}: pool3 mean {pool3.mean():.4f} std {pool3.std():.4f}; logits std {unbiased.std():.4f}'
    )

  # torch-fidelity's TF1 resize on small odd sizes (up and down), NCHW float32.
  rng = np.random.default_rng(args.seed + 1)
  resize_in = (rng.uniform(0, 255, size=(2, 3, 9, 11))).astype(np.float32)
  result['resize_in'] = resize_in
  for h, w in ((23, 17), (5, 4)):
    result[f'resize_out_{h}x{w}'] = tf1_resize(
      torch.from_numpy(resize_in), size=(h, w), align_corners=False
    ).numpy()

  result['layout_names'] = np.array(list(layout))
  shapes = np.full((len(layout), 4), -1, np.int64)
  for i, shape in enumerate(layout.values()):
    shapes[i, : len(shape)] = shape
  result['layout_shapes'] = shapes
  result['seed'] = np.int64(args.seed)
  out = os.path.join(args.out_dir, 'inception_golden.npz')
  np.savez_compressed(out, **result)
  print('wrote', out, os.path.getsize(out), 'bytes')

  # Small .pth files for the reader test: subset of the golden tensors plus layouts torch can produce.
  subset = collections.OrderedDict((k, state_dict[k].clone()) for k in SUBSET)
  subset['extra.transposed'] = torch.from_numpy(weights['fc.bias'][:12].reshape(3, 4).copy()).t()
  subset['extra.slice'] = state_dict['fc.bias'][5:9]  # shares fc.bias's storage at an offset
  subset['extra.float16'] = torch.from_numpy(weights['fc.bias'][:6].copy()).half()
  subset['extra.int64'] = torch.arange(-3, 4, dtype=torch.int64).reshape(7, 1)
  for name, kwargs in (
    ('inception_subset.pth', {}),
    ('inception_subset_legacy.pth', {'_use_new_zipfile_serialization': False}),
  ):
    path = os.path.join(args.out_dir, name)
    torch.save(subset, path, **kwargs)
    print('wrote', path, os.path.getsize(path), 'bytes')


if __name__ == '__main__':
  main()
