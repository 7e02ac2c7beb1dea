"""Writes the EDM2 goldens of tests/models/test_edm2.py from NVlabs/edm2's own network code (torch).

Run it with a Python that has torch and numpy, never the project's venv (the tests need neither):

    python3 -m venv /tmp/e2 && /tmp/e2/bin/pip install torch==2.13.0 numpy
    git clone https://github.com/NVlabs/edm2 /tmp/edm2src    # the goldens were made at 4bf8162
    /tmp/e2/bin/python scripts/make_edm2_golden.py --edm2=/tmp/edm2src

It writes two small files into tests/golden/:

* `edm2_param_counts.json`: parameters of EDM2's `Precond` (U-Net plus uncertainty head) for the
  ImageNet-64 presets of train_edm2.py (64×64×3, 1000 classes) and for diffjax's digits preset,
  counted on PyTorch's meta device (no memory is allocated).
* `edm2_output.npz`: a small conditional EDM2 network (two levels, multi-head attention at both)
  with *random* weights and gains — every gain nonzero, weights not unit-norm, so that the output
  depends on every layer and on normalization at use — given as PyTorch tensors by their
  state_dict names, the inputs (x NHWC, σ, one-hot labels), and EDM2's `Precond` outputs D(x; σ)
  (NHWC) and u(σ) in float32. The weights are stored as float16 (the values the network ran on).

The frozen Fourier frequencies and phases are EDM2 buffers drawn by torch at construction; they are
replaced by diffjax's NumPy recipe (`diffjax.models.edm2.fourier_buffers`, restated below because
this script cannot import JAX), so both sides use the same ones. NVlabs/edm2 is licensed
CC BY-NC-SA 4.0: this script only imports and runs it; nothing of it is copied into diffjax.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'golden')

# edm2's train_edm2.py, edm2-img64-*: (model channels, dropout).
IMG64 = {'xs': (128, 0.0), 's': (192, 0.0), 'm': (256, 0.1), 'l': (320, 0.1), 'xl': (384, 0.1)}
# diffjax's 'edm2-digits' preset in EDM2's terms.
DIGITS = dict(img_resolution=8, img_channels=1, label_dim=10, model_channels=32,
              channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4], channels_per_head=32,
              logvar_channels=32)
# The output golden's network: two in-channels, three classes, attention with 2 and 4 heads.
SMALL = dict(img_resolution=8, img_channels=2, label_dim=3, model_channels=8, channel_mult=[1, 2],
             num_blocks=1, attn_resolutions=[8, 4], channels_per_head=4, logvar_channels=8)
SIGMAS = [0.003, 0.2, 1.1, 30.0]


def fourier_buffers(num_channels, bandwidth=1.0, seed=0):
  """diffjax.models.edm2.fourier_buffers: 2π·N(0, bw²) frequencies, then 2π·U(0, 1) phases."""
  rng = np.random.default_rng(seed)
  freqs = 2 * np.pi * rng.standard_normal(num_channels) * bandwidth
  phases = 2 * np.pi * rng.uniform(size=num_channels)
  return freqs.astype(np.float32), phases.astype(np.float32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--edm2', required=True, help='a checkout of github.com/NVlabs/edm2')
  args = parser.parse_args()
  # dnnlib.util imports `requests` (for URLs) at the top; the network code never uses it.
  sys.modules.setdefault('requests', types.ModuleType('requests'))
  sys.path.insert(0, args.edm2)
  import torch
  from training import networks_edm2

  try:
    commit = subprocess.run(['git', '-C', args.edm2, 'rev-parse', 'HEAD'], capture_output=True,
                            text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = 'unknown'

  def count(**kwargs):
    with torch.device('meta'):
      net = networks_edm2.Precond(**kwargs)
    return sum(p.numel() for p in net.parameters())

  counts = {f'edm2-img64-{size}': count(img_resolution=64, img_channels=3, label_dim=1000,
                                        model_channels=ch, dropout=dropout)
            for size, (ch, dropout) in IMG64.items()}
  counts['edm2-digits'] = count(**DIGITS)
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, 'edm2_param_counts.json'), 'w') as f:
    json.dump({'edm2_commit': commit, 'label_dim_img64': 1000, 'counts': counts}, f, indent=2)
    f.write('\n')
  print(json.dumps(counts, indent=2))

  torch.manual_seed(0)
  net = networks_edm2.Precond(use_fp16=False, **SMALL).eval()
  rng = np.random.default_rng(2024)
  weights = {}
  with torch.no_grad():
    for name, p in net.named_parameters():
      # Gains N(0.5, 1): nonzero, some negative. Weights at scale 3, far from unit norm. Rounded to
      # float16, which halves the file; the network runs on exactly these values in float32.
      value = (rng.normal(0.5, 1.0, p.shape) if p.ndim == 0 else
               3.0 * rng.standard_normal(p.shape)).astype(np.float16)
      p.copy_(torch.from_numpy(value.astype(np.float32)))
      weights[name] = value
    for module, seed in ((net.unet.emb_fourier, 0), (net.logvar_fourier, 1)):
      freqs, phases = fourier_buffers(module.freqs.numel(), seed=seed)
      module.freqs.copy_(torch.from_numpy(freqs))
      module.phases.copy_(torch.from_numpy(phases))
    b, r, c = len(SIGMAS), SMALL['img_resolution'], SMALL['img_channels']
    sigma = np.float32(SIGMAS)
    x = (rng.standard_normal((b, c, r, r)) * np.sqrt(sigma**2 + 0.25)[:, None, None, None])
    x = x.astype(np.float32)
    labels = np.eye(SMALL['label_dim'], dtype=np.float32)[rng.integers(0, SMALL['label_dim'], b)]
    d, logvar = net(torch.from_numpy(x), torch.from_numpy(sigma), torch.from_numpy(labels),
                    force_fp32=True, return_logvar=True)
  np.savez_compressed(
      os.path.join(OUT, 'edm2_output.npz'),
      x=x.transpose(0, 2, 3, 1), sigma=sigma, labels=labels,
      denoised=d.numpy().transpose(0, 2, 3, 1), logvar=logvar.numpy().reshape(-1),
      config=np.array(json.dumps(SMALL)), edm2_commit=np.array(commit),
      **{f'param/{k}': v for k, v in weights.items()})
  print(f'{len(weights)} tensors, {sum(v.size for v in weights.values())} weights; '
        f'|D| {np.abs(d.numpy()).mean():.3f}, u {logvar.numpy().reshape(-1)}')


if __name__ == '__main__':
  main()
