"""MaxMin (GroupSort-2): the max and the min of each pair of units, each optionally clamped.

Every output is a monotone, 1-Lipschitz function of one pair ``(a_k, b_k)``:
boxes map through it, an output is constant exactly where its interval has
zero width, and a pre-activation unit can leave the rows of the layer before
only when both outputs of its pair are constant (so the row mask is per
pair). A float32 error passes through as the larger of the pair's two.

Pairs and output layouts (the ways MaxMin is written):

* ``pairs="halves"``: unit ``k`` with unit ``k + C/2`` of the last axis
  (``a, b = jnp.split(z, 2, -1)``, or slicing); ``pairs="adjacent"``: units
  ``2k`` and ``2k + 1`` (``r = z.reshape(..., C // 2, 2)``, then ``max`` /
  ``min`` over its last axis, or of ``r[..., 0]`` and ``r[..., 1]``, or of
  ``z[..., ::2]`` and ``z[..., 1::2]``; or ``jnp.sort(r, axis=-1)``, each pair
  in increasing order);
* ``layout="halves"``: ``concatenate([max part, min part], -1)``;
  ``"stacked"``: ``stack([max, min], -1)`` (shape ``(..., C/2, 2)``);
  ``"interleaved"``: the stacked form reshaped back to ``(..., C)``.
  ``max_first=False`` puts the min part first.

``lipjax.nn.ClippedMaxMin`` (halves, max part first, the max clamped from
above by ``M``, the min from below by ``m``) has a rule of its own with its
two learnable parameters (and a sparsity term); a traced MaxMin of that form
becomes it too.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import nn as lnn
from lipjax._src import patterns
from lipjax._src.rules import registry
from lipjax._src.rules.base import ActivationRule, as_float

__all__ = ["ClippedMaxMin", "PairMaxMin"]


def _clamp(v, lo, hi):
  return jnp.minimum(jnp.maximum(v, lo), hi)


@dataclasses.dataclass(frozen=True)
class PairMaxMin(ActivationRule):
  """MaxMin over pairs, each part clamped to its own ``[lower, upper]``.

  ``params = {"max_lower", "max_upper", "min_lower", "min_upper"}`` of the
  shape of one part (``(..., C/2)``; ``-inf`` / ``+inf`` for no clamp).
  """

  max_first: bool = True
  pairs: str = "halves"
  layout: str = "halves"
  exact = True

  # -- pairing -------------------------------------------------------------
  def split(self, z):
    """The two members of every pair, each ``(..., C/2)``."""
    if self.pairs == "halves":
      c = z.shape[-1] // 2
      return z[..., :c], z[..., c:]
    r = z.reshape(z.shape[:-1] + (z.shape[-1] // 2, 2))
    return r[..., 0], r[..., 1]

  def unsplit(self, a, b):
    """The inverse of :meth:`split`."""
    if self.pairs == "halves":
      return jnp.concatenate([a, b], axis=-1)
    s = jnp.stack([a, b], axis=-1)
    return s.reshape(s.shape[:-2] + (2 * s.shape[-2],))

  def join(self, hi, lo):
    """The output from the max part ``hi`` and the min part ``lo``."""
    first, second = (hi, lo) if self.max_first else (lo, hi)
    if self.layout == "halves":
      return jnp.concatenate([first, second], axis=-1)
    s = jnp.stack([first, second], axis=-1)
    if self.layout == "stacked":
      return s
    return s.reshape(s.shape[:-2] + (2 * s.shape[-2],))

  def unjoin(self, out):
    """``(max part, min part)`` of an output-shaped array."""
    if self.layout == "halves":
      c = out.shape[-1] // 2
      first, second = out[..., :c], out[..., c:]
    else:
      s = out if self.layout == "stacked" else out.reshape(out.shape[:-1] + (-1, 2))
      first, second = s[..., 0], s[..., 1]
    return (first, second) if self.max_first else (second, first)

  # -- the rules -----------------------------------------------------------
  def _parts(self, params, z):
    a, b = self.split(z)
    p = params
    return (_clamp(jnp.maximum(a, b), p["max_lower"], p["max_upper"]),
            _clamp(jnp.minimum(a, b), p["min_lower"], p["min_upper"]))

  def forward(self, params, z):
    return self.join(*self._parts(params, z))

  def interval(self, params, lb, ub):
    return self.forward(params, lb), self.forward(params, ub)

  def mask(self, params, lb, ub):
    lo, hi = self.interval(params, lb, ub)
    col = ~(hi <= lo)
    c_hi, c_lo = self.unjoin(col)
    pair = c_hi | c_lo
    row = self.unsplit(pair, pair)
    return as_float(row, ub), as_float(col, ub)

  def propagated_error(self, ez, dz, like):
    del dz, like
    a, b = self.split(ez)
    m = jnp.maximum(a, b)
    return self.join(m, m)


@dataclasses.dataclass(frozen=True)
class ClippedMaxMin(PairMaxMin):
  """``concat(min(max(a, b), M), max(min(a, b), m))`` over the channel halves,
  ``params = {"upper": M, "lower": m}`` per position (shape of one half)."""

  def forward(self, params, z):
    a, b = self.split(z)
    hi = jnp.minimum(jnp.maximum(a, b), params["upper"])
    lo = jnp.maximum(jnp.minimum(a, b), params["lower"])
    return jnp.concatenate([hi, lo], axis=-1)

  def interval(self, params, lb, ub):
    la, lb_ = self.split(lb)
    ua, ub_ = self.split(ub)
    hi_l = jnp.minimum(jnp.maximum(la, lb_), params["upper"])
    hi_u = jnp.minimum(jnp.maximum(ua, ub_), params["upper"])
    lo_l = jnp.maximum(jnp.minimum(la, lb_), params["lower"])
    lo_u = jnp.maximum(jnp.minimum(ua, ub_), params["lower"])
    return (jnp.concatenate([hi_l, lo_l], axis=-1),
            jnp.concatenate([hi_u, lo_u], axis=-1))

  def smooth(self, params, z, temperature):
    t = temperature
    sp = lambda u: t * jax.nn.softplus(u / t)   # noqa: E731
    a, b = jnp.split(z, 2, axis=-1)
    hi = t * jnp.logaddexp(a / t, b / t)
    lo = -t * jnp.logaddexp(-a / t, -b / t)
    hi = hi - sp(hi - params["upper"])           # smooth min(hi, M)
    lo = lo + sp(params["lower"] - lo)           # smooth max(lo, m)
    return jnp.concatenate([hi, lo], axis=-1)

  def sparsity(self, params, lower, upper, theta_weight):
    del theta_weight
    c = lower.shape[-1] // 2
    lo_max = jnp.maximum(lower[..., :c], lower[..., c:])
    up_min = jnp.minimum(upper[..., :c], upper[..., c:])
    return jnp.mean(jax.nn.relu(params["upper"] - lo_max)) + jnp.mean(
        jax.nn.relu(up_min - params["lower"]))


registry.register_module(lnn.ClippedMaxMin, lambda m: ClippedMaxMin())


# ---------------------------------------------------------------------------
# Traced forms
# ---------------------------------------------------------------------------


def _member(ctx, a) -> Optional[Tuple[int, str, int, Tuple[int, ...]]]:
  """``(source, pairs, which, nodes)`` when ``a`` holds one member of every pair
  of the last axis of a value ``source``: its first (``which=0``) or second
  half (``pairs="halves"``: ``jnp.split`` or slicing), or its even or odd
  entries (``pairs="adjacent"``: ``z[..., ::2]`` / ``z[..., 1::2]``, or
  ``z.reshape(..., C // 2, 2)[..., k]``)."""
  p = ctx.producer(a)
  if p is None:
    return None
  node = ctx.nodes[p]
  if len(node.act_ins()) != 1:
    return None
  (src,) = node.act_ins()
  shape = ctx.shapes[src]
  last = len(shape) - 1
  if node.name == "squeeze" and tuple(node.params["dimensions"]) == (last,):
    q = ctx.producer(src)   # src: r[..., k:k+1] of r = z.reshape(..., C // 2, 2)
    if q is None or ctx.nodes[q].name != "slice" or shape[-1] != 1:
      return None
    sl = ctx.nodes[q]
    (r,) = sl.act_ins()
    rs = ctx.shapes[r]
    start, limit = tuple(sl.params["start_indices"]), tuple(sl.params["limit_indices"])
    strides = sl.params.get("strides")
    rp = ctx.producer(r)
    if (rs[-1] != 2 or len(rs) < 3 or start[:-1] != (0,) * (len(rs) - 1)
        or limit[:-1] != rs[:-1] or limit[-1] != start[-1] + 1
        or (strides is not None and any(d != 1 for d in strides))
        or rp is None or ctx.nodes[rp].name != "reshape"
        or ctx.nodes[rp].params.get("dimensions")):
      return None
    (z,) = ctx.nodes[rp].act_ins()
    if ctx.shapes[z] != rs[:-2] + (2 * rs[-2],):
      return None
    return z, "adjacent", int(start[-1]), (p, q, rp)
  if shape[-1] % 2:
    return None
  c = shape[-1] // 2
  if node.name == "split":
    sizes = tuple(int(s) for s in node.params["sizes"])
    if node.params["axis"] == last and sizes == (c, c):
      return src, "halves", node.outs.index(a), (p,)
  if node.name == "slice":
    start = tuple(node.params["start_indices"])
    limit = tuple(node.params["limit_indices"])
    strides = tuple(node.params.get("strides") or (1,) * len(shape))
    if start[:last] != (0,) * last or limit[:last] != shape[:last] or any(
        d != 1 for d in strides[:last]):
      return None
    if strides[last] == 1 and (start[last], limit[last]) in ((0, c), (c, 2 * c)):
      return src, "halves", int(start[last] == c), (p,)
    if strides[last] == 2 and start[last] in (0, 1) and ctx.shapes[a][-1] == c:
      return src, "adjacent", int(start[last]), (p,)   # entries start, start + 2, ...
  return None


def _parts(ctx, pair_nodes) -> Dict[str, Tuple[int, int, tuple, tuple]]:
  """Per part (``"max"`` / ``"min"``): ``(node output, end, clamp steps, chain nodes)``."""
  parts = {}
  for m in pair_nodes:
    node = ctx.nodes[m]
    out = node.outs[0]
    ch = ctx.chain_after(out)
    if ch is not None:
      parts[node.name.replace("reduce_", "")] = (out, ch.output, ch.steps, ch.nodes)
    else:
      parts[node.name.replace("reduce_", "")] = (out, out, (), ())
  return parts


def _single_user(ctx, aid) -> Optional[int]:
  users = ctx.consumers[aid]
  return users[0] if len(users) == 1 and aid != ctx.out_aid else None


def _combined(ctx, ends) -> Optional[Tuple[str, bool, int, Tuple[int, ...]]]:
  """How the two parts are put together: ``(layout, max_first, output, nodes)``."""
  e_max, e_min = ends
  rank = len(ctx.shapes[e_max])
  u_max, u_min = _single_user(ctx, e_max), _single_user(ctx, e_min)
  if u_max is None or u_min is None:
    return None
  if u_max == u_min:
    node = ctx.nodes[u_max]
    if len(node.ins) != 2 or not all(node.act_mask):
      return None
    max_first = node.ins[0][1] == e_max
    if node.name == "concatenate" and node.params["dimension"] == rank - 1:
      return "halves", max_first, node.outs[0], (u_max,)
    if node.name == "stack" and node.params["axis"] == rank:
      return _maybe_flat(ctx, max_first, node.outs[0], (u_max,))
    return None
  expands = []
  for u, e in ((u_max, e_max), (u_min, e_min)):
    node = ctx.nodes[u]
    out_shape = ctx.shapes[node.outs[0]]
    if out_shape != ctx.shapes[e] + (1,) or node.name not in ("broadcast_in_dim", "reshape"):
      return None
    if node.name == "broadcast_in_dim" and tuple(node.params["broadcast_dimensions"]) != \
        tuple(range(rank)):
      return None
    expands.append(node.outs[0])
  c0, c1 = _single_user(ctx, expands[0]), _single_user(ctx, expands[1])
  if c0 is None or c0 != c1:
    return None
  cat = ctx.nodes[c0]
  if (cat.name != "concatenate" or cat.params["dimension"] != rank or len(cat.ins) != 2
      or not all(cat.act_mask)):
    return None
  max_first = cat.ins[0][1] == expands[0]
  return _maybe_flat(ctx, max_first, cat.outs[0], (u_max, u_min, c0))


def _maybe_flat(ctx, max_first, stacked, nodes):
  """The stacked layout, or the interleaved one when a reshape back follows."""
  shape = ctx.shapes[stacked]
  flat = shape[:-2] + (2 * shape[-2],)
  u = _single_user(ctx, stacked)
  if u is not None:
    node = ctx.nodes[u]
    if node.name == "reshape" and ctx.shapes[node.outs[0]] == flat:
      return "interleaved", max_first, node.outs[0], nodes + (u,)
  return "stacked", max_first, stacked, nodes


def _match(ctx, z, pairs, members, parts, layout, max_first, output, where):
  """The activation of a MaxMin found in the traced nodes."""
  max_steps, min_steps = parts["max"][2], parts["min"][2]
  has_upper = any(op == "min" for op, _ in max_steps)
  has_lower = any(op == "max" for op, _ in min_steps)
  mx = patterns.concrete_fold([s for s in max_steps if s[0] == "max"], ctx)
  mn = patterns.concrete_fold([s for s in min_steps if s[0] == "min"], ctx)
  clipped = (pairs == "halves" and layout == "halves" and max_first and has_upper
             and has_lower and mx is not None and mn is not None
             and patterns.all_values(mx[0], np.isneginf)
             and patterns.all_values(mn[1], np.isposinf))

  def build(get, in_shape):
    half = tuple(in_shape[:-1]) + (in_shape[-1] // 2,)
    mlo, mhi = patterns.fold_steps(max_steps, get, jnp)
    nlo, nhi = patterns.fold_steps(min_steps, get, jnp)
    if clipped:
      return ClippedMaxMin(), {"upper": patterns.shaped(mhi, half),
                               "lower": patterns.shaped(nlo, half)}
    return (PairMaxMin(max_first=max_first, pairs=pairs, layout=layout),
            {"max_lower": patterns.shaped(mlo, half), "max_upper": patterns.shaped(mhi, half),
             "min_lower": patterns.shaped(nlo, half), "min_upper": patterns.shaped(nhi, half)})

  return patterns.ActivationMatch(
      z, output, tuple(sorted(members)), where, build,
      statics=patterns.step_statics(max_steps, min_steps),
      kind="clipped_maxmin" if clipped else "pair_maxmin")


def _pairs_pattern(ctx):
  """``max`` and ``min`` of the two members of every pair (see :func:`_member`)."""
  out = []
  taken = set()
  for n in ctx.live:
    node = ctx.nodes[n]
    if node.name not in ("max", "min") or len(node.act_ins()) != 2 or n in taken:
      continue
    a0, a1 = node.act_ins()
    h0, h1 = _member(ctx, a0), _member(ctx, a1)
    if (h0 is None or h1 is None or h0[0] != h1[0] or h0[1] != h1[1]
        or {h0[2], h1[2]} != {0, 1}):
      continue
    z, pairs = h0[0], h0[1]
    members = {a0, a1}
    pair_nodes = [m for m in ctx.live if ctx.nodes[m].name in ("max", "min")
                  and set(ctx.nodes[m].act_ins()) == members
                  and len(ctx.nodes[m].act_ins()) == 2]
    if sorted(ctx.nodes[m].name for m in pair_nodes) != ["max", "min"]:
      continue
    if any(sorted(ctx.consumers[h]) != sorted(pair_nodes) for h in members):
      continue
    # The members' own pieces (a split, slices, a shared reshape) serve only them.
    pieces = set(h0[3]) | set(h1[3])
    if any(set(ctx.consumers[o]) - pieces - set(pair_nodes)
           for m in pieces for o in ctx.nodes[m].outs):
      continue
    match = _claim(ctx, z, pairs, pair_nodes, pieces, node.where, taken)
    if match is not None:
      out.append(match)
  return out


def _claim(ctx, z, pairs, pair_nodes, pieces, where, taken):
  """The match of a pair's ``max`` / ``min`` nodes once their outputs are
  recombined (:func:`_combined`), its nodes added to ``taken``; or None."""
  parts = _parts(ctx, pair_nodes)
  found = _combined(ctx, (parts["max"][1], parts["min"][1]))
  if found is None:
    return None
  layout, max_first, output, tail = found
  claimed = (set(pieces) | set(pair_nodes) | set(parts["max"][3]) | set(parts["min"][3])
             | set(tail))
  taken.update(claimed)
  return _match(ctx, z, pairs, claimed, parts, layout, max_first, output, where)


def _adjacent_pattern(ctx):
  """``r = z.reshape(..., C // 2, 2)``, then ``max`` and ``min`` of ``r`` over its last axis."""
  out = []
  taken = set()
  for n in ctx.live:
    node = ctx.nodes[n]
    if node.name not in ("reduce_max", "reduce_min") or n in taken:
      continue
    (r,) = node.act_ins()
    shape = ctx.shapes[r]
    if tuple(node.params["axes"]) != (len(shape) - 1,) or shape[-1] != 2 or len(shape) < 3:
      continue
    p = ctx.producer(r)
    if p is None or ctx.nodes[p].name != "reshape" or ctx.nodes[p].params.get("dimensions"):
      continue
    (z,) = ctx.nodes[p].act_ins()
    if ctx.shapes[z] != shape[:-2] + (2 * shape[-2],):
      continue
    pair_nodes = list(ctx.consumers[r])
    names = sorted(ctx.nodes[m].name for m in pair_nodes)
    if names != ["reduce_max", "reduce_min"] or any(
        tuple(ctx.nodes[m].params["axes"]) != (len(shape) - 1,) for m in pair_nodes):
      continue
    match = _claim(ctx, z, "adjacent", pair_nodes, {p}, node.where, taken)
    if match is not None:
      out.append(match)
  return out


def _sort_pattern(ctx):
  """``jnp.sort(z.reshape(..., C // 2, 2), axis=-1)``: each pair sorted (min first)."""
  out = []
  for n in ctx.live:
    node = ctx.nodes[n]
    if node.name != "sort" or len(node.ins) != 1:
      continue
    (r,) = node.act_ins()
    shape = ctx.shapes[r]
    p = ctx.producer(r)
    if (node.params["dimension"] != len(shape) - 1 or shape[-1] != 2 or len(shape) < 3
        or p is None or ctx.nodes[p].name != "reshape" or ctx.nodes[p].params.get("dimensions")
        or ctx.consumers[r] != [n]):
      continue
    (z,) = ctx.nodes[p].act_ins()
    if ctx.shapes[z] != shape[:-2] + (2 * shape[-2],):
      continue
    layout, _, output, tail = _maybe_flat(ctx, False, node.outs[0], (n,))
    parts = {"max": (None, None, (), ()), "min": (None, None, (), ())}
    out.append(_match(ctx, z, "adjacent", {p, n} | set(tail), parts, layout, False, output,
                      node.where))
  return out


def _check_sort(eqn, acts):
  """Sorting pairs (one key, an axis of size 2) is MaxMin; nothing else is."""
  del acts
  dim = eqn.params["dimension"]
  shape = tuple(eqn.invars[0].aval.shape)
  if len(eqn.invars) != 1 or eqn.params["num_keys"] != 1 or dim == 0 or shape[dim] != 2:
    return "sort over more than pairs (MaxMin sorts pairs)"
  return None


registry.register_activation_pattern("maxmin_pairs", _pairs_pattern, priority=10)
registry.register_activation_pattern("maxmin_adjacent", _adjacent_pattern, priority=10)
def _check_reduce(eqn, acts):
  """MaxMin reduces pairs: one axis of size 2, not the batch axis."""
  del acts
  axes = tuple(eqn.params["axes"])
  shape = tuple(eqn.invars[0].aval.shape)
  name = eqn.primitive.name
  if 0 in axes:
    return f"{name} over the batch axis"
  if len(axes) != 1 or shape[axes[0]] != 2:
    return f"{name} over more than pairs (MaxMin takes the max and min of pairs)"
  return None


for _name in ("reduce_max", "reduce_min"):
  registry.register_activation_primitive(_name, _check_reduce)
registry.register_activation_pattern("maxmin_sort", _sort_pattern, priority=10)
registry.register_activation_primitive("sort", _check_sort)
