"""Resumable shard folders: finished pieces of a long job (sample batches, feature statistics),
each written whole, and the settings they were made with.

`sampling.sample_run` keeps its sample batches in OUT/shards/ and `evaluation.feature_shards` its
FID statistics in OUT/shards/; both open the folder here. A rerun after a kill reuses what is
there only if it was made with the same settings (`settings.json`), so shards of two different
jobs never mix. Paths go through `runs.files` (local or gs://).
"""

from __future__ import annotations

import json

from diffjax.runs import files

SETTINGS_FILE = 'settings.json'
TMP_PREFIX = '.tmp-'  # `files.write_whole`'s names for a file being written


def canonical_settings(value):
  """`value` as JSON would give it back (tuples as lists, keys as strings)."""
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def differences(old, new, prefix: str = '') -> list[str]:
  """The dotted keys whose values differ between two JSON-like dicts."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [d for k in sorted(set(old) | set(new))
            for d in differences(old.get(k), new.get(k), f'{prefix}{k}.')]
  return [] if old == new else [prefix.rstrip('.') or 'all']


def open_shard_dir(directory: files.PathLike, settings: dict, what: str) -> None:
  """Makes a resumable shard folder ready: removes files a kill cut short, then checks that earlier
  shards were made with `settings` (or records them, for a new folder).

  Args:
    directory: the shard folder (made if missing; local path or URL).
    settings: canonical JSON (`canonical_settings`) of everything the shards depend on.
    what: what the shards hold, for the message ('samples', 'feature statistics').

  Raises:
    ValueError: the folder holds shards of other settings (one sentence naming the keys).
  """
  root = files.path(directory)
  root.mkdir(parents=True, exist_ok=True)
  for entry in root.iterdir():
    if entry.name.startswith(TMP_PREFIX):  # a write cut short by a kill
      files.remove(entry)
  record = root / SETTINGS_FILE
  if not record.exists():
    files.write_whole(record, lambda f: f.write(json.dumps(settings, indent=2).encode()))
    return
  try:
    differ = differences(json.loads(record.read_text()), settings)
  except ValueError:
    differ = [f'{SETTINGS_FILE} is unreadable']
  if differ:
    shown = ', '.join(differ[:6]) + (f' and {len(differ) - 6} more' if len(differ) > 6 else '')
    raise ValueError(f'{directory} holds {what} made with other settings ({shown}); pass another '
                     f'--out, or delete {directory} to start over.')


def shard_names(directory: files.PathLike) -> list[str]:
  """The sorted names of the finished shards (`shard-*.npz`) in a shard folder."""
  return sorted(e.name for e in files.path(directory).iterdir()
                if e.name.startswith('shard-') and e.name.endswith('.npz'))
