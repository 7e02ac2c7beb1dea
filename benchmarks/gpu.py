"""One-GPU benchmark table: EDM's DDPM++ CIFAR-10 (config F) and ADM ImageNet-64, fp32 and bf16.

    bash benchmarks/gpu.sh                  # on one GPU, ≤ 8 min including compilation
    python benchmarks/gpu.py --tiny --no-torch   # CPU smoke run in seconds (the test runs this)

Needs, beyond a stock JAX-with-CUDA and PyTorch install: diffjax's own requirements (flax, optax,
ml_collections) and, for the PyTorch column, diffusers. Synthetic data: no TensorFlow import.

Per network and dtype: train-step img/s of the library's own step (EDM loss, Adam, EMA, state
donated, as train.py runs it), MFU = XLA cost-analysis FLOPs × steps/s / the GPU's peak
(`PEAKS`, keyed on device_kind; --peak overrides), the first step's compile time, Heun-35 (18
steps) sampling img/s and the peak device memory (`memory_stats()`, cumulative over the process).
The PyTorch column is diffusers' UNet2DModel of the same widths, depths and attention resolutions
(not the same network: its parameter count is printed) trained with torch.autocast, FLOPs from
torch.utils.flop_counter; both sides allow TF32 in 'float32', as XLA's default precision does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense peaks in TFLOP/s ('float32' = TF32 tensor cores, what XLA's default precision uses).
PEAKS = {
    'H200': {'bfloat16': 989.4, 'float32': 494.7},
    'H100 PCIe': {'bfloat16': 756.0, 'float32': 378.0},
    'H100': {'bfloat16': 989.4, 'float32': 494.7},
    'A100': {'bfloat16': 312.0, 'float32': 156.0},
}

NETS = {  # name -> (config preset edits, resolution, classes, batch, tiny preset)
    'cifar10': ('ddpmpp_cifar10', 32, 10, 64, 'tiny'),
    'imagenet64': ('adm_imagenet64', 64, 1000, 32, 'adm_tiny'),
}


def peak_tflops(device_kind: str, dtype: str, override: float | None) -> float | None:
  if override:
    return override
  for key, peaks in PEAKS.items():  # Most specific first ('H100 PCIe' before 'H100').
    if key in device_kind:
      return peaks[dtype]
  return None


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) if cost else 0.0


def _timed(fn, n: int) -> float:
  import jax
  jax.block_until_ready(fn())
  t0 = time.perf_counter()
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / n


def measure_jax(net: str, dtype: str, args) -> dict:
  import jax
  import jax.numpy as jnp

  from configs import edm
  from diffjax import build, samplers
  from diffjax import state as state_lib
  from diffjax.training import step as step_lib

  preset, res, classes, batch, tiny = NETS[net]
  c = edm.get_config('cifar10')
  c.model.preset = tiny if args.tiny else preset
  if args.tiny:  # A smoke test of the code path: the smallest U-Net that still has every part.
    res, classes = 8, 10
    c.model.kwargs.update(dropout=0.0, model_channels=8, channel_mult=(1,), attn_resolutions=())
  if net == 'imagenet64' or args.tiny:
    c.augment.p = 0.0  # EDM's ImageNet-64 ADM trains without augmentation.
  c.model.remat = args.remat
  c.train.compute_dtype = dtype
  batch = args.batch or (2 if args.tiny else batch)
  c.train.batch_size = batch
  channels = 1 if args.tiny else 3
  spec = types.SimpleNamespace(resolution=res, channels=channels, num_classes=classes)
  denoiser = build.build_denoiser(c, spec)
  tx = build.build_optimizer(c)
  objective = build.build_objective(c, spec, denoiser)
  step = step_lib.make_train_step(objective, tx, batch_size=batch,
                                  ema_halflife_images=c.train.ema_halflife_images)
  params = build.init_params(denoiser.network, spec, jax.random.key(0))
  n_params = sum(int(p.size) for p in jax.tree.leaves(params))
  state = state_lib.create_train_state(jax.tree.map(jnp.copy, params), tx)
  data = {'image': jax.random.uniform(jax.random.key(1), (batch, res, res, channels), minval=-1.0,
                                      maxval=1.0),
          'label': jnp.arange(batch) % classes}
  key = jax.random.key(2)
  t0 = time.perf_counter()
  train = jax.jit(step, donate_argnums=0).lower(state, data, key).compile()
  compile_s = time.perf_counter() - t0
  holder = [state]

  def one():
    holder[0], m = train(holder[0], data, key)
    return m['loss']

  t = _timed(one, args.steps)
  last_loss = float(one())
  flops = _flops(train)
  labels = jax.nn.one_hot(jnp.arange(batch) % classes, classes)
  sigmas = jnp.asarray(samplers.edm_grid_for(denoiser.precond, args.heun_steps), jnp.float32)
  sample = jax.jit(lambda p, x: samplers.heun(denoiser.bind(p, labels), x * sigmas[0], sigmas))
  x = jax.random.normal(jax.random.key(3), data['image'].shape)
  t_heun = _timed(lambda: sample(params, x), max(1, args.steps // 5))
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  peak = peak_tflops(dev.device_kind, dtype, args.peak)
  tflops = flops / t / 1e12
  return {'net': net, 'dtype': dtype, 'batch': batch, 'params': n_params,
          'device': dev.device_kind, 'compile_s': compile_s, 'train_img_s': batch / t,
          'train_tflops': tflops, 'mfu': tflops / peak if peak else float('nan'),
          'heun_img_s': batch / t_heun, 'heun_nfe': 2 * args.heun_steps - 1,
          'peak_mem_gib': stats.get('peak_bytes_in_use', float('nan')) / 2**30,
          'loss': last_loss}


def measure_torch(net: str, dtype: str, args) -> dict | None:
  """diffusers' UNet2DModel of the same shape, trained with the EDM loss under torch.autocast."""
  try:
    import torch
    from diffusers import UNet2DModel
  except ImportError:
    return None
  _, res, classes, batch, _ = NETS[net]
  batch = args.batch or batch
  cuda = torch.cuda.is_available()
  device = 'cuda' if cuda else 'cpu'
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
  if net == 'cifar10':
    cfg = dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=4,
               down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
               up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
               num_class_embeds=classes)
  else:
    cfg = dict(sample_size=64, block_out_channels=(192, 384, 576, 768), layers_per_block=3,
               down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D',
                                 'AttnDownBlock2D'),
               up_block_types=('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
               attention_head_dim=64, resnet_time_scale_shift='scale_shift',
               num_class_embeds=classes)
  model = UNet2DModel(in_channels=3, out_channels=3, **cfg).to(device).train()
  model = model.to(memory_format=torch.channels_last)
  opt = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)
  ema = [p.detach().clone() for p in model.parameters()]
  x0 = torch.rand(batch, 3, res, res, device=device) * 2 - 1
  y = torch.arange(batch, device=device) % classes
  amp = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == 'bfloat16')

  def step():
    sigma = (torch.randn(batch, device=device) * 1.2 - 1.2).exp().view(-1, 1, 1, 1)
    n = torch.randn_like(x0) * sigma
    c_in, c_skip = 1 / (sigma**2 + 0.25).sqrt(), 0.25 / (sigma**2 + 0.25)
    c_out = sigma * 0.5 / (sigma**2 + 0.25).sqrt()
    with amp:
      f = model(c_in * (x0 + n), sigma.flatten().log() / 4, class_labels=y).sample.float()
    w = (sigma**2 + 0.25) / (sigma * 0.5)**2
    loss = (w * (c_skip * (x0 + n) + c_out * f - x0)**2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, list(model.parameters()), 1e-3)
    return loss

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  from torch.utils.flop_counter import FlopCounterMode
  with FlopCounterMode(display=False) as counter:
    step()
  flops = counter.get_total_flops()
  step()
  sync()
  t0 = time.perf_counter()
  for _ in range(args.steps):
    step()
  sync()
  t = (time.perf_counter() - t0) / args.steps
  kind = torch.cuda.get_device_name() if cuda else 'cpu'
  peak = peak_tflops(kind, dtype, args.peak)
  return {'params': sum(p.numel() for p in model.parameters()), 'train_img_s': batch / t,
          'mfu': flops / t / 1e12 / peak if peak else float('nan'),
          'peak_mem_gib': torch.cuda.max_memory_allocated() / 2**30 if cuda else float('nan')}


