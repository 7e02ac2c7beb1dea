"""Shared plumbing of the entry points: quiet logs, one-sentence errors, exit codes.

Bad input ends in one line `error: <what is wrong and what to do>` and exit code 2 (1 for a run that
diverged), never a traceback from deep inside JAX — unless --debug is given.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

# Errors whose message is already a sentence for the user.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError, PermissionError, OSError)


def quiet_logs() -> None:
  """Silences TensorFlow/absl chatter so progress and errors stay readable."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  logging.getLogger('absl').setLevel(logging.WARNING)
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.ERROR)


def enable_compilation_cache(path: str | None = None) -> None:
  """Persists XLA compilations across runs (restarts and repeated sampling start faster)."""
  import jax
  path = path or os.environ.get('DIFFJAX_CACHE', os.path.expanduser('~/.cache/diffjax/xla'))
  try:
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  except Exception:  # An unwritable cache only costs compile time.
    pass


def error_message(e: BaseException) -> str:
  text = str(e).strip()
  if isinstance(e, KeyError) and len(e.args) == 1:
    text = str(e.args[0])
  return (text.splitlines() or [type(e).__name__])[0]


def run(main: Callable[[], int | None], debug: bool) -> int:
  """Runs `main`; user errors become one line on stderr and a non-zero exit code."""
  from diffjax.training.loop import TrainingDiverged
  try:
    return int(main() or 0)
  except TrainingDiverged as e:
    if debug:
      raise
    print(f'error: {error_message(e)}', file=sys.stderr)
    return 1
  except USER_ERRORS as e:
    if debug:
      raise
    print(f'error: {error_message(e)}', file=sys.stderr)
    return 2
