"""diffjax.cli.tune_xla_cpu: the XLA:CPU flags the entry points add, and that they take effect."""

import os
import re
import subprocess
import sys
import textwrap

import jaxlib.version
import pytest

from diffjax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_RELEASE = tuple(int(p) for p in jaxlib.version.__version__.split('.')[:2])
measured_jaxlib = pytest.mark.skipif(
  _RELEASE not in cli.xla._CPU_XLA_FLAGS_JAXLIB,
  reason=f'diffjax adds no XLA:CPU flags on jaxlib {jaxlib.version.__version__} (not measured).')


@measured_jaxlib
def test_tune_xla_cpu_appends_its_flags_once(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  assert cli.tune_xla_cpu()
  assert os.environ['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=4',
                                             *cli.CPU_XLA_FLAGS]
  assert not cli.tune_xla_cpu()  # a second call adds nothing
  assert os.environ['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=4',
                                             *cli.CPU_XLA_FLAGS]


@measured_jaxlib
def test_tune_xla_cpu_leaves_a_flag_the_user_set(monkeypatch):
  name = cli.CPU_XLA_FLAGS[0].split('=')[0]
  monkeypatch.setenv('XLA_FLAGS', f'{name}=')
  assert not cli.tune_xla_cpu()
  assert os.environ['XLA_FLAGS'] == f'{name}='


def test_tune_xla_cpu_adds_nothing_on_an_unmeasured_jaxlib(monkeypatch):
  monkeypatch.setattr(jaxlib.version, '__version__', '0.99.0')
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  assert not cli.tune_xla_cpu()
  assert 'XLA_FLAGS' not in os.environ


@measured_jaxlib
def test_tuned_flags_parse_and_move_convolutions_out_of_ynnpack():
  # A fresh process, as an entry point starts: XLA aborts on a flag it does not know, so this also
  # proves the flags are valid for the installed jaxlib. With them, the convolution is XLA's own
  # (Eigen) op and the reduction stays a YNNPACK fusion.
  code = textwrap.dedent('''
    from diffjax import cli
    assert cli.tune_xla_cpu()
    import jax, jax.numpy as jnp
    def f(x, w):
      y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      # y is an output too, as a U-Net layer's activation is read again: a conv whose only reader
      # is the reduction may be fused into that reduction's YNNPACK call.
      return y, jnp.sum(y * y, axis=(0, 1, 2))
    # Compiled, not run. At this size XLA hands the reduction to YNNPACK (at 2×8×8×16 it kept it
    # in its own loops, and the test would have nothing to look for).
    x = jax.ShapeDtypeStruct((4, 16, 16, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)
    print(jax.jit(f).lower(x, w).compile().as_text())
  ''')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  hlo = out.stdout
  conv_lines = [l for l in hlo.splitlines() if re.search(r'= f32\S* convolution\(', l)]
  assert conv_lines, 'no convolution in the compiled module'
  # The convolution is not inside a fused computation handed to YNNPACK...
  ynn_bodies = re.findall(r'calls=%([\w.\-]+), [^\n]*__ynn_fusion', hlo)
  for body in ynn_bodies:
    block = re.search(r'^%' + re.escape(body) + r' .*?\n\}', hlo, re.M | re.S).group(0)
    assert ' convolution(' not in block
  # ...while the reduction is.
  assert ynn_bodies, 'the reduction was not handed to YNNPACK'
