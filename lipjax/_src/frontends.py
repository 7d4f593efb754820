"""Front ends: what lipjax accepts as a model, seen as ``apply(variables, x)``.

Every bound, certificate and training step reads a model through one object
with ``apply(variables, x) -> logits`` that hashes (so that compiled
computations are cached per model):

* a ``flax.linen`` module (``lipjax.nn.Sequential`` included) is used as it is;
* a ``flax.nnx.Module`` becomes an :class:`NnxModel`: its graph definition
  (``nnx.split``) and a pure function of its state, like a linen module;
* a pure function ``fn(variables, x)`` becomes a :class:`FunctionModel`;
* an unhashable object with ``apply`` gets an identity handle.

:func:`resolve` does this at the API edge and also settles the variables
(``None`` means an NNX module's own state).
"""

from __future__ import annotations

import collections
import hashlib
import threading
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FunctionModel", "NnxModel", "TracedKey", "as_model", "describe", "is_nnx_module",
           "keyed", "resolve", "unwrap"]


class FunctionModel:
  """A pure function ``fn(variables, x) -> logits`` seen as a model."""

  def __init__(self, fn: Callable):
    self.fn = fn

  def apply(self, variables, x):
    return self.fn(variables, x)

  def __eq__(self, other):
    return isinstance(other, FunctionModel) and other.fn is self.fn

  def __hash__(self):
    return hash(("lipjax.FunctionModel", id(self.fn)))

  def __repr__(self):
    return f"FunctionModel({_qualname(self.fn)})"


class _Handle:
  """Identity-hashed stand-in for an unhashable model (e.g. a
  ``flax.linen.Sequential`` built from a list), so compiled computations can
  be cached per model object."""

  def __init__(self, model):
    self.model = model

  def apply(self, variables, x, *args, **kwargs):
    return self.model.apply(variables, x, *args, **kwargs)

  def __getattr__(self, name):
    if name == "model":
      raise AttributeError(name)
    return getattr(self.model, name)

  def __repr__(self):
    return f"_Handle({type(self.model).__name__})"


_HANDLES: "collections.OrderedDict[int, Tuple[Any, _Handle]]" = collections.OrderedDict()
_HANDLES_LOCK = threading.Lock()
_MAX_HANDLES = 256


def _handle(model) -> _Handle:
  with _HANDLES_LOCK:
    hit = _HANDLES.get(id(model))
    if hit is not None and hit[0] is model:
      _HANDLES.move_to_end(id(model))
      return hit[1]
    h = _Handle(model)
    _HANDLES[id(model)] = (model, h)   # the strong reference keeps id() unique
    while len(_HANDLES) > _MAX_HANDLES:
      _HANDLES.popitem(last=False)
    return h


# ---------------------------------------------------------------------------
# Flax NNX
# ---------------------------------------------------------------------------


def _nnx():
  from flax import nnx   # pylint: disable=import-outside-toplevel
  return nnx


def is_nnx_module(obj) -> bool:
  """Whether ``obj`` is a ``flax.nnx.Module`` instance."""
  try:
    return isinstance(obj, _nnx().Module)
  except ImportError:   # pragma: no cover - flax without nnx
    return False


def _collection(variable) -> str:
  """The linen-style collection name of an NNX variable (``"params"``, ``"batch_stats"``)."""
  from flax.nnx import variablelib   # pylint: disable=import-outside-toplevel
  try:
    return variablelib.variable_name_from_type(type(variable))
  except Exception:   # pylint: disable=broad-except
    return type(variable).__name__.lower()


def _path(keys) -> Tuple[str, ...]:
  """An attribute path with every key as a string (list indices included), so
  that the canonical variables are nested dicts with string keys only."""
  return tuple(str(k) for k in keys)


def _floating(a) -> bool:
  dt = getattr(a, "dtype", None)
  return dt is not None and jnp.issubdtype(dt, jnp.floating)


def _host_bytes(a) -> bytes:
  if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
    a = jax.random.key_data(a)
  return np.ascontiguousarray(jax.device_get(a)).tobytes()


