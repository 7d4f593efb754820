"""The rule interface: what the bounds ask of a linear map, an activation and a block.

A *rule* is a small frozen object holding a piece of the network's static
configuration (a stride, a layout, a traced program); the arrays it acts on
come in ``params``. The interpreter (:mod:`lipjax._src.interpret`) and the
bounds ask the rules of each node and never look at the node's kind, so a
new kind of layer, activation or block is one new rule (and its
registrations, see :mod:`lipjax._src.rules`).

Shapes: ``h`` is a batch ``(B, *in_shape)``, ``z`` a batch ``(B, *out_shape)``
(per-example shapes without the batch axis); masks and boxes have the shape
of the values they describe.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from lipjax._src import per_example, rounding

Array = jax.Array
Params = Any

__all__ = ["ActivationRule", "CombineRule", "ElementwiseActivation", "LinearRule", "as_float",
           "interval_masks"]


# ---------------------------------------------------------------------------
# Linear maps
# ---------------------------------------------------------------------------


class LinearRule:
  """How the bounds treat a linear map ``z = W h + b``.

  Only :meth:`forward` is required; every other method has a sound generic
  answer (``None`` selects it):

  * the adjoint ``W^T`` comes from ``jax.linear_transpose`` of
    :meth:`forward_for_adjoint`;
  * ``|W| h`` (interval propagation, rounding) falls back to
    ``row_norms * ||h||_2``;
  * row norms fall back to the global norm;
  * the global norm falls back to the SVD of the explicit Jacobian (small
    maps) or Lanczos with its failure probability;
  * the masked local norm ``||D_r W D_c||`` is exact (float64 eigensolver on
    the host) where :meth:`explicit_matrix` gives the matrix, else Lanczos;
  * the fan-in (rounding model) falls back to the whole input size.

  Attributes:
    deterministic_global: whether :meth:`global_norm` returns a deterministic
      upper bound (for every parameter value).
    replays: whether :meth:`affine` replays the user's own primitives (a
      traced map), rather than computing ``forward + bias``.
  """

  deterministic_global = False
  replays = False

  def forward(self, params: Params, h: Array) -> Array:
    """``W h`` (no bias) for a batch ``h`` of shape ``(B, *in_shape)``."""
    raise NotImplementedError

  def bias(self, params: Params) -> Optional[Array]:
    """``b`` broadcastable to ``out_shape``, or ``None``."""
    del params
    return None

  def affine(self, params: Params, h: Array) -> Array:
    """``W h + b`` as the model computes it."""
    z = self.forward(params, h)
    b = self.bias(params)
    return z if b is None else z + b

  def forward_for_adjoint(self, params: Params, h: Array) -> Array:
    """The same map as :meth:`forward`, in the form whose transpose runs fastest."""
    return self.forward(params, h)

  def adjoint(self, params: Params, z: Array, in_shape: Tuple[int, ...]) -> Optional[Array]:
    """``W^T z`` (an explicit formulation, exactly the transpose), or ``None``."""
    del params, z, in_shape
    return None

  def adjoint_terms(self, params: Params, out_shape: Tuple[int, ...]) -> Optional[int]:
    """For a map that :attr:`replays` traced primitives: a bound on the number
    of float32 operations behind each entry of its computed adjoint
    ``W^T z`` (``jax.linear_transpose`` of the replay), so that the rounding
    model ``c_n |W|^T |z|`` (with :meth:`abs_forward`'s ``|W|``) covers it;
    ``None`` when unknown (the per-class-pair bound then does not apply).
    Other maps: unused (the output size bounds it)."""
    del params, out_shape
    return None

  def abs_forward(self, params: Params, h: Array) -> Optional[Array]:
    """``|W| h`` (elementwise absolute value of ``W``), or an elementwise upper
    bound of it for ``h >= 0``, or ``None``."""
    del params, h
    return None

  def rounding_abs_forward(self, params: Params, h: Array) -> Optional[Array]:
    """Like :meth:`abs_forward`, for the rounding model of the float32
    evaluation (the terms the computation actually sums, which for a replayed
    program may exceed ``|W|``); defaults to :meth:`abs_forward`."""
    return self.abs_forward(params, h)

  def row_norms(self, params: Params, in_shape: Tuple[int, ...]) -> Optional[Array]:
    """Upper bounds on the l2 norm of every row of ``W`` (shape ``out_shape``), or ``None``."""
    del params, in_shape
    return None

  def global_norm(self, params: Params, in_shape: Tuple[int, ...]) -> Optional[Array]:
    """A deterministic upper bound on ``||W||_2``, or ``None``."""
    del params, in_shape
    return None

  def explicit_matrix(self, params: Params) -> Optional[Array]:
    """The ``(out, in)`` matrix when it is cheap (the local norm is then exact)."""
    del params
    return None

  def fan_in(self, params: Params, in_shape: Tuple[int, ...]) -> Optional[int]:
    """Largest number of products summed into one output, or ``None`` (the input size)."""
    del params, in_shape
    return None


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


def as_float(mask, like):
  """A 0/1 mask in the working precision of ``like`` (float32 at least)."""
  dtype = like.dtype if jnp.issubdtype(like.dtype, jnp.floating) else jnp.float32
  return mask.astype(jnp.promote_types(dtype, jnp.float32))


def interval_masks(lo: Array, hi: Array, like: Array) -> Array:
  """``1`` where an activation's output box ``[lo, hi]`` has positive width
  (the output varies), ``0`` where it is a point; NaN counts as varying."""
  return as_float(~(hi <= lo), like)


class ActivationRule:
  """How the bounds treat a 1-Lipschitz activation that is monotone (nondecreasing)
  in each argument.

  Required: :meth:`forward`, :meth:`interval`. :meth:`mask` defaults to the
  exact rule for elementwise activations (an output is constant exactly when
  its interval has zero width). :meth:`rounding_error` combines the interval
  rule with a Lipschitz rule (:meth:`propagated_error`, in l2 by default) and
  :meth:`evaluation_error`.

  Attributes:
    exact: whether the activation's float32 evaluation is exact (``max``,
      ``min``, comparisons): the norm-based rounding screen then applies.
    linear: whether it is the identity (slope 1 everywhere, whatever the box).
  """

  exact = False
  linear = False

  def forward(self, params: Params, z: Array) -> Array:
    """The activation of a batch ``z``."""
    raise NotImplementedError

  def interval(self, params: Params, lb: Array, ub: Array) -> Tuple[Array, Array]:
    """A box of the outputs from a box ``[lb, ub]`` of the inputs."""
    raise NotImplementedError

  def mask(self, params: Params, lb: Array, ub: Array) -> Tuple[Array, Array]:
    """``(row_mask, col_mask)`` 0/1 arrays for an input box.

    ``row_mask`` (input shape): 0 only where no output depends on that input
    anywhere in the box (its row of the preceding linear map can go);
    ``col_mask`` (output shape): 0 where the output is constant on the box
    (its column of the next linear map can go).
    """
    lo, hi = self.interval(params, lb, ub)
    m = interval_masks(lo, hi, ub)
    return m, m

  def active(self, params: Params, lb: Array, ub: Array) -> Optional[Array]:
    """For an elementwise activation whose slopes lie in ``[0, 1]``: the units
    (bools, input shape) whose slope is 1 on the whole box ``[lb, ub]``;
    ``None`` for any other activation (the per-class-pair bound of
    :mod:`lipjax._src.pairwise` then gives it no midpoint slope)."""
    del params, lb, ub
    return None

  def propagated_error(self, ez: Array, dz: Array, like: Array) -> Array:
    """Bound on ``|act(a) - act(b)|`` (output shape) from ``|a - b| <= ez``
    elementwise and ``||a - b||_2 <= dz``: the l2 rule (any 1-Lipschitz map)."""
    del ez
    return jnp.broadcast_to(per_example.expand(dz, like), like.shape)

  def evaluation_error(self, params: Params, lo: Array, hi: Array) -> Optional[Array]:
    """Bound on ``|fl(act(z)) - act(z)|`` for ``z`` in ``[lo, hi]``; ``None`` when exact."""
    del params, lo, hi
    return None

  def rounding_error(self, params: Params, z_lo: Array, z_hi: Array, ez: Array,
                     dz: Array) -> Array:
    """Bound on ``|act(z_float) - act(z)|`` for ``z`` in ``[z_lo, z_hi]`` and
    ``|z_float - z| <= ez`` (``||z_float - z||_2 <= dz``).

    The smaller of two sound rules: the interval rule on the box widened by
    ``ez`` (both values lie in it), and :meth:`propagated_error` (plus the
    activation's own evaluation error, if any).
    """
    wlo, whi = rounding.down(z_lo - ez), rounding.up(z_hi + ez)
    lo, hi = self.interval(params, wlo, whi)
    width = rounding.up(hi - lo)
    point = self.propagated_error(ez, dz, width)
    own = self.evaluation_error(params, wlo, whi)
    if own is not None:   # its float32 result errs by own(...) more than the exact one
      point = rounding.up(point + own)
    return jnp.minimum(width, point)

  def smooth(self, params: Params, z: Array, temperature: float) -> Array:
    """A smooth surrogate (for the search of large Jacobians); default: itself."""
    del temperature
    return self.forward(params, z)

  def sparsity(self, params: Params, lower: Array, upper: Array,
               theta_weight: float) -> Optional[Array]:
    """The sparsity loss term for an input box (pushes units to be constant), or ``None``."""
    del params, lower, upper, theta_weight
    return None


class ElementwiseActivation(ActivationRule):
  """An activation applied elementwise: its error propagates entry by entry."""

  def propagated_error(self, ez, dz, like):
    del dz, like
    return ez


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------


class CombineRule:
  """How a block joins its paths (the values of every path have one shape).

  The interpreter walks each path from the block's input, then asks the
  block's combine rule for the joined value, box, radius, errors and the
  Lipschitz factor.
  """

  def forward(self, values: Sequence[Array]) -> Array:
    """The joined value."""
    raise NotImplementedError

  def lipschitz(self, path_factors: Sequence[Any]) -> Any:
    """A bound on the block's Lipschitz constant before its activation, from a
    bound per path (``1.0`` for an empty path: the identity)."""
    raise NotImplementedError

  def boxes(self, carries: Sequence[Any], rounding_bounds: bool) -> Any:
    """The interpreter's carry of the joined value from each path's carry."""
    raise NotImplementedError

  def transpose(self, cotangent: Array, num_paths: int) -> Optional[Sequence[Array]]:
    """The cotangent of each path from the joined value's (the transpose of
    the join, a linear map), or ``None`` when the join is not linear (the
    per-class-pair bound of :mod:`lipjax._src.pairwise` then does not apply)."""
    del cotangent, num_paths
    return None
