"""Error against NFE of every deterministic σ-grid solver on an exact Gaussian mixture (docs).

`python scripts/solver_error_curves.py` writes docs/samplers_error_vs_nfe.png and prints the
table docs/samplers.md quotes. The data are the mixture of scripts/make_kdiffusion_golden.py
(3 components in R^3, exact denoiser); 256 latents are carried from σ = 80 to σ = 0 down the
PF-ODE dx/dσ = (x − D(x; σ))/σ by each solver on the Karras grid (σ_min = 0.002, ρ = 7) of N
steps, and compared with diffrax's Tsit5 at rtol = atol = 1e-11 (to σ = 1e-7, then D, whose
remaining error is O(σ²)). Everything runs in float64, so the curves show the solvers'
truncation error, not float32 rounding. The error is the median over samples of the Euclidean
distance to the reference endpoint: a few trajectories pass close to where the flow splits
between components, and their much larger errors would make a mean follow them alone.

The figure is drawn with PIL (as scripts/architecture_graph.py): the project needs no plotting
package.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffrax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

jax.config.update('jax_enable_x64', True)

from diffjax import samplers  # noqa: E402
from diffjax.processes import schedules  # noqa: E402

MEANS = np.array([[0.6, 0.0, -0.3], [-0.5, 0.4, 0.0], [0.0, -0.6, 0.5]])
STDS = np.array([0.2, 0.3, 0.1])
WEIGHTS = np.array([0.5, 0.3, 0.2])
SIGMA_MAX, SIGMA_MIN = 80.0, 0.002

# name: (solver, options, denoiser calls per step (the last step to 0 costs one)).
SOLVERS = {
    'euler': (samplers.euler, {}, 1),
    'heun': (samplers.heun, {}, 2),
    'dpm_2': (samplers.dpm_2, {}, 2),
    'lms (order 4)': (samplers.lms, {}, 1),
    'dpmpp_2s (η=0)': (samplers.dpmpp_2s_ancestral, dict(eta=0.0), 2),
    'dpmpp_sde (η=0)': (samplers.dpmpp_sde, dict(eta=0.0), 2),
    'dpmpp_2m': (samplers.dpmpp_2m, {}, 1),
    'dpmpp_2m_sde heun (η=0)': (samplers.dpmpp_2m_sde, dict(eta=0.0, solver_type='heun'), 1),
    'dpmpp_3m_sde (η=0)': (samplers.dpmpp_3m_sde, dict(eta=0.0), 1),
    'unipc-1 bh2': (samplers.unipc, dict(order=1), 1),
    'unipc-2 bh2': (samplers.unipc, dict(order=2), 1),
    'unipc-3 bh2': (samplers.unipc, dict(order=3), 1),
    'unipc-3 bh1': (samplers.unipc, dict(order=3, solver_type='bh1'), 1),
    'deis-2': (samplers.deis, dict(order=2), 1),
    'deis-3': (samplers.deis, dict(order=3), 1),
}
TABLE_NFE = (10, 20, 35)
# NFE = N for one call per step; 2N − 1 (3, 5, …, 127) for two.
STEPS_ONE_CALL = (3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 35, 48, 64, 96, 128)
STEPS_TWO_CALLS = (2, 3, 4, 5, 6, 8, 10, 11, 12, 16, 18, 24, 32, 48, 64)


def denoise(x, sigma):
  """Exact D(x [B, 3], σ [B]) of the mixture."""
  var = STDS**2 + sigma[:, None]**2
  diff = x[:, None, :] - MEANS
  logits = jnp.log(WEIGHTS) - 1.5 * jnp.log(var) - 0.5 * jnp.sum(diff**2, -1) / var
  w = jax.nn.softmax(logits, axis=1)
  return jnp.sum(w[..., None] * (MEANS + (STDS**2 / var)[..., None] * diff), axis=1)


def reference(x0):
  """The PF-ODE endpoint at σ = 0 from x0 at σ_max, diffrax Tsit5 at rtol = atol = 1e-11."""
  def field(sigma, x, args):
    return (x - denoise(x, jnp.full(x.shape[:1], sigma))) / sigma

  end = 1e-7
  sol = diffrax.diffeqsolve(diffrax.ODETerm(field), diffrax.Tsit5(), t0=SIGMA_MAX, t1=end,
                            dt0=-1e-2, y0=x0, max_steps=100_000,
                            stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-11))
  x = sol.ys[-1]
  return np.asarray(denoise(x, jnp.full(x.shape[:1], end)))


def curves(num_samples: int):
  latents = np.random.RandomState(0).randn(num_samples, 3)
  x0 = jnp.asarray(latents * SIGMA_MAX)
  exact = reference(x0)
  out = {}
  for name, (fn, kwargs, calls) in SOLVERS.items():
    steps = STEPS_TWO_CALLS if calls == 2 else STEPS_ONE_CALL
    points = []
    for n in steps:
      sigmas = schedules.karras(n, SIGMA_MIN, SIGMA_MAX)
      x = np.asarray(fn(denoise, x0, sigmas, **kwargs))
      error = np.median(np.sqrt(np.sum((x - exact)**2, axis=-1)))
      points.append((calls * n - (calls - 1), float(error)))
    out[name] = points
    print(f'{name:26s}', ' '.join(f'{nfe}:{err:.1e}' for nfe, err in points), flush=True)
  return out


# ------------------------------------------------------------------------------------------------
# A log-log plot in PIL.

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
          (0, 0, 128), (128, 0, 0), (0, 128, 128), (128, 128, 0), (0, 0, 0)]


def _font(size):
  try:
    return ImageFont.truetype('DejaVuSans.ttf', size)
  except OSError:
    return ImageFont.load_default()


def plot(data: dict, path: str, title: str) -> None:
  width, height, left, right, top, bottom = 1100, 640, 80, 300, 40, 60
  image = Image.new('RGB', (width, height), 'white')
  pen = ImageDraw.Draw(image)
  font, small = _font(14), _font(12)
  errs = [e for pts in data.values() for _, e in pts if e > 0]
  nfes = [n for pts in data.values() for n, _ in pts]
  y_lo, y_hi = math.floor(math.log10(min(errs))), math.ceil(math.log10(max(errs)))
  x_lo, x_hi = math.log10(max(2, min(nfes) - 0.5)), math.log10(max(nfes) * 1.05)

  def to_px(nfe, err):
    u = (math.log10(nfe) - x_lo) / (x_hi - x_lo)
    v = (math.log10(err) - y_lo) / (y_hi - y_lo)
    return left + u * (width - left - right), height - bottom - v * (height - top - bottom)

  box = (left, top, width - right, height - bottom)
  pen.rectangle(box, outline='black')
  for e in range(y_lo, y_hi + 1):
    _, y = to_px(10**x_lo, 10.0**e)
    pen.line([(left, y), (width - right, y)], fill=(225, 225, 225))
    pen.text((left - 8, y), f'1e{e}', fill='black', font=small, anchor='rm')
  for nfe in (3, 5, 10, 20, 35, 50, 100):
    if 10**x_lo <= nfe <= 10**x_hi:
      x, _ = to_px(nfe, 10.0**y_lo)
      pen.line([(x, top), (x, height - bottom)], fill=(225, 225, 225))
      pen.text((x, height - bottom + 8), str(nfe), fill='black', font=small, anchor='mt')
  pen.text(((left + width - right) / 2, height - 22), 'NFE (denoiser evaluations)',
           fill='black', font=font, anchor='mm')
  pen.text((left, 12), title, fill='black', font=font)
  for k, (name, pts) in enumerate(data.items()):
    color = COLORS[k % len(COLORS)]
    xy = [to_px(n, e) for n, e in pts if e > 0]
    pen.line(xy, fill=color, width=2)
    for x, y in xy:
      pen.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=color)
    y = top + 10 + 22 * k
    pen.line([(width - right + 15, y), (width - right + 45, y)], fill=color, width=3)
    pen.text((width - right + 52, y), name, fill='black', font=small, anchor='lm')
  image.save(path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--samples', type=int, default=256)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'docs', 'samplers_error_vs_nfe.png'))
  args = parser.parse_args()
  data = curves(args.samples)
  plot(data, args.out, 'Median error of the PF-ODE endpoint against NFE: exact 3-component '
       'mixture, Karras σ, float64')
  print(f'wrote {args.out}')
  print('\n| solver | ' + ' | '.join(f'NFE {n}' for n in TABLE_NFE) + ' |')
  print('|---|' + '---|' * len(TABLE_NFE))
  for name, pts in data.items():
    cells = []
    for target in TABLE_NFE:  # the largest NFE not above the target (odd for 2-call solvers)
      nfe, err = max((p for p in pts if p[0] <= target), key=lambda p: p[0])
      cells.append(f'{err:.1e}' + ('' if nfe == target else f' ({nfe})'))
    print(f'| {name} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
