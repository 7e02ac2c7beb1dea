"""Comparisons shared by the converter tests (imported by name: tests/convert is on sys.path)."""

import numpy as np


def max_error(actual, expected) -> float:
  return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))


def assert_close(actual, expected, what: str, rel: float = 1e-4):
  """max |actual − expected| ≤ rel · std(expected) (the issue's float32 criterion)."""
  err, scale = max_error(actual, expected), float(np.std(expected))
  assert np.shape(actual) == np.shape(expected), (what, np.shape(actual), np.shape(expected))
  assert err <= rel * scale, f'{what}: max |diff| {err:.3g} > {rel} × std {scale:.3g}'
  return err / scale

