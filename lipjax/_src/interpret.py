"""The passes of the one walker (:meth:`lipjax._src.graph.Graph.walk`).

* :func:`propagate` -- per-example boxes, l2 radii, activation-status masks
  and rigorous float32 rounding bounds over an l2 ball (the paper's interval
  bounds, Step A and B);
* :func:`forward` -- the network replayed from its graph;
* :func:`smoothed_forward` -- the same with every activation's smooth
  surrogate (for the search of large Jacobians);
* the Lipschitz product is :meth:`lipjax._src.graph.Graph.product`.

Every pass asks the node's rule (linear, activation, combine) and never
looks at the node's kind; blocks recurse.

Propagation over the ball ``B(x, eps)``. For each example the pass carries
the clean activation (the ball's centre), an l2 radius ``r`` that contains
every reachable activation (starts at ``eps``) and an elementwise box
``[lb, ub]`` (starts at ``x +- eps``). At an affine map the box goes through
interval arithmetic and is intersected with the ball projection
``z_k(x) +- r ||w_k||``; then ``r <- r ||W||`` with a *sound* norm.
Activations map the box through their interval rule and produce the masks.
A block's paths start from its input; the join adds the boxes, the radii
and the errors (the combine rule).

Rounding. The boxes contain the *exact* (real-arithmetic) pre-activations of
every point of the ball although they are computed in float32: each box is
widened by a rigorous bound on the rounding of the sums that produced it,
``c_n (|W| max(|lb|, |ub|) + |b|)`` with ``c_n`` from
:func:`lipjax._src.rounding.dot_coefficient` (it grows with the fan-in
``n`` and with the magnitudes summed, not with the result, so a cancelling
sum whose float32 value has the wrong sign is still marked varying). The
rounding of the forward pass itself also has an l2 bound per entry,
``c_n (|W| |h(x)| + ||w_k|| (r + 2 d) + |b|)`` with ``r`` the l2 radius of
the layer's input set and ``d`` its float32 error, much smaller on wide
balls; the smaller of the two is used. The pass also carries, per stage, a
bound on how far the float32 forward pass (``model.apply``) can be from the
exact one anywhere in the ball (``error``, ``input_error``,
``input_error_l2``, ``rounding``), which the certificate uses; the centre
``z_k(x)`` of the ball projection is the float32 one, so that projection is
widened by that error. Training estimates (``rounding_bounds=False``) use a
cheap relative widening instead.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lipjax._src import per_example, rounding
from lipjax._src.graph import Block, Graph, Pass, Stage, last_stage

Array = jax.Array

__all__ = ["JoinBounds", "LayerBounds", "fan_in", "forward", "propagate", "smoothed_forward"]


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
      logits stage).
    col_mask: 0/1 of the stage's activation outputs that vary (ones for the
      logits stage); for the last stage of a block's path, of the block's
      output: the next stage's column mask.
    rounding: ``(B, *out)`` bound on the rounding of this stage's affine map
      evaluated in float32 at any float32 input the forward pass can reach
      from the ball.
    error: ``(B, *out)`` bound on ``|float32 pre-activation - exact|`` at
      every point of the ball (the stage's own rounding included).
    input_error: ``(B, *in)`` the same for the stage's input (0 for the
      network input).
    input_error_l2: ``(B,)`` bound on the l2 norm of the input error vector.
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
  rounding: Array
  error: Array
  input_error: Array
  input_error_l2: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class JoinBounds:
  """Bounds of one block's joined value (before the block's activation).

  Attributes:
    lower, upper: ``(B, *shape)`` box of the exact joined values over the ball.
    col_mask: 0/1 of the block's outputs that vary (after its activation).
  """

  lower: Array
  upper: Array
  col_mask: Array


RadiusNorm = Callable[[int, "LayerBounds", Array], Array]


def fan_in(st: Stage) -> int:
  """Largest number of products summed into one output of the stage's map."""
  n = st.layer.fan_in(st.params, st.layer_in_shape)
  return int(np.prod(st.in_shape)) if n is None else int(n)


