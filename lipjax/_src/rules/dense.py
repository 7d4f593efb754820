"""Dense layers: ``lipjax.nn.Dense``, and a traced ``dot_general`` with a kernel.

Exact rules: ``|W| h``, row norms, the global norm (float64 SVD on the host),
the explicit matrix (so the masked local norm is exact) and the fan-in.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax.numpy as jnp

from lipjax import nn as lnn
from lipjax._src import norms, patterns
from lipjax._src.rules import registry
from lipjax._src.rules.base import LinearRule

__all__ = ["Dense"]


@dataclasses.dataclass(frozen=True)
class Dense(LinearRule):
  """``z = h @ kernel + bias`` on ``(B, F_in)``; ``params = {"kernel": (F_in, F_out), "bias"}``."""

  use_bias: bool = True
  deterministic_global = True

  def forward(self, params, h):
    return h @ params["kernel"]

  def bias(self, params):
    return params.get("bias") if self.use_bias else None

  def abs_forward(self, params, h):
    return h @ jnp.abs(params["kernel"])

  def row_norms(self, params, in_shape):
    del in_shape
    return jnp.sqrt(jnp.sum(jnp.square(params["kernel"]), axis=0))

  def global_norm(self, params, in_shape):
    del in_shape
    return norms.dense_global_norm(params["kernel"])

  def explicit_matrix(self, params):
    return params["kernel"].T

  def fan_in(self, params, in_shape):
    del in_shape
    return int(params["kernel"].shape[0])


registry.register_module(lnn.Dense, lambda m: Dense(use_bias=m.use_bias))


def _dense_segment(prog, statics) -> Optional[patterns.SegmentMatch]:
  """One ``dot_general`` of the (flattened) input with a 2-D kernel, then
  static additions: exactly ``lipjax.nn.Dense`` (same code, same speed)."""
  split = patterns.single_coefficient(prog)
  if split is None:
    return None
  before, node, after = split
  if node.name != "dot_general" or not patterns.bias_only(after) or any(
      n.name not in patterns.PASS + ("reshape",) for n in before):
    return None
  (lc, rc), _ = node.params["dimension_numbers"]
  kernel = node.ins[1][1]
  kshape = tuple(statics[kernel].shape)
  feats = math.prod(prog.in_shape)
  if not (len(prog.out_shape) == 1 and len(kshape) == 2 and tuple(lc) == (1,)
          and tuple(rc) in ((0,), (1,)) and feats == kshape[rc[0]]):
    return None
  transpose = tuple(rc) == (1,)
  terms = patterns.bias_terms(after)

  def build(get):
    k = get(kernel)
    params = {"kernel": k.T if transpose else k,
              "bias": patterns.bias_sum(terms, get, prog.out_shape)}
    reshapes = () if prog.in_shape == (feats,) else (patterns.ToShape((feats,)),)
    return Dense(), params, reshapes

  return patterns.SegmentMatch("dense", build)


registry.register_segment_pattern("dense", _dense_segment, priority=30)