class NnxModel:
  """A ``flax.nnx.Module`` seen as a linen-style model.

  ``apply(variables, x)`` merges the module's graph definition with the
  state held by ``variables`` and calls it on ``x``: a pure function of the
  state that lipjax traces like any other. The variables come in the
  linen-style form ``{"params": {...}, "batch_stats": {...}}`` (nested dicts
  of the floating-point values of each kind of ``nnx.Variable``, keyed by
  attribute path; see :meth:`variables_of`), or as an ``nnx.State`` (full or
  partial, or a tuple of them). Entries they lack, and every value that is
  not floating point (RNG keys and counts), come from the module as it was
  when the adapter was made (``defaults``). ``init`` returns that module's
  own variables, so the adapter also stands in for a linen module in code
  written for ``init`` / ``apply`` (the training launcher).

  Two adapters compare equal when their modules have the same graph
  definition and the same default values: they compute the same function of
  the same variables.
  """

  def __init__(self, module):
    nnx = _nnx()
    graphdef, state = nnx.split(module)
    flat = list(nnx.to_flat_state(state))
    self.graphdef = graphdef
    self.name = type(module).__name__
    self._module_type = f"{type(module).__module__}.{type(module).__qualname__}"
    self._treedef = jax.tree_util.tree_structure(state)
    self._paths = tuple(_path(p) for p, _ in flat)
    self._collections = tuple(_collection(v) for _, v in flat)
    values = [v.get_value() if hasattr(v, "get_value") else v for _, v in flat]
    self._defaults: Dict[Tuple, Any] = {}
    self._floating = tuple(_floating(v) for v in values)
    for path, coll, val, fl in zip(self._paths, self._collections, values, self._floating):
      if coll != "params" or not fl:
        self._defaults[path] = val
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((self._paths, self._collections, self._floating)).encode())
    for path in sorted(self._defaults, key=repr):
      val = self._defaults[path]
      h.update(repr((path, getattr(val, "dtype", None), np.shape(val))).encode())
      h.update(_host_bytes(jnp.asarray(val)) if hasattr(val, "dtype") else repr(val).encode())
    self._key = (graphdef, h.digest())
    self.input_shape = getattr(module, "input_shape", None)
    self._module = module   # for init() only (not part of equality)

  # -- identity ------------------------------------------------------------
  def __eq__(self, other):
    return isinstance(other, NnxModel) and other._key == self._key

  def __hash__(self):
    return hash(("lipjax.NnxModel", self._key))

  def __repr__(self):
    return f"NnxModel({self.name})"

  @property
  def collections(self) -> Tuple[str, ...]:
    return tuple(sorted(set(self._collections)))

  # -- variables -----------------------------------------------------------
  def _flat_values(self, variables) -> Dict[Tuple, Any]:
    """``{attribute path: value}`` of whatever form ``variables`` takes."""
    nnx = _nnx()
    from flax import traverse_util   # pylint: disable=import-outside-toplevel
    out: Dict[Tuple, Any] = {}
    if variables is None:
      return out
    if isinstance(variables, nnx.State):
      for p, v in nnx.to_flat_state(variables):
        out[_path(p)] = v.get_value() if hasattr(v, "get_value") else v
      return out
    if isinstance(variables, (tuple, list)):
      for part in variables:
        out.update(self._flat_values(part))
      return out
    if not hasattr(variables, "items"):
      raise TypeError(f"variables of the NNX module {self.name} must be an nnx.State or a "
                      f"dict of its values, got {type(variables).__name__}")
    keys = set(variables.keys())
    tops = {p[0] for p in self._paths}
    if keys and keys <= set(self._collections) and not keys & tops:
      for part in variables.values():
        out.update(self._flat_values(part))
      return out
    for p, v in traverse_util.flatten_dict(dict(variables)).items():
      out[_path(p)] = v
    return out

  def state_of(self, variables):
    """The module's full ``nnx.State`` from ``variables`` (missing entries from the defaults)."""
    given = self._flat_values(variables)
    leaves = []
    for path, fl in zip(self._paths, self._floating):
      if fl and path in given:
        leaves.append(given[path])
      elif path in self._defaults:
        leaves.append(self._defaults[path])
      else:
        name = "/".join(path)
        raise ValueError(f"the variables of the NNX module {self.name} lack {name!r}; pass "
                         "nnx.state(model) or None (the module's own state)")
    return jax.tree_util.tree_unflatten(self._treedef, leaves)

  def variables_of(self, variables) -> Dict[str, Dict]:
    """``variables`` in the canonical form: ``{collection: nested dict}`` of the
    floating-point values only (the rest stays with the adapter)."""
    nnx = _nnx()
    from flax import traverse_util   # pylint: disable=import-outside-toplevel
    if variables is None:
      variables = nnx.state(self._module)
    given = self._flat_values(variables)
    out: Dict[str, Dict] = {}
    for path, coll, fl in zip(self._paths, self._collections, self._floating):
      if fl and path in given:
        out.setdefault(coll, {})[path] = given[path]
    return {c: traverse_util.unflatten_dict(v) for c, v in out.items()}

  def init(self, rng=None, x=None, **kwargs):
    """The module's own variables, in the canonical form (``rng`` and ``x`` are
    not used: an NNX module is initialised when it is built)."""
    del rng, x, kwargs
    return self.variables_of(None)

  def apply(self, variables, x, **kwargs):
    if kwargs:
      raise TypeError(f"NNX module {self.name}: apply takes no keyword arguments, got "
                      f"{sorted(kwargs)}")
    return _nnx().merge(self.graphdef, self.state_of(variables))(x)


# ---------------------------------------------------------------------------
# Any model
# ---------------------------------------------------------------------------


