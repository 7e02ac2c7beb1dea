"""benchmarks/gpu.py --tiny: the GPU table's columns are there and finite (JAX side, on CPU)."""

import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'benchmarks'))

import gpu  # noqa: E402
import pytest  # noqa: E402


@pytest.mark.slow  # A train step and a sampler compile: 110–134 s measured at load average 11.
def test_tiny_table_has_every_column_finite(capsys):
  table = gpu.main(['--tiny', '--no-torch', '--nets=cifar10', '--dtypes=bfloat16', '--steps=1',
                    '--heun_steps=1', '--peak=1.0'])
  (row,) = table
  assert set(gpu.COLUMNS) <= set(row)
  for c in ('compile_s', 'loss', 'train_img_s', 'train_tflops', 'mfu', 'heun_img_s'):
    assert math.isfinite(row[c]) and row[c] >= 0, (c, row[c])
  assert row['heun_nfe'] == 1
  assert capsys.readouterr().out.splitlines()[0].split() == list(gpu.COLUMNS)


def test_peaks_are_keyed_on_device_kind():
  assert gpu.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16', None) == 989.4
  assert gpu.peak_tflops('NVIDIA H100 PCIe', 'float32', None) == 378.0
  assert gpu.peak_tflops('NVIDIA A100-SXM4-80GB', 'bfloat16', None) == 312.0
  assert gpu.peak_tflops('cpu', 'bfloat16', None) is None
  assert gpu.peak_tflops('cpu', 'bfloat16', 2.0) == 2.0
