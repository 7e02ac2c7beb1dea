"""Golden trajectories of k-diffusion's and diffusers' solvers on an exact Gaussian-mixture denoiser.

Writes tests/golden/kdiffusion_samplers.npz and tests/golden/kdiffusion_diffusers_multistep.npz,
which tests/samplers/test_kdiffusion.py and test_unipc_deis.py compare diffjax's solvers to,
without torch. Everything runs in float64, so the files hold the reference algorithms' results to
~1e-15 and a float32 diffjax run is judged at float32 precision.

The denoiser is exact: data y ~ Σ_k π_k N(μ_k, s_k² I) in R^3, so x = y + σn has
p(x) = Σ_k π_k N(μ_k, (s_k² + σ²) I) and

    D(x; σ) = E[y | x] = Σ_k w_k(x)·(μ_k + s_k²/(s_k² + σ²)·(x − μ_k)),
    w_k(x) ∝ π_k·N(x; μ_k, (s_k² + σ²) I).

Run it in a separate environment with torch (never in the project's .venv):

    python3 -m venv /tmp/kd
    /tmp/kd/bin/pip install torch==2.13.0 numpy scipy torchdiffeq torchsde diffusers
    /tmp/kd/bin/pip install --no-deps k-diffusion==0.1.1.post1
    /tmp/kd/bin/python scripts/make_kdiffusion_golden.py

k-diffusion's package __init__ imports torchvision; its `sampling.py` needs only torch, scipy,
torchdiffeq, torchsde, tqdm and `utils.append_dims`, so it is loaded on its own with a stand-in
`k_diffusion.utils` (as benchmarks/bench_torch.py does). The stochastic solvers run with a noise
sampler that records what it hands out (step, stage, noise), so that the tests can replay the
same noise through diffjax's `noise_sampler=` hook.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np
import torch

torch.set_default_dtype(torch.float64)

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests', 'golden')

# The mixture (3 components in R^3) and the latents: small, so the files stay a few kB.
MEANS = np.array([[0.6, 0.0, -0.3], [-0.5, 0.4, 0.0], [0.0, -0.6, 0.5]])
STDS = np.array([0.2, 0.3, 0.1])
WEIGHTS = np.array([0.5, 0.3, 0.2])
BATCH = 6
NUM_STEPS = 8


def mixture_denoiser(x, sigma):
  """Exact D(x; σ) [B, 3] of the mixture for x [B, 3], σ [B] (torch, float64)."""
  means, stds = torch.as_tensor(MEANS), torch.as_tensor(STDS)
  var = stds**2 + sigma[:, None]**2  # [B, K]
  diff = x[:, None, :] - means  # [B, K, 3]
  logits = (torch.log(torch.as_tensor(WEIGHTS)) - 1.5 * torch.log(var)
            - 0.5 * (diff**2).sum(-1) / var)
  w = torch.softmax(logits, dim=1)
  posterior = means + (stds**2 / var)[..., None] * diff
  return (w[..., None] * posterior).sum(1)


def load_sampling():
  """k-diffusion's sampling module, loaded on its own (its package imports torchvision)."""
  spec = importlib.util.find_spec('k_diffusion')
  root = list(spec.submodule_search_locations)[0]
  package = types.ModuleType('k_diffusion')
  package.__path__ = [root]
  utils = types.ModuleType('k_diffusion.utils')
  utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
  sys.modules.update({'k_diffusion': package, 'k_diffusion.utils': utils})
  loader = importlib.util.spec_from_file_location('k_diffusion.sampling', f'{root}/sampling.py')
  module = importlib.util.module_from_spec(loader)
  sys.modules['k_diffusion.sampling'] = module
  loader.loader.exec_module(module)
  return module


class RecordingNoise:
  """A noise sampler that draws from a seeded generator and records (step, stage, noise).

  The step is the grid index of `sigma` (every solver calls it with σ = σ_i of its step); the
  stage counts the calls within a step.
  """

  def __init__(self, sigmas, seed):
    self.sigmas = sigmas.numpy()
    self.gen = torch.Generator().manual_seed(seed)
    self.noise = np.zeros((len(self.sigmas) - 1, 2, BATCH, 3))
    self.calls = {}

  def __call__(self, sigma, sigma_next):
    i = int(np.argmin(np.abs(self.sigmas - float(sigma))))
    stage = self.calls.get(i, 0)
    self.calls[i] = stage + 1
    # float32-representable draws, so the file can hold them in float32 without changing them.
    n = torch.randn(BATCH, 3, generator=self.gen).float().double()
    self.noise[i, stage] = n.numpy()
    return n


