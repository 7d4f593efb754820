"""The network as the bounds see it: a recursive graph of stages and blocks.

* A :class:`Stage` is a linear node (its rule, parameters and the reshapes
  folded in before it) followed by an activation node (``None`` after the
  logits; the identity where a linear map feeds a block's join).
* A :class:`Block` holds two or more *paths* (each a sequence of stages and
  blocks, empty for an identity shortcut) from the same input, a combine
  rule joining them (a residual sum) and an optional activation after the
  join. Projection shortcuts ``act(f(h) + P h)`` and nested blocks are data:
  a path holding one linear stage, a path holding a block.
* A :class:`Graph` is the top-level sequence, ending with the logits stage.
  It is also the sequence of its stages in walk order (depth first, paths in
  order), which is how per-layer results (norms, boxes, power vectors) are
  indexed.

:meth:`Graph.walk` is the one walker: every computation over a network (boxes,
masks and rounding, the forward pass, its smooth surrogate, the Lipschitz
product) is a pass of it (:mod:`lipjax._src.interpret`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["Block", "Graph", "Pass", "Stage", "blocks_of", "last_stage", "stages_of", "walk"]


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
  """One linear map and the activation after it.

  Attributes:
    index: position in the graph's stages (walk order).
    name: a label for messages and :class:`~lipjax.bounds.Guarantee` rows.
    layer: the linear map's rule (:class:`~lipjax._src.rules.base.LinearRule`).
    params: its parameters (arrays).
    reshapes: shape changes applied to the stage's input before the map
      (objects with ``reshape(h)``).
    in_shape: per-example shape of the stage's input (before the reshapes).
    out_shape: per-example shape of the map's output.
    activation: the activation's rule (None for the logits stage).
    act_params: its parameters.
    dtype: working precision.
  """

  index: int
  name: str
  layer: Any
  params: Any
  reshapes: Tuple[Any, ...]
  in_shape: Tuple[int, ...]
  out_shape: Tuple[int, ...]
  activation: Any
  act_params: Any
  dtype: Any = jnp.float32

  def layer_input(self, h: Array) -> Array:
    """``(B, *in_shape)`` through the stage's reshapes to the map's own input."""
    for r in self.reshapes:
      h = r.reshape(h)
    return h

  @property
  def layer_in_shape(self) -> Tuple[int, ...]:
    x = jax.ShapeDtypeStruct((1,) + self.in_shape, self.dtype)
    return jax.eval_shape(self.layer_input, x).shape[1:]

  def linear(self, h: Array) -> Array:
    """``W h`` (no bias) for ``h`` of shape ``(B, *in_shape)``."""
    return self.layer.forward(self.params, self.layer_input(h))

  def linear_for_adjoint(self, h: Array) -> Array:
    """The same map as :meth:`linear`, in the rule's transpose-friendly form."""
    return self.layer.forward_for_adjoint(self.params, self.layer_input(h))

  def adjoint(self, z: Array) -> Array:
    """``W^T z`` for ``z`` of shape ``(B, *out_shape)``; returns ``(B, *in_shape)``.

    The rule's explicit adjoint when it has one, else ``jax.linear_transpose``
    of :meth:`linear_for_adjoint`.
    """
    spec = jax.ShapeDtypeStruct((z.shape[0],) + tuple(self.in_shape), z.dtype)
    h = self.layer.adjoint(self.params, z, self.layer_in_shape)
    if h is None:
      return jax.linear_transpose(self.linear_for_adjoint, spec)(z)[0]
    if not self.reshapes:
      return h
    return jax.linear_transpose(self.layer_input, spec)(h)[0]

  def affine(self, h: Array) -> Array:
    """``W h + b`` as the model computes it (a traced map replays its primitives)."""
    return self.layer.affine(self.params, self.layer_input(h))

  def abs_linear(self, h: Array) -> Optional[Array]:
    """``|W| h`` (or an elementwise upper bound for ``h >= 0``), or None."""
    return self.layer.abs_forward(self.params, self.layer_input(h))

  def rounding_abs_linear(self, h: Array) -> Optional[Array]:
    """:meth:`abs_linear` for the rounding model (the terms the float32
    evaluation sums; see ``LinearRule.rounding_abs_forward``)."""
    return self.layer.rounding_abs_forward(self.params, self.layer_input(h))

  def bias(self) -> Optional[Array]:
    return self.layer.bias(self.params)

  def explicit_matrix(self) -> Optional[Array]:
    return self.layer.explicit_matrix(self.params)


