"""Leaky ReLU ``z if z >= 0 else slope * z`` with a constant ``slope`` in ``[0, 1]``.

Elementwise, nondecreasing and 1-Lipschitz, so boxes map through it and a
float32 error passes through entry by entry. The product ``slope * z`` is
rounded in float32, so (unlike ``max`` / ``min``) it is not exact: the
interval is widened by one rounding and the rule states its evaluation
error (``u |slope z|``). A unit is never constant on a box of positive width
(unless ``slope = 0``, then it is a ReLU).

Traced forms: ``jax.nn.leaky_relu(z, slope)`` and ``jnp.where(z > 0, z,
slope * z)`` (a comparison with 0, a product with the constant and a
``select_n``), and ``jnp.maximum(z, slope * z)``.

This file is the worked example of CONTRIBUTING.md: the rule, its trace
pattern and the primitives the pattern reads, registered in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lipjax._src import patterns, rounding
from lipjax._src.rules import registry
from lipjax._src.rules.base import ElementwiseActivation

__all__ = ["LeakyReLU"]


@dataclasses.dataclass(frozen=True)
class LeakyReLU(ElementwiseActivation):
  """``where(z >= 0, z, slope * z)``; ``params = {"slope": per-neuron slope in [0, 1]}``."""

  def forward(self, params, z):
    return jnp.where(z >= 0, z, params["slope"] * z)

  def interval(self, params, lb, ub):
    # Monotone; the float32 product may round up (down) by u |slope z|.
    return rounding.down(self.forward(params, lb)), rounding.up(self.forward(params, ub))

  def evaluation_error(self, params, lo, hi):
    mag = jnp.maximum(jnp.abs(params["slope"] * lo), jnp.abs(params["slope"] * hi))
    return 2.0 * rounding.U * mag + 2.0 ** -126

  def smooth(self, params, z, temperature):
    t, a = temperature, params["slope"]
    return a * z + (1.0 - a) * t * jax.nn.softplus(z / t)


def _slope(ctx, node, z) -> Optional[int]:
  """The static id ``a`` when ``node`` is ``a * z`` (or ``z * a``) with a
  constant scalar ``a`` in ``[0, 1]``."""
  if node.name != "mul" or node.act_ins() != [z] or len(node.static_ins()) != 1:
    return None
  (sid,) = node.static_ins()
  a = ctx.concrete(sid)
  if a is None or np.ndim(a) != 0 or not 0.0 <= float(a) <= 1.0:
    return None
  return sid


def _single(ctx, aid, n):
  return ctx.consumers[aid] == [n] and aid != ctx.out_aid


def _match(ctx, z, sid, nodes, output, where):
  return patterns.ActivationMatch(
      z, output, tuple(sorted(nodes)), where,
      lambda get, in_shape: (LeakyReLU(), {"slope": patterns.shaped(get(sid), in_shape)}),
      statics=(sid,), kind="leaky_relu")


def _pattern(ctx):
  out = []
  for n in ctx.live:
    node = ctx.nodes[n]
    if node.name == "select_n" and len(node.ins) == 3 and node.act_mask == (True, True, True):
      pred, if_false, if_true = node.act_ins()
      p, m = ctx.producer(pred), ctx.producer(if_false)
      if p is None or m is None:
        continue
      cmp_node, mul = ctx.nodes[p], ctx.nodes[m]
      if (cmp_node.name not in ("ge", "gt") or cmp_node.act_ins() != [if_true]
          or cmp_node.ins[1][0] != "s" or ctx.concrete(cmp_node.ins[1][1]) is None
          or float(np.max(np.abs(ctx.concrete(cmp_node.ins[1][1])))) != 0.0):
        continue
      sid = _slope(ctx, mul, if_true)
      if sid is None or not (_single(ctx, pred, n) and _single(ctx, if_false, n)):
        continue
      out.append(_match(ctx, if_true, sid, (n, p, m), node.outs[0], node.where))
    elif node.name == "max" and len(node.act_ins()) == 2 and len(node.ins) == 2:
      a, b = node.act_ins()
      for z, scaled in ((a, b), (b, a)):
        m = ctx.producer(scaled)
        if m is None:
          continue
        sid = _slope(ctx, ctx.nodes[m], z)
        if sid is not None and _single(ctx, scaled, n):
          out.append(_match(ctx, z, sid, (n, m), node.outs[0], node.where))
          break
  return out


registry.register_activation_pattern("leaky_relu", _pattern, priority=20)
registry.register_activation_primitive("select_n")
registry.register_activation_primitive("ge", any_dtype=True)
registry.register_activation_primitive("gt", any_dtype=True)
