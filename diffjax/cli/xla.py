"""The process set-up every entry point does first: quiet logs, XLA:CPU flags, compilation cache."""

from __future__ import annotations

import logging
import os
from typing import Sequence


def quiet_logs() -> None:
  """Silences TensorFlow/absl chatter so progress and errors stay readable."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  logging.getLogger('absl').setLevel(logging.WARNING)
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.ERROR)


# XLA:CPU flags measured to speed up diffjax's networks (benchmarks/NOTES.md): XLA 0.10 hands
# convolutions, reductions and elementwise fusions to YNNPACK by default; keeping only the reductions
# there (its reductions that keep the minor axis run at memory speed, XLA's own emitter is ~15×
# slower) and leaving convolutions to XLA's Eigen kernels (near the matmul peak, forward and both
# gradients) gave the DDPM CIFAR-10 U-Net +14% forward and +19% train step (medians of repeated
# runs) on the 2-core CPU.
CPU_XLA_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=reduce',)
# XLA aborts the process on a flag it does not know, and these are experimental: only jaxlib
# releases on which they were measured get them.
_CPU_XLA_FLAGS_JAXLIB = ((0, 10),)


def tune_xla_cpu(flags: Sequence[str] = CPU_XLA_FLAGS) -> bool:
  """Adds diffjax's measured XLA:CPU flags to $XLA_FLAGS; returns whether it did.

  Call it before JAX creates its backends (the entry points do, first thing): XLA reads the
  variable once. A flag the user already set in $XLA_FLAGS is left as they set it, and on a jaxlib
  other than the measured releases nothing is added. The flags only concern the CPU backend, so
  GPU and TPU runs are unaffected.

  Args:
    flags: `--name=value` strings to add.
  """
  try:
    import jaxlib.version
    release = tuple(int(p) for p in jaxlib.version.__version__.split('.')[:2])
  except Exception:  # An unreadable version means an unmeasured one.
    return False
  if release not in _CPU_XLA_FLAGS_JAXLIB:
    return False
  current = os.environ.get('XLA_FLAGS', '')
  given = {f.split('=')[0] for f in current.split()}
  added = [f for f in flags if f.split('=')[0] not in given]
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return bool(added)


def enable_compilation_cache(path: str | None = None) -> None:
  """Persists XLA compilations across runs (restarts and repeated sampling start faster)."""
  import jax
  path = path or os.environ.get('DIFFJAX_CACHE', os.path.expanduser('~/.cache/diffjax/xla'))
  try:
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  except Exception:  # An unwritable cache only costs compile time.
    pass
