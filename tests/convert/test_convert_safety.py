"""Reading checkpoints is safe and fails in one sentence: hostile pickles are refused before any
payload runs, broken files and wrong options say what is wrong, downloads and the CLI behave."""

import json
import os
import pickle
import shutil
import struct
import sys
import types

import numpy as np
import pytest

from diffjax import convert
from diffjax.convert import __main__ as cli
from diffjax.convert import diffusers as diffusers_lib
from diffjax.convert import safetensors, torch_pickle, workdir


class _System:
  """Pickles as os.system(command): what a hostile checkpoint does."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def test_hostile_reduce_is_refused_and_never_runs(tmp_path, capsys):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'network-snapshot.pkl'
  path.write_bytes(pickle.dumps({'ema': _System(f'touch {marker}')}))
  with pytest.raises(torch_pickle.UnsafePickleError, match=r'posix\.system|os\.system') as e:
    convert.read_edm(path)
  assert 'refuses' in str(e.value) and str(e.value).count('.') <= 4  # one sentence
  assert cli.main(['edm', str(path), f'--workdir={tmp_path / "out"}']) == 1
  assert capsys.readouterr().err.count('\n') == 1
  assert not marker.exists() and not (tmp_path / 'out').exists()


def _persistent_pickle(meta) -> bytes:
  """A pickle calling torch_utils.persistence._reconstruct_persistent_obj(meta), as EDM's do."""
  def _reconstruct_persistent_obj(meta):
    raise AssertionError('never called while pickling')

  package = types.ModuleType('torch_utils')
  module = types.ModuleType('torch_utils.persistence')
  _reconstruct_persistent_obj.__module__ = module.__name__
  _reconstruct_persistent_obj.__qualname__ = '_reconstruct_persistent_obj'
  package.persistence = module
  module._reconstruct_persistent_obj = _reconstruct_persistent_obj

  class Persistent:
    def __reduce__(self):
      return _reconstruct_persistent_obj, (meta,)

  saved = {k: sys.modules.get(k) for k in (package.__name__, module.__name__)}
  sys.modules.update({package.__name__: package, module.__name__: module})
  try:
    return pickle.dumps({'ema': Persistent(), 'dataset_kwargs': {}})
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k)
      else:
        sys.modules[k] = v


def test_persistent_object_module_src_is_never_executed(tmp_path):
  marker = tmp_path / 'ran'
  meta = dict(type='class', version=6, class_name='EDMPrecond', state={'label_dim': 0},
              module_src=f'open({str(marker)!r}, "w").write("module_src ran")\n')
  path = tmp_path / 'edm.pkl'
  path.write_bytes(_persistent_pickle(meta))
  obj = torch_pickle.load_network_pickle(path)
  assert obj['ema'].class_name == 'EDMPrecond' and obj['ema'].state == {'label_dim': 0}
  with pytest.raises(workdir.ConversionError, match='has no wrapped network'):
    convert.read_edm(path)
  assert not marker.exists()


def test_other_globals_and_networks_are_named(tmp_path):
  path = tmp_path / 'eval.pkl'
  path.write_bytes(pickle.dumps({'ema': eval}))  # builtins.eval as a value
  with pytest.raises(torch_pickle.UnsafePickleError, match='builtins.eval'):
    convert.read_edm(path)
  edm2 = dict(type='class', version=6, class_name='Precond', module_src='', state={})
  path.write_bytes(_persistent_pickle(edm2))
  with pytest.raises(workdir.ConversionError, match='Precond has no recorded constructor'):
    convert.read_edm(path)
  other = dict(type='class', version=6, class_name='StyleGAN', module_src='', state={})
  path.write_bytes(_persistent_pickle(other))
  with pytest.raises(workdir.ConversionError,
                     match='StyleGAN network.*EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond.*EDM2'):
    convert.read_edm(path)


def test_broken_files_fail_in_one_sentence(golden, tmp_path):
  data = golden['files']['edm_ddpmpp'].read_bytes()
  cut = tmp_path / 'cut.pkl'
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match='truncated or not a pickle'):
    convert.read_edm(cut)
  junk = tmp_path / 'junk.pkl'
  junk.write_bytes(b'not a pickle at all')
  with pytest.raises(ValueError, match='truncated or not a pickle'):
    convert.read_edm(junk)
  with pytest.raises(ValueError, match='zip archive .*improved-diffusion'):
    convert.read_edm(golden['files']['iddpm'])
  with pytest.raises(FileNotFoundError):
    convert.read_edm(tmp_path / 'missing.pkl')
  st = tmp_path / 'cut.safetensors'
  st.write_bytes((golden['files']['diffusers'] / 'unet' /
                  'diffusion_pytorch_model.safetensors').read_bytes()[:5000])
  with pytest.raises(ValueError, match='truncated'):
    safetensors.load_safetensors(st)


