"""Makes the DINOv2 fixtures `tests/golden/dinov2_*`: facebookresearch/dinov2's ViT on random weights, fed
by NVlabs/edm2's own FD_DINOv2 detector.

The test (`tests/evaluation/test_dinov2.py`) needs only the files this script writes; the script needs
PyTorch, a checkout of facebookresearch/dinov2 and one of NVlabs/edm2 (whose `calculate_metrics.py` needs
click, tqdm, Pillow, scipy and requests at import), none of which diffjax imports:

  git clone https://github.com/facebookresearch/dinov2 /tmp/dinov2-src
  git clone https://github.com/NVlabs/edm2 /tmp/edm2-src
  python3 -m venv /tmp/venv-golden && /tmp/venv-golden/bin/pip install torch numpy click tqdm pillow \
    scipy requests
  /tmp/venv-golden/bin/python scripts/make_dinov2_golden.py --dinov2=/tmp/dinov2-src --edm2=/tmp/edm2-src

(Used for the committed files: dinov2 b8931f7bf91576930313be2c6d6af376033b35f0, edm2
4bf8162f601bcc09472ce8a32dd0cbe8889dc8fc, torch 2.13.0 CPU.)

What it writes:
1. `dinov2_vitl14_layout.json`: the names and shapes of `dinov2_vitl14`'s state dict (the hub constructor,
   pretrained=False, built on torch's meta device: no 1.2 GB of weights allocated), which the published
   `dinov2_vitl14_pretrain.pth` must match (dinov2 loads it with strict=True).
2. `dinov2_tiny.pth`: a tiny ViT of the same code and layout (D 32, depth 2, 2 heads, patch 14, a 7x7
   positional grid) with seeded random weights rounded to float16 (so the file is small and both sides
   compute from identical values), saved by `torch.save` (zip format) for diffjax's torch-free reader.
3. `dinov2_golden.npz`: 4 uint8 28x28 RGB images and their features through edm2's
   `DINOv2Detector.__call__` (resize_mode='torch': antialiased bicubic to 224, ImageNet normalisation)
   with the tiny network in place of the hub model (so the 7x7 positional grid is upsampled to 16x16);
   a normalised 56x56 input straight into the network (the grid downsampled to 4x4) and its features;
   torch's interpolation matrices along one axis (one-hot inputs through `interpolate`): antialiased
   bicubic 28/64/512/224 -> 224, and the positional-embedding bicubic 37 -> 16 and 7 -> 16 / 4 with
   dinov2's scale factor (grid + 0.1) / M.
"""

