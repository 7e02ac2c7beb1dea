"""python -m diffjax.convert {edm,improved-diffusion,guided-diffusion,diffusers} SRC --workdir=OUT

Converts a published checkpoint into a diffjax run (docs/convert.md). SRC is a path or an http(s)
URL, downloaded once into the cache (--cache_dir, default ~/.cache/diffjax/convert) with a progress
bar. improved-diffusion and guided-diffusion take the model's training flags by their script names,
e.g. --image_size=64 --num_channels=192 --learn_sigma=True; the rest take --dataset only.
Errors end in one sentence on stderr and exit code 1 (2 for a usage error).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Dict, List, Optional

from diffjax.convert import diffusers, download, edm, openai

FORMATS = ('edm', 'improved-diffusion', 'guided-diffusion', 'diffusers')


def _flags(extra: List[str], parser: argparse.ArgumentParser) -> Dict[str, str]:
  """--name=value / --name value pairs of the openai flags, as strings."""
  flags: Dict[str, str] = {}
  i = 0
  while i < len(extra):
    arg = extra[i]
    if not arg.startswith('--'):
      parser.error(f'unexpected argument {arg!r}; flags are written --name=value')
    name, eq, value = arg[2:].partition('=')
    if not eq:
      if i + 1 >= len(extra) or extra[i + 1].startswith('--'):
        parser.error(f'flag --{name} needs a value (--{name}=VALUE)')
      value = extra[i + 1]
      i += 1
    flags[name] = value
    i += 1
  return flags


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m diffjax.convert',
      description='Convert a published diffusion checkpoint into a diffjax run (no torch needed).')
  parser.add_argument('format', choices=FORMATS, help='what SRC is')
  parser.add_argument('src', metavar='SRC', help='checkpoint path, pipeline folder, or http(s) URL')
  parser.add_argument('--workdir', required=True, help='the new run\'s directory')
  parser.add_argument('--dataset', default=None,
                      help='registered dataset the run names (default: the one matching the model)')
  parser.add_argument('--cache_dir', default=None, help='where URLs are downloaded to')
  parser.add_argument('--no_progress', action='store_true', help='no download progress bar')
  args, extra = parser.parse_known_args(argv)
  flags = _flags(extra, parser)
  if flags and args.format in ('edm', 'diffusers'):
    parser.error(f'{args.format} takes no model flags (got --{next(iter(flags))}); the '
                 'architecture is read from the checkpoint')
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  try:
    src = download.fetch(args.src, cache=args.cache_dir, progress=not args.no_progress)
    if args.format == 'edm':
      out = edm.from_edm(src, args.workdir, dataset=args.dataset)
    elif args.format == 'diffusers':
      out = diffusers.from_diffusers(src, args.workdir, dataset=args.dataset)
    else:
      out = openai.from_improved_diffusion(src, args.workdir, project=args.format,
                                           dataset=args.dataset, **flags)
  except (OSError, ValueError) as e:  # FileNotFoundError, ConversionError, UnsafePickleError, ...
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'Converted {args.src} into {out}; sample it with: python sample.py --workdir={out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
