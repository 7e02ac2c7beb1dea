"""One-sentence errors and exit codes for the entry points, and absl flag parsing that keeps them.

Bad input ends in one line `error: <what is wrong and what to do>` and exit code 2 (1 for a run that
diverged), never a traceback from deep inside JAX — unless --debug is given.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Callable, Sequence

from diffjax.training.loop import TrainingDiverged, TrainingInterrupted

# Errors whose message is already a sentence for the user.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError, PermissionError, OSError)


def error_message(e: BaseException) -> str:
  text = str(e).strip()
  if isinstance(e, KeyError) and len(e.args) == 1:
    text = str(e.args[0])
  return (text.splitlines() or [type(e).__name__])[0]


class _OneLineLogs(logging.Filter):
  """Without --debug: no tracebacks in log records, and Orbax's chatter below ERROR dropped.

  Orbax logs a full traceback when an async save fails; the error itself is reported as one
  sentence by `run`.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if 'orbax' in record.pathname and record.levelno < logging.ERROR:
      return False
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def _one_handler() -> None:
  """Drops the plain stderr handler that absl's logging adds to the root logger when something
  logs before absl's own handler is installed (Orbax does, at import), so warnings print once."""
  from absl import logging as absl_logging
  root = logging.getLogger()
  if absl_logging.get_absl_handler() in root.handlers:
    for handler in list(root.handlers):
      if type(handler) is logging.StreamHandler:
        root.removeHandler(handler)


def _is_main_process() -> bool:
  try:
    import jax
    return jax.process_index() == 0
  except Exception:  # noqa: BLE001 - before/without JAX: there is one process.
    return True


def run(main: Callable[[], int | None], debug: bool) -> int:
  """Runs `main`; user errors become one line on stderr and a non-zero exit code.

  A run stopped by SIGTERM/SIGINT after saving (`TrainingInterrupted`) prints where it resumes and
  exits 0; a second Ctrl-C (KeyboardInterrupt) exits 130.
  """
  _one_handler()
  if not debug:
    logging.getLogger('absl').addFilter(_OneLineLogs())
  try:
    return int(main() or 0)
  except TrainingInterrupted as e:
    if _is_main_process():
      print(str(e), flush=True)
    return 0
  except KeyboardInterrupt:
    if debug:
      raise
    print('error: Interrupted; rerun the same command to resume from the last checkpoint.',
          file=sys.stderr)
    return 130
  except TrainingDiverged as e:
    if debug:
      raise
    print(f'error: {error_message(e)}', file=sys.stderr)
    return 1
  except USER_ERRORS as e:
    if debug:
      raise
    message = error_message(e)
    if 'failure to load' in message or 'Failed loading config file' in message:
      # ml_collections reports a config file that failed to load only when it is first used, and
      # without the reason: find it.
      message = _config_load_error(sys.argv) or message
    print(f'error: {message}', file=sys.stderr)
    return 2


def _load_config_arg(argv: Sequence[str], errors: list | None = None):
  """The config named by --config=FILE.py[:ARG] in argv, or None if it can't be loaded.

  Args:
    argv: the command line.
    errors: if given, the exception that stopped the load is appended to it.
  """
  import importlib.util
  for arg in argv:
    m = re.match(r'--config=([^:]+)(?::(.*))?$', arg)
    if m:
      try:
        spec = importlib.util.spec_from_file_location('_diffjax_config', m.group(1))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(m.group(2)) if m.group(2) is not None else module.get_config()
      except Exception as e:  # noqa: BLE001 - only used to improve an error message.
        if errors is not None:
          errors.append(e)
        return None
  return None


def _config_load_error(argv: Sequence[str]) -> str | None:
  """Why the --config file could not be loaded, in one sentence (None if it loads)."""
  missing = _missing_config_file(argv)
  if missing:
    return missing
  errors = []
  if _load_config_arg(argv, errors) is None and errors:
    where = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '--config')
    return (f'Cannot load the config {where} ({error_message(errors[0]).rstrip(".")}); fix the '
            'file or pass another --config.')
  return None


def _unknown_override(argv: Sequence[str]) -> str | None:
  """Names the first --config.a.b=… override that is not a field of the loaded config."""
  config = _load_config_arg(argv)
  if config is None:
    return None
  for arg in argv:
    m = re.match(r'--config\.([\w.]+)(=|$)', arg)
    if not m:
      continue
    node, path = config, m.group(1).split('.')
    for i, key in enumerate(path):
      if not hasattr(node, 'keys') or key not in node:
        known = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(not a group)'
        where = '.'.join(path[:i]) or 'the config'
        return (f'Unknown config field {m.group(1)!r} in {arg}; fields of {where}: {known}.')
      node = node[key]
  return None


def _missing_config_file(argv: Sequence[str]) -> str | None:
  """Names a --config=FILE.py[:ARG] whose file does not exist."""
  for arg in argv:
    m = re.match(r'--config=([^:]+)(?::.*)?$', arg)
    if m and not os.path.isfile(m.group(1)):
      return (f'Config file {m.group(1)} does not exist; pass --config=configs/FILE.py:PRESET, '
              'e.g. --config=configs/edm.py:digits.')
  return None


def _bad_value(argv: Sequence[str], message: str) -> str | None:
  """Rewords absl's `flag --config.a.b=v: <parse error>` to name the type the field wants."""
  m = re.match(r'flag --config\.([\w.]+)=(.*?): (.*)$', message)
  if not m:
    return None
  field, value, reason = m.groups()
  node = _load_config_arg(argv)
  for key in field.split('.'):
    node = node.get(key) if hasattr(node, 'get') else None
  name = type(node).__name__
  wanted = f'{"an" if name[0] in "aeiou" else "a"} {name}' if node is not None else (
      'a value of the field\'s type')
  return (f'Cannot set config field {field} to {value!r} ({reason.rstrip(".")}); pass {wanted}, '
          f'e.g. --config.{field}={node!r}.' if node is not None else
          f'Cannot set config field {field} to {value!r} ({reason.rstrip(".")}); pass {wanted}.')


def parse_flags(argv: Sequence[str]):
  """absl flag parsing whose errors are one line (config files' tracebacks are cut to their message).

  Pass as `app.run(main, flags_parser=cli.parse_flags)`; --debug keeps the full text.
  """
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - every parse failure becomes one sentence.
    if '--debug' in argv:
      raise
    message = _config_load_error(argv) or _unknown_override(argv)
    if message is None:
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      message = lines[-1] if lines else type(e).__name__
      # ml_collections embeds the config file's traceback; its last line is `SomeError: message`.
      message = re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', message)
      message = _bad_value(argv, message) or message
    print(f'error: {message}', file=sys.stderr)
    raise SystemExit(2) from None
