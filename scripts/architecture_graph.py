"""Draws docs/architecture.png: diffjax's layers and the imports between its parts, read from the code.

    python scripts/architecture_graph.py [--out=docs/architecture.png]

The layers come from pyproject.toml's import-linter contract (the same list `lint-imports` checks);
the arrows are the imports grimp finds between the parts (every module import, function-local ones
included), aggregated per part. A part is a top-level module or subpackage of diffjax. An arrow
points from the importer down to what it imports; it is drawn thicker the more module imports it
stands for, and red if it points up or sideways (the script then exits 1).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import grimp
import tomllib
from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What each part is, in a few words (shown under its name).
ROLES = {
    'cli': 'flags, errors', 'evaluation': 'FID/IS/KID, bpd', 'training': 'step, loop, distill',
    'sampling': 'seeds → images', 'runs': 'config, ckpt, load', 'build': 'config → parts',
    'data': 'TFDS, batches', 'objectives': 'losses', 'likelihood': 'ODE, VLB',
    'samplers': 'over denoise_fn', 'models': 'networks', 'precond': 'network → D(x; σ)',
    'processes': 'σ(t), β, SDEs', 'registry': 'names', 'images': 'PNG grids',
    'parallel': 'mesh, hosts', 'state': 'train state', 'pth': '.pth reader',
    'convert': 'published ckpts', 'ema': 'EMA maths', 'phema': 'post-hoc EMA CLI',
}


def read_layers(pyproject: str) -> list[list[str]]:
  """The contract's layers, top first, each a list of part names."""
  with open(pyproject, 'rb') as f:
    config = tomllib.load(f)
  contract = next(c for c in config['tool']['importlinter']['contracts'] if c['type'] == 'layers')
  # '(name)' marks an optional layer (it may not exist yet); drawn like any other.
  return [[p.strip().strip('()') for p in layer.split('|')] for layer in contract['layers']]


def part_of(module: str) -> str | None:
  parts = module.split('.')
  return parts[1] if len(parts) > 1 and parts[0] == 'diffjax' else None


def part_edges(graph) -> collections.Counter:
  """(importer part, imported part) → number of module-level imports between them."""
  edges = collections.Counter()
  for module in graph.modules:
    src = part_of(module)
    for imported in graph.find_modules_directly_imported_by(module):
      dst = part_of(imported)
      if src and dst and src != dst:
        edges[src, dst] += 1
  return edges


def draw(layers: list[list[str]], edges: collections.Counter, path: str) -> None:
  box_w, box_h, gap_x, gap_y, margin = 150, 46, 26, 34, 30
  width = margin * 2 + max(len(layer) for layer in layers) * (box_w + gap_x) - gap_x
  height = margin * 2 + len(layers) * (box_h + gap_y) - gap_y
  image = Image.new('RGB', (width, height), 'white')
  pen = ImageDraw.Draw(image)
  try:
    font = ImageFont.truetype('DejaVuSans.ttf', 13)
    small = ImageFont.truetype('DejaVuSans.ttf', 10)
  except OSError:  # No TrueType font installed: PIL's bitmap font still draws.
    font = small = ImageFont.load_default()
  centers = {}
  for row, layer in enumerate(layers):
    y = margin + row * (box_h + gap_y)
    x0 = (width - (len(layer) * (box_w + gap_x) - gap_x)) // 2
    for col, name in enumerate(layer):
      x = x0 + col * (box_w + gap_x)
      centers[name] = (x + box_w // 2, y, y + box_h)
  for (src, dst), count in sorted(edges.items()):
    if src not in centers or dst not in centers:
      continue
    (x1, _, y1), (x2, y2, _) = centers[src], centers[dst]
    upward = y2 < y1
    color = (200, 30, 30) if upward else (150, 150, 170)
    pen.line([(x1, y1), (x2, y2)], fill=color, width=min(1 + count // 4, 4))
    pen.polygon([(x2, y2), (x2 - 4, y2 - 8), (x2 + 4, y2 - 8)], fill=color)
  for layer in layers:
    for name in layer:
      cx, top, bottom = centers[name]
      pen.rounded_rectangle([cx - box_w // 2, top, cx + box_w // 2, bottom], radius=8,
                            fill=(232, 240, 252), outline=(60, 90, 150), width=2)
      pen.text((cx, top + 15), name, fill='black', font=font, anchor='mm')
      pen.text((cx, top + 33), ROLES.get(name, ''), fill=(70, 70, 70), font=small, anchor='mm')
  image.save(path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=os.path.join(ROOT, 'docs', 'architecture.png'))
  args = parser.parse_args(argv)
  sys.path.insert(0, ROOT)
  layers = read_layers(os.path.join(ROOT, 'pyproject.toml'))
  edges = part_edges(grimp.build_graph('diffjax'))
  rank = {name: i for i, layer in enumerate(layers) for name in layer}
  upward = [(s, d) for s, d in edges if rank.get(s, 0) >= rank.get(d, 0)]
  draw(layers, edges, args.out)
  print(f'Wrote {args.out}: {len(rank)} parts in {len(layers)} layers, {len(edges)} part-to-part '
        f'import edges, {len(upward)} upward or sideways.')
  return 1 if upward else 0


if __name__ == '__main__':
  raise SystemExit(main())
