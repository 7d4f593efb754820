"""Traced linear maps without a specialised rule: the generic traced rule, and
the explicit matrix of a map with a small vector output."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from lipjax._src import norms, patterns, program
from lipjax._src.rules import registry
from lipjax._src.rules.base import LinearRule

__all__ = ["TracedLinear", "TracedMatrix", "generic"]


@dataclasses.dataclass(frozen=True, eq=False)
class TracedLinear(LinearRule):
  """A traced program as a linear map.

  ``params`` maps ``"s<id>"`` to the static values the program uses.
  :meth:`forward` replays the primitives without static additions,
  :meth:`bias` is the program at zero, :meth:`affine` replays the model's
  own arithmetic, :meth:`abs_forward` the absolute-value replay (exact for a
  single dense or convolution primitive, an elementwise upper bound of
  ``|W| h`` otherwise). Other norms use the generic rules.
  """

  program: Any = None
  replays = True

  def forward(self, params, h):
    return program.replay(self.program, params, h, "linear")

  def bias(self, params):
    return program.bias(self.program, params)

  def affine(self, params, h):
    return program.replay(self.program, params, h, "affine")

  def abs_forward(self, params, h):
    if any(n.opaque for n in self.program.nodes):
      return None   # generic rule (row norms times the l2 norm)
    return program.replay(self.program, params, h, "abs")


@dataclasses.dataclass(frozen=True, eq=False)
class TracedMatrix(TracedLinear):
  """A traced program with a vector output and its explicit matrix.

  The ``(out, in)`` matrix comes from ``out`` applications of the program's
  transpose; dense rules follow (exact row norms, ``|W|``, SVD, exact local
  norms).
  """

  deterministic_global = True

  def explicit_matrix(self, params):
    prog = self.program
    n_out = math.prod(prog.out_shape)
    f = lambda h: self.forward(params, h).reshape(h.shape[0], n_out)
    t = jax.linear_transpose(f, jax.ShapeDtypeStruct((n_out,) + prog.in_shape, jnp.float32))
    (rows,) = t(jnp.eye(n_out, dtype=jnp.float32))
    return rows.reshape(n_out, -1)

  def abs_forward(self, params, h):
    m = jnp.abs(self.explicit_matrix(params))
    return (h.reshape(h.shape[0], -1) @ m.T).reshape((h.shape[0],) + self.program.out_shape)

  def row_norms(self, params, in_shape):
    del in_shape
    m = self.explicit_matrix(params)
    return jnp.sqrt(jnp.sum(jnp.square(m), axis=1)).reshape(self.program.out_shape)

  def global_norm(self, params, in_shape):
    del in_shape
    return norms.top_singular_value(self.explicit_matrix(params)[None])


def _params(prog, get):
  return {program.key(s): get(s) for s in prog.static_ids}


def _matrix_segment(prog, statics) -> Optional[patterns.SegmentMatch]:
  """A vector output of at most 4096 entries and 2^24 matrix entries."""
  del statics
  if len(prog.out_shape) != 1:
    return None
  n_out, n_in = prog.out_shape[0], math.prod(prog.in_shape)
  if n_out > 4096 or n_out * n_in > 2 ** 24:
    return None
  return patterns.SegmentMatch(
      "matrix", lambda get: (TracedMatrix(program=prog), _params(prog, get), ()))


def generic(prog) -> patterns.SegmentMatch:
  """The fallback of every segment no pattern claims."""
  return patterns.SegmentMatch(
      "generic", lambda get: (TracedLinear(program=prog), _params(prog, get), ()))


registry.register_segment_pattern("matrix", _matrix_segment, priority=90)
