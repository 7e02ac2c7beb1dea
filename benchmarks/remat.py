"""What --config.model.remat saves: residual bytes, XLA temp bytes and step time per mode.

    python benchmarks/remat.py --preset=ddpmpp_cifar10 --batch=16,64 [--time]

For each mode (none, blocks, full) and batch: the bytes of the values the forward pass keeps for
the backward (JAX's own accounting, `jax.ad_checkpoint.print_saved_residuals`), XLA's buffer plan of
the compiled gradient (`memory_analysis()`: temp bytes), and with --time the median time of the
gradient over a few calls, as a ratio to 'none' measured in the same process. The network is the
preset's (EDM's DDPM++ CIFAR-10 by default, 32×32×3, unconditional) with the loss ‖D − x‖².
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import ad_checkpoint  # noqa: E402

from diffjax import models  # noqa: E402

MODES = ('none', 'blocks', 'full')


def residual_bytes(loss, params) -> int:
  """Bytes JAX keeps for the backward pass (parsed from its printout, one array a line)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ad_checkpoint.print_saved_residuals(loss, params)
  return sum(int(np.prod([int(d) for d in dims.split(',') if d])) * int(bits) // 8
             for _, bits, dims in re.findall(r'^([a-z]+)(\d+)\[([\d,]*)\]', out.getvalue(), re.M))


def measure(preset: str, resolution: int, channels: int, batch: int, timed: bool) -> list[dict]:
  x = jax.random.normal(jax.random.key(1), (batch, resolution, resolution, channels))
  noise = jnp.linspace(-1.0, 1.0, batch)
  rows = []
  params = None
  for mode in MODES:
    net = models.create_network(preset, remat=mode, label_dim=0, img_resolution=resolution,
                                in_channels=channels, out_channels=channels)
    if params is None:  # The same tree in every mode (tests/models/test_remat.py).
      params = jax.jit(lambda k, n=net: n.init({'params': k}, x, noise))(jax.random.key(0))['params']

    def loss(p, n=net):
      out = n.apply({'params': p}, x, noise, train=True, rngs={'dropout': jax.random.key(3)})
      return jnp.mean(jnp.square(out - x))

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    row = {'mode': mode, 'batch': batch, 'residual_mb': residual_bytes(loss, params) / 1e6,
           'temp_mb': compiled.memory_analysis().temp_size_in_bytes / 1e6}
    if timed:
      jax.block_until_ready(compiled(params))
      times = []
      for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params))
        times.append(time.perf_counter() - t0)
      row['step_s'] = float(np.median(times))
    rows.append(row)
  for row in rows:
    row['residual_x'] = rows[0]['residual_mb'] / row['residual_mb']
    row['temp_x'] = rows[0]['temp_mb'] / row['temp_mb']
    if timed:
      row['time_ratio'] = row['step_s'] / rows[0]['step_s']
  return rows


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--preset', default='ddpmpp_cifar10')
  p.add_argument('--resolution', type=int, default=32)
  p.add_argument('--channels', type=int, default=3)
  p.add_argument('--batch', default='16,64', help='comma-separated batch sizes')
  p.add_argument('--time', action='store_true', help='also time the gradient (3 calls per mode)')
  args = p.parse_args(argv)
  print(f'# {jax.devices()[0].device_kind}, {args.preset} at {args.resolution}²×{args.channels}')
  print('| batch | remat | residuals MB | × less | XLA temp MB | × less |'
        + (' step s | × none |' if args.time else ''))
  print('|---|---|---|---|---|---|' + ('---|---|' if args.time else ''))
  rows = []
  for batch in [int(b) for b in args.batch.split(',')]:
    for r in measure(args.preset, args.resolution, args.channels, batch, args.time):
      rows.append(r)
      line = (f'| {r["batch"]} | {r["mode"]} | {r["residual_mb"]:.1f} | {r["residual_x"]:.2f} | '
              f'{r["temp_mb"]:.1f} | {r["temp_x"]:.2f} |')
      if args.time:
        line += f' {r["step_s"]:.2f} | {r["time_ratio"]:.2f} |'
      print(line, flush=True)
  return rows


if __name__ == '__main__':
  main()
