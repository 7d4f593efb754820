"""From the traced nodes to the graph's skeleton: activations, linear segments, blocks.

The tracer (:mod:`lipjax._src.trace`) hands over the nodes of a jaxpr (every
primitive applied to a value computed from the input). This module

1. groups nodes into *activations* with the registered activation patterns
   (a clamp chain ``min(max(z, lo), hi)``, MaxMin over channel halves or over
   adjacent pairs, a registered activation call; see :func:`match_activations`);
2. sorts the other nodes into *segments*: the linear nodes computed from one
   *point* (the model input, an activation's output or a join's output). An
   addition of two values from different segments is a *join* (the end of a
   block, e.g. a residual sum);
3. reads the points, segments and joins as a series-parallel graph: each
   value a segment hands to something outside it is a *stage* (the
   segment's nodes that value depends on, and the activation after it, the
   identity before a join, none for the logits); a point with two outgoing
   paths that meet at one join is a *block* (paths of any depth: projection
   shortcuts and nested blocks included);
4. gives each stage's program its rule with the registered segment patterns
   (the generic traced rule when none matches).

The result (:class:`Skeleton`) depends on the model's structure and shapes
only; :mod:`lipjax._src.trace` caches it and fills in the parameters on every
call. Anything outside these forms raises one short line
(:func:`lipjax._src.errors.unsupported`).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from lipjax._src import errors, program
from lipjax._src.rules import registry

__all__ = ["ActivationMatch", "BlockSpec", "Chain", "Context", "SegmentMatch", "Skeleton",
           "StageSpec", "ToShape", "build_skeleton"]

#: No-op copies inside a linear segment.
PASS = ("convert_element_type", "copy", "copy_p")


# ---------------------------------------------------------------------------
# What patterns return
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToShape:
  """Reshapes ``(B, ...)`` to ``(B, *shape)`` (row-major, like ``jnp.reshape``)."""

  shape: Tuple[int, ...] = ()

  def reshape(self, x):
    return x.reshape((x.shape[0],) + tuple(self.shape))


@dataclasses.dataclass(frozen=True)
class SegmentMatch:
  """A linear segment's rule: ``build(get) -> (rule, params, reshapes)`` with
  ``get(static id)`` the value of a static input in this call."""

  kind: str
  build: Callable


@dataclasses.dataclass(frozen=True)
class ActivationMatch:
  """An activation found in the traced nodes.

  Attributes:
    input: the activation value it is applied to (its pre-activation).
    output: the activation value it computes.
    nodes: the node ids it claims.
    where: where it sits (for messages).
    build: ``build(get, in_shape) -> (rule, params)``; ``in_shape`` is the
      per-example shape of ``input``.
    statics: the static ids ``build`` reads.
    thresholds: static ids that are learnable thresholds to keep ``>= 0``
      (a clipped ReLU's upper bound).
    kind: a label.
  """

  input: int
  output: int
  nodes: Tuple[int, ...]
  where: str
  build: Callable
  statics: Tuple[int, ...] = ()
  thresholds: Tuple[int, ...] = ()
  kind: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class StageSpec:
  """A stage of the skeleton: its program, its linear rule, what follows it."""

  program: program.Program
  segment: SegmentMatch
  activation: Any      # an ActivationMatch, "identity" (before a join) or None (logits)
  name: str


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSpec:
  """A block of the skeleton: paths from one point to one join."""

  paths: Tuple[Tuple[Any, ...], ...]
  combine: Any
  activation: Optional[ActivationMatch]
  shape: Tuple[int, ...]
  name: str


@dataclasses.dataclass(frozen=True, eq=False)
class Skeleton:
  """The structure of a traced model (parameters are filled in per call)."""

  items: Tuple[Any, ...]

  def specs(self):
    """Every stage spec and block spec, depth first."""
    def visit(items):
      for item in items:
        yield item
        if isinstance(item, BlockSpec):
          for path in item.paths:
            yield from visit(path)
    return list(visit(self.items))

  def activations(self) -> List[ActivationMatch]:
    out = []
    for spec in self.specs():
      act = spec.activation
      if isinstance(act, ActivationMatch):
        out.append(act)
    return out


# ---------------------------------------------------------------------------
# The context patterns read
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chain:
  """A chain of elementwise ``max`` / ``min`` with static operands (and ``clamp``),
  fused while each intermediate value has a single use: one clamp."""

  input: int
  output: int
  nodes: Tuple[int, ...]
  steps: Tuple[Tuple[str, Tuple[int, ...]], ...]
  where: str


def _is_clamp_node(node) -> bool:
  if node.name == "clamp":
    return True
  return node.name in ("max", "min") and len(node.act_ins()) == 1


def _clamp_steps(node) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
  if node.name == "clamp":
    lo, hi = node.ins[0][1], node.ins[2][1]
    return (("max", (lo,)), ("min", (hi,)))
  return ((node.name, tuple(node.static_ins())),)


class Context:
  """The traced nodes as patterns see them: the nodes the output depends on
  (``live``), who produces and who consumes each value, their shapes and the
  static values (``statics``, with ``value`` set when concrete)."""

  def __init__(self, nodes, shapes, producer, statics, out_aid: int, in_aid: int):
    self.nodes = nodes
    self.shapes = shapes
    self.statics = statics
    self.out_aid = out_aid
    self.in_aid = in_aid
    live, seen, stack = set(), set(), [out_aid]
    while stack:
      a = stack.pop()
      if a in seen or a not in producer:
        continue
      seen.add(a)
      n = producer[a]
      live.add(n)
      stack.extend(nodes[n].act_ins())
    self.live = sorted(live)
    self._producer = {a: n for a, n in producer.items() if n in live}
    self.consumers: Dict[int, List[int]] = collections.defaultdict(list)
    for n in self.live:
      for a in nodes[n].act_ins():
        self.consumers[a].append(n)
    self.claimed: set = set()
    self._chains = None

  def producer(self, aid: int) -> Optional[int]:
    """The live node that computes ``aid`` (None for the input)."""
    return self._producer.get(aid)

  def shape(self, aid: int) -> Tuple[int, ...]:
    """Per-example shape of an activation value."""
    return tuple(self.shapes[aid][1:])

  def chains(self) -> List[Chain]:
    """Every clamp chain of the live nodes."""
    if self._chains is None:
      chain_of: Dict[int, int] = {}
      chains: List[Dict[str, Any]] = []
      for n in self.live:
        node = self.nodes[n]
        if not _is_clamp_node(node):
          continue
        (a,) = node.act_ins()
        p = self.producer(a)
        if p is not None and p in chain_of and self.consumers[a] == [n] and a != self.out_aid:
          ch = chains[chain_of[p]]
          ch["nodes"].append(n)
          ch["steps"] += _clamp_steps(node)
          ch["output"] = node.outs[0]
          chain_of[n] = chain_of[p]
        else:
          chain_of[n] = len(chains)
          chains.append({"input": a, "output": node.outs[0], "nodes": [n],
                         "steps": _clamp_steps(node), "where": node.where})
      self._chains = [Chain(c["input"], c["output"], tuple(c["nodes"]), c["steps"],
                            c["where"]) for c in chains]
    return self._chains

  def chain_after(self, aid: int) -> Optional[Chain]:
    """The unclaimed clamp chain applied to ``aid`` when it is ``aid``'s only use."""
    for ch in self.chains():
      if (ch.input == aid and self.consumers[aid] == [ch.nodes[0]]
          and not self.claimed.intersection(ch.nodes)):
        return ch
    return None

  def concrete(self, sid: int):
    """The concrete value of a static input, or None when it depends on the variables."""
    return self.statics[sid].value


# ---------------------------------------------------------------------------
# Helpers for activation patterns: clamps
# ---------------------------------------------------------------------------


def fold_steps(steps, get, xp):
  """``(lo, hi)`` with ``f(z) = min(max(z, lo), hi)`` for a chain of max/min steps.

  ``max(min(max(z, lo), hi), c) = min(max(z, max(lo, c)), max(hi, c))`` and
  ``min(min(max(z, lo), hi), c) = min(max(z, lo), min(hi, c))`` (max
  distributes over min), so every chain is one clamp. ``None`` when a value
  is unknown (``get`` returned None).
  """
  lo, hi = -xp.inf, xp.inf
  for op, sids in steps:
    for sid in sids:
      c = get(sid)
      if c is None:
        return None
      if op == "max":
        lo, hi = xp.maximum(lo, c), xp.maximum(hi, c)
      else:
        hi = xp.minimum(hi, c)
  return lo, hi


def concrete_fold(steps, ctx: Context):
  """:func:`fold_steps` on concrete values only (None if any depends on the variables)."""
  return fold_steps(steps, ctx.concrete, np)


def all_values(v, pred) -> bool:
  """Whether ``v`` is known and ``pred`` holds for every entry."""
  return v is not None and bool(np.all(pred(np.asarray(v, np.float64))))


def step_statics(*step_lists) -> Tuple[int, ...]:
  out = []
  for steps in step_lists:
    for _, sids in steps:
      out.extend(sids)
  return tuple(dict.fromkeys(out))


def shaped(v, shape):
  """``v`` broadcast to the per-example ``shape`` (a leading batch axis of one dropped)."""
  return jnp.broadcast_to(jnp.asarray(v, jnp.float32), (1,) + tuple(shape))[0]


# ---------------------------------------------------------------------------
# Helpers for segment patterns
# ---------------------------------------------------------------------------


def bias_only(nodes: Sequence) -> bool:
  """Only static additions (``z + b``, ``b + z``, ``z - b``) and no-op copies."""
  for n in nodes:
    if n.name in PASS:
      continue
    if n.name in ("add", "add_any") and len(n.act_ins()) == 1:
      continue
    if n.name == "sub" and n.act_mask == (True, False):
      continue
    return False
  return True


def bias_terms(nodes: Sequence) -> Tuple[Tuple[int, float], ...]:
  """``(static id, sign)`` of the additions in a :func:`bias_only` tail."""
  out = []
  for n in nodes:
    if n.name in PASS:
      continue
    (sid,) = n.static_ins()
    out.append((sid, -1.0 if n.name == "sub" else 1.0))
  return tuple(out)


def bias_sum(terms, get, out_shape):
  """The bias of a dense or conv segment from its additions (per-example shape)."""
  total = jnp.zeros((), jnp.float32)
  for sid, sign in terms:
    v = jnp.asarray(get(sid), jnp.float32)
    if v.ndim == len(out_shape) + 1:
      v = v[0]                      # drop the batch axis of the traced batch of one
    total = total + v if sign > 0 else total - v
  return total if total.ndim else jnp.broadcast_to(total, tuple(out_shape[-1:]))


def chain_order(prog: program.Program) -> bool:
  """Every node consumes the previous node's (single) output."""
  cur = prog.input
  for n in prog.nodes:
    if len(n.outs) != 1 or n.act_ins() != [cur]:
      return False
    cur = n.outs[0]
  return cur == prog.output


def single_coefficient(prog: program.Program):
  """``(before, node, after)`` around the one coefficient node of a chain-ordered
  program (a dense, convolution, scaling or registered map), or None."""
  if not chain_order(prog):
    return None
  nodes = list(prog.nodes)
  coef = [i for i, n in enumerate(nodes) if n.coefficient]
  if len(coef) != 1:
    return None
  k = coef[0]
  return nodes[:k], nodes[k], nodes[k + 1:]


# ---------------------------------------------------------------------------
# 1. Activations
# ---------------------------------------------------------------------------


_ACTIVATION_HINTS = {
    "max": "max of two values computed from the input that is not MaxMin",
    "min": "min of two values computed from the input that is not MaxMin",
    "reduce_max": "reduce_max that is not MaxMin over pairs",
    "reduce_min": "reduce_min that is not MaxMin over pairs",
}


def match_activations(ctx: Context) -> List[ActivationMatch]:
  """Every activation of the live nodes, by the registered patterns in order.

  Raises:
    UnsupportedModelError: for a node that looks like part of an activation
      but that no pattern claims.
  """
  importlib.import_module("lipjax._src.rules")   # the rule files register their patterns
  found: List[ActivationMatch] = []
  for pattern in registry.activation_patterns():
    for match in pattern(ctx):
      if ctx.claimed.intersection(match.nodes):
        continue
      ctx.claimed.update(match.nodes)
      found.append(match)
  for n in ctx.live:
    node = ctx.nodes[n]
    if n in ctx.claimed or node.rule is not None:
      continue
    if registry.linear_primitive(node.name) is None:
      what = _ACTIVATION_HINTS.get(node.name, f"the operation {node.name!r}")
      raise errors.unsupported(what, node.where)
  return found


# ---------------------------------------------------------------------------
# 2.-4. Segments, stages and blocks
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Join:
  node: int
  output: int
  operands: Tuple[int, int]
  combine: Any
  where: str


@dataclasses.dataclass(frozen=True)
class _Edge:
  """Something a point hands a value to: ``kind`` is ``"stage"`` (a segment
  value ``value`` consumed by an activation ``target``, a join or the logits)
  or ``"identity"`` (the point itself, consumed by a join)."""

  kind: str
  value: int
  target: Any      # an ActivationMatch, a _Join or "out"
  order: int


def _label(where: str) -> str:
  return where.split(", ")[0].replace("module ", "")


def build_skeleton(ctx: Context) -> Skeleton:
  """The skeleton of the traced model in ``ctx`` (see the module docstring)."""
  nodes = ctx.nodes
  groups = match_activations(ctx)
  by_output = {g.output: g for g in groups}
  by_input: Dict[int, List[ActivationMatch]] = collections.defaultdict(list)
  for g in groups:
    by_input[g.input].append(g)
  grouped = set(ctx.claimed)

  # Segments: linear nodes sorted by the point their inputs are computed from.
  seg_of: Dict[int, int] = {ctx.in_aid: 0}
  points: List[int] = [ctx.in_aid]
  seg_nodes: List[List[int]] = [[]]
  joins: Dict[int, _Join] = {}
  where_of_point = {ctx.in_aid: "the model input"}

  def new_point(aid, where):
    seg_of[aid] = len(points)
    points.append(aid)
    seg_nodes.append([])
    where_of_point[aid] = where

  for n in ctx.live:
    node = nodes[n]
    if n in grouped:
      g = by_output.get(node.outs[0])
      if g is not None:
        if g.input not in seg_of:
          raise errors.unsupported("an activation applied to an intermediate value of "
                                   "another activation", g.where)
        new_point(g.output, g.where)
      continue
    segs = set()
    for a in node.act_ins():
      if a not in seg_of:
        raise errors.unsupported(f"{node.name} applied to an intermediate value of an "
                                 "activation", node.where)
      segs.add(seg_of[a])
    if len(segs) > 1:
      acts = node.act_ins()
      combine = registry.combine_for(node.name)
      if combine is None or len(acts) != 2 or len(node.ins) != 2:
        raise errors.unsupported(f"{node.name} of values from different layers (blocks "
                                 "join two paths with a sum)", node.where)
      if not (ctx.shapes[acts[0]] == ctx.shapes[acts[1]] == ctx.shapes[node.outs[0]]):
        raise errors.unsupported(f"a sum of shapes {ctx.shape(acts[0])} and "
                                 f"{ctx.shape(acts[1])} (broadcast)", node.where)
      joins[node.outs[0]] = _Join(n, node.outs[0], (acts[0], acts[1]), combine, node.where)
      new_point(node.outs[0], node.where)
      continue
    (s,) = segs
    for o in node.outs:
      seg_of[o] = s
    seg_nodes[s].append(n)

  # Who takes each value out of its segment.
  takers: Dict[int, List[Any]] = collections.defaultdict(list)
  for g in groups:
    takers[g.input].append(g)
  for j in joins.values():
    for a in j.operands:
      takers[a].append(j)
  takers[ctx.out_aid].append("out")
  first_node = {}
  for s, ns in enumerate(seg_nodes):
    for n in ns:
      for o in nodes[n].outs:
        first_node.setdefault(o, n)
  edges: Dict[int, List[_Edge]] = collections.defaultdict(list)
  post: Dict[int, ActivationMatch] = {}
  for value, takes in takers.items():
    if value not in seg_of:
      continue
    s = seg_of[value]
    point = points[s]
    where = (nodes[first_node[value]].where if value in first_node
             else where_of_point.get(point, "the model input"))
    if value == point and not (point in joins and not seg_nodes[s]):
      for t in takes:
        if isinstance(t, ActivationMatch):
          msg = ("an activation applied to the model input (lipjax bounds need a linear "
                 "layer first)" if s == 0 else "two activations in a row (lipjax bounds "
                 "need a linear layer in between)")
          raise errors.unsupported(msg, t.where)
    if len(takes) > 1:
      raise errors.unsupported(
          f"a value used elsewhere too: it feeds {len(takes)} activations, sums or the "
          "logits (a block joins two paths)", where)
    (t,) = takes
    if value == point:
      if isinstance(t, _Join):
        edges[point].append(_Edge("identity", value, t, -1))
        continue
      if t == "out":
        raise errors.model_error("the model must end with a linear layer (the logits); its "
                                 "output comes straight from an activation or a sum")
      post[point] = t   # the activation after a join (checked above)
      continue
    edges[point].append(_Edge("stage", value, t, first_node.get(value, -1)))
  for point in points:
    edges[point].sort(key=lambda e: e.order)

  def stage_spec(point: int, e: _Edge) -> StageSpec:
    s = seg_of[point]
    members = set(seg_nodes[s])
    need, stack = set(), [e.value]
    while stack:
      a = stack.pop()
      p = ctx.producer(a)
      if p in members and p not in need:
        need.add(p)
        stack.extend(nodes[p].act_ins())
    prog = program.Program(nodes=tuple(nodes[n] for n in seg_nodes[s] if n in need),
                           input=point, output=e.value, in_shape=ctx.shape(point),
                           out_shape=ctx.shape(e.value))
    match = classify(prog, ctx.statics)
    main = next((n for n in prog.nodes if n.coefficient), prog.nodes[0] if prog.nodes else None)
    label = _label(main.where) if main is not None else "stage"
    act = (e.target if isinstance(e.target, ActivationMatch)
           else "identity" if isinstance(e.target, _Join) else None)
    return StageSpec(prog, match, act, f"{label} ({match.kind})")

  def chain(point: int):
    """Items from ``point`` until the logits or a join: ``(items, end)`` with
    ``end`` ``"out"`` or ``(join, operand)``."""
    items = []
    while True:
      outs = edges.get(point, [])
      if len(outs) == 1:
        e = outs[0]
        if e.kind == "identity":
          return items, (e.target, point)
        items.append(stage_spec(point, e))
        if e.target == "out":
          return items, "out"
        if isinstance(e.target, _Join):
          return items, (e.target, e.value)
        point = e.target.output
        continue
      if len(outs) == 2:
        blk, point = block(point, outs)
        items.append(blk)
        continue
      where = where_of_point.get(point, "the model input")
      if not outs:
        raise errors.unsupported("a value that reaches neither the logits nor a sum", where)
      raise errors.unsupported(
          f"a residual skip value used elsewhere: {len(outs)} paths start at one value "
          "(lipjax bounds join two)", where)

  def block(point: int, outs: Sequence[_Edge]):
    paths, ends = [], []
    for e in outs:
      if e.kind == "identity":
        paths.append(())
        ends.append((e.target, point))
      elif e.target == "out":
        raise errors.unsupported("a value that feeds both the logits and another layer "
                                 "(lipjax bounds need the logits last)",
                                 where_of_point.get(point, "the model input"))
      elif isinstance(e.target, _Join):
        paths.append((stage_spec(point, e),))
        ends.append((e.target, e.value))
      else:
        first = stage_spec(point, e)
        rest, end = chain(e.target.output)
        if end == "out":
          raise errors.unsupported("a branch that reaches the logits without joining its "
                                   "sum", where_of_point.get(point, "the model input"))
        paths.append((first,) + tuple(rest))
        ends.append(end)
    (j0, v0), (j1, v1) = ends
    if j0 is not j1 or {v0, v1} != set(j0.operands) or v0 == v1:
      raise errors.unsupported("a sum whose two paths do not start at one value (lipjax "
                               "bounds take blocks act(f(h) + g(h)))", j1.where)
    out = j0.output
    act = post.get(out)
    nxt = act.output if act is not None else out
    name = f"{_label(j0.where)} (block)"
    return BlockSpec(tuple(tuple(p) for p in paths), j0.combine, act, ctx.shape(out), name), nxt

  items, end = chain(ctx.in_aid)
  if end != "out":
    join, _ = end
    raise errors.unsupported("a sum of values from different layers whose paths do not "
                             "start at one value", join.where)
  return Skeleton(tuple(items))


def classify(prog: program.Program, statics) -> SegmentMatch:
  """The first registered segment pattern that matches, else the generic traced rule."""
  for pattern in registry.segment_patterns():
    match = pattern(prog, statics)
    if match is not None:
      return match
  from lipjax._src.rules import traced   # pylint: disable=import-outside-toplevel
  return traced.generic(prog)


def needed_statics(skeleton: Skeleton, statics) -> Tuple[int, ...]:
  """The static ids a call evaluates: those the programs and activations read,
  and what they are computed from."""
  want = set()
  for spec in skeleton.specs():
    if isinstance(spec, StageSpec):
      want.update(spec.program.static_ids)
    act = spec.activation
    if isinstance(act, ActivationMatch):
      want.update(act.statics)
  stack = list(want)
  while stack:
    s = stack.pop()
    st = statics[s]
    if st.kind == "call" and st.value is None:
      for i in st.ins:
        if i not in want:
          want.add(i)
          stack.append(i)
  return tuple(sorted(want))

