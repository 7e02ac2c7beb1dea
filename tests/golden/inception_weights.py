"""The random Inception weights behind `inception_golden.npz`, regenerated from a seed with numpy only.

Shared by `scripts/make_inception_golden.py` (which saves them as a `.pth` for torch-fidelity) and
`tests/test_evaluation.py` (which feeds them through diffjax's converter), so the 95 MB of weights never
need committing. Each tensor draws from its own generator seeded by (seed, crc32(name)), so the values do
not depend on the order in which the names are listed.

Scales keep activations O(1) through all 94 conv layers: He-normal conv weights, BN layers close to the
identity, so the golden features exercise every layer instead of collapsing to 0 or overflowing.
"""

import zlib

import numpy as np

SEED = 20151205


def golden_tensor(name: str, shape: tuple[int, ...], seed: int = SEED) -> np.ndarray:
  """One tensor of the golden state dict (PyTorch layout), float32."""
  rng = np.random.default_rng([seed, zlib.crc32(name.encode('utf-8'))])
  shape = tuple(int(s) for s in shape)
  if name.endswith('conv.weight'):  # [out, in, kh, kw]
    fan_in = int(np.prod(shape[1:]))
    value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
  elif name.endswith('bn.weight'):
    value = rng.uniform(0.8, 1.2, shape)
  elif name.endswith('bn.bias'):
    value = rng.normal(0.0, 0.1, shape)
  elif name.endswith('bn.running_mean'):
    value = rng.normal(0.0, 0.1, shape)
  elif name.endswith('bn.running_var'):
    value = rng.uniform(0.5, 1.5, shape)
  elif name == 'fc.weight':  # [1008, 2048]
    value = rng.standard_normal(shape) / np.sqrt(shape[1])
  elif name == 'fc.bias':
    value = rng.normal(0.0, 1.0, shape)
  else:
    raise KeyError(f'No golden rule for tensor {name!r}')
  return value.astype(np.float32)


def golden_state_dict(
  layout: dict[str, tuple[int, ...]], seed: int = SEED
) -> dict[str, np.ndarray]:
  """{name: tensor} for every float tensor in `layout` (name -> PyTorch shape)."""
  return {name: golden_tensor(name, shape, seed) for name, shape in layout.items()}