@dataclasses.dataclass(frozen=True, eq=False)
class Block:
  """Paths from one input joined by a combine rule, then an optional activation.

  The Jacobian of the block is ``A (J_1 + ... + J_k)`` with ``||A|| <= 1``
  (the activation after the join), so ``sum_i ||J_i||`` bounds its norm on
  the ball (an empty path is the identity, ``||J|| = 1``).

  Attributes:
    paths: per path, its stages and blocks (empty: the identity).
    combine: the join's rule (:class:`~lipjax._src.rules.base.CombineRule`).
    activation: the activation's rule after the join, or None.
    act_params: its parameters.
    shape: per-example shape of the joined value.
    name: a label for messages.
  """

  paths: Tuple[Tuple[Any, ...], ...]
  combine: Any
  activation: Any = None
  act_params: Any = None
  shape: Tuple[int, ...] = ()
  name: str = "block"


Item = Union[Stage, Block]


def stages_of(items) -> list:
  """The stages of ``items`` (blocks included), in walk order."""
  out = []
  for item in items:
    if isinstance(item, Block):
      for path in item.paths:
        out.extend(stages_of(path))
    else:
      out.append(item)
  return out


def last_stage(items) -> Optional[Stage]:
  """The stage that produces the output of ``items`` (through nested blocks:
  the last stage of the last path that has one), or None."""
  for item in reversed(items):
    if isinstance(item, Stage):
      return item
    for path in reversed(item.paths):
      last = last_stage(path)
      if last is not None:
        return last
  return None


def blocks_of(items) -> list:
  """The blocks of ``items`` (nested ones included) in the order the walker
  joins them: a block after every block inside its paths."""
  out = []
  for item in items:
    if isinstance(item, Block):
      for path in item.paths:
        out.extend(blocks_of(path))
      out.append(item)
  return out


class Pass:
  """A computation over a graph: the walker calls :meth:`stage` for every
  stage in order, and for every block :meth:`fork` (the carry each path
  starts from), then the paths, then :meth:`join`."""

  def stage(self, stage: Stage, carry):
    raise NotImplementedError

  def fork(self, block: Block, carry):
    del block
    return carry

  def join(self, block: Block, carry, outs: Sequence[Any]):
    raise NotImplementedError


def walk(items: Sequence[Item], pass_: Pass, carry):
  """Runs ``pass_`` over ``items`` (recursing into every block's paths)."""
  for item in items:
    if isinstance(item, Block):
      outs = [walk(path, pass_, pass_.fork(item, carry)) for path in item.paths]
      carry = pass_.join(item, carry, outs)
    else:
      carry = pass_.stage(item, carry)
  return carry


class _Product(Pass):
  """The Lipschitz bound from one bound per stage (scalars or ``(B,)`` arrays)."""

  def __init__(self, norms):
    self.norms = norms

  def stage(self, stage, carry):
    f = self.norms[stage.index]
    return f if carry is None else carry * f

  def fork(self, block, carry):
    return None

  def join(self, block, carry, outs):
    factor = block.combine.lipschitz([1.0 if o is None else o for o in outs])
    return factor if carry is None else carry * factor


class Graph:
  """The whole network: its items (the last one the logits stage) and, as a
  sequence, its stages in walk order."""

  def __init__(self, items: Sequence[Item]):
    self.items = tuple(items)
    self.stages = tuple(stages_of(self.items))
    self.blocks = tuple(blocks_of(self.items))
    if not self.items or not isinstance(self.items[-1], Stage) \
        or self.items[-1].activation is not None:
      raise ValueError("a graph ends with its logits stage")

  # -- the sequence of stages ----------------------------------------------
  def __len__(self):
    return len(self.stages)

  def __getitem__(self, i):
    return self.stages[i]

  def __iter__(self):
    return iter(self.stages)

  @property
  def has_blocks(self) -> bool:
    return any(isinstance(item, Block) for item in self.items)

  @property
  def in_shape(self) -> Tuple[int, ...]:
    return self.stages[0].in_shape

  def walk(self, pass_: Pass, carry, upto_logits: bool = True):
    """``pass_`` over the graph from ``carry``; without the logits stage when
    ``upto_logits`` is False."""
    return walk(self.items if upto_logits else self.items[:-1], pass_, carry)

  def product(self, norms: Sequence[Any], logits: bool = True):
    """The network's Lipschitz bound from a bound per stage (indexed by stage).

    The product along the graph, where each block contributes its combine
    rule's factor (for a residual sum ``(1 + 2u) (sum of its paths'
    products)``, an empty path counting 1). Without the logits stage when
    ``logits`` is False (``norms`` may then omit it). ``1.0`` for nothing.
    """
    total = self.walk(_Product(norms), None, upto_logits=logits)
    return 1.0 if total is None else total
