"""Where the DDPM U-Net's time goes: forward and forward+backward img/s with one part swapped out.

    python benchmarks/ablate_unet.py base two_pass_groupnorm no_groupnorm no_attention no_silu

Each variant runs in its own process (the swaps patch module attributes). Variants:
  base                 the network as shipped
  two_pass_groupnorm   GroupNorm with mean, then the variance of the centred values (the old one)
  no_groupnorm         GroupNorm replaced by its affine alone (an upper bound on what it can cost)
  no_attention         attention returns v (no softmax, no logits)
  no_silu              SiLU replaced by the identity
  silu_vjp             SiLU with a hand-written backward that recomputes the sigmoid
  dot_product_attention  jax.nn.dot_product_attention in place of the einsum chain
Results are recorded in benchmarks/NOTES.md.
"""

from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = ('base', 'two_pass_groupnorm', 'no_groupnorm', 'no_attention', 'no_silu', 'silu_vjp',
            'dot_product_attention')


def _patch(variant: str) -> None:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from diffjax.models import adm_unet, layers

  if variant in ('two_pass_groupnorm', 'no_groupnorm'):
    class SwappedGroupNorm(nn.Module):
      num_groups: int = 32
      min_channels_per_group: int = 4
      eps: float = 1e-5
      dtype: object = jnp.float32

      @nn.compact
      def __call__(self, x):
        c = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
        if variant == 'no_groupnorm':
          return x * scale + bias
        groups = layers.group_count(c, self.num_groups, self.min_channels_per_group)
        h = x.reshape(*x.shape[:-1], groups, c // groups)
        axes = tuple(range(1, h.ndim - 2)) + (h.ndim - 1,)
        mean = h.mean(axis=axes, keepdims=True)
        var = jnp.square(h - mean).mean(axis=axes, keepdims=True)
        h = ((h - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return h * scale + bias

    layers.GroupNorm = adm_unet.GroupNorm = SwappedGroupNorm
  elif variant == 'no_attention':
    layers.attention = lambda q, k, v: v
  elif variant == 'dot_product_attention':
    layers.attention = lambda q, k, v: jax.nn.dot_product_attention(q, k, v).astype(v.dtype)
  elif variant in ('no_silu', 'silu_vjp'):
    if variant == 'no_silu':
      silu = lambda x: x
    else:
      @jax.custom_vjp
      def silu(x):
        return x * jax.nn.sigmoid(x)

      def silu_bwd(x, g):
        s = jax.nn.sigmoid(x)
        return (g * (s * (1 + x * (1 - s))),)

      silu.defvjp(lambda x: (silu(x), x), silu_bwd)
    nn.silu = silu  # layers and adm_unet call nn.silu at trace time
  elif variant != 'base':
    raise SystemExit(f'Unknown variant {variant!r}; known: {", ".join(VARIANTS)}.')


def measure(variant: str) -> str:
  _patch(variant)
  import jax
  import jax.numpy as jnp
  from bench_jax import best_time, compiled_flops

  from diffjax import models

  net = models.create_network('ddpm_cifar10', label_dim=0)
  x = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  noise = jnp.full((16,), 500.0)
  params = jax.jit(lambda k: net.init({'params': k}, x, noise))(jax.random.key(1))['params']
  fwd = jax.jit(lambda p, x: net.apply({'params': p}, x, noise)).lower(params, x).compile()
  t = best_time(fwd, params, x, repeats=5, min_time=2.0)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(net.apply({'params': p}, x, noise) ** 2)))
  bwd = grad.lower(params, x).compile()
  tb = best_time(bwd, params, x, repeats=3, min_time=3.0)
  return (f'{variant:<24} forward {16 / t:6.2f} img/s ({compiled_flops(fwd) / t / 1e9:4.0f} '
          f'GFLOP/s)   fwd+bwd {16 / tb:5.2f} img/s ({compiled_flops(bwd) / tb / 1e9:4.0f} GFLOP/s)')


def main():
  if len(sys.argv) == 3 and sys.argv[1] == '--one':
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(measure(sys.argv[2]))
    return
  for variant in sys.argv[1:] or VARIANTS:
    if variant not in VARIANTS:
      raise SystemExit(f'Unknown variant {variant!r}; known: {", ".join(VARIANTS)}.')
    out = subprocess.run([sys.executable, __file__, '--one', variant], capture_output=True,
                         text=True)
    print(out.stdout.strip() or out.stderr[-2000:])


if __name__ == '__main__':
  main()
