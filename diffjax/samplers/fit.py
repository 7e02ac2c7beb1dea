"""Does a sampler fit a model? Checked before any training or sampling, in one sentence.

A registered sampler (`samplers.get_sampler`) takes `(denoise_fn, latents, keys, *, precond,
num_steps, **options)`. Two things can go wrong only once it runs — after a whole training run, when
the config's sampler draws the final previews: an option it does not take (EDM's `s_churn` given to
the DDPM sampler), or a model it cannot sample (the DDPM posterior of a continuous-σ EDM model, an
SDE sampler on a model with no SDE). `check` finds both up front: it compares the options with the
sampler's parameters, then traces the sampler once (`jax.eval_shape`: no compute, no weights) with a
stand-in denoiser on the model's preconditioning, so every check the sampler itself makes runs.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from diffjax import registry

# Arguments every registered sampler gets from its caller, never as options.
_GIVEN = frozenset({'denoise_fn', 'latents', 'keys', 'key', 'x', 'sigmas', 'precond', 'num_steps',
                    'schedule', 'x1', 'sde', 'return_stats', 'round_sigma'})


def _keyword_params(fn: Callable) -> tuple[list[str], bool]:
  """The parameters of `fn` that can be passed by keyword with a default, and whether it has
  **options."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return [], True
  names = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
           and (p.default is not p.empty or p.kind == p.KEYWORD_ONLY)]
  return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _forwarded_to(fn: Callable) -> list[Callable]:
  """The functions a sampler with **options passes them on to: the functions it closes over
  (a registry form's solver) and the module-level functions its body names."""
  inner = [c.cell_contents for c in (getattr(fn, '__closure__', None) or ())
           if inspect.isfunction(getattr(c, 'cell_contents', None))]
  code, scope = getattr(fn, '__code__', None), getattr(fn, '__globals__', {})
  for name in (code.co_names if code else ()):
    value = scope.get(name)
    if inspect.isfunction(value) and value.__module__.startswith('diffjax.samplers'):
      inner.append(value)
  return inner


def options_of(name: str) -> Optional[list[str]]:
  """The options sampler `name` takes (sorted), or None when they cannot be told."""
  fn = registry.get('sampler', name)
  names, open_ended = _keyword_params(fn)
  if open_ended:
    inner = _forwarded_to(fn)
    if not inner:
      return None
    for f in inner:
      more, _ = _keyword_params(f)
      names += more
  return sorted(set(names) - _GIVEN | ({'sde'} & set(_keyword_params(fn)[0])))


def _stand_in(x: jax.Array, sigma: jax.Array) -> jax.Array:
  """A denoiser of the right shape and nothing else (tracing only)."""
  del sigma
  return x


# The DDPM samplers' learned variance reads the network's extra channels through `.raw`.
_stand_in.raw = lambda x, sigma: (x, jnp.zeros_like(x))


def _trace(fn: Callable, precond, num_steps: int, options: dict, shape: Sequence[int]) -> None:
  """Traces one sampler call on a one-image batch; raises whatever the sampler raises."""
  keys = jax.random.split(jax.random.key(0), 1)

  def call(latents):
    return fn(_stand_in, latents, keys, precond=precond, num_steps=num_steps, **options)

  jax.eval_shape(call, jax.ShapeDtypeStruct((1, *shape), jnp.float32))


def _reason(e: BaseException) -> str:
  """The first clause of a sampler's error: what is wrong, without its own advice."""
  text = (str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)).strip()
  text = (text.splitlines() or [type(e).__name__])[0]
  for stop in ('; ', '. '):
    text = text.split(stop)[0]
  if text[:1].isupper() and text[1:2].islower():  # 'The DDPM …' inside a sentence: 'the DDPM …'
    text = text[0].lower() + text[1:]
  return text.rstrip('.')


