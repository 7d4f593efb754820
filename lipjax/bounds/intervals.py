"""Per-example interval bounds on an l2 ball and activation-status masks.

For each example the propagation carries three things (the paper's interval bounds and masks):

* the clean activation (the ball's centre),
* an l2 radius ``r`` that contains every reachable activation (starts at eps),
* an elementwise box ``[lb, ub]`` (starts at ``x +- eps``).

At an affine layer the box goes through interval arithmetic and is intersected
with the ball projection ``z_k(x) +- r ||w_k||``; then ``r <- r ||W||`` with a
*sound* norm. Activations map the box monotonically and produce the masks.
Boxes are widened by a relative ``1e-5`` (plus ``1e-7``) at every layer so
that float32 rounding cannot mark a varying neuron as constant.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Sequence

import jax
import jax.numpy as jnp

from lipjax.bounds.network import Stage

Array = jax.Array

_REL_WIDEN = 1e-5
_ABS_WIDEN = 1e-7


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerBounds:
  """Bounds of one stage for a batch of ``B`` examples.

  Attributes:
    center: ``(B, *out)`` pre-activation at the clean input.
    lower, upper: ``(B, *out)`` pre-activation box over the ball.
    radius_in: ``(B,)`` l2 radius of the stage's input set around its centre.
    input_lower, input_upper: ``(B, *in)`` box of the stage's input.
    input_center: ``(B, *in)`` the stage's input at the clean example.
    row_mask: ``(B, *out)`` 0/1, rows of this layer that matter (ones for the
      last stage).
    col_mask: ``(B, *out)`` 0/1, activation outputs that vary (ones for the
      last stage); the next stage's column mask.
  """

  center: Array
  lower: Array
  upper: Array
  radius_in: Array
  input_lower: Array
  input_upper: Array
  input_center: Array
  row_mask: Array
  col_mask: Array


def _bcast(s: Array, like: Array) -> Array:
  return s.reshape(s.shape + (1,) * (like.ndim - 1))


def _l2(x: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))))


RadiusNorm = Callable[[int, "LayerBounds", Array], Array]


def propagate(stages: Sequence[Stage], x: Array, eps: Array,
              row_norms: Sequence[Array], radius_norm: RadiusNorm
              ) -> List[LayerBounds]:
  """Propagates the ball ``B(x_b, eps_b)`` through every stage.

  Args:
    stages: from :func:`lipjax.bounds.network.trace`.
    x: ``(B, *in_shape)`` inputs.
    eps: ``(B,)`` radii.
    row_norms: per stage, upper bounds on the row norms (shape ``out``).
    radius_norm: ``radius_norm(l, bounds_l, col_mask_prev)`` returns an upper
      bound (scalar or ``(B,)``) on the Lipschitz constant of stage ``l``'s
      affine map followed by its activation on the ball, used for
      ``r <- r * norm``: the global ``||W_l||`` or the sound local
      ``||D_l W_l D_{l-1}||``. It is called once per hidden stage, in order.

  Returns:
    One :class:`LayerBounds` per stage. Every box contains the exact set of
    reachable pre-activations, provided ``radius_norm`` and ``row_norms`` return
    upper bounds.
  """
  c = x
  col_prev = jnp.ones_like(x)
  lo = x - _bcast(eps, x)
  hi = x + _bcast(eps, x)
  r = eps
  out = []
  for st, rnorm in zip(stages, row_norms):
    zc = st.affine(c)
    mid = 0.5 * (lo + hi)
    half = 0.5 * (hi - lo)
    abs_half = st.abs_linear(half)
    if abs_half is None:   # generic rule: |W| h <= ||w_k|| ||h||_2
      abs_half = rnorm[None] * _bcast(_l2(half), zc)
    zmid = st.affine(mid)
    ball = _bcast(r, zc) * rnorm[None]
    z_lo = jnp.maximum(zmid - abs_half, zc - ball)
    z_hi = jnp.minimum(zmid + abs_half, zc + ball)
    widen = _REL_WIDEN * (jnp.abs(zc) + (z_hi - z_lo)) + _ABS_WIDEN
    z_lo, z_hi = z_lo - widen, z_hi + widen
    if st.activation is None:
      ones = jnp.ones_like(zc)
      out.append(LayerBounds(zc, z_lo, z_hi, r, lo, hi, c, ones, ones))
      break
    row, col = st.activation.varying(st.act_params, z_lo, z_hi)
    lb = LayerBounds(zc, z_lo, z_hi, r, lo, hi, c, row, col)
    out.append(lb)
    r = r * radius_norm(st.index, lb, col_prev)
    col_prev = col
    c = st.activation.activate(st.act_params, zc)
    lo, hi = st.activation.interval(st.act_params, z_lo, z_hi)
  return out
