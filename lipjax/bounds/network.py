"""Reads a model into a list of bound stages.

A *stage* is one linear layer (with any reshapes before it folded into its
map) followed by its activation (``None`` for the last layer). A
:class:`lipjax.nn.Sequential` is read layer by layer (consecutive linear
layers get an :class:`lipjax.nn.Identity` activation between them); any other
Flax module or function ``fn(variables, x)`` is traced to a jaxpr by
:mod:`lipjax.bounds.graph`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Tuple

import jax
import jax.numpy as jnp

from lipjax import nn as lnn

Array = jax.Array

SUPPORTED = ("lipjax.nn.Dense", "lipjax.nn.Conv", "lipjax.nn.AvgPool",
             "any lipjax.nn.LinearLayer subclass", "lipjax.nn.ReLU",
             "lipjax.nn.ClippedReLU", "lipjax.nn.ClippedMaxMin",
             "any lipjax.nn.Activation subclass", "lipjax.nn.Flatten")


class UnsupportedModelError(TypeError):
  """The model contains something the bounds cannot handle."""


@dataclasses.dataclass(frozen=True)
class Stage:
  """One linear layer and the activation after it."""

  index: int
  name: str
  layer: lnn.LinearLayer
  params: Any
  reshapes: Tuple[lnn.Reshape, ...]
  in_shape: Tuple[int, ...]     # shape the map accepts (before reshapes)
  out_shape: Tuple[int, ...]
  activation: Optional[lnn.Activation]
  act_params: Any

  def _pre(self, h: Array) -> Array:
    for r in self.reshapes:
      h = r.reshape(h)
    return h

  @property
  def layer_in_shape(self) -> Tuple[int, ...]:
    x = jax.ShapeDtypeStruct((1,) + self.in_shape, jnp.float32)
    return jax.eval_shape(self._pre, x).shape[1:]

  def linear(self, h: Array) -> Array:
    """``W h`` (no bias) for ``h`` of shape ``(B, *in_shape)``."""
    return self.layer.linear(self.params, self._pre(h))

  def linear_for_adjoint(self, h: Array) -> Array:
    """The same map as :meth:`linear`, in the layer's transpose-friendly form."""
    return self.layer.linear_for_adjoint(self.params, self._pre(h))

  def affine(self, h: Array) -> Array:
    """``W h + b``; a traced layer replays the user's own primitives instead."""
    replay = getattr(self.layer, "affine_replay", None)
    if replay is not None:
      return replay(self.params, self._pre(h))
    z = self.linear(h)
    b = self.layer.bias(self.params)
    return z if b is None else z + b

  def abs_linear(self, h: Array) -> Optional[Array]:
    return self.layer.abs_linear(self.params, self._pre(h))


def _params_of(variables, i):
  params = variables.get("params", {}) if hasattr(variables, "get") else {}
  return params.get(f"layers_{i}", {})


def _describe(layer) -> str:
  return f"{type(layer).__module__}.{type(layer).__name__}"


def trace(model, variables, in_shape: Tuple[int, ...]) -> List[Stage]:
  """Splits ``model`` into stages.

  Args:
    model: a :class:`lipjax.nn.Sequential`, any other Flax module, or a
      function ``fn(variables, x) -> logits`` (see :func:`lipjax.bounds.graph.trace`).
    variables: its Flax variables (``{"params": ...}``).
    in_shape: shape of one input example.

  Raises:
    UnsupportedModelError: for any layer outside the protocol, a model that
      does not end with a linear layer, or an activation before the first
      linear layer.
  """
  if not isinstance(model, lnn.Sequential):
    from lipjax.bounds import graph   # pylint: disable=import-outside-toplevel
    return graph.trace(model, variables, in_shape)
  if not isinstance(variables, dict) and not hasattr(variables, "get"):
    raise TypeError("variables must be the dict returned by model.init")
  layers = list(model.layers)
  if not layers:
    raise UnsupportedModelError("the model has no layers")
  stages: List[Stage] = []
  pending_reshapes: List[lnn.Reshape] = []
  current = None   # dict of the open linear stage
  shape = tuple(in_shape)

  def close(activation, act_params):
    nonlocal current
    stages.append(Stage(activation=activation, act_params=act_params, **current))
    current = None

  for i, layer in enumerate(layers):
    if isinstance(layer, lnn.LinearLayer):
      if current is not None:
        close(lnn.Identity(), {})
      params = _params_of(variables, i)
      stage_in = shape
      probe = Stage(len(stages), f"layers_{i} ({type(layer).__name__})", layer, params,
                    tuple(pending_reshapes), stage_in, (), None, None)
      try:
        out = jax.eval_shape(probe.linear,
                             jax.ShapeDtypeStruct((1,) + stage_in, jnp.float32))
      except KeyError as e:
        top = variables.get("params", {}) if hasattr(variables, "get") else {}
        raise UnsupportedModelError(
            f"variables['params'] has no parameter {e} for layers_{i} "
            f"({type(layer).__name__}); its top-level keys are {sorted(top)}. For a "
            "lipjax model held as a submodule named NAME, pass "
            "{'params': variables['params'][NAME]}") from None
      shape = tuple(out.shape[1:])
      current = dict(index=len(stages), name=probe.name, layer=layer, params=params,
                     reshapes=tuple(pending_reshapes), in_shape=stage_in,
                     out_shape=shape)
      pending_reshapes = []
    elif isinstance(layer, lnn.Activation):
      if current is None:
        raise UnsupportedModelError(
            f"layers_{i} ({type(layer).__name__}) is an activation that does not "
            "follow a linear layer; lipjax bounds need linear -> activation chains")
      close(layer, _params_of(variables, i))
    elif isinstance(layer, lnn.Reshape):
      if current is not None:
        close(lnn.Identity(), {})
      pending_reshapes.append(layer)
    else:
      raise UnsupportedModelError(
          f"layers_{i} is {_describe(layer)}, which lipjax bounds do not support. "
          f"Supported: {', '.join(SUPPORTED)}. A new linear layer only needs to "
          "subclass lipjax.nn.LinearLayer and implement linear() and bias().")
  if current is None or pending_reshapes:
    raise UnsupportedModelError(
        "the model must end with a linear layer (the logits); found "
        f"{_describe(layers[-1])} last")
  close(None, None)
  if len(shape) != 1:
    raise UnsupportedModelError(
        f"the last layer must output (B, num_classes), got per-example shape {shape}")
  return stages
