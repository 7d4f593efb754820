"""Linear JAX primitives: how a traced linear map replays each one.

A traced linear layer is a *program*: the primitives between two activations
(:mod:`lipjax._src.program`). Its map is replayed in three modes:

* ``"affine"``: the primitive as traced (the model's own arithmetic);
* ``"linear"``: static *additions* dropped (the map ``W`` without its bias);
* ``"abs"``: additionally every static coefficient replaced by its absolute
  value and subtractions of two input-dependent values by additions, so that
  for ``h >= 0`` the replay is ``>= |W| h`` elementwise (``|A B| <= |A| |B|``,
  ``|A - B| <= |A| + |B|``).

Each rule also says which uses of its primitive it accepts (``check``):
linear in the input-dependent operands, the batch axis (axis 0) kept per
example.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp

from lipjax._src.rules import registry

Array = jax.Array


def bind(prim, args, params) -> List[Array]:
  """``prim.bind(*args, **params)`` as a list of outputs."""
  out = prim.bind(*args, **prim.get_bind_params(params))
  return list(out) if prim.multiple_results else [out]


@dataclasses.dataclass(frozen=True)
class LinearPrimitive:
  """A primitive that is a fixed 0/1 map of its input (reshape, slicing, sums of entries)."""

  def check(self, name: str, params, acts: Sequence[int]) -> Optional[str]:
    """A short description of an unsupported use, or ``None``."""
    del name, params, acts
    return None

  def replay(self, node, args: List[Array], mode: str) -> List[Array]:
    del mode
    return bind(node.prim, args, node.params)


def _batch_bad(name: str, params) -> Optional[str]:
  """Whether a structural primitive moves or mixes the batch axis."""
  p = params
  if name == "transpose" and p["permutation"][0] != 0:
    return "a transpose that moves the batch axis"
  if name == "broadcast_in_dim" and (not p["broadcast_dimensions"]
                                     or p["broadcast_dimensions"][0] != 0):
    return "a broadcast that moves the batch axis"
  if name == "squeeze" and 0 in p["dimensions"]:
    return "squeezing the batch axis"
  if name == "rev" and 0 in p["dimensions"]:
    return "reversing the batch axis"
  if name == "split" and p["axis"] == 0:
    return "splitting the batch axis"
  if name == "reduce_sum" and 0 in p["axes"]:
    return "a sum over the batch axis"
  if name == "cumsum" and p["axis"] == 0:
    return "a cumulative sum over the batch axis"
  if name == "reduce_window_sum" and (
      p["window_dimensions"][0] != 1 or p["window_strides"][0] != 1
      or tuple(p["padding"][0]) != (0, 0) or p["base_dilation"][0] != 1):
    return "a window sum over the batch axis"
  if name == "slice" and (p["start_indices"][0] != 0 or p["limit_indices"][0] != 1):
    return "slicing the batch axis"
  return None


@dataclasses.dataclass(frozen=True)
class Structural(LinearPrimitive):
  """A 0/1 map: the same in every replay."""

  def check(self, name, params, acts):
    return _batch_bad(name, params)


@dataclasses.dataclass(frozen=True)
class Coefficient(LinearPrimitive):
  """Multiplies its input by static operands (dense, convolution, scaling):
  the absolute-value replay uses ``|static|``."""

  def check(self, name, params, acts):
    p = params
    if name == "dot_general":
      (lc, _), (lb, rb) = p["dimension_numbers"]
      if list(acts) != [0]:
        return ("a product of two values computed from the input" if len(acts) == 2 else
                "dot_general with the input-dependent value as its right operand")
      if lb or rb or 0 in lc:
        return "dot_general over the batch axis"
    elif name == "conv_general_dilated":
      dn = p["dimension_numbers"]
      if list(acts) != [0]:
        return ("a convolution of two values computed from the input" if len(acts) == 2 else
                "a convolution whose kernel depends on the input")
      if dn.lhs_spec[0] != 0 or dn.out_spec[0] != 0 or p["batch_group_count"] != 1:
        return "a convolution that does not keep the batch axis first"
    elif name == "mul" and len(acts) == 2:
      return "a multiplication of two values computed from the input"
    return None

  def replay(self, node, args, mode):
    if mode == "abs":
      args = [a if m else jnp.abs(a) for a, m in zip(args, node.act_mask)]
    return bind(node.prim, args, node.params)


@dataclasses.dataclass(frozen=True)
class Divide(LinearPrimitive):
  """Division by a static value."""

  def check(self, name, params, acts):
    return None if list(acts) == [0] else "a division by a value computed from the input"

  def replay(self, node, args, mode):
    if mode == "abs":
      args = [args[0], jnp.abs(args[1])]
    return bind(node.prim, args, node.params)


@dataclasses.dataclass(frozen=True)
class Negate(LinearPrimitive):

  def replay(self, node, args, mode):
    if mode == "abs":
      return [args[0]]
    return bind(node.prim, args, node.params)


@dataclasses.dataclass(frozen=True)
class Add(LinearPrimitive):
  """Sums: static addends are the bias (dropped outside ``"affine"``)."""

  def replay(self, node, args, mode):
    if mode != "affine":
      acts = [a for a, m in zip(args, node.act_mask) if m]
      if len(acts) == 1:
        return [acts[0]]
    return bind(node.prim, args, node.params)


@dataclasses.dataclass(frozen=True)
class Subtract(LinearPrimitive):

  def replay(self, node, args, mode):
    if mode != "affine":
      mask = node.act_mask
      if mask == (True, False):
        return [args[0]]
      if mask == (False, True):
        return [args[1] if mode == "abs" else -args[1]]
      if mode == "abs":
        return [args[0] + args[1]]
    return bind(node.prim, args, node.params)


@dataclasses.dataclass(frozen=True)
class Pad(LinearPrimitive):

  def check(self, name, params, acts):
    if list(acts) != [0]:
      return "padding with a value computed from the input"
    if tuple(params["padding_config"][0]) != (0, 0, 0):
      return "padding of the batch axis"
    return None

  def replay(self, node, args, mode):
    if mode != "affine":
      args = [args[0], jnp.zeros((), args[0].dtype)]
    return bind(node.prim, args, node.params)


@dataclasses.dataclass(frozen=True)
class Concatenate(LinearPrimitive):

  def check(self, name, params, acts):
    return "concatenation along the batch axis" if params["dimension"] == 0 else None

  def replay(self, node, args, mode):
    if mode != "affine":
      args = [a if m else jnp.zeros_like(a) for a, m in zip(args, node.act_mask)]
    return bind(node.prim, args, node.params)


@dataclasses.dataclass(frozen=True)
class Stack(LinearPrimitive):
  """``jnp.stack``: concatenation along a new axis."""

  def check(self, name, params, acts):
    return "stacking along the batch axis" if params["axis"] == 0 else None

  def replay(self, node, args, mode):
    if mode != "affine":
      args = [a if m else jnp.zeros_like(a) for a, m in zip(args, node.act_mask)]
    return bind(node.prim, args, node.params)


for _name in ("reshape", "transpose", "broadcast_in_dim", "squeeze", "slice", "rev", "split",
              "reduce_sum", "reduce_window_sum", "cumsum", "convert_element_type", "copy",
              "copy_p"):
  registry.register_linear_primitive(_name, Structural())
for _name in ("dot_general", "conv_general_dilated", "mul"):
  registry.register_linear_primitive(_name, Coefficient())
registry.register_linear_primitive("div", Divide())
registry.register_linear_primitive("neg", Negate())
registry.register_linear_primitive("add", Add())
registry.register_linear_primitive("add_any", Add())
registry.register_linear_primitive("sub", Subtract())
registry.register_linear_primitive("pad", Pad())
registry.register_linear_primitive("concatenate", Concatenate())
registry.register_linear_primitive("stack", Stack())
