"""The PyTorch reference side of the benchmark table (run by benchmarks/run.py in its own process).

The same network as diffjax's `ddpm_cifar10` preset: diffusers' `UNet2DModel` with the configuration
of Ho et al.'s CIFAR-10 model (google/ddpm-cifar10-32: block_out_channels (128, 256, 256, 256),
two ResNet blocks per level, attention at 16×16, GroupNorm eps 1e-6, [sin, cos] embedding with
freq_shift 1, right/bottom padding of the stride-2 downsampling conv). Built from its config, so
nothing is downloaded. Measures in float32 (or bf16 autocast with --dtype=bfloat16):
  matmul peak     GFLOP/s of torch's 2048² float32 matmul (for reference)
  forward         img/s of model(x, t) under torch.inference_mode, eval mode
  train           img/s of one ε-prediction step: forward + MSE to the noise, backward, gradient
                  clipping at 1, Adam (lr 2e-4, foreach), an EMA of the weights (foreach lerp) —
                  the work diffjax's DDPM train step does
  heun            img/s of EDM's 18-step Heun sampler (35 evaluations) around the UNet, with
                  k-diffusion's `sample_heun` when it can be loaded, else the loop below
  overhead        that sampler with a trivial denoiser D(x) = x/2 at 18 and 256 steps: µs per
                  evaluation (the slope) and µs per call (the intercept)
  memory          peak resident memory of this process

k-diffusion 0.1.1's package `__init__` imports torchvision, which has no working CPU build here; its
`sampling.py` needs only torch, scipy, torchdiffeq, torchsde, tqdm and one helper from its `utils`
(`append_dims`). So, when `import k_diffusion.sampling` fails but the package is installed
(`pip install --no-deps k-diffusion torchdiffeq torchsde`), the unmodified `sampling.py` is loaded
on its own with a stand-in `k_diffusion.utils` that defines only `append_dims`.

Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import resource
import sys
import time
import types

import overhead  # benchmarks/overhead.py, beside this script
import torch

DDPM_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D', 'UpBlock2D'),
    attention_head_dim=None, norm_eps=1e-6, norm_num_groups=32, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, time_embedding_type='positional', act_fn='silu',
    dropout=0.1,
)


def best_time(fn, repeats: int = 5, min_time: float = 1.0) -> float:
  """Best mean wall time of fn() over `repeats` rounds, after one warm-up call."""
  fn()
  best = float('inf')
  for _ in range(repeats):
    n, t0 = 0, time.perf_counter()
    while True:
      fn()
      n += 1
      if time.perf_counter() - t0 >= min_time / repeats:
        break
    best = min(best, (time.perf_counter() - t0) / n)
  return best


def _append_dims(x, target_dims):
  """x with trailing singleton axes up to target_dims (the one k-diffusion helper sampling needs)."""
  return x[(...,) + (None,) * (target_dims - x.ndim)]


def k_diffusion_heun():
  """(sample_heun, source): k-diffusion's sampler if it can be loaded, else None."""
  try:
    from k_diffusion import sampling
    return sampling.sample_heun, 'k-diffusion'
  except Exception:  # noqa: BLE001 - usually torchvision; try the module on its own below.
    pass
  for name in [m for m in sys.modules if m == 'k_diffusion' or m.startswith('k_diffusion.')]:
    del sys.modules[name]
  spec = importlib.util.find_spec('k_diffusion')
  if spec is None or not spec.submodule_search_locations:
    return None, None
  root = list(spec.submodule_search_locations)[0]
  package = types.ModuleType('k_diffusion')
  package.__path__ = [root]
  utils = types.ModuleType('k_diffusion.utils')
  utils.append_dims = _append_dims
  sys.modules.update({'k_diffusion': package, 'k_diffusion.utils': utils})
  try:
    loader_spec = importlib.util.spec_from_file_location('k_diffusion.sampling',
                                                         f'{root}/sampling.py')
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules['k_diffusion.sampling'] = module
    loader_spec.loader.exec_module(module)
    return module.sample_heun, 'k-diffusion sampling.py'
  except Exception as e:  # noqa: BLE001 - a missing torchsde/torchdiffeq: fall back, say why.
    print(f'k-diffusion sampling.py could not be loaded ({e}); using the plain loop.',
          file=sys.stderr)
    return None, None


