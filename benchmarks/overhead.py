"""The sampler-overhead split both sides of the table use (no JAX or PyTorch import here)."""

# The sampler is timed around a trivial denoiser at the table's step count and at this one.
LONG_STEPS = 256


def split_overhead(t_short: float, nfe_short: int, t_long: float, nfe_long: int) -> dict:
  """Splits sampler call times t(n) = a + b·n into b per network evaluation and a per call.

  b is what each extra evaluation costs (the sampler's own arithmetic and loop); a is paid once
  per call (dispatch, and on this VM ~100–200 µs to wake the thread that waits for the result).

  Args:
    t_short, t_long: seconds per call at nfe_short and nfe_long network evaluations.

  Returns:
    overhead_us_per_nfe (b), overhead_call_us (a), overhead_all_in_us_per_nfe (t_short per
    evaluation), nfe and overhead_long_nfe.
  """
  per_nfe = (t_long - t_short) / (nfe_long - nfe_short)
  return {'overhead_us_per_nfe': per_nfe * 1e6,
          'overhead_call_us': (t_short - per_nfe * nfe_short) * 1e6,
          'overhead_all_in_us_per_nfe': t_short / nfe_short * 1e6,
          'nfe': nfe_short, 'overhead_long_nfe': nfe_long}
