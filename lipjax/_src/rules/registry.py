"""The registries the rule files fill in (see :mod:`lipjax._src.rules`).

Four kinds of entries, each keyed by what the tracer or the
``lipjax.nn.Sequential`` reader meets:

* module rules: a ``lipjax.nn`` layer class (or any Flax module class) ->
  a function building its rule from the module's attributes;
* linear primitives: a JAX primitive name -> how a traced linear map replays
  it (:class:`lipjax._src.rules.primitives.LinearPrimitive`);
* patterns: functions that recognise an activation in the traced graph
  (``activation``), or a whole linear segment with a specialised rule
  (``segment``), each with a priority (lower runs first);
* combine rules: the primitive that joins the paths of a block (``add``) ->
  its :class:`~lipjax._src.rules.base.CombineRule`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["activation_patterns", "activation_primitive", "combine_for", "linear_primitive", "module_rule",
           "register_activation_pattern", "register_activation_primitive", "register_combine",
           "register_linear_primitive",
           "register_module", "register_segment_pattern", "segment_patterns"]

_MODULES: Dict[type, Callable[[Any], Any]] = {}
_PRIMITIVES: Dict[str, Any] = {}
_ACTIVATION_PATTERNS: List[Tuple[float, str, Callable]] = []
_SEGMENT_PATTERNS: List[Tuple[float, str, Callable]] = []
_COMBINES: Dict[str, Any] = {}
_ACTIVATION_PRIMITIVES: Dict[str, Any] = {}


def register_module(cls: type, factory: Callable[[Any], Any]) -> None:
  """``factory(module)`` builds the rule of any instance of ``cls`` (and subclasses)."""
  _MODULES[cls] = factory


def module_rule(module) -> Optional[Any]:
  """The rule of a module instance: the factory of the nearest registered class
  in its method resolution order, or ``None``."""
  for cls in type(module).__mro__:
    factory = _MODULES.get(cls)
    if factory is not None:
      return factory(module)
  return None


def register_linear_primitive(name: str, rule) -> None:
  """How a traced linear map replays the primitive ``name`` (and which uses it allows)."""
  _PRIMITIVES[name] = rule


def linear_primitive(name: str):
  """The rule of the linear primitive ``name``, or ``None``."""
  return _PRIMITIVES.get(name)


def register_activation_primitive(name: str, check: Optional[Callable] = None,
                                  any_dtype: bool = False) -> None:
  """Lets the tracer keep primitive ``name`` on input-dependent values for an
  activation pattern to claim (an unclaimed one is refused after matching).

  ``check(eqn, acts) -> message or None`` refuses uses outright (e.g. over
  the batch axis; ``eqn`` is the jaxpr equation, ``acts`` the positions of
  its input-dependent operands); ``any_dtype`` allows non-float outputs (a comparison's
  boolean mask).
  """
  _ACTIVATION_PRIMITIVES[name] = (check, any_dtype)


def activation_primitive(name: str):
  """``(check, any_dtype)`` of a registered activation primitive, or None."""
  return _ACTIVATION_PRIMITIVES.get(name)


def _insert(table, priority, name, fn):
  table[:] = [e for e in table if e[1] != name]
  table.append((float(priority), name, fn))
  table.sort(key=lambda e: e[0])


def register_activation_pattern(name: str, fn: Callable, priority: float) -> None:
  """``fn(context)`` returns the activations it recognises in a traced graph
  (see :mod:`lipjax._src.patterns`); patterns run by increasing priority and
  each node belongs to the first activation that claims it."""
  _insert(_ACTIVATION_PATTERNS, priority, name, fn)


def activation_patterns() -> List[Callable]:
  return [fn for _, _, fn in _ACTIVATION_PATTERNS]


def register_segment_pattern(name: str, fn: Callable, priority: float) -> None:
  """``fn(program, statics)`` returns a builder of a specialised rule for a
  traced linear segment, or ``None``; the first match (by priority) wins, the
  generic traced rule otherwise."""
  _insert(_SEGMENT_PATTERNS, priority, name, fn)


def segment_patterns() -> List[Callable]:
  return [fn for _, _, fn in _SEGMENT_PATTERNS]


def register_combine(names, rule) -> None:
  """``rule`` joins the paths of a block whose join is one of the primitives ``names``."""
  for name in ((names,) if isinstance(names, str) else names):
    _COMBINES[name] = rule


def combine_for(name: str):
  return _COMBINES.get(name)
