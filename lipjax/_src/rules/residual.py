"""Residual sums: blocks ``act(f(h) + g(h))`` joined by an addition.

``f`` and ``g`` are the block's paths: the identity (``h + f(h)``, ResNet's
basic block), a linear map (a projection shortcut ``P h``, e.g. a 1x1 stride-2
convolution), or any chain of layers and blocks (nested blocks). The
Jacobian of the block is ``A (J_f + J_g)`` with ``||A|| <= 1`` for the
activation after the sum, so ``||J_f|| + ||J_g||`` bounds it on the ball
(an identity path counting 1); every path's norm is the product of its own
masked local norms (a projection's: its masked norm ``||P D||``).

The box of the sum is the sum of the boxes (any value of ``f + g`` lies in
it), the ball radius the sum of the radii, and the float32 error the sum of
the errors plus the rounding of the float32 addition, ``u (|f| + |g|)`` with
the operands bounded by box magnitude plus error. An entry varies when any
path's does (or, with an activation after the sum, as its masks say).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from lipjax._src import per_example, rounding
from lipjax._src.rules import registry
from lipjax._src.rules.base import CombineRule

__all__ = ["ResidualSum"]


@dataclasses.dataclass(frozen=True)
class ResidualSum(CombineRule):
  """The sum of a block's paths (one float32 addition)."""

  def forward(self, values):
    out = values[0]
    for v in values[1:]:
      out = out + v
    return out

  def lipschitz(self, path_factors):
    total = path_factors[0]
    for f in path_factors[1:]:
      total = total + f
    # The factor is computed in float32: (1 + 2u) covers its rounding.
    return total * (1.0 + 2.0 ** -23)

  def transpose(self, cotangent, num_paths):
    return [cotangent] * num_paths

  def boxes(self, carries, rounding_bounds):
    """``(center, lower, upper, radius, error, error_l2, col)`` of the sum
    (see the module docstring) from each path's (same fields)."""
    u = rounding.U
    first, *rest = carries
    c = first.center
    for p in rest:
      c = c + p.center
    r = first.radius
    for p in rest:
      r = r + p.radius
    r = r * (1.0 + 4 * u)
    col = first.col
    for p in rest:
      col = jnp.maximum(col, p.col)
    if not rounding_bounds:
      lo, hi = first.lower, first.upper
      for p in rest:
        lo, hi = lo + p.lower, hi + p.upper
      return c, lo, hi, r, jnp.full_like(c, jnp.nan), jnp.full_like(first.radius, jnp.nan), col
    lo_sum, hi_sum = first.lower, first.upper
    mag = jnp.maximum(jnp.abs(first.lower), jnp.abs(first.upper)) + first.error
    e_sum, d_sum = first.error, first.error_l2
    for p in rest:
      lo_sum, hi_sum = lo_sum + p.lower, hi_sum + p.upper
      mag = mag + jnp.maximum(jnp.abs(p.lower), jnp.abs(p.upper)) + p.error
      e_sum, d_sum = e_sum + p.error, d_sum + p.error_l2
    lo, hi = rounding.down(lo_sum), rounding.up(hi_sum)
    e = (e_sum + u * mag) * (1.0 + 4 * u)
    size = int(np.prod(c.shape[1:]))
    up = rounding.upper_factor(size)
    d = jnp.minimum((d_sum + u * per_example.l2_norm(mag) * up) * (1.0 + 4 * u),
                    per_example.l2_norm(e) * up)
    return c, lo, hi, r, e, d, col


registry.register_combine(("add", "add_any"), ResidualSum())