def _zero(sigma, sigma_next):
  return torch.zeros(BATCH, 3)


def kdiffusion_golden(ks) -> dict:
  # One length for all grids (the tests compile each solver once, the grid an argument).
  grids = {
      'karras': ks.get_sigmas_karras(NUM_STEPS, 0.002, 80.0, rho=7.0),
      'exponential': ks.get_sigmas_exponential(NUM_STEPS, 0.01, 20.0),
      'polyexponential': ks.get_sigmas_polyexponential(NUM_STEPS, 0.005, 40.0, rho=2.0),
      'vp': ks.get_sigmas_vp(NUM_STEPS),
  }
  deterministic = {
      'euler': lambda m, x, s: ks.sample_euler(m, x, s, disable=True),
      'heun': lambda m, x, s: ks.sample_heun(m, x, s, disable=True),
      'lms': lambda m, x, s: ks.sample_lms(m, x, s, disable=True),
      'lms_order2': lambda m, x, s: ks.sample_lms(m, x, s, disable=True, order=2),
      'dpm_2': lambda m, x, s: ks.sample_dpm_2(m, x, s, disable=True),
      'dpm_2_ancestral_eta0': lambda m, x, s: ks.sample_dpm_2_ancestral(m, x, s, disable=True,
                                                                        eta=0.0),
      'dpmpp_2s_ancestral_eta0': lambda m, x, s: ks.sample_dpmpp_2s_ancestral(
          m, x, s, disable=True, eta=0.0),
      'dpmpp_sde_eta0': lambda m, x, s: ks.sample_dpmpp_sde(m, x, s, disable=True, eta=0.0,
                                                            noise_sampler=_zero),
      'dpmpp_sde_eta0_r03': lambda m, x, s: ks.sample_dpmpp_sde(m, x, s, disable=True, eta=0.0,
                                                                r=0.3, noise_sampler=_zero),
      'dpmpp_2m': lambda m, x, s: ks.sample_dpmpp_2m(m, x, s, disable=True),
      'dpmpp_2m_sde_eta0': lambda m, x, s: ks.sample_dpmpp_2m_sde(m, x, s, disable=True, eta=0.0,
                                                                  noise_sampler=_zero),
      'dpmpp_2m_sde_heun_eta0': lambda m, x, s: ks.sample_dpmpp_2m_sde(
          m, x, s, disable=True, eta=0.0, solver_type='heun', noise_sampler=_zero),
      'dpmpp_3m_sde_eta0': lambda m, x, s: ks.sample_dpmpp_3m_sde(m, x, s, disable=True, eta=0.0,
                                                                  noise_sampler=_zero),
  }
  # Stochastic, with recorded noise: (name, sampler, kwargs).
  stochastic = {
      'euler_ancestral': (ks.sample_euler_ancestral, dict(eta=1.0, s_noise=1.0)),
      'dpm_2_ancestral': (ks.sample_dpm_2_ancestral, dict(eta=0.7, s_noise=1.0)),
      'dpmpp_2s_ancestral': (ks.sample_dpmpp_2s_ancestral, dict(eta=1.0, s_noise=0.9)),
      'dpmpp_sde': (ks.sample_dpmpp_sde, dict(eta=1.0, s_noise=1.0)),
      'dpmpp_2m_sde': (ks.sample_dpmpp_2m_sde, dict(eta=1.0, s_noise=1.0)),
      'dpmpp_2m_sde_heun': (ks.sample_dpmpp_2m_sde, dict(eta=0.5, solver_type='heun')),
      'dpmpp_3m_sde': (ks.sample_dpmpp_3m_sde, dict(eta=1.0, s_noise=1.0)),
  }
  latents = np.random.RandomState(0).randn(BATCH, 3)
  out = dict(means=MEANS, stds=STDS, weights=WEIGHTS, latents=latents)
  for g, sigmas in grids.items():
    out[f'{g}__sigmas'] = sigmas.numpy()
    x0 = torch.as_tensor(latents) * sigmas[0]
    for name, run in deterministic.items():
      out[f'{g}__{name}'] = run(mixture_denoiser, x0.clone(), sigmas).numpy()
    if g not in ('karras', 'exponential'):  # the noise records are the bulk of the file
      continue
    for seed, (name, (run, kwargs)) in enumerate(stochastic.items()):
      recorder = RecordingNoise(sigmas, seed)
      result = run(mixture_denoiser, x0.clone(), sigmas, disable=True, noise_sampler=recorder,
                   **kwargs)
      out[f'{g}__{name}'] = result.numpy()
      out[f'{g}__{name}__noise'] = recorder.noise.astype(np.float32)
  # DPM-Solver-fast and -adaptive walk their own λ-grids between σ_min and σ_max.
  x0 = torch.as_tensor(latents) * 80.0
  for nfe in (10, 11, 12):
    out[f'dpm_fast__nfe{nfe}'] = ks.sample_dpm_fast(mixture_denoiser, x0.clone(), 0.002, 80.0,
                                                    nfe, disable=True).numpy()
  # k-diffusion's adaptive error norm spans the batch; diffjax adapts per sample, which is
  # k-diffusion run on each sample alone.
  for order in (2, 3):
    runs = [ks.sample_dpm_adaptive(mixture_denoiser, x0[b:b + 1].clone(), 0.002, 80.0,
                                   order=order, disable=True, return_info=True)
            for b in range(BATCH)]
    out[f'dpm_adaptive__order{order}'] = np.concatenate([x.numpy() for x, _ in runs])
    out[f'dpm_adaptive__order{order}__nfe'] = np.asarray([info['nfe'] for _, info in runs])
  return out


