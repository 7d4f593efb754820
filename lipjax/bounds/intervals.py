"""Per-example interval bounds on an l2 ball and activation-status masks.

For each example the propagation carries three things (the paper's interval bounds and masks):

* the clean activation (the ball's centre),
* an l2 radius ``r`` that contains every reachable activation (starts at eps),
* an elementwise box ``[lb, ub]`` (starts at ``x +- eps``).

At an affine layer the box goes through interval arithmetic and is intersected
with the ball projection ``z_k(x) +- r ||w_k||``; then ``r <- r ||W||`` with a
*sound* norm. Activations map the box monotonically and produce the masks.

Rounding. The boxes contain the *exact* (real-arithmetic) pre-activations of
every point of the ball although they are computed in float32: each box is
widened by a rigorous bound on the rounding of the sums that produced it,
``c_n (|W| max(|lb|, |ub|) + |b|)`` with ``c_n`` from
:func:`lipjax.bounds.rounding.dot_coefficient` (it grows with the fan-in
``n`` and with the magnitudes summed, not with the result, so a cancelling
sum whose float32 value has the wrong sign is still marked varying). The
rounding of the forward pass itself (not of the box arithmetic) also has an
l2 bound per entry, ``c_n (|W| |h(x)| + ||w_k|| (r + 2 d) + |b|)`` with ``r``
the l2 radius of the layer's input set and ``d`` its float32 error, much
smaller on wide balls; the smaller of the two is used. The
propagation also carries, per layer, a bound on how far the float32 forward
pass (``model.apply``) can be from the exact one anywhere in the ball
(``error``, ``input_error``, ``input_error_l2``, ``rounding``), which the
certificate uses; the centre ``z_k(x)`` of the ball projection is the float32
one, so that projection is widened by that error. Training estimates
(``rounding_bounds=False``) use a cheap relative widening instead.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import nn as lnn
from lipjax.bounds import per_example, rounding
from lipjax.bounds.network import Stage

Array = jax.Array


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


RadiusNorm = Callable[[int, "LayerBounds", Array], Array]

# Activations evaluated elementwise: an input error e gives an output error <= e.
_ELEMENTWISE = (lnn.ReLU, lnn.ClippedReLU, lnn.Identity)


def _fan_in(st: Stage) -> int:
  n = st.layer.fan_in(st.params, st.layer_in_shape)
  return int(np.prod(st.in_shape)) if n is None else int(n)


def _abs_apply(st: Stage, v: Array, rnorm: Array, like: Array) -> Array:
  """An upper bound on ``|W| v`` for ``v >= 0`` (exact map up to rounding, or
  the generic ``||w_k|| ||v||_2``)."""
  a = st.abs_linear(v)
  if a is None:
    n = int(np.prod(v.shape[1:]))
    return rnorm[None] * per_example.expand(per_example.l2_norm(v) * rounding.upper_factor(n), like)
  return a


def _activation_error(act, params, z_lo, z_hi, ez, dz):
  """Bound on ``|act(z_float) - act(z)|`` when ``z`` is in the box and
  ``|z_float - z| <= ez`` (``||z_float - z||_2 <= dz``).

  Two sound rules, the smaller is kept: the activation's own interval rule on
  the box widened by ``ez`` (both values lie in it), and 1-Lipschitz
  continuity (elementwise for the built-in elementwise activations, over
  channel pairs for ClippedMaxMin, in l2 for any other).
  """
  lo, hi = act.interval(params, rounding.down(z_lo - ez), rounding.up(z_hi + ez))
  width = rounding.up(hi - lo)
  own = getattr(act, "evaluation_error", None)   # an activation not evaluated exactly
  if type(act) in _ELEMENTWISE:   # pylint: disable=unidiomatic-typecheck
    point = ez
  elif type(act) is lnn.ClippedMaxMin:   # pylint: disable=unidiomatic-typecheck
    c = ez.shape[-1] // 2
    m = jnp.maximum(ez[..., :c], ez[..., c:])
    point = jnp.concatenate([m, m], axis=-1)
  else:
    point = jnp.broadcast_to(per_example.expand(dz, width), width.shape)
  if own is not None:   # its float32 result errs by own(...) more than the exact one
    point = rounding.up(point + own(params, rounding.down(z_lo - ez), rounding.up(z_hi + ez)))
  return jnp.minimum(width, point)


def propagate(stages: Sequence[Stage], x: Array, eps: Array,
              row_norms: Sequence[Array], radius_norm: RadiusNorm,
              error_norms: Optional[Sequence[Array]] = None,
              rounding_bounds: bool = True,
              widen: bool = True) -> List[LayerBounds]:
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
    error_norms: optional, per stage, a scalar upper bound on ``||W_l||``
      (valid everywhere, not only on the ball), used to carry the l2 norm of
      the forward-pass rounding error through the layers.
    rounding_bounds: True (default): widen the boxes by rigorous rounding
      bounds and compute the error fields. False (training estimates only):
      widen by a cheap relative ``1e-5 (|z(x)| + width) + 1e-7``, which is
      not a bound, and fill the error fields with NaN; saves two passes of
      ``|W|`` per layer.
    widen: with ``rounding_bounds=False`` only: False leaves the boxes
      unwidened (exact interval arithmetic carried out in float32; estimates
      from below, whose boxes must stay inside the sound ones).

  Returns:
    One :class:`LayerBounds` per stage. Every box contains the exact set of
    reachable pre-activations, and every error field bounds the float32
    forward pass's deviation from the exact one (see
    :mod:`lipjax.bounds.rounding` for the arithmetic model), provided
    ``radius_norm``, ``row_norms`` and ``error_norms`` return upper bounds
    (and ``rounding_bounds`` is True).
  """
  v = rounding.operand_roundoff()
  u = rounding.U
  c = x
  col_prev = jnp.ones_like(x)
  eb = per_example.expand(eps, x)
  lo, hi = (rounding.down(x - eb), rounding.up(x + eb)) if rounding_bounds else (x - eb, x + eb)
  r = eps
  e = jnp.zeros_like(x)      # |float32 activation - exact| over the ball
  d = jnp.zeros_like(eps)    # its l2 norm
  if not rounding_bounds:
    e, d = e + jnp.nan, d + jnp.nan
  out = []
  norms_ = error_norms if error_norms is not None else [None] * len(stages)
  starts = {st.block.start for st in stages if st.block is not None}
  saved = None
  for st, rnorm, gnorm in zip(stages, row_norms, norms_):
    if st.index in starts:   # a residual branch starts: keep its input
      saved = _Carry(c, lo, hi, r, e, d, col_prev)
    n = _fan_in(st)
    zc = st.affine(c)
    mid = 0.5 * (lo + hi)
    half = 0.5 * (hi - lo)
    abs_half = _abs_apply(st, half, rnorm, zc)
    zmid = st.affine(mid)
    if not rounding_bounds:
      ball = per_example.expand(r, zc) * rnorm[None]
      z_lo = jnp.maximum(zmid - abs_half, zc - ball)
      z_hi = jnp.minimum(zmid + abs_half, zc + ball)
      if widen:
        pad = 1e-5 * (jnp.abs(zc) + (z_hi - z_lo)) + 1e-7
        z_lo, z_hi = z_lo - pad, z_hi + pad
      rho = ez = jnp.full_like(zc, jnp.nan)
      size = dz = None
    else:
      # Rounding of this stage's sums at any float input |h| <= M + e (the
      # float forward pass) or |h| <= M (the box's midpoint and half-width,
      # whose own rounding n + 4 covers), M = max(|lb|, |ub|).
      bias = st.layer.bias(st.params)
      mag = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) + e + rounding.FLOOR
      s = _abs_apply(st, mag, rnorm, zc)
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
      s_pt = (_abs_apply(st, jnp.abs(c) + rounding.FLOOR, rnorm, zc)
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
    if st.activation is None:
      ones = jnp.ones_like(zc)
      out.append(LayerBounds(zc, z_lo, z_hi, r, lo, hi, c, ones, ones, **fields))
      break
    row, col = st.activation.varying(st.act_params, z_lo, z_hi)
    lb = LayerBounds(zc, z_lo, z_hi, r, lo, hi, c, row, col, **fields)
    r = r * radius_norm(st.index, lb, col_prev) * (1.0 + 4 * u)
    col_prev = col
    c = st.activation.activate(st.act_params, zc)
    lo, hi = st.activation.interval(st.act_params, z_lo, z_hi)
    if not rounding_bounds:
      e, d = jnp.full_like(c, jnp.nan), jnp.full_like(eps, jnp.nan)
    else:
      e = jax.lax.stop_gradient(_activation_error(st.activation, st.act_params, z_lo, z_hi,
                                                  ez, dz))
      e_l2 = per_example.l2_norm(e) * rounding.upper_factor(size)
      d = jax.lax.stop_gradient(jnp.minimum(dz, e_l2))
    if st.block is not None:
      if saved is None:
        raise ValueError(f"{st.name}: residual block without a start stage")
      carry = _residual(st.block, saved, _Carry(c, lo, hi, r, e, d, col), rounding_bounds)
      c, lo, hi, r, e, d, col_prev = dataclasses.astuple(carry)
      lb = dataclasses.replace(lb, col_mask=col_prev)
      saved = None
    out.append(lb)
  return out


@dataclasses.dataclass(frozen=True)
class _Carry:
  """What the propagation carries between stages (one activation's sets)."""

  center: Array       # (B, *shape) float32 value at the clean input
  lower: Array        # box of the exact values over the ball
  upper: Array
  radius: Array       # (B,) l2 radius of the exact set around the exact centre
  error: Array        # |float32 value - exact| over the ball
  error_l2: Array     # (B,) its l2 norm
  col: Array          # 0/1, entries that vary over the ball


def _residual(block, skip: _Carry, branch: _Carry, rounding_bounds: bool) -> _Carry:
  """The sets of ``post(h + f(h))`` from those of ``h`` (``skip``) and ``f(h)``.

  The box is the sum of the boxes (any ``h + f(h)`` lies in it), the radius
  the sum of the radii (``||(h' + f(h')) - (h + f(h))|| <= ||h' - h|| +
  ||f(h') - f(h)||``), the forward-pass error the sum of the errors plus the
  rounding of the float32 addition, ``u (|h| + |f(h)|)`` with the float
  operands bounded by box magnitude plus error. An entry varies when either
  term does (or, with a post activation, as its masks say).
  """
  u = rounding.U
  c = skip.center + branch.center
  if rounding_bounds:
    lo = rounding.down(skip.lower + branch.lower)
    hi = rounding.up(skip.upper + branch.upper)
    mag = (jnp.maximum(jnp.abs(skip.lower), jnp.abs(skip.upper)) + skip.error
           + jnp.maximum(jnp.abs(branch.lower), jnp.abs(branch.upper)) + branch.error)
    e = (skip.error + branch.error + u * mag) * (1.0 + 4 * u)
    size = int(np.prod(c.shape[1:]))
    up = rounding.upper_factor(size)
    d = jnp.minimum((skip.error_l2 + branch.error_l2 + u * per_example.l2_norm(mag) * up)
                    * (1.0 + 4 * u), per_example.l2_norm(e) * up)
  else:
    lo, hi = skip.lower + branch.lower, skip.upper + branch.upper
    e, d = jnp.full_like(c, jnp.nan), jnp.full_like(skip.radius, jnp.nan)
  r = (skip.radius + branch.radius) * (1.0 + 4 * u)
  col = jnp.maximum(skip.col, branch.col)
  act = block.activation
  if act is not None:
    _, col = act.varying(block.act_params, lo, hi)
    c_out = act.activate(block.act_params, c)
    lo_out, hi_out = act.interval(block.act_params, lo, hi)
    if rounding_bounds:
      size = int(np.prod(c.shape[1:]))
      e_out = jax.lax.stop_gradient(_activation_error(act, block.act_params, lo, hi, e, d))
      e_l2 = per_example.l2_norm(e_out) * rounding.upper_factor(size)
      d = jax.lax.stop_gradient(jnp.minimum(d, e_l2))
      e = e_out
    else:
      e = jnp.full_like(c_out, jnp.nan)
    c, lo, hi = c_out, lo_out, hi_out
  return _Carry(c, lo, hi, r, e, d, col)