@pytest.mark.parametrize('flags, match', [
    ({'num_channels': 64}, r'time_embed\.0\.weight does not fit .*check num_channels'),
    ({'learn_sigma': False}, r'out\.2\.weight does not fit .*check learn_sigma'),
    ({'class_cond': False}, r'class embedding \(label_emb\): pass class_cond=True'),
    ({'attention_resolutions': '4'}, r'input_blocks\.1\.1\.\S+ .*check attention_resolutions'),
    ({'resblock_updown': False}, r'input_blocks\.2\.0\.op\.weight.*check resblock_updown'),
    ({'num_res_block': 1}, r'Unknown flag num_res_block .*num_res_blocks'),
])
def test_wrong_flags_name_the_tensor_and_flag(golden, flags, match):
  info = golden['meta']['guided']
  with pytest.raises(workdir.ConversionError, match=match):
    convert.read_improved_diffusion(golden['files']['guided'], project='guided-diffusion',
                                    **{**info['flags'], **flags}).params()


def _write_safetensors(path, tensors):
  header, chunks, offset = {}, [], 0
  for name, array in tensors.items():
    raw = np.ascontiguousarray(array, '<f4').tobytes()
    header[name] = {'dtype': 'F32', 'shape': list(array.shape),
                    'data_offsets': [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  blob = json.dumps(header).encode()
  path.write_bytes(struct.pack('<Q', len(blob)) + blob + b''.join(chunks))


def test_diffusers_old_attention_names_and_bin(golden, tmp_path):
  """Pipelines saved before diffusers 0.15 (query/key/value/proj_attn), and .bin weights."""
  folder = golden['files']['diffusers']
  new = diffusers_lib.read_diffusers(folder)
  state = safetensors.load_safetensors(folder / 'unet' / 'diffusion_pytorch_model.safetensors')
  old_names = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  renamed = {}
  for key, value in state.items():
    for a, b in old_names.items():
      key = key.replace(f'.{a}.', f'.{b}.')
    renamed[key] = value
  assert renamed.keys() != state.keys()
  old = tmp_path / 'old'
  (old / 'unet').mkdir(parents=True)
  for sub in ('model_index.json', 'unet/config.json', 'scheduler'):
    src = folder / sub
    if src.is_dir():
      shutil.copytree(src, old / sub)
    else:
      (old / sub).write_bytes(src.read_bytes())
  _write_safetensors(old / 'unet' / 'diffusion_pytorch_model.safetensors', renamed)
  converted = diffusers_lib.read_diffusers(old)
  assert converted.flat.keys() == new.flat.keys()
  for k in new.flat:
    np.testing.assert_array_equal(converted.flat[k], new.flat[k])
  assert new.config.precond.kwargs.beta_schedule == 'linear'
  assert new.config.sample.kwargs.variance == 'fixed_large'


def test_converted_config_has_every_base_field():
  from configs import common

  def keys(node, prefix=''):
    out = set()
    for k, v in node.items():
      out.add(prefix + k)
      if hasattr(v, 'items') and k != 'kwargs':
        out |= keys(v, prefix + k + '.')
    return out

  assert keys(common.base_config()) <= keys(workdir.base_config())


def test_dataset_choice(golden):
  assert workdir.choose_dataset(32, 3, 10) == 'cifar10'
  assert workdir.choose_dataset(64, 3, 1000) == 'imagenet64'
  assert workdir.choose_dataset(64, 3, 0) == 'downsampled_imagenet64'
  assert workdir.choose_dataset(64, 3, 0, hints=['datasets/ffhq-64x64.zip']) == 'ffhq64'
  with pytest.raises(workdir.ConversionError, match="'cifar10' has 32×32×3 images"):
    workdir.choose_dataset(8, 1, 10, dataset='cifar10')
  # No registered set of that shape: the generic name of the shape (diffusers' celebahq-256).
  assert workdir.choose_dataset(256, 3, 0) == 'images256x256x3'
  assert workdir.choose_dataset(128, 3, 1000) == 'images128x128x3_1000classes'
  with pytest.raises(workdir.ConversionError, match='No registered dataset has 8×8×2'):
    workdir.choose_dataset(8, 2, 0)


def test_cli_usage_and_download_errors(http_root, tmp_path, capsys):
  url, _ = http_root
  with pytest.raises(SystemExit) as e:
    cli.main(['edm', 'x.pkl', f'--workdir={tmp_path}', '--image_size=64'])
  assert e.value.code == 2
  capsys.readouterr()
  assert cli.main(['edm', f'{url}/missing.pkl', f'--workdir={tmp_path / "o"}',
                   f'--cache_dir={tmp_path / "c"}', '--no_progress']) == 1
  err = capsys.readouterr().err
  assert 'Could not download' in err and err.count('\n') == 1
  assert not any('.part' in n for n in os.listdir(tmp_path / 'c'))