COLUMNS = ('net', 'dtype', 'batch', 'params', 'compile_s', 'loss', 'train_img_s', 'train_tflops', 'mfu',
           'heun_img_s', 'peak_mem_gib', 'torch_params', 'torch_train_img_s', 'torch_mfu',
           'train_vs_torch')


def rows(args) -> list[dict]:
  out = []
  for net in args.nets.split(','):
    for dtype in args.dtypes.split(','):
      r = measure_jax(net, dtype, args)
      pt = None if args.no_torch or args.tiny else measure_torch(net, dtype, args)
      r['torch_params'] = pt['params'] if pt else float('nan')
      r['torch_train_img_s'] = pt['train_img_s'] if pt else float('nan')
      r['torch_mfu'] = pt['mfu'] if pt else float('nan')
      r['train_vs_torch'] = r['train_img_s'] / pt['train_img_s'] if pt else float('nan')
      out.append(r)
      print(json.dumps(r), file=sys.stderr, flush=True)
  return out


def format_table(table: list[dict]) -> str:
  fmt = lambda v: f'{v:.3g}' if isinstance(v, float) else str(v)
  cells = [COLUMNS] + [tuple(fmt(r[c]) for c in COLUMNS) for r in table]
  widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
  return '\n'.join('  '.join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--tiny', action='store_true', help='Tiny networks, batch 2: a CPU smoke run.')
  p.add_argument('--nets', default='cifar10,imagenet64')
  p.add_argument('--dtypes', default='float32,bfloat16')
  p.add_argument('--batch', type=int, default=0, help='0 = each network\'s default.')
  p.add_argument('--steps', type=int, default=10, help='Timed train steps per row.')
  p.add_argument('--heun_steps', type=int, default=18, help='18 steps = 35 NFE.')
  p.add_argument('--remat', default='none', choices=('none', 'blocks', 'full'))
  p.add_argument('--peak', type=float, default=None, help='Peak TFLOP/s for MFU (overrides).')
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)
  table = rows(args)
  print(format_table(table))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(table, f, indent=2)
  return table


if __name__ == '__main__':
  main()