def fitting(precond, num_steps: int, shape: Sequence[int], skip: str = '') -> list[str]:
  """The registered samplers that sample this model with their default options."""
  out = []
  for name in registry.names('sampler'):
    if name == skip:
      continue
    try:
      _trace(registry.get('sampler', name), precond, num_steps, {}, shape)
    except Exception:  # noqa: BLE001 - any failure: it does not fit.
      continue
    out.append(name)
  return out


def check(name: str, precond, num_steps: int, options: dict, shape: Sequence[int], *,
          config_options: Sequence[str] = ()) -> None:
  """Raises one sentence when sampler `name` cannot sample this model with these options.

  Args:
    name: a registered sampler (an unknown one fails listing the known ones).
    precond: the model's preconditioning; None skips the model check (options are still checked).
    num_steps: the number of sampling steps.
    options: the sampler's options (config.sample.kwargs and the caller's overrides).
    shape: (H, W, C) of one image.
    config_options: which of `options` came from config.sample.kwargs (named as such).

  Raises:
    registry.UnknownNameError: an unknown sampler.
    ValueError: an option the sampler does not take (listing those it takes), or a model it
      does not fit (saying why and listing the samplers that fit).
  """
  fn = registry.get('sampler', name)
  takes = options_of(name)
  unknown = [] if takes is None else sorted(k for k in options if k not in takes)
  if precond is not None:
    # The model first (with the options the sampler takes): EDM's default options on a DDPM
    # sampler are a symptom; the model it cannot sample is the cause.
    _check_model(name, fn, precond, num_steps,
                 {k: v for k, v in options.items() if k not in unknown}, shape, takes)
  if unknown:
    where = ('config.sample.kwargs' if all(k in config_options for k in unknown) else
             'the sampler options given')
    others = [n for n in registry.names('sampler') if set(unknown) <= set(options_of(n) or [])]
    also = (f', or pick a sampler that takes {"them" if len(unknown) > 1 else "it"} '
            f'({", ".join(others)})' if others else '')
    fix = ('set config.sample.kwargs to options of this sampler in the config file'
           if where == 'config.sample.kwargs' else
           f'leave {"them" if len(unknown) > 1 else "it"} out')
    raise ValueError(
        f'Sampler {name!r} does not take the option{"s" if len(unknown) > 1 else ""} '
        f'{", ".join(unknown)} (from {where}); its options: {", ".join(takes) or "none"}: '
        f'{fix}{also}.')


def _check_model(name: str, fn: Callable, precond, num_steps: int, options: dict,
                 shape: Sequence[int], takes: Optional[list]) -> None:
  """Traces the sampler on the model's preconditioning; its failure as one sentence."""
  try:
    _trace(fn, precond, num_steps, options, shape)
  except TypeError as e:
    if 'unexpected keyword' not in str(e):
      raise
    raise ValueError(f'Sampler {name!r} rejects its options ({_reason(e)}); its options: '
                     f'{", ".join(takes or [])}.') from e
  except Exception as e:  # noqa: BLE001 - whatever the sampler finds wrong, in one sentence.
    kind = getattr(precond, 'name', type(precond).__name__)
    try:  # Does it fit the model with one step and its defaults? Then the settings are wrong.
      _trace(fn, precond, 1, {}, shape)
    except Exception:  # noqa: BLE001 - it does not fit the model: said below.
      pass
    else:
      given = ', '.join(f'{k}={v!r}' for k, v in sorted(options.items()))
      raise ValueError(f'Sampler {name!r} cannot sample this model with {num_steps} steps'
                       f'{" and " + given if given else ""} ({_reason(e)}); change --steps or '
                       'those options.') from e
    if 'sde' in (takes or []) and options.get('sde') is None:
      why = f'it integrates an SDE, and a model with the {kind!r} preconditioning has none'
    else:
      why = _reason(e)
    fits = fitting(precond, num_steps, shape, skip=name)
    hint = (f'pick one that fits ({", ".join(fits)}) with --sampler=NAME (sample.py, evaluate.py) '
            'or --config.sample.sampler=NAME (train.py)' if fits else 'no registered sampler fits it')
    raise ValueError(f'Sampler {name!r} does not fit this model ({why}); {hint}.') from e