def _abs_apply(st: Stage, v: Array, rnorm: Array, like: Array,
               for_rounding: bool = False) -> Array:
  """An upper bound on ``|W| v`` for ``v >= 0`` (exact map up to rounding, or
  the generic ``||w_k|| ||v||_2``); with ``for_rounding``, on the terms the
  float32 evaluation sums (:meth:`~lipjax._src.graph.Stage.rounding_abs_linear`)."""
  a = st.rounding_abs_linear(v) if for_rounding else st.abs_linear(v)
  if a is None:
    n = int(np.prod(v.shape[1:]))
    return rnorm[None] * per_example.expand(per_example.l2_norm(v) * rounding.upper_factor(n),
                                            like)
  return a


@dataclasses.dataclass(frozen=True)
class Carry:
  """What the propagation carries from node to node (one value's sets)."""

  center: Array       # (B, *shape) float32 value at the clean input
  lower: Array        # box of the exact values over the ball
  upper: Array
  radius: Array       # (B,) l2 radius of the exact set around the exact centre
  error: Array        # |float32 value - exact| over the ball
  error_l2: Array     # (B,) its l2 norm
  col: Array          # 0/1, entries that vary over the ball


class _Boxes(Pass):
  """The propagation pass (see :func:`propagate`)."""

  def __init__(self, row_norms, radius_norm, error_norms, rounding_bounds, widen):
    self.row_norms = row_norms
    self.radius_norm = radius_norm
    self.error_norms = error_norms
    self.rounding_bounds = rounding_bounds
    self.widen = widen
    self.out: List[Optional[LayerBounds]] = []
    self.in_cols: List[Optional[Array]] = []
    self.joins: List[JoinBounds] = []

  def stage(self, st: Stage, carry: Carry) -> Carry:
    c, lo, hi, r, e, d, col_prev = dataclasses.astuple(carry)
    rnorm, gnorm = self.row_norms[st.index], self.error_norms[st.index]
    v = rounding.operand_roundoff()
    u = rounding.U
    n = fan_in(st)
    zc = st.affine(c)
    mid = 0.5 * (lo + hi)
    half = 0.5 * (hi - lo)
    abs_half = _abs_apply(st, half, rnorm, zc)
    zmid = st.affine(mid)
    if not self.rounding_bounds:
      ball = per_example.expand(r, zc) * rnorm[None]
      z_lo = jnp.maximum(zmid - abs_half, zc - ball)
      z_hi = jnp.minimum(zmid + abs_half, zc + ball)
      if self.widen:
        pad = 1e-5 * (jnp.abs(zc) + (z_hi - z_lo)) + 1e-7
        z_lo, z_hi = z_lo - pad, z_hi + pad
      rho = ez = jnp.full_like(zc, jnp.nan)
      size = dz = None
    else:
      # Rounding of this stage's sums at any float input |h| <= M + e (the
      # float forward pass) or |h| <= M (the box's midpoint and half-width,
      # whose own rounding n + 4 covers), M = max(|lb|, |ub|).
      bias = st.bias()
      mag = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) + e + rounding.FLOOR
      s = _abs_apply(st, mag, rnorm, zc, for_rounding=True)
      if bias is not None:
        s = s + jnp.abs(bias)
      mag_max = jnp.max(mag.reshape(mag.shape[0], -1), axis=1)
      coef = rounding.dot_coefficient(n + 4, v)
      under = per_example.expand(rounding.underflow_term(n, mag_max), zc)
      rho_box = coef * s + under
      # At a point the float forward pass reaches, |h~(x')| <= |c| + |delta|
      # with ||delta||_2 <= r + 2 d (c is a float32 evaluation at the centre,
      # as is model.apply's), so per row sum_k |w_k| |h~_k(x')| <=
      # |w| . |c| + ||w||_2 (r + 2 d): an l2 bound per entry, much smaller
      # than the box's on wide balls (the box is wide in every coordinate).
      # It bounds the forward pass's own rounding (not the box midpoint's).
      dev = per_example.expand((r + 2.0 * d) * (1.0 + 8 * u), zc)
      s_pt = (_abs_apply(st, jnp.abs(c) + rounding.FLOOR, rnorm, zc, for_rounding=True)
              + rnorm[None] * dev * (1.0 + 4 * u))
      if bias is not None:
        s_pt = s_pt + jnp.abs(bias)
      rho = jnp.minimum(rho_box, coef * s_pt * (1.0 + 4 * u) + under)
      # Error of the float pre-activation: own rounding + W (h_float - h).
      row_up = rnorm[None] * rounding.upper_factor(n + 4)
      through = row_up * per_example.expand(d, zc)
      abs_e = st.abs_linear(e) if st.index > 0 else None
      if abs_e is not None:
        through = jnp.minimum(through, abs_e * rounding.upper_factor(n, v))
      ez = (through + rho) * (1.0 + 4 * u)
      ball = per_example.expand(r, zc) * row_up
      z_lo = jnp.maximum(
          zmid - abs_half - rho_box - 3 * u * (jnp.abs(zmid) + abs_half + rho_box),
          zc - ball - ez - 3 * u * (jnp.abs(zc) + ball + ez))
      z_hi = jnp.minimum(
          zmid + abs_half + rho_box + 3 * u * (jnp.abs(zmid) + abs_half + rho_box),
          zc + ball + ez + 3 * u * (jnp.abs(zc) + ball + ez))
      size = int(np.prod(zc.shape[1:]))
      dz = per_example.l2_norm(ez) * rounding.upper_factor(size)
      if gnorm is not None:
        rho_l2 = per_example.l2_norm(rho) * rounding.upper_factor(size)
        dz = jnp.minimum(dz, (gnorm * d + rho_l2) * (1 + 4 * u))
    fields = dict(rounding=rho, error=ez, input_error=e, input_error_l2=d)
    self.in_cols.append(col_prev)
    if st.activation is None:
      ones = jnp.ones_like(zc)
      self.out.append(LayerBounds(zc, z_lo, z_hi, r, lo, hi, c, ones, ones, **fields))
      return carry
    act, ap = st.activation, st.act_params
    row, col = act.mask(ap, z_lo, z_hi)
    lb = LayerBounds(zc, z_lo, z_hi, r, lo, hi, c, row, col, **fields)
    r = r * self.radius_norm(st.index, lb, col_prev) * (1.0 + 4 * u)
    c = act.forward(ap, zc)
    lo, hi = act.interval(ap, z_lo, z_hi)
    if not self.rounding_bounds:
      e, d = jnp.full_like(c, jnp.nan), jnp.full_like(r, jnp.nan)
    else:
      e = jax.lax.stop_gradient(act.rounding_error(ap, z_lo, z_hi, ez, dz))
      e_l2 = per_example.l2_norm(e) * rounding.upper_factor(size)
      d = jax.lax.stop_gradient(jnp.minimum(dz, e_l2))
    self.out.append(lb)
    return Carry(c, lo, hi, r, e, d, col)

  def join(self, block: Block, carry: Carry, outs: Sequence[Carry]) -> Carry:
    c, lo, hi, r, e, d, col = block.combine.boxes(outs, self.rounding_bounds)
    act, ap = block.activation, block.act_params
    if act is not None:   # the post-join activation's column mask
      col = act.mask(ap, lo, hi)[1]
    self.joins.append(JoinBounds(lo, hi, col))
    if act is not None:
      c_out = act.forward(ap, c)
      lo_out, hi_out = act.interval(ap, lo, hi)
      if self.rounding_bounds:
        size = int(np.prod(c.shape[1:]))
        e_out = jax.lax.stop_gradient(act.rounding_error(ap, lo, hi, e, d))
        e_l2 = per_example.l2_norm(e_out) * rounding.upper_factor(size)
        d = jax.lax.stop_gradient(jnp.minimum(d, e_l2))
        e = e_out
      else:
        e = jnp.full_like(c_out, jnp.nan)
      c, lo, hi = c_out, lo_out, hi_out
    # The last stage of every path hands the block's output to the next stage.
    for path in block.paths:
      last = last_stage(path)
      if last is not None:
        self.out[last.index] = dataclasses.replace(self.out[last.index], col_mask=col)
    return Carry(c, lo, hi, r, e, d, col)