def diffusers_golden() -> dict:
  """UniPC (bh1/bh2, orders 1–3) and DEIS (orders 1–3) of diffusers on Karras σ, data prediction.

  diffusers steps the VP-scaled state x_vp = x/sqrt(1 + σ²); the model gets x = x_vp·sqrt(1 + σ²)
  and returns D (prediction_type='sample'). Its σ are made float64 after set_timesteps.
  """
  from diffusers import DEISMultistepScheduler, UniPCMultistepScheduler
  latents = np.random.RandomState(1).randn(BATCH, 3)
  out = dict(latents=latents)
  def run(scheduler):
    scheduler.set_timesteps(NUM_STEPS)
    scheduler.sigmas = scheduler.sigmas.to(torch.float64)
    scheduler.set_begin_index(0)
    sigmas = scheduler.sigmas
    sample = torch.as_tensor(latents) * sigmas[0] / torch.sqrt(1 + sigmas[0]**2)
    for i, t in enumerate(scheduler.timesteps):
      scale = torch.sqrt(1 + sigmas[i]**2)
      denoised = mixture_denoiser(sample * scale, sigmas[i].expand(BATCH))
      sample = scheduler.step(denoised, t, sample).prev_sample
    return sigmas.numpy(), (sample * torch.sqrt(1 + sigmas[-1]**2)).numpy()

  common = dict(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012,
                prediction_type='sample', use_karras_sigmas=True, lower_order_final=True)
  # bh1 ends on σ_min: diffusers' last step to σ = 0 computes B(h)·0 = (−inf)·0 = NaN for bh1.
  # Ending on σ_min repeats it (a step of zero length, which leaves x as it is).
  for solver_type, final in (('bh1', 'sigma_min'), ('bh2', 'zero')):
    for order in (1, 2, 3):
      sched = UniPCMultistepScheduler(solver_order=order, solver_type=solver_type,
                                      predict_x0=True, final_sigmas_type=final, **common)
      sigmas, x = run(sched)
      out[f'unipc_{solver_type}_order{order}'] = x
      out[f'unipc_{solver_type}_order{order}__sigmas'] = sigmas
  for order in (1, 2, 3):
    sched = DEISMultistepScheduler(solver_order=order, algorithm_type='deis', **common)
    sigmas, x = run(sched)
    out[f'deis_order{order}'] = x
    out[f'deis_order{order}__sigmas'] = sigmas
  return out


def main():
  ks = load_sampling()
  os.makedirs(OUT, exist_ok=True)
  for name, data in (('kdiffusion_samplers', kdiffusion_golden(ks)),
                     ('kdiffusion_diffusers_multistep', diffusers_golden())):
    bad = [k for k, v in data.items() if not np.all(np.isfinite(v))]
    if bad:
      print(f'warning: non-finite reference results: {bad}', file=sys.stderr)
    path = os.path.join(OUT, f'{name}.npz')
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in data.items()})
    print(f'wrote {path} ({os.path.getsize(path)} bytes, {len(data)} arrays)')


if __name__ == '__main__':
  main()