import argparse
import json
import os
import sys
from functools import partial

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_GOLDEN = os.path.join(os.path.dirname(_HERE), 'tests', 'golden')
SEED = 2023  # DINOv2's year
TINY = dict(img_size=98, patch_size=14, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4)


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Seeded weights of O(1) activations everywhere (the default init has zero biases and unit gammas)."""
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      shape = tuple(p.shape)
      if name.endswith('weight') and p.ndim >= 2:
        value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
      elif name.endswith('norm1.weight') or name.endswith('norm2.weight') or name == 'norm.weight':
        value = rng.uniform(0.5, 1.5, shape)
      elif name.endswith('gamma'):
        value = rng.uniform(0.3, 1.0, shape)
      elif name in ('cls_token', 'pos_embed', 'mask_token'):
        value = rng.standard_normal(shape) * 0.5
      else:  # biases
        value = rng.normal(0.0, 0.1, shape)
      p.copy_(torch.from_numpy(value.astype(np.float16).astype(np.float32)))


def _matrix(fn, in_size: int) -> np.ndarray:
  """[out, in] matrix of a 1-D linear map applied along the height of one-hot images.

  The one-hot vectors are the channels of one [1, in, in, 3] image (width 3, left unchanged): a width
  of 1 would make the tensor look channels-last to torch, whose antialiased kernel then misreads it.
  """
  x = torch.eye(in_size, dtype=torch.float32).reshape(1, in_size, in_size, 1).repeat(1, 1, 1, 3)
  out = fn(x)  # [1, in, out, 3]
  return out[0, :, :, 0].T.double().numpy()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--dinov2', required=True, help='checkout of facebookresearch/dinov2')
  parser.add_argument('--edm2', required=True, help='checkout of NVlabs/edm2')
  parser.add_argument('--out', default=_GOLDEN)
  args = parser.parse_args()
  os.environ['XFORMERS_DISABLED'] = '1'  # the plain attention path, deterministic on CPU
  sys.path[:0] = [args.dinov2, args.edm2]
  import calculate_metrics  # NVlabs/edm2
  from dinov2.hub.backbones import dinov2_vitl14
  from dinov2.layers import MemEffAttention
  from dinov2.layers import NestedTensorBlock as Block
  from dinov2.models.vision_transformer import DinoVisionTransformer

  # 1. The ViT-L/14 layout, on the meta device.
  with torch.device('meta'):
    big = dinov2_vitl14(pretrained=False)
  layout = {k: list(v.shape) for k, v in big.state_dict().items()}
  with open(os.path.join(args.out, 'dinov2_vitl14_layout.json'), 'w') as f:
    json.dump(layout, f, indent=0, sort_keys=True)

  # 2. The tiny network: dinov2_vitl14's constructor arguments with small sizes.
  torch.manual_seed(0)
  tiny = DinoVisionTransformer(**TINY, block_fn=partial(Block, attn_class=MemEffAttention),
                               init_values=1.0, ffn_layer='mlp', block_chunks=0, num_register_tokens=0,
                               interpolate_antialias=False, interpolate_offset=0.1).eval()
  _randomize(tiny, SEED)
  state = {k: v.half() for k, v in tiny.state_dict().items()}
  torch.save(state, os.path.join(args.out, 'dinov2_tiny.pth'))

  # 3. Features through edm2's detector (its __init__ would download ViT-L; only __call__ is used).
  rng = np.random.default_rng(SEED)
  yy, xx = np.mgrid[0:28, 0:28] / 27.0
  smooth = 127.5 + 100 * np.sin(2 * np.pi * (yy[None, ..., None] * rng.uniform(0.5, 2, (4, 1, 1, 3))
                                             + xx[None, ..., None] * rng.uniform(0.5, 2, (4, 1, 1, 3))))
  images = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).round().astype(np.uint8)
  detector = object.__new__(calculate_metrics.DINOv2Detector)
  detector.resize_mode, detector.model, detector.feature_dim = 'torch', tiny, TINY['embed_dim']
  with torch.no_grad():
    features = detector(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    x56 = rng.standard_normal((2, 56, 56, 3)).astype(np.float16)
    features56 = tiny(torch.from_numpy(x56.astype(np.float32)).permute(0, 3, 1, 2)).numpy()

  aa = lambda n: partial(torch.nn.functional.interpolate, size=(224, 3), mode='bicubic', antialias=True)
  pos = lambda m, g: partial(torch.nn.functional.interpolate, scale_factor=((g + 0.1) / m, 1.0),
                             mode='bicubic', antialias=False)
  matrices = {f'aa_{n}': _matrix(aa(n), n) for n in (28, 64, 512, 224)}
  matrices.update({f'pos_{m}_{g}': _matrix(pos(m, g), m) for m, g in ((37, 16), (7, 16), (7, 4))})
  np.savez_compressed(os.path.join(args.out, 'dinov2_golden.npz'), images=images,
                      features=features.astype(np.float32), x56=x56,
                      features56=features56.astype(np.float32),
                      **{k: v.astype(np.float32) for k, v in matrices.items()})
  print('features std', features.std(), 'features56 std', features56.std(),
        'layout tensors', len(layout))


if __name__ == '__main__':
  main()
