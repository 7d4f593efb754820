"""Traced values, nodes and programs (the pieces of a traced model).

The tracer (:mod:`lipjax._src.trace`) sorts every value of a model's jaxpr
into *static* values (computed from the variables and constants only:
kernels, biases, thresholds) and *activation* values (computed from the
input). Each primitive applied to an activation value is a :class:`Node`; a
:class:`Program` is the nodes between two activations, replayed as a linear
map in the modes of :mod:`lipjax._src.rules.primitives`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp

from lipjax._src.rules import primitives, registry

Array = jax.Array

bind = primitives.bind


@dataclasses.dataclass(eq=False)
class Static:
  """A value computed from the variables and constants only.

  ``kind`` is ``"leaf"`` (variable leaf ``leaf``), ``"const"`` (``value``) or
  ``"call"`` (output ``index`` of ``prim.bind(*ins, **params)``). ``value``
  is the concrete value whenever it does not depend on the variables.
  """

  kind: str
  value: Any = None
  leaf: int = -1
  prim: Any = None
  params: Any = None
  ins: Tuple[int, ...] = ()
  index: int = 0
  call: int = -1
  shape: Tuple[int, ...] = ()


@dataclasses.dataclass(eq=False)
class Node:
  """One primitive applied to at least one activation value.

  ``ins`` holds ``("a", aid)`` (activation value) or ``("s", sid)`` (static)
  references; ``outs`` the activation ids it defines; ``rule`` a registered
  user rule (:mod:`lipjax._src.rules.registered`) for an opaque call.
  """

  prim: Any
  params: Dict[str, Any]
  ins: Tuple[Tuple[str, int], ...]
  outs: Tuple[int, ...]
  where: str
  rule: Any = None
  order: int = 0

  @property
  def name(self) -> str:
    return self.prim.name

  @property
  def act_mask(self) -> Tuple[bool, ...]:
    return tuple(k == "a" for k, _ in self.ins)

  def act_ins(self) -> List[int]:
    return [i for k, i in self.ins if k == "a"]

  def static_ins(self) -> List[int]:
    return [i for k, i in self.ins if k == "s"]

  @property
  def opaque(self) -> bool:
    """A registered user map: replayed as a whole, no absolute-value replay."""
    return self.rule is not None

  @property
  def coefficient(self) -> bool:
    """Multiplies by static values (dense, convolution, scaling) or is opaque."""
    return self.opaque or isinstance(registry.linear_primitive(self.name),
                                     primitives.Coefficient)


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
  """The primitives of one linear layer: input activation -> pre-activation."""

  nodes: Tuple[Node, ...]
  input: int
  output: int
  in_shape: Tuple[int, ...]     # per example
  out_shape: Tuple[int, ...]

  @property
  def static_ids(self) -> Tuple[int, ...]:
    seen = []
    for n in self.nodes:
      for s in n.static_ins():
        if s not in seen:
          seen.append(s)
    return tuple(seen)


def key(sid: int) -> str:
  """The name of static value ``sid`` in a traced layer's ``params``."""
  return f"s{sid}"


def apply_node(node: Node, args: List[Array], mode: str) -> List[Array]:
  """One node in the replay ``mode`` (``"affine"``, ``"linear"`` or ``"abs"``)."""
  if mode == "affine":
    return bind(node.prim, args, node.params)
  if node.opaque:
    if mode == "abs":
      raise ValueError("a registered linear map has no absolute-value replay")
    return bind(node.prim, args, node.params)
  return registry.linear_primitive(node.name).replay(node, args, mode)


def run(prog: Program, params, h: Array, mode: str) -> Array:
  """The program on a batch of one, ``(1, *in_shape) -> (1, *out_shape)``."""
  env = {prog.input: h}
  for node in prog.nodes:
    args = [env[i] if k == "a" else params[key(i)] for k, i in node.ins]
    for aid, out in zip(node.outs, apply_node(node, args, mode)):
      env[aid] = out
  return env[prog.output]


def replay(prog: Program, params, h: Array, mode: str) -> Array:
  """The program on a batch ``(B, *in_shape)``, example by example."""
  return jax.vmap(lambda e: run(prog, params, e[None], mode)[0])(h)


def bias(prog: Program, params) -> Array:
  """The program at zero: the affine map's bias (per-example shape)."""
  z = jnp.zeros((1,) + prog.in_shape, jnp.float32)
  return replay(prog, params, z, "affine")[0]
