"""One generic registry for every pluggable part of diffjax.

Every part a config can name (networks, preconditionings, losses, samplers, σ-grids, datasets, …) is
registered here under a *kind* and a *name*. Looking up an unknown name fails with one sentence that
lists the known names of that kind, so a typo in a config never ends in a deep traceback.

Example:
    >>> from diffjax import registry
    >>> @registry.register('sampler', 'heun')
    ... def heun(...): ...
    >>> registry.get('sampler', 'heun')
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, TypeVar

T = TypeVar('T')

_TABLE: Dict[str, Dict[str, Any]] = {}


class UnknownNameError(ValueError):
  """A config or caller named a part that is not registered."""


def register(kind: str, name: str) -> Callable[[T], T]:
  """Returns a decorator that registers its argument as `name` of `kind`.

  Args:
    kind: the family of the part, e.g. 'sampler', 'precond', 'loss', 'network', 'dataset'.
    name: the name a config uses for it.

  Raises:
    ValueError: if `name` is already registered for `kind` (two parts must not share a name).
  """

  def decorator(obj: T) -> T:
    table = _TABLE.setdefault(kind, {})
    if name in table and table[name] is not obj:
      raise ValueError(f'{kind} {name!r} is registered twice; pick another name.')
    table[name] = obj
    return obj

  return decorator


def add(kind: str, name: str, obj: Any) -> Any:
  """Registers `obj` as `name` of `kind` (the non-decorator form of `register`)."""
  return register(kind, name)(obj)


def names(kind: str) -> List[str]:
  """The sorted names registered for `kind` (empty if the kind is unknown)."""
  return sorted(_TABLE.get(kind, {}))


def kinds() -> List[str]:
  """The sorted kinds that have at least one registered part."""
  return sorted(_TABLE)


def get(kind: str, name: str) -> Any:
  """Looks up the part registered as `name` of `kind`.

  Raises:
    UnknownNameError: with one sentence naming the known names when `name` is not registered.
  """
  table = _TABLE.get(kind, {})
  if name not in table:
    known = ', '.join(sorted(table)) or '(none registered)'
    plural = kind + ('es' if kind.endswith('s') else 's')
    raise UnknownNameError(f'Unknown {kind} {name!r}; known {plural}: {known}.')
  return table[name]
