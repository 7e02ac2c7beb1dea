"""Fixtures of the converter tests: the golden files unpacked, and a local HTTP server.

The golden checkpoints (scripts/make_convert_golden.py) are committed xz-compressed; `golden`
decompresses each into a temporary folder, byte for byte the file the reference code wrote.
"""

import functools
import http.server
import json
import lzma
import pathlib
import shutil
import threading

import numpy as np
import pytest

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / 'golden'


def _unxz(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  dst.write_bytes(lzma.decompress(src.read_bytes()))
  return dst


@pytest.fixture(scope='session')
def golden(tmp_path_factory):
  """{'meta': the fixtures' json, 'ref': the reference outputs, 'files': name -> local path}."""
  root = tmp_path_factory.mktemp('convert_golden')
  meta = json.loads((GOLDEN / 'convert_golden.json').read_text())
  files = {}
  for name, info in meta.items():
    if name.startswith('_'):
      continue
    if info['converter'] == 'diffusers':
      folder = root / name
      shutil.copytree(GOLDEN / info['file'], folder)
      packed = folder / 'unet' / 'diffusion_pytorch_model.safetensors.xz'
      _unxz(packed, packed.with_suffix(''))
      packed.unlink()
      files[name] = folder
    else:
      files[name] = _unxz(GOLDEN / info['file'], root / info['file'][:-len('.xz')])
  with np.load(GOLDEN / 'convert_golden.npz') as ref:
    return {'meta': meta, 'ref': dict(ref), 'files': files, 'root': root}


class _Handler(http.server.SimpleHTTPRequestHandler):
  requests: list = []

  def do_GET(self):  # noqa: N802 - the http.server API
    type(self).requests.append(self.path)
    super().do_GET()

  def log_message(self, *args):
    pass


@pytest.fixture(scope='session')
def http_root(golden):
  """(base URL, list of requested paths) of a server on 127.0.0.1 serving golden['root']."""
  handler = type('Handler', (_Handler,), {'requests': []})
  server = http.server.ThreadingHTTPServer(
      ('127.0.0.1', 0), functools.partial(handler, directory=str(golden['root'])))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}', handler.requests
  finally:
    server.shutdown()
    server.server_close()