@torch.no_grad()
def heun_loop(model, x, sigmas, extra_args=None, disable=None):
  """EDM Alg. 1 (deterministic Heun) as an eager PyTorch loop, for when k-diffusion is absent."""
  s_in = x.new_ones([x.shape[0]])
  for i in range(len(sigmas) - 1):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    d_cur = (x - model(x, sigma * s_in)) / sigma
    x_next = x + (sigma_next - sigma) * d_cur
    if sigma_next > 0:
      d_prime = (x_next - model(x_next, sigma_next * s_in)) / sigma_next
      x_next = x + (sigma_next - sigma) * (0.5 * d_cur + 0.5 * d_prime)
    x = x_next
  return x


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0):
  ramp = torch.linspace(0, 1, n)
  s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
  return torch.cat([s, s.new_zeros(1)])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--heun_steps', type=int, default=18)
  args = p.parse_args()
  import diffusers
  from diffusers import UNet2DModel

  torch.manual_seed(0)
  b = args.batch
  autocast = (torch.autocast('cpu', dtype=torch.bfloat16) if args.dtype == 'bfloat16'
              else torch.autocast('cpu', enabled=False))
  out = {'framework': f'torch {torch.__version__}, diffusers {diffusers.__version__}',
         'threads': torch.get_num_threads(), 'batch': b, 'dtype': args.dtype}
  a = torch.randn(2048, 2048)
  out['matmul_gflops'] = 2 * 2048**3 / best_time(lambda: a @ a) / 1e9

  model = UNet2DModel(**DDPM_CIFAR10)
  out['params'] = sum(p.numel() for p in model.parameters())
  x = torch.randn(b, 3, 32, 32)
  t = torch.full((b,), 500, dtype=torch.long)

  model.eval()
  with torch.inference_mode(), autocast:
    # ≥ 2 calls a round, as on diffjax's side.
    out['forward_img_s'] = b / best_time(lambda: model(x, t).sample, repeats=3, min_time=9.0)

  # Ho et al.'s linear β schedule, ε-prediction with L_simple (mean squared error).
  betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
  alphas_bar = torch.cumprod(1 - betas, 0).float()
  model.train()
  opt = torch.optim.Adam(model.parameters(), lr=2e-4, foreach=True)
  params = [p for p in model.parameters()]
  ema = [p.detach().clone() for p in params]

  x0 = torch.randn(b, 3, 32, 32)  # a fixed batch, as on diffjax's side

  def train_step():
    steps = torch.randint(0, 1000, (b,))
    noise = torch.randn_like(x0)
    ab = alphas_bar[steps].view(b, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    with autocast:
      loss = torch.nn.functional.mse_loss(model(xt, steps).sample.float(), noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1 - 0.9999)
    return loss.item()

  out['train_img_s'] = b / best_time(train_step, repeats=3, min_time=3.0)

  # EDM's Heun sampler around the ε-network: D(x; σ) = x − σ·ε(x/√(1+σ²), t(σ)).
  model.eval()
  sigma_table = ((1 - alphas_bar) / alphas_bar).sqrt()

  def denoise(x, sigma):
    steps = torch.searchsorted(sigma_table, sigma.float()).clamp(max=999)
    c_in = (1 / (1 + sigma**2).sqrt()).view(-1, 1, 1, 1)
    with autocast:
      eps = model(c_in * x, steps).sample.float()
    return x - sigma.view(-1, 1, 1, 1) * eps

  sample_heun, source = k_diffusion_heun()
  out['heun_source'] = source or 'eager loop (k-diffusion not installed)'
  sample_heun = sample_heun or heun_loop
  sigmas = karras_sigmas(args.heun_steps, float(sigma_table[0]), float(sigma_table[-1]))
  latents = torch.randn(b, 3, 32, 32) * sigmas[0]
  with torch.inference_mode():
    out['heun_img_s'] = b / best_time(lambda: sample_heun(denoise, latents, sigmas, disable=True),
                                      repeats=2, min_time=1.0)
    # The same split as diffjax's side: t(n) = a + b·n at the table's and at LONG_STEPS steps.
    trivial = lambda x, sigma: 0.5 * x
    times = []
    for n in (args.heun_steps, overhead.LONG_STEPS):
      s = karras_sigmas(n, float(sigma_table[0]), float(sigma_table[-1]))
      x = torch.randn(b, 3, 32, 32) * s[0]
      times.append(best_time(functools.partial(sample_heun, trivial, x, s, disable=True),
                             repeats=10, min_time=2.0))
  out.update(overhead.split_overhead(times[0], 2 * args.heun_steps - 1,
                                     times[1], 2 * overhead.LONG_STEPS - 1))
  out['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  assert math.isfinite(out['train_img_s'])
  print(json.dumps(out))


if __name__ == '__main__':
  main()
