"""Your own linear maps and activations: :func:`register_linear`, :func:`register_activation`.

A registered function comes back wrapped in a named ``jax.jit`` call; the
tracer finds the name in :data:`_REGISTERED` and keeps the call as one node
(instead of inlining it): a linear piece of a traced layer (generic rules:
adjoint from ``jax.linear_transpose``, explicit Jacobian or Lanczos), or an
activation with the monotone interval rule, the declared flat regions as its
masks and the declared evaluation error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp

from lipjax._src import patterns
from lipjax._src.rules import registry
from lipjax._src.rules.base import ElementwiseActivation, as_float

__all__ = ["RegisteredActivation", "lookup", "register_activation", "register_linear"]


@dataclasses.dataclass(frozen=True)
class LinearCall:
  """A registered linear map (kept as one node of a traced layer)."""

  name: str
  fn: Callable


@dataclasses.dataclass(frozen=True)
class ActivationCall:
  """A registered activation (kept as one node, an activation of its own)."""

  name: str
  fn: Callable
  flat_below: float
  flat_above: float
  ulps: float


_REGISTERED: Dict[str, Any] = {}
_PREFIX = "lipjax_registered__"


def lookup(call_name: str):
  """The registration behind a traced call's name, or None."""
  return _REGISTERED.get(str(call_name))


def _tagged(fn: Callable, name: str, entry) -> Callable:
  """``fn`` as a ``jax.jit`` call whose name the tracer looks up."""
  tag = f"{_PREFIX}{name}"
  if tag in _REGISTERED and _REGISTERED[tag].fn is not fn:
    raise ValueError(f"a different function is already registered as {name!r}")
  _REGISTERED[tag] = entry

  def call(*args):
    return fn(*args)

  call.__name__ = call.__qualname__ = tag
  jitted = jax.jit(call)

  def wrapper(*args):
    return jitted(*args)

  wrapper.__name__ = getattr(fn, "__name__", name)
  wrapper.__doc__ = fn.__doc__
  wrapper.lipjax_rule = entry
  return wrapper


def _check_name(name) -> str:
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"a registered rule needs a Python identifier as its name, got {name!r}")
  return name


def register_linear(fn: Callable, name: Optional[str] = None) -> Callable:
  """Registers a linear map so that the bounds treat each call as one linear piece.

  ``fn(h, *params)`` must be linear in ``h`` (a batch ``(B, ...)``, examples
  independent) and compute each output as a sum of products of entries of
  ``h`` with values of ``params`` (no FFT or other algorithm outside the
  rounding model of the certificates). Only the forward map is needed: the
  adjoint comes from ``jax.linear_transpose`` (which also checks linearity
  when the model is traced), and the bounds use the generic sound rules
  (explicit Jacobian for small outputs, Lanczos with its failure probability
  otherwise; row norms from the global norm). Call the returned function in
  your model instead of ``fn``.

  Args:
    fn: the linear map.
    name: a unique identifier (default ``fn.__name__``).

  Returns:
    ``fn`` wrapped so that the tracer recognises it (same arguments and
    results).
  """
  if not callable(fn):
    raise TypeError(f"register_linear needs a function, got {type(fn).__name__}")
  name = _check_name(name or getattr(fn, "__name__", ""))
  return _tagged(fn, name, LinearCall(name, fn))


def register_activation(fn: Callable, name: Optional[str] = None, *,
                        flat_below: float = -math.inf, flat_above: float = math.inf,
                        ulps: float = 4.0) -> Callable:
  """Registers an elementwise, nondecreasing, 1-Lipschitz activation ``fn(z)``.

  The bounds map boxes through it by monotonicity (``[fn(lb), fn(ub)]``),
  use slope in ``[0, 1]`` for the local norms (an output varies unless its
  box lies where ``fn`` is constant: ``ub <= flat_below`` or ``lb >=
  flat_above``), and widen every value by ``ulps`` units in the last place
  of float32 for the rounding of ``fn`` itself.

  These properties are the caller's guarantee (they are not checked):
  an activation that is not monotone, has a slope above 1, is not constant
  where declared, or is evaluated less accurately than ``ulps`` voids the
  bounds.

  Args:
    fn: the activation, applied elementwise to a float32 array.
    name: a unique identifier (default ``fn.__name__``).
    flat_below, flat_above: ``fn`` is constant on ``z <= flat_below`` and on
      ``z >= flat_above``.
    ulps: bound on the float32 evaluation error of ``fn``, in units of
      ``2^-24 |fn(z)|`` (plus the smallest normal number).

  Returns:
    ``fn`` wrapped so that the tracer recognises it.
  """
  if not callable(fn):
    raise TypeError(f"register_activation needs a function, got {type(fn).__name__}")
  name = _check_name(name or getattr(fn, "__name__", ""))
  if not (float(flat_below) <= float(flat_above)):
    raise ValueError(f"flat_below must be <= flat_above, got {flat_below} > {flat_above}")
  if not (0 <= float(ulps) < 2 ** 20):
    raise ValueError(f"ulps must be in [0, 2^20), got {ulps}")
  return _tagged(fn, name, ActivationCall(name, fn, float(flat_below), float(flat_above),
                                          float(ulps)))


@dataclasses.dataclass(frozen=True, eq=False)
class RegisteredActivation(ElementwiseActivation):
  """An activation added by :func:`register_activation`: boxes map by
  monotonicity, widened by the rounding allowance of ``fn``; an output is
  constant where its box lies in a declared flat region."""

  fn: Any = None
  flat_below: float = -math.inf
  flat_above: float = math.inf
  ulps: float = 4.0
  label: str = ""

  def forward(self, params, z):
    return self.fn(z)

  def evaluation_error(self, params, lo, hi):
    """Bound on ``|fl(fn(z)) - fn(z)|`` for ``z`` in ``[lo, hi]``."""
    mag = jnp.maximum(jnp.abs(self.fn(lo)), jnp.abs(self.fn(hi)))
    return (self.ulps + 2.0) * 2.0 ** -24 * mag + 2.0 ** -126

  def interval(self, params, lb, ub):
    err = self.evaluation_error(params, lb, ub)
    return self.fn(lb) - err, self.fn(ub) + err

  def mask(self, params, lb, ub):
    m = as_float(~((ub <= self.flat_below) | (lb >= self.flat_above)), ub)  # NaN: varies
    return m, m


def _pattern(ctx):
  out = []
  for n in ctx.live:
    node = ctx.nodes[n]
    r = node.rule
    if isinstance(r, ActivationCall):
      act = RegisteredActivation(fn=r.fn, flat_below=r.flat_below, flat_above=r.flat_above,
                                 ulps=r.ulps, label=r.name)
      out.append(patterns.ActivationMatch(node.act_ins()[0], node.outs[0], (n,), node.where,
                                          lambda get, in_shape, act=act: (act, {}),
                                          kind="user"))
  return out


registry.register_activation_pattern("registered", _pattern, priority=5)