def propagate(graph: Graph, x: Array, eps: Array, row_norms: Sequence[Array],
              radius_norm: RadiusNorm, error_norms: Optional[Sequence[Array]] = None,
              rounding_bounds: bool = True,
              widen: bool = True
              ) -> Tuple[List[LayerBounds], List[Array], List[JoinBounds]]:
  """Propagates the ball ``B(x_b, eps_b)`` through every stage.

  Args:
    graph: from :func:`lipjax._src.trace.trace`.
    x: ``(B, *in_shape)`` inputs.
    eps: ``(B,)`` radii.
    row_norms: per stage, upper bounds on the row norms (shape ``out``).
    radius_norm: ``radius_norm(l, bounds_l, col_in)`` returns an upper bound
      (scalar or ``(B,)``) on the Lipschitz constant of stage ``l``'s affine
      map followed by its activation on the ball (``col_in``: the column mask
      of the stage's input), used for ``r <- r * norm``: the global
      ``||W_l||`` or the sound local ``||D_l W_l D_in||``. It is called once
      per hidden stage, in walk order.
    error_norms: optional, per stage, a scalar upper bound on ``||W_l||``
      (valid everywhere, not only on the ball), used to carry the l2 norm of
      the forward-pass rounding error through the layers.
    rounding_bounds: True (default): widen the boxes by rigorous rounding
      bounds and compute the error fields. False (training estimates only):
      widen by a cheap relative ``1e-5 (|z(x)| + width) + 1e-7``, which is
      not a bound, and fill the error fields with NaN.
    widen: with ``rounding_bounds=False`` only: False leaves the boxes
      unwidened (estimates from below, whose boxes must stay inside the
      sound ones).

  Returns:
    ``(layers, in_cols, joins)``: one :class:`LayerBounds` per stage, per
    stage the column mask of its input (ones for the network input), and one
    :class:`JoinBounds` per block (in the order of ``graph.blocks``). Every box
    contains the exact set of reachable pre-activations, and every error
    field bounds the float32 forward pass's deviation from the exact one,
    provided ``radius_norm``, ``row_norms`` and ``error_norms`` return upper
    bounds (and ``rounding_bounds`` is True).
  """
  eb = per_example.expand(eps, x)
  if rounding_bounds:
    lo, hi = rounding.down(x - eb), rounding.up(x + eb)
    e, d = jnp.zeros_like(x), jnp.zeros_like(eps)
  else:
    lo, hi = x - eb, x + eb
    e, d = jnp.zeros_like(x) + jnp.nan, jnp.zeros_like(eps) + jnp.nan
  norms_ = list(error_norms) if error_norms is not None else [None] * len(graph)
  p = _Boxes(list(row_norms), radius_norm, norms_, rounding_bounds, widen)
  graph.walk(p, Carry(x, lo, hi, eps, e, d, jnp.ones_like(x)))
  return p.out, p.in_cols, p.joins


class _Forward(Pass):

  def __init__(self, smooth: Optional[float] = None):
    self.smooth = smooth

  def _act(self, rule, params, z):
    if self.smooth is None:
      return rule.forward(params, z)
    return rule.smooth(params, z, self.smooth)

  def stage(self, st, h):
    z = st.affine(h)
    return z if st.activation is None else self._act(st.activation, st.act_params, z)

  def join(self, block, h, outs):
    y = block.combine.forward(outs)
    return y if block.activation is None else self._act(block.activation, block.act_params, y)


def forward(graph: Graph, x: Array) -> Array:
  """The network replayed from its graph: ``(B, *in_shape) -> (B, C)``."""
  return graph.walk(_Forward(), x)


def smoothed_forward(graph: Graph, x: Array, temperature: float) -> Array:
  """:func:`forward` with every activation's smooth surrogate at ``temperature``."""
  return graph.walk(_Forward(float(temperature)), x)