def _qualname(fn) -> str:
  name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
  return name if isinstance(name, str) else type(fn).__name__


def as_model(model):
  """The model as lipjax passes it around: an object with ``apply`` that hashes.

  A hashable object with ``apply`` (a Flax linen module, an adapter) is
  returned as it is; a ``flax.nnx.Module`` becomes an :class:`NnxModel`; a
  plain callable a :class:`FunctionModel`; an unhashable object with
  ``apply`` a cached identity handle.

  Raises:
    TypeError: for an object that is none of these.
  """
  if isinstance(model, (FunctionModel, NnxModel, _Handle, TracedKey)):
    return model
  if is_nnx_module(model):
    return NnxModel(model)
  if not hasattr(model, "apply"):
    if not callable(model):
      raise TypeError("model must be a flax.linen.Module or a function fn(variables, x) -> "
                      f"logits (or a flax.nnx.Module), got {type(model).__name__}")
    model = FunctionModel(model)
  try:
    hash(model)
  except TypeError:
    return _handle(model)
  return model


def unwrap(model):
  """The object behind an identity handle or a traced key (the model itself otherwise)."""
  while isinstance(model, (_Handle, TracedKey)):
    model = model.model
  return model


class TracedKey:
  """A model whose identity, for lipjax's caches, is its traced structure.

  Functions and unhashable modules have no structural equality of their
  own: a fresh ``lambda v, x: model.apply(v, x)`` per call would otherwise
  compile everything again. Two keys are equal when ``apply`` traces to the
  same jaxpr (same primitives, parameters and shapes, same constants' bytes)
  for the same variable structure and input shape, so they compute the same
  function; ``apply`` runs the first one's.
  """

  def __init__(self, model, key):
    self.model = model
    self._key = key
    self.input_shape = getattr(model, "input_shape", None)

  def apply(self, variables, x, *args, **kwargs):
    return self.model.apply(variables, x, *args, **kwargs)

  def __eq__(self, other):
    return isinstance(other, TracedKey) and other._key == self._key

  def __hash__(self):
    return hash(("lipjax.TracedKey", self._key))

  def __repr__(self):
    return f"TracedKey({describe(self.model)})"


def _fingerprint(model, variables, in_shape):
  """A structural key of ``model.apply`` on ``variables`` and inputs of
  ``in_shape``, or None when it cannot be formed (the model does not trace,
  or captures values of an enclosing trace)."""
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  try:
    abstract = [jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)) for a in leaves]
    x1 = jax.ShapeDtypeStruct((1,) + tuple(in_shape), jnp.float32)
    closed = jax.make_jaxpr(
        lambda v, x: model.apply(jax.tree_util.tree_unflatten(treedef, v), x))(abstract, x1)
  except Exception:   # pylint: disable=broad-except
    return None
  h = hashlib.blake2b(digest_size=32)
  h.update(str(closed.jaxpr).encode())
  for c in closed.consts:
    if isinstance(c, jax.core.Tracer):
      return None
    c = jnp.asarray(c) if not hasattr(c, "dtype") else c
    h.update(f"{c.dtype}|{np.shape(c)}|".encode())
    h.update(_host_bytes(c))
  shapes = tuple((a.shape, str(a.dtype)) for a in abstract)
  return (treedef, shapes, tuple(in_shape), h.digest())


def keyed(model, variables, in_shape):
  """``model`` as the key of lipjax's caches: a function or an unhashable
  module becomes a :class:`TracedKey` (keyed by its traced structure);
  modules that compare by their fields, and NNX adapters, stay as they are."""
  if isinstance(model, (FunctionModel, _Handle)):
    key = _fingerprint(model, variables, in_shape)
    if key is not None:
      return TracedKey(model, key)
  return model


def resolve(model, variables=None):
  """``(model, variables)`` as the bounds use them.

  An NNX module (or its adapter) takes ``variables=None`` as its own state,
  and any accepted form of its variables is put in the canonical one
  (:meth:`NnxModel.variables_of`). Other models need their variables.

  Raises:
    TypeError: for something that is not a model, or ``variables=None`` for
      a model that does not carry its own.
  """
  model = as_model(model)
  if isinstance(model, NnxModel):
    return model, model.variables_of(variables)
  if variables is None:
    raise TypeError(f"variables=None is for flax.nnx modules (their own state); "
                    f"{describe(model)} needs its variables")
  return model, variables


def describe(model) -> str:
  """A short name of the model for messages: its class or function name, never its repr."""
  m = unwrap(model)
  if isinstance(m, FunctionModel):
    return f"function {_qualname(m.fn)}"
  if isinstance(m, NnxModel):
    return f"NNX module {m.name}"
  if is_nnx_module(m):
    return f"NNX module {type(m).__name__}"
  return f"{type(m).__module__}.{type(m).__name__}"
