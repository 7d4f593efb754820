"""Certificates and certified radii.

For an example with label ``y`` and a bound ``R(x) = eps * prod_{l<L} s_l(x)``
on how far the penultimate activation can move inside ``B(x, eps)``, the
exact gap ``z_y - z_i`` anywhere in the ball is at least

  ``L_iy = max(g_iy - E_iy - R ||D_{L-1} (w_i - w_y)||_2,  IBP_iy)``

where ``g_iy`` is the float32 gap at ``x``, ``D_{L-1}`` deletes the last
layer's constant columns, ``IBP_iy`` is the exact minimum of the gap over the
penultimate box, and ``E_iy`` bounds ``|fl(z_y - z_i) - (z_y - z_i)|`` at
every point of the ball: the float32 rounding of the whole forward pass
(:mod:`lipjax._src.rounding`), which grows with the magnitudes summed
(``sum |W| |h| + |b|`` per logit), not with the gap. The example is
*certified* when ``L_iy - E_iy > 0`` for every ``i != y`` (every float32
evaluation ``model.apply(x')`` and the exact network then predict ``y`` on
the whole ball), with every computed quantity rounded the safe way. Any NaN
or inf on the way (logits, margins, norms, their product, the radius scale)
makes it *not* certified.

With ``bound="global"`` the GloRo certificate with global norms is used
instead (no masks, no interval bound; the boxes only bound the rounding),
the baseline of the paper.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lipjax._src import (frontends, interpret, lipschitz, margins, norms, pairwise,
                         per_example, rounding)
from lipjax._src import trace as trace_lib
from lipjax._src.graph import Pass
from lipjax._src.options import check_choice

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Certificate:
  """Result of :func:`certify` for ``B`` examples.

  Attributes:
    predicted: ``(B,)`` int32 argmax of the logits.
    certified: ``(B,)`` bool; ``predicted == y`` and at every point ``x'`` of
      ``B(x, eps)`` both the float32 forward pass ``model.apply`` (on this
      backend and matmul precision, see :mod:`lipjax._src.rounding`) and
      the exact network predict ``y`` (with probability
      ``>= 1 - failure_probability`` over the Lanczos start vectors where
      that is nonzero).
    radius: ``(B,)`` certified radius for the label: ``eps`` where certified,
      0 elsewhere (masks hold only inside ``B(x, eps)``, so no larger radius
      is claimed).
    robust_radius: ``(B,)`` certified radius of the *prediction* ``p``:
      ``eps`` where the prediction is certified at ``eps``, else
      ``min(eps, min_i (g_pi - 2 E_pi) / (||D (w_p - w_i)|| prod_{l<L} s_l))``
      (rounding terms as in the module docstring); valid for wrong
      predictions too.
    margin: ``(B,)`` ``min_{i != y} (L_iy - E_iy)``: a lower bound on
      ``fl(z_y(x')) - fl(z_i(x'))`` and on the exact gap over the ball; > 0
      iff certified (``-inf`` where something is not finite).
    lipschitz: ``(B,)`` the bound on the logits' Lipschitz constant used.
    failure_probability: ``(B,)`` probability over the Lanczos start vectors
      that the certificate's norms fail to be upper bounds; 0 where every
      norm used is deterministic (see :func:`lipjax.bound_guarantee`).
    local: ``(B,)`` bool, whether the sound local bound was computed for the
      example. With ``certify(..., triage=True)`` (the default) it is not for
      examples the triage decides: those are reported with the global
      certificate (``lipschitz`` the global bound, ``failure_probability``
      that of the global norms: 0 for built-in layers), which is sound and,
      for an example it certifies, implies the local certificate.
  """

  predicted: Array
  certified: Array
  radius: Array
  robust_radius: Array
  margin: Array
  lipschitz: Array
  failure_probability: Array
  local: Array


def check_labels(y, batch: int, num_classes: int) -> Array:
  concrete = not isinstance(y, jax.core.Tracer)
  y = np.asarray(y) if concrete else y
  if y.shape != (batch,):
    raise ValueError(f"y must have shape ({batch},), got {y.shape}")
  if not np.issubdtype(y.dtype, np.integer):
    raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
  if concrete and np.any((y < 0) | (y >= num_classes)):
    raise ValueError(f"labels must be in [0, {num_classes}), got range "
                     f"[{int(y.min())}, {int(y.max())}]")
  return jnp.asarray(y, jnp.int32)


def _margins(logits, labels, mat, col, scale, fwd, *, box=None, bias=None,
             rows=None, last_norm=None, depth=1, inner=None, eps=None, pair=None,
             center=None, consider=None):
  """Lower bounds on ``z_y - z_i`` over the ball, net of float32 rounding.

  Args:
    logits: ``(B, C)`` float32 logits at the centres.
    labels: ``(B,)`` the class ``y`` whose gaps are bounded.
    mat: explicit ``(C, m)`` last-layer matrix, or None (generic last layer).
    col: ``(B, m)`` column mask of the last layer.
    scale: ``(B,)`` bound on ``||h(x') - h(x)||_2`` per unit of ``||D w||``
      (``eps * prod_{l<L} s_l``).
    fwd: ``(e, d, rho)``: bounds on the float32 penultimate activation's
      error over the ball (``(B, m)`` elementwise, ``(B,)`` in l2) and on the
      rounding of the last layer (``(B, C)``), from
      :func:`_tightest_rounding` (or the screen's :func:`_norm_rounding`).
    box: ``(lo, hi)``, ``(B, m)`` box of the exact penultimate activation
      over the ball, for the interval lower bound (``mat`` needed).
    bias: ``(C,)`` last-layer bias or None.
    rows: ``(C,)`` bounds on the last layer's row norms (generic last layer).
    last_norm: ``(B,)`` bound on the masked last-layer norm (generic layer).
    depth: number of norms multiplied into ``scale``.
    inner: ``(B,)`` the product of norms in ``scale`` (``scale = eps * inner``).
    eps: ``(B,)`` the radii (with ``pair``).
    pair: optional ``(B, C)`` sound bounds on the Lipschitz constant of
      ``z_i - z_y`` over the ball (:func:`lipjax._src.pairwise.pair_bounds`);
      each pair's gap then moves by at most ``eps`` times the smaller of it
      and the product bound.
    center: ``(B, m)`` float32 penultimate activation at the centres (with
      ``box`` and ``mat``): the box-clipped translation (BCP) bound, the
      move of each gap over the ball's part inside the box
      (:func:`lipjax._src.margins.box_ball_support`), evaluated rigorously.
    consider: optional ``(B, C)`` bools: ``margin`` is the minimum over
      these classes only (estimates from below whose pair bounds cover only
      them; see :func:`certify_arrays`).

  Returns:
    ``(num, den, margin, other)``: ``num - r * den > 0`` (``den`` the
    Lipschitz bound of each pair's gap, without ``eps``) proves robustness
    of class ``y`` against class ``i`` at radius ``r <= eps``; ``margin`` ``(B,)`` is ``min_{i != y}`` of the
    certified lower bound on ``fl(z_y(x')) - fl(z_i(x'))`` and on the exact
    gap over the ball (positive iff certified); ``other`` masks ``i != y``.
  """
  u = rounding.U
  v = rounding.operand_roundoff()
  b, c = logits.shape
  e, d, rho = fwd
  lab = labels[:, None]
  other = jnp.arange(c)[None, :] != lab
  gap = jnp.take_along_axis(logits, lab, axis=1) - logits            # (B, C)
  rho_y = jnp.take_along_axis(rho, lab, axis=1)
  if mat is not None:
    m = mat.shape[1]
    pn = margins.pair_norms(mat, col, labels)                          # (B, C)
    a = margins.class_differences(mat, labels)                          # w_i - w_y
    an = jnp.sqrt(jnp.sum(jnp.square(a), axis=-1)) * rounding.upper_factor(m + 4)
    vecs = [e] if box is None else [e, 0.5 * (box[1] - box[0])]
    prods = jnp.einsum("bch,bkh->bkc", jnp.abs(a), jnp.stack(vecs, axis=1))
    prods = prods * rounding.upper_factor(m + 4, v)
    through = jnp.minimum(prods[:, 0], an * d[:, None] * (1 + 4 * u))
    kd = rounding.upper_factor(m + depth + 8)
  else:
    pn = jnp.broadcast_to((jnp.sqrt(2.0) * last_norm)[:, None], (b, c))
    through = (rows[None, :] + rows[labels][:, None]) * d[:, None] * (1 + 4 * u)
    kd = rounding.upper_factor(depth + 8)
  # |fl(z_y - z_i) - (z_y - z_i)| at any point of the ball (centre included).
  err = (through + rho + rho_y) * (1 + 4 * u)
  den = pn * (1.0 + norms.ROUNDING_SLACK) * kd
  delta = scale[:, None] * den
  den = den * inner[:, None]
  if pair is not None:   # a pair bound that is not finite leaves the product bound
    pair = pair * (1 + 4 * u)
    use = jnp.isfinite(pair)
    delta = jnp.where(use, jnp.minimum(delta, eps[:, None] * pair * (1 + 2 * u)), delta)
    den = jnp.where(use, jnp.minimum(den, pair), den)
  # Lower bounds on the exact gap over the ball; each chain of float32
  # subtractions of k terms is off by at most k u (sum of |terms|).
  lower = gap - err - delta - 6 * u * (jnp.abs(gap) + err + delta)      # Lipschitz
  num = gap - 2 * err - 6 * u * (jnp.abs(gap) + 2 * err + delta)        # robust radius
  if box is not None:                                                   # intervals
    lo, hi = box
    mid = 0.5 * (lo + hi)
    mag = jnp.maximum(jnp.abs(lo), jnp.abs(hi)) + rounding.FLOOR
    zmid = mid @ mat.T                                                  # (B, C)
    amid = zmid - jnp.take_along_axis(zmid, lab, axis=1)                # a . mid
    size = mag @ jnp.abs(mat).T
    size = size + jnp.take_along_axis(size, lab, axis=1)
    if bias is None:
      db = jnp.zeros((b, c), logits.dtype)
    else:
      bb = jnp.broadcast_to(bias, (b, c))
      db = jnp.take_along_axis(bb, lab, axis=1) - bb
      size = size + jnp.abs(bb) + jnp.abs(jnp.take_along_axis(bb, lab, axis=1))
    mag_max = jnp.max(mag, axis=1, keepdims=True)
    err_ibp = (rounding.dot_coefficient(m + 8, v) * size
               + 2 * rounding.underflow_term(m, mag_max))
    ibp = db - amid - prods[:, 1] - err_ibp
    ibp = ibp - 6 * u * (jnp.abs(db) + jnp.abs(amid) + prods[:, 1] + err_ibp)
    lower = jnp.maximum(lower, ibp)
    if center is not None:                                              # box-clipped
      clipped = _box_clipped_move(a, an, lo, hi, center, e, scale, depth)
      bcp = gap - err - clipped - 6 * u * (jnp.abs(gap) + err + clipped)
      lower = jnp.maximum(lower, jnp.where(jnp.isnan(bcp), -jnp.inf, bcp))
  # The float32 gap at any point of the ball is within err of the exact one.
  slack = lower - err - 3 * u * (jnp.abs(lower) + err)
  margin = jnp.min(jnp.where(other if consider is None else other & consider, slack,
                             jnp.inf), axis=1)
  return num, den, margin, other


def _box_clipped_move(a, a_norm, lo, hi, center, e, scale, depth):
  """``(B, C)`` rigorous upper bound on ``(w_i - w_y) . (h* (x') - h* (x))`` over the ball.

  ``h*`` is the exact penultimate activation. ``h*(x')`` lies in the box
  ``[lo, hi]`` and within ``R = scale * prod`` (the Lipschitz bound below the
  last layer) of ``h*(x)``, which is within ``e`` of the float32 ``center``;
  so ``delta = h*(x') - h*(x)`` lies in the ball of radius ``R`` and in
  ``[lo - center - e, hi - center + e]`` (widened to contain 0). The dual
  bound of :func:`lipjax._src.margins.box_ball_support` holds for any
  multiplier ``nu``; here it is evaluated for the computed ``nu`` with every
  float32 error bounded: the exact ``a`` differs from the computed one by at
  most ``u |a|`` per entry, norms and sums are inflated by their rounding
  factors, and ``R`` by the factor the Lipschitz path applies to it.
  ``a_norm`` (``(B, C)``) is an upper bound on ``||a||_2`` of the computed ``a``.
  """
  u = rounding.U
  m = a.shape[-1]
  dlo = jnp.minimum(rounding.down(rounding.down(lo - center) - e), 0.0)[:, None, :]
  dhi = jnp.maximum(rounding.up(rounding.up(hi - center) + e), 0.0)[:, None, :]
  radius = scale * (1.0 + norms.ROUNDING_SLACK) * rounding.upper_factor(depth + 8)
  _, nu = margins.box_ball_support(a, dlo, dhi, radius[:, None])
  nf = rounding.upper_factor(m + 4)
  rest = jnp.sqrt(jnp.sum(jnp.square(a - nu), axis=-1)) * nf            # ~ ||a - nu||
  rest = (rest * (1 + 2 * u) + 2 * u * a_norm) * (1 + 4 * u)           # >= exact ||a - nu||
  terms = margins.support_terms(nu, dlo, dhi)
  box = jnp.sum(terms, axis=-1)
  box = (box + rounding.dot_coefficient(m + 8, 0.0) * jnp.sum(jnp.abs(terms), axis=-1)
         + rounding.underflow_term(m, 0.0))
  first = radius[:, None] * rest * (1 + 4 * u)
  return (first + box) * (1 + 4 * u) + rounding.underflow_term(2, 0.0)


def certify_arrays(model, variables, x, y, eps, *, bound: str = "local",
                   global_norms=None, abs_norms=None, **options) -> Certificate:
  """Un-batched core of :func:`certify` (jit-compatible; one call, one batch).

  ``global_norms``: optionally the per-layer global norms of *these*
  ``variables``, computed once by the caller for many batches
  (:func:`lipjax.bounds.layer_global_norms` with the same options
  for ``bound="local"``, ``global_lipschitz_bound(per_layer=True)`` for
  ``bound="global"``); computed here when None. ``abs_norms``: likewise
  :func:`abs_norm_bounds` of these variables (the rounding bound's norms).
  """
  model, variables = frontends.resolve(model, variables)
  x, eps = lipschitz.check_inputs(model, x, eps, variables)
  variables = trace_lib.cast_floating(variables, x.dtype)   # the working precision
  b = x.shape[0]
  stages = trace_lib.trace(model, variables, tuple(x.shape[1:]), x.dtype)
  last = stages[-1]
  options = dict(options)
  use_pairs = options.pop("pairwise", True)
  pair_classes = options.pop("pair_classes", None)
  box_clip = options.pop("box_clip", True)
  consider = None
  if bound == "local":
    lb = lipschitz.local_lipschitz_bound(model, variables, x, eps,
                                         global_norms=global_norms, **options)
    layers = lb.layers
    logits = lb.logits
    col = margins.last_layer_columns(stages, layers, b)
    inner = (stages.product(lb.layer_norms, logits=False) if len(layers) > 1
             else jnp.ones((b,)))
    lo = last.layer_input(layers[-1].input_lower).reshape(b, -1)
    hi = last.layer_input(layers[-1].input_upper).reshape(b, -1)
    box = (lo, hi)
    center = (last.layer_input(layers[-1].input_center).reshape(b, -1) if box_clip
              else None)
    lip, fail = lb.bound, lb.failure_probability
    last_norm, last_global = lb.layer_norms[-1], lb.global_norms[-1]
    finite_extra = jnp.all(jnp.isfinite(jnp.stack(lb.layer_norms)), axis=0)
    mode = options.get("mode", "sound")
    classes = None
    if use_pairs and pair_classes is not None and pair_classes < logits.shape[-1] - 1:
      classes = _threatening_classes(stages, logits, col, eps, inner, pair_classes)
    pair = (_local_pair_bounds(stages, lb, abs_norms, mode, x, eps, classes)
            if use_pairs else None)
    if mode == "lower" and pair is not None and classes is not None:
      # Estimates from below stay above the sound margins only over the
      # classes whose pair bound is computed (elsewhere the product bound
      # alone may lie below the sound, pair-bounded margin).
      consider = jnp.zeros(logits.shape, bool).at[jnp.arange(b)[:, None], classes].set(True)
  else:   # "global" (the options were checked by the caller)
    options = {k: v for k, v in options.items() if k in ("key", "failure_probability")}
    if global_norms is None:
      _, gn = lipschitz.global_lipschitz_bound(model, variables, input_shape=x.shape[1:],
                                               per_layer=True, **options)
    else:
      gn = lipschitz.check_global_norms(stages, global_norms)
    layers = lipschitz.ball_bounds(stages, x, eps, gn)
    logits = model.apply(variables, x)
    box = center = None
    inner, col, lip, fail, last_norm, last_global, finite_extra = _global_terms(
        stages, gn, b, options.get("failure_probability", 1e-9))
    pair = None

  gnorms = lb.global_norms if bound == "local" else gn
  if bound == "local" and not options.get("rounding", True):
    # Estimates from below without rounding bounds (the triage's first
    # test): no rounding is subtracted, so the margins stay above the sound ones.
    b_, m_ = lo.shape
    fwd = (jnp.zeros((b_, m_), logits.dtype), jnp.zeros((b_,), logits.dtype),
           jnp.zeros_like(logits))
  else:
    fwd = _tightest_rounding(stages, x, eps, gnorms, layers[-1], abs_norms)
  return _finish(stages, logits, y, eps, inner, col, box, lip, fail, last_norm, last_global,
                 finite_extra, fwd, bound == "local", pair=pair, center=center,
                 consider=consider)


def _threatening_classes(stages, logits, col, eps, inner, k):
  """``(B, k)`` the classes ``i != p`` (``p`` the prediction) whose product
  bound ``z_p - z_i - eps inner ||D (w_i - w_p)||`` is smallest: those the
  per-pair bound can help most. Any choice is sound; this one decides which
  pairs get the (costly) pair bound."""
  predicted = jnp.argmax(logits, axis=-1)
  gap = jnp.take_along_axis(logits, predicted[:, None], axis=1) - logits
  mat = stages[-1].layer.explicit_matrix(stages[-1].params)
  if mat is not None:
    gap = gap - margins.logit_deltas(eps, inner, margins.pair_norms(mat, col, predicted))
  gap = jnp.where(jnp.arange(logits.shape[1])[None, :] == predicted[:, None], jnp.inf,
                  jnp.nan_to_num(gap, nan=-jnp.inf))
  _, classes = jax.lax.top_k(-jax.lax.stop_gradient(gap), int(k))
  return classes.astype(jnp.int32)


def _local_pair_bounds(stages, lb, abs_norms, mode, x, eps, classes=None):
  """``(B, C)`` pair bounds of the local certificate for the predicted classes, or None.

  :func:`lipjax._src.pairwise.pair_bounds` with the slopes of the sound
  boxes that the *global* norms give (:func:`lipjax._src.lipschitz.ball_bounds`:
  deterministic, the same in every mode, and containing the ball's exact
  pre-activations) and the local per-layer norms ``lb.layer_norms`` for the
  prefixes (the global norm of a layer where the global boxes' masks keep a
  unit the local bound's masks drop). Sound mode: rigorous (sound local
  norms, float32 rounding bounded). Lower mode (the triage's estimates from below): the same
  computation with the estimates from below and no rounding terms, so it
  stays below the sound pair bound (the slopes are identical and the bound
  grows with the norms) and the triage's margins above the sound margins.
  """
  if not pairwise.supports(stages) or mode == "estimate":
    return None
  if abs_norms is None:
    abs_norms = abs_norm_bounds(stages)
    if abs_norms is None:
      return None
  predicted = jnp.argmax(lb.logits, axis=-1).astype(jnp.int32)
  gnorms = [jax.lax.stop_gradient(g) for g in lb.global_norms]
  boxes, joins = lipschitz.ball_bounds(stages, x, eps, gnorms, with_joins=True)
  if mode == "sound":
    # The local norms hold under the local bound's own masks (those of
    # ``lb.layers``): where the global boxes keep a unit those masks drop,
    # the layer's global norm stands in.
    return pairwise.pair_bounds(stages, boxes, lb.layer_norms, predicted, sound=True,
                                abs_norms=abs_norms, norm_layers=lb.layers,
                                global_norms=gnorms, joins=joins, classes=classes)
  # The estimates from below are below whichever factor the sound bound uses.
  return pairwise.pair_bounds(stages, boxes, lb.layer_norms, predicted, sound=False,
                              joins=joins, classes=classes)


def _tightest_rounding(stages, x, eps, gnorms, last_bounds, abs_norms=None):
  """``(e, d, rho)`` of :func:`_margins`: the elementwise smaller of the
  boxes' bounds (``last_bounds``) and, where it applies, the norm-based one
  of :func:`_norm_rounding`.

  Both bound the same quantities soundly, so their minimum does. The exact
  certificates use it, so their margins are never below the screen's (which
  uses the norm-based bound alone) and grow monotonically as ``eps`` shrinks,
  whichever path decides an example.
  """
  last = stages[-1]
  e = last.layer_input(last_bounds.input_error).reshape(x.shape[0], -1)
  d, rho = last_bounds.input_error_l2, last_bounds.rounding
  if not screenable(stages):
    return e, d, rho
  e_n, d_n, rho_n = _norm_rounding(stages, x, eps, gnorms, abs_norms)
  return jnp.minimum(e, e_n), jnp.minimum(d, d_n), jnp.minimum(rho, rho_n)


def _finish(stages, logits, y, eps, inner, col, box, lip, fail, last_norm, last_global,
            finite_extra, fwd, local, pair=None, center=None, consider=None):
  """The margins, radii and :class:`Certificate` from the bounds of one batch.

  ``fwd``: the triple ``(e, d, rho)`` of :func:`_margins`. ``pair``:
  optional ``(B, C)`` sound bounds on the Lipschitz constants of
  ``z_i - z_p`` for the predicted class ``p`` (``argmax`` of ``logits``).
  ``center``: optional ``(B, m)`` penultimate activation at the centres, for
  the box-clipped translation bound (with ``box``).
  """
  b = logits.shape[0]
  last = stages[-1]
  num_classes = logits.shape[-1]
  y = check_labels(y, b, num_classes)
  mat = last.layer.explicit_matrix(last.params)
  predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scale = eps * inner
  rows = None
  if mat is None:
    rows = lipschitz.row_norm_bounds(last, last_global)
  bias = last.layer.bias(last.params)

  def for_labels(labels, pair_bounds=None):
    return _margins(logits, labels, mat, col, scale, fwd,
                    box=box if mat is not None else None, bias=bias, rows=rows,
                    last_norm=last_norm, depth=len(stages), inner=inner, eps=eps,
                    pair=pair_bounds, center=center, consider=consider)

  # The pair bounds are those of the prediction: they serve the label where
  # it is the prediction (elsewhere the example is not certified anyway).
  pair_y = None if pair is None else jnp.where((predicted == y)[:, None], pair, jnp.inf)
  if consider is not None:   # the classes chosen for the prediction
    consider = consider | (predicted != y)[:, None]
  _, _, margin, _ = for_labels(y, pair_y)
  # Any NaN or inf on the way means "not certified".
  finite = (jnp.all(jnp.isfinite(logits), axis=1) & jnp.isfinite(margin)
            & jnp.isfinite(scale) & jnp.isfinite(lip) & finite_extra)
  certified = (predicted == y) & (margin > 0) & finite
  radius = jnp.where(certified, eps, 0.0)

  num_p, denom, margin_p, other_p = for_labels(predicted, pair)   # for robust_radius
  ratio = jnp.where(other_p, jnp.maximum(num_p, 0.0) / jnp.maximum(denom, 1e-30), jnp.inf)
  ratio = jnp.where(other_p & (denom <= 0), jnp.where(num_p > 0, jnp.inf, 0.0), ratio)
  rr = jnp.clip(jnp.min(ratio, axis=1) * (1.0 - 16 * rounding.U), 0.0, eps)
  rr = jnp.where(margin_p > 0, eps, rr)
  rr = jnp.where(finite & jnp.isfinite(rr) & jnp.isfinite(margin_p), rr, 0.0)
  return Certificate(predicted=predicted, certified=certified, radius=radius,
                     robust_radius=rr, margin=jnp.where(finite, margin, -jnp.inf),
                     lipschitz=lip, failure_probability=fail,
                     local=jnp.full((b,), local))


def _global_terms(stages, gn, b, failure_probability):
  """``(inner, col, lip, fail, last_norm, last_global, finite_extra)`` of the global certificate."""
  last = stages[-1]
  inner = jnp.full((b,), stages.product(gn, logits=False))
  col = jnp.ones((b, int(np.prod(last.layer_in_shape))))
  lip = jnp.full((b,), stages.product(gn))
  probabilistic = any(lipschitz.needs_probabilistic_global(st) for st in stages)
  fail = jnp.full((b,), failure_probability if probabilistic else 0.0, jnp.float32)
  last_norm, last_global = jnp.full((b,), gn[-1]), gn[-1]
  finite_extra = jnp.all(jnp.isfinite(jnp.stack(gn)))
  return inner, col, lip, fail, last_norm, last_global, finite_extra


def screenable(stages) -> bool:
  """Whether :func:`screen_arrays` applies: a chain of maps with ``|W|`` whose
  activations are evaluated exactly in float32 (``max``, ``min``: they are
  1-Lipschitz in l2)."""
  if stages.has_blocks:   # residual sums: the screen's chain rule does not apply
    return False
  for st in stages:
    if st.layer.replays:
      return False
    if st.activation is not None and not st.activation.exact:
      return False
  return has_abs_norms(stages)


_ABS_NORM_ITERATIONS = 20


def _abs_norm_bound(st, iterations: int = _ABS_NORM_ITERATIONS) -> Array:
  """A rigorous upper bound on ``|| |W| ||_2`` of one stage's linear layer.

  The smaller of ``sqrt(max row sum * max column sum)`` of ``A = |W|`` and
  the Collatz-Wielandt bound of the Perron root of ``B = A^T A``: for any
  entrywise positive ``v``, ``lambda_max(B) <= max_i (B v)_i / v_i``, so
  every iterate of the power method on ``B`` (started at the all-ones
  vector, each iterate floored at ``1e-6`` of its largest entry to stay
  positive) gives a bound; the smallest one over ``iterations`` iterates is
  kept, typically within 1% of the norm, where the row-column bound is often
  1.5-2 times it. Both are made rigorous for the float32 (or lower-precision
  operand) evaluation of ``A v`` and ``A^T u``: sums of nonnegative terms,
  rounded up by :func:`lipjax._src.rounding.upper_factor`, plus
  ``2^-126`` per product for the ones flushed to zero.
  """
  spec = jax.ShapeDtypeStruct((1,) + tuple(st.in_shape), st.dtype)
  tiny = 2.0 ** -126
  v_op = rounding.operand_roundoff()
  n_in = int(np.prod(st.in_shape))
  out_spec = jax.eval_shape(st.rounding_abs_linear, spec)
  n_out = int(np.prod(out_spec.shape[1:]))
  f_in, f_out = rounding.upper_factor(n_in, v_op), rounding.upper_factor(n_out, v_op)
  transpose = jax.linear_transpose(st.rounding_abs_linear, spec)
  ones = jnp.ones(spec.shape, st.dtype)
  rows = st.rounding_abs_linear(ones)
  cols = transpose(jnp.ones(rows.shape, st.dtype))[0]
  r = (jnp.max(rows) + n_in * tiny) * f_in
  c = (jnp.max(cols) + n_out * tiny) * f_out
  crude = jnp.sqrt(r) * jnp.sqrt(c)   # not sqrt(r * c), which underflows for tiny weights

  def step(_, carry):
    v, best = carry
    u = st.rounding_abs_linear(v)
    w = transpose(u)[0]
    # Exact (A^T A v)_i <= f_in f_out (fl(w_i) + n_out 2^-126 (1 + max u))
    # + f_in n_in 2^-126 c: the rounding of both sums of nonnegative terms
    # and the products lost to underflow, in either pass.
    umax = jnp.max(u) * f_in + n_in * tiny
    slack = f_in * f_out * n_out * tiny * (1.0 + umax) + f_in * n_in * tiny * c
    bw = w * (f_in * f_out) + slack
    lam = jnp.max(bw / v) * (1.0 + 4 * rounding.U)
    best = jnp.minimum(best, lam)
    v = jnp.maximum(w / jnp.maximum(jnp.max(w), tiny), 1e-6).astype(st.dtype)
    return v, best

  _, lam = jax.lax.fori_loop(0, iterations, step, (ones, jnp.asarray(jnp.inf, st.dtype)))
  # A failed iteration (NaN from inf / inf) falls back to the row-column
  # bound, whose own NaN or inf stays.
  cw = jnp.where(jnp.isnan(lam), jnp.inf, jnp.sqrt(lam))
  return jnp.minimum(crude, cw) * (1.0 + 1e-3)


def has_abs_norms(stages) -> bool:
  """Whether :func:`abs_norm_bounds` applies: every stage's map has ``|W|``
  (:meth:`~lipjax._src.graph.Stage.rounding_abs_linear`), and a map that
  replays traced primitives also bounds the operations of its adjoint
  (``LinearRule.adjoint_terms``, for :mod:`lipjax._src.pairwise`)."""
  for st in stages:
    spec = jax.ShapeDtypeStruct((1,) + tuple(st.in_shape), st.dtype)
    if jax.eval_shape(st.rounding_abs_linear, spec) is None:
      return False
    if st.layer.replays and st.layer.adjoint_terms(st.params, st.out_shape) is None:
      return False
  return True


def abs_norm_bounds(stages) -> Optional[tuple]:
  """Per stage, :func:`_abs_norm_bound` of its layer (the last stage: 0, unused).

  ``None`` unless :func:`has_abs_norms` (which every :func:`screenable`
  network is). Used by the norm-based rounding bound (screenable
  networks) and by the rounding of the per-class-pair bound. Depends only
  on the parameters: computed once per :func:`certify` call and shared by
  every chunk and pass.
  """
  if not has_abs_norms(stages):
    return None
  return tuple(_abs_norm_bound(st) if st.activation is not None else jnp.zeros((), st.dtype)
               for st in stages)


def _norm_rounding(stages, x, eps, gn, abs_norms=None):
  """``(e, d, rho)`` of the last stage (see :func:`_margins`) from norms only.

  The float32 forward pass at any ``x'`` of ``B(x, eps)`` is bounded layer
  by layer with l2 norms instead of boxes: with ``h`` the exact and ``h~``
  the float32 input of stage ``l``, ``||h~ - h|| <= d_l``,
  ``||h(x') - h(x)|| <= r_l = eps prod_{k<l} ||W_k||`` and so
  ``||h~(x')|| <= M_l = ||h~(x)|| + r_l + 2 d_l`` (also a bound on every
  entry). The stage's own rounding is at most ``c_n (|W| |h~| + |b|)`` per
  entry (the model of :mod:`lipjax._src.rounding`), in l2 at most
  ``c_n (|| |W| || M_l + ||b||)`` plus the underflow allowance, so
  ``d_{l+1} = ||W_l|| d_l + that``; the activations are evaluated exactly
  and are 1-Lipschitz. Every quantity is rounded up with ample slack
  (``1e-3`` relative). The last layer's rounding is bounded per logit,
  ``|w_i| |h~(x')| <= |w_i| |h~(x)| + ||w_i|| (r_L + 2 d_L)``. One forward
  pass instead of the several per layer of
  :func:`lipjax._src.interpret.propagate`; neither bound is always the
  smaller, and the exact certificates keep the minimum of both
  (:func:`_tightest_rounding`). ``abs_norms``: :func:`abs_norm_bounds` of
  these stages, computed here when None.
  """
  abs_norms = abs_norm_bounds(stages) if abs_norms is None else tuple(abs_norms)
  if len(abs_norms) != len(stages):
    raise ValueError(f"abs_norms must hold {len(stages)} scalars, got {len(abs_norms)}")
  return stages.walk(_NormRounding(gn, abs_norms, x.shape[0]), (x, eps, jnp.zeros_like(eps)))


class _NormRounding(Pass):
  """The pass of :func:`_norm_rounding`: carries ``(centre, radius, error)``
  through the hidden stages and returns ``(e, d, rho)`` at the logits."""

  def __init__(self, gn, abs_norms, batch):
    self.gn, self.abs_norms, self.batch = gn, abs_norms, batch

  def join(self, block, carry, outs):
    raise ValueError("the norm-based rounding bound is for chains (see screenable)")

  def stage(self, st, carry):
    c, r, d = carry
    g, an = self.gn[st.index], self.abs_norms[st.index]
    u, v = rounding.U, rounding.operand_roundoff()
    safe = 1.0 + 1e-3
    n = interpret.fan_in(st)
    size_in = int(np.prod(st.in_shape))
    hn = per_example.l2_norm(c) * rounding.upper_factor(size_in)
    m = (hn + r + 2.0 * d + rounding.FLOOR * np.sqrt(size_in)) * safe
    coef = rounding.dot_coefficient(n + 4, v)
    bias = st.layer.bias(st.params)
    under = rounding.underflow_term(n, m)
    if st.activation is None:   # the last stage: per-logit rounding
      rows = lipschitz.row_norm_bounds(st, g).reshape(-1)
      babs = jnp.zeros_like(rows) if bias is None else jnp.abs(bias).reshape(-1)
      # Per logit, |w_i| . |h~(x')| <= |w_i| . |h~(x)| + ||w_i|| (r + 2 d).
      near = st.rounding_abs_linear(jnp.abs(c) + rounding.FLOOR).reshape(c.shape[0], -1)
      pt = near + rows[None, :] * ((r + 2.0 * d) * safe)[:, None]
      mags = jnp.minimum(rows[None, :] * m[:, None], pt * safe)
      rho = (coef * (mags + babs[None, :]) + under[:, None]) * safe
      width = int(np.prod(st.layer_in_shape))
      e = jnp.broadcast_to(d[:, None], (self.batch, width))
      return e, d, rho
    size_out = int(np.prod(st.out_shape))
    bn = (jnp.zeros(()) if bias is None else
          jnp.sqrt(jnp.sum(jnp.square(jnp.broadcast_to(bias, st.out_shape))))
          * rounding.upper_factor(size_out))
    rn = (coef * (an * m + bn) + np.sqrt(size_out) * under) * safe
    d = (g * d + rn) * safe
    r = r * g * (1.0 + 4 * u)
    c = st.activation.forward(st.act_params, st.affine(c))
    return c, r, d


def screen_arrays(model, variables, x, y, eps, global_norms, failure_probability=1e-9,
                  abs_norms=None):
  """The global certificate with the norm-based rounding bound, and a screen.

  Returns ``(cert, hopeless)``: ``cert`` is a sound global certificate
  (:func:`_norm_rounding` in place of the boxes' rounding bounds: its
  ``margin`` and ``robust_radius`` are valid, and may be smaller or larger
  than the exact certificate's), and
  ``hopeless`` ``(B,)`` marks examples for which the margin of the exact
  global certificate (``certify_arrays(bound="global")``, any float32
  evaluation of it) cannot be positive: an upper bound on it,
  ``min_i (g_iy + E_iy - R_iy)`` with the float32 gap ``g``, the rounding
  bound ``E`` and the Lipschitz term ``R`` lowered by its own rounding, is
  not positive. ``global_norms`` and ``abs_norms`` as in
  :func:`certify_arrays`.
  """
  model, variables = frontends.resolve(model, variables)
  x, eps = lipschitz.check_inputs(model, x, eps, variables)
  variables = trace_lib.cast_floating(variables, x.dtype)
  b = x.shape[0]
  stages = trace_lib.trace(model, variables, tuple(x.shape[1:]), x.dtype)
  gn = lipschitz.check_global_norms(stages, global_norms)
  logits = model.apply(variables, x)
  fwd = _norm_rounding(stages, x, eps, gn, abs_norms)
  inner, col, lip, fail, last_norm, last_global, finite_extra = _global_terms(
      stages, gn, b, failure_probability)
  cert = _finish(stages, logits, y, eps, inner, col, None, lip, fail, last_norm, last_global,
                 finite_extra, fwd, False)
  # An upper bound on the exact certificate's margin m' = g' - 2 E' - R'
  # (see the module docstring), from its own float32 gap g', rounding bound
  # E' and Lipschitz term R' >= delta: both rounding bounds are sound, so
  # |g' - g*| <= E' and |g - g*| <= E around the exact gap g*, hence
  # g' <= g + E + E' and m' <= g + E - E' - R' <= g + E - delta; its chain
  # of subtractions adds at most 6 u (|g| + R).
  u = rounding.U
  last = stages[-1]
  mat = last.layer.explicit_matrix(last.params)
  y = jnp.asarray(y, jnp.int32)
  lab = y[:, None]
  gap = jnp.take_along_axis(logits, lab, axis=1) - logits
  _, d, rho = fwd
  if mat is not None:
    m = mat.shape[1]
    a = margins.class_differences(mat, y)
    pn = jnp.sqrt(jnp.sum(jnp.square(a), axis=-1))
    an = pn * rounding.upper_factor(m + 4)
    den = pn * (1.0 + norms.ROUNDING_SLACK) * rounding.upper_factor(m + len(stages) + 8)
  else:
    m = 1
    rows = lipschitz.row_norm_bounds(last, last_global).reshape(-1)
    an = rows[None, :] + rows[y][:, None]
    den = (jnp.sqrt(2.0) * last_norm)[:, None] * (1.0 + norms.ROUNDING_SLACK) \
        * rounding.upper_factor(len(stages) + 8)
  den = jnp.broadcast_to(den, gap.shape)
  err = (an * d[:, None] * (1 + 4 * u) + rho + jnp.take_along_axis(rho, lab, axis=1)) \
      * (1 + 8 * u)
  delta = (eps * inner)[:, None] * den * (1.0 - 4 * (m + 16) * u)
  upper = gap + err - delta + 32 * u * (jnp.abs(gap) + 2 * err + jnp.abs(delta))
  other = jnp.arange(logits.shape[1])[None, :] != lab
  hopeless = jnp.min(jnp.where(other, upper, jnp.inf), axis=1) <= 0   # NaN: not hopeless
  return cert, hopeless


def falsify_arrays(model, variables, x, y, eps) -> Array:
  """``(B,)`` bools: examples a one-step l2 gradient attack proves not robust.

  From each ``x`` one step of length ``eps (1 - 1e-3)`` against the
  gradient of the margin ``z_y - max_{i != y} z_i`` gives ``x'``; an example
  is marked where the logits at ``x'``, computed in the working precision
  as users run the model, put another class strictly above ``y`` and the
  computed distance ``||x' - x||``, its float32 rounding bounded, is at
  most ``eps``. Such an ``x'`` is a counterexample: no sound certificate
  (the forward pass's rounding over the ball included) certifies the
  example, so marking it only saves the bounds' work. A NaN or inf margin
  or a zero gradient leaves an example unmarked; NaN inputs are refused
  outside ``jit``, as everywhere in the library.

  Args:
    model, variables: as in :func:`certify_arrays`.
    x: ``(B, *input_shape)`` inputs.
    y: ``(B,)`` labels.
    eps: scalar or ``(B,)`` radii.

  Returns:
    ``(B,)`` bools, True where a counterexample was found.
  """
  model, variables = frontends.resolve(model, variables)
  x, eps = lipschitz.check_inputs(model, x, eps, variables)
  y = jnp.asarray(y, jnp.int32)
  axes = tuple(range(1, x.ndim))

  def margin(z):
    own = jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
    other = jnp.where(jax.nn.one_hot(y, z.shape[1], dtype=bool), -jnp.inf, z)
    return own - jnp.max(other, axis=1)

  grad = jax.grad(lambda q: jnp.sum(margin(model.apply(variables, q))))(x)
  gnorm = jnp.sqrt(jnp.sum(jnp.square(grad), axis=axes))
  scale = eps * (1.0 - 1e-3) / jnp.where(gnorm > 0, gnorm, 1.0)
  x_adv = x - grad * scale.reshape((-1,) + (1,) * (x.ndim - 1))
  n = int(np.prod(x.shape[1:]))
  dist = jnp.sqrt(jnp.sum(jnp.square(x_adv - x), axis=axes) * rounding.upper_factor(n + 2))
  inside = dist * (1.0 + 4 * rounding.U) <= eps
  m = margin(model.apply(variables, x_adv))
  return inside & (gnorm > 0) & (m < 0) & jnp.isfinite(m)


@functools.lru_cache(maxsize=32)
def _jitted(model, bound, options_items):
  options = dict(options_items)

  return jax.jit(functools.partial(_call_plain, model, bound, options))


def _call_plain(model, bound, options, variables, norms_, x, y, eps, key):
  """One chunk; ``norms_ = (global norms, abs_norm_bounds)`` (for ``"lower"``
  the first is ``(norms, Lanczos starts)``), computed once per call."""
  gnorms, absn = norms_
  if bound == "attack":
    return falsify_arrays(model, variables, x, y, eps)
  if bound == "screen":
    return screen_arrays(model, variables, x, y, eps, gnorms, abs_norms=absn, **options)
  if bound == "lower":   # the triage's estimates from below
    gnorms, starts = gnorms
    return certify_arrays(model, variables, x, y, eps, bound="local", key=key,
                          global_norms=gnorms, abs_norms=absn, state=starts, **options)
  return certify_arrays(model, variables, x, y, eps, bound=bound, key=key,
                        global_norms=gnorms, abs_norms=absn, **options)


_NORM_CACHE: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_NORM_CACHE_SIZE = 8


def clear_caches() -> None:
  """Drops every compiled bound and certificate computation and the parameter
  norms kept across calls (``certify(..., cache=True)``)."""
  for f in (_jitted, _compiled_abs_norms, lipschitz.compiled_local, lipschitz.compiled_norms):
    f.cache_clear()
  _NORM_CACHE.clear()


def parameter_fingerprint(variables) -> Optional[bytes]:
  """A hash of every parameter's path, dtype, shape and bytes (None under tracing).

  Two parameter sets with the same fingerprint are bitwise identical (up to
  a BLAKE2b collision), so a quantity computed for one holds for the other.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  h = hashlib.blake2b(digest_size=32)
  h.update(str(treedef).encode())
  for path, leaf in leaves:
    if isinstance(leaf, jax.core.Tracer):
      return None
    a = np.ascontiguousarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.digest()


@functools.lru_cache(maxsize=32)
def _compiled_abs_norms(model, input_shape, dtype_name):
  dtype = jnp.dtype(dtype_name)

  def fn(variables):
    variables = trace_lib.cast_floating(variables, dtype)
    return abs_norm_bounds(trace_lib.trace(model, variables, input_shape, dtype))

  return jax.jit(fn)


class _ParameterNorms:
  """The per-layer global norms of one parameter set, each computed at most once.

  They depend only on the parameters (and, for a generic layer bounded by
  Lanczos, on its failure share and key), so one :func:`certify` call
  computes them once and hands them to every chunk of every pass instead of
  recomputing them per chunk. With ``cache`` they are also kept across calls,
  keyed by :func:`parameter_fingerprint` (the parameters' bytes, never their
  identity), the model and the input shape.
  """

  def __init__(self, model, variables, input_shape, key, timer, cache=False):
    self.model, self.variables, self.shape, self.key = model, variables, input_shape, key
    self.timer, self.cache = timer, cache
    stages = trace_lib.trace(model, variables, input_shape)
    self.stages = stages
    # Built-in layers have deterministic global norms: one set serves all passes.
    self.random = any(lipschitz.needs_probabilistic_global(st) for st in stages)
    self.computed = {}
    self._fingerprint = None

  def _cache_key(self, slot, keyed: Optional[bool] = None):
    if self._fingerprint is None:
      self._fingerprint = parameter_fingerprint(self.variables) or b""
    if not self._fingerprint:
      return None
    keyed = self.random if keyed is None else keyed
    key_bytes = np.asarray(jax.random.key_data(self.key)).tobytes() if keyed else b""
    return (self.model, self.shape, slot, key_bytes, self._fingerprint)

  def _memo(self, slot, keyed: Optional[bool], compute):
    """``compute()``'s result for ``slot``, computed at most once per call (and,
    with ``cache``, kept across calls in ``_NORM_CACHE``)."""
    if slot in self.computed:
      return self.computed[slot]
    ckey = self._cache_key(slot, keyed) if self.cache else None
    if ckey is not None and ckey in _NORM_CACHE:
      _NORM_CACHE.move_to_end(ckey)
      self.computed[slot] = _NORM_CACHE[ckey]
      return self.computed[slot]
    with self.timer.stage("norms", 0) as done:
      value = compute()
      done(value)
    self.computed[slot] = value
    if ckey is not None:
      _NORM_CACHE[ckey] = value
      while len(_NORM_CACHE) > _NORM_CACHE_SIZE:
        _NORM_CACHE.popitem(last=False)
    return value

  def top_vectors(self):
    """:func:`lipjax.bounds.global_top_vectors` of these parameters (the
    triage's Lanczos starts), computed at most once."""
    return self._memo(("top",), True, lambda: lipschitz.global_top_vectors(
        self.model, self.variables, input_shape=self.shape,
        key=jax.random.fold_in(self.key, 7)))

  def abs_norms(self, dtype):
    """:func:`abs_norm_bounds` of these parameters in ``dtype`` (None where
    it does not apply), computed at most once."""
    if not has_abs_norms(self.stages):
      return None
    name = jnp.dtype(dtype).name
    fn = _compiled_abs_norms(self.model, self.shape, name)
    return self._memo(("abs", name), False, lambda: fn(self.variables))

  def get(self, mode: str, dense: str = "exact", failure_probability: float = 1e-9):
    """Norms for a pass of ``mode`` (``"global"``, ``"sound"`` or ``"lower"``)."""
    delta = lipschitz.failure_share(self.stages, mode, dense, float(failure_probability))
    # A generic layer's Lanczos global norm: an upper bound for the sound
    # passes, the estimate from below for the lower pass.
    lower = mode == "lower" and self.random
    fn = lipschitz.compiled_norms(self.model, self.shape, delta, lower)
    return self._memo((delta, lower) if self.random else None, None,
                      lambda: fn(self.variables, self.key))


def _check_optional_count(name: str, value, low: int) -> None:
  """Raises one line unless ``value`` is None or an integer (not a bool) ``>= low``."""
  if value is not None and (isinstance(value, bool) or
                            not isinstance(value, (int, np.integer)) or value < low):
    raise ValueError(f"{name} must be None or an integer >= {low}, got {value!r}")


def certify(model, variables, x, y, eps, *, bound: str = "local",
            batch_size: Optional[int] = 256, key: Optional[Array] = None,
            jit: bool = True, triage: bool = True, triage_steps: int = 4,
            attack: Optional[int] = 256, cache: bool = False, screen: bool = True,
            stats: Optional[dict] = None, **options) -> Certificate:
  """Certifies ``B`` examples against l2 perturbations of size ``eps``.

  With ``bound="local"`` and ``triage`` (the default) three cheap tests run
  first, and only the examples they leave undecided get the sound local bound:

  1. a wrong prediction is not certified;
  2. an example certified by the exact global bound is certified (the local
     margin is never smaller than the global one);
  3. an example whose margin is not positive even with every per-layer norm
     replaced by an estimate from below (``local_lipschitz_bound`` with
     ``mode="lower"``, each estimate started from the layer's top singular
     vector times the example's column mask: any start gives an estimate
     from below, a good one a close estimate in few steps) is not certified,
     since the sound margin is smaller still. This test runs twice: first
     for every undecided example with one step (the Rayleigh quotient of the
     start, one application of each masked layer) and without the rounding
     bounds (``rounding=False``: smaller boxes, no rounding subtracted, so
     the margins stay above the sound ones), then for the examples left with
     ``triage_steps`` Lanczos steps and the rounding bounds. Both rounds
     bound one class pair per example with the per-pair bound (the class
     whose product-bound margin is smallest) and test that pair's margin
     alone: it is at least the sound margin, the minimum over all classes.
     Before both rounds, when at least ``attack`` examples are undecided, a
     one-step l2 gradient attack (:func:`falsify_arrays`) settles those
     with a counterexample in the ball: no sound bound certifies them.

  The triage never certifies anything the global certificate does not; it
  only saves the Lanczos runs whose outcome is known.

  Everything that depends only on the parameters (the per-layer global
  norms, with their host-side SVDs) is computed once per call and shared by
  every chunk and every pass.

  Args:
    model: a :class:`lipjax.nn.Sequential`, a Flax module or a function
      ``fn(variables, x)`` (see :mod:`lipjax._src.trace`).
    variables: its variables.
    x: ``(B, *input_shape)`` inputs.
    y: ``(B,)`` integer labels in ``[0, num_classes)``.
    eps: scalar or ``(B,)`` radii ``>= 0``.
    bound: ``"local"`` (sound local bound, default) or ``"global"`` (GloRo
      with exact global norms).
    batch_size: examples per compiled call (the last chunk is padded); None
      processes everything at once.
    key: PRNG key of the Lanczos start vectors (default ``PRNGKey(0)``); each
      chunk uses its own fold of it.
    jit: compile the per-chunk computation (default True).
    triage: ``bound="local"``: decide what the cheap tests above can decide
      without the sound local bound (see ``Certificate.local``). False runs
      the sound local bound on every example.
    triage_steps: Lanczos steps of the second round of lower estimates in
      test 3 (more steps rule out more examples and cost more each; >= 1).
    attack: the one-step attack runs before test 3 when at least this many
      examples are undecided (default 256; 0: always, None: never). It costs
      about one forward and one backward pass per example and on trained
      models settles most of the examples test 3 would rule out; for a few
      examples its compilation costs more than it saves.
    cache: keep the per-layer global norms for later calls with the same
      parameters (e.g. a sweep over ``eps``). The cache is keyed by a hash of
      the parameters' bytes (and the model, input shape and, for generic
      layers bounded by Lanczos, ``key``), so parameters that changed in any
      way, in place included, never get a stale bound; hashing costs one pass
      over the parameters. Holds the last 8 parameter sets.
    screen: the global certificate (``bound="global"``, and the first test
      of the triage) first runs a forward pass with a norm-based bound on the
      float32 rounding, and computes the exact global certificate (boxes
      over the ball, several passes per layer) only for the examples that
      screen neither certifies (its margin is sound) nor proves to have a
      non-positive exact margin. The certified set is the same as with
      ``screen=False``; examples the screen decides get its margin and
      robust radius, which are sound and at most the exact certificate's
      (that one keeps the smaller of the boxes' and the screen's rounding
      bounds, so it certifies whatever the screen does). Either way a
      robust radius returned at one
      ``eps`` is certified by a call at any smaller ``eps``. Applies to
      networks of built-in layers and activations.
    stats: optional dict, filled with the seconds and number of examples of
      each stage (``"norms"``, ``"global"`` (all examples, screen included),
      ``"global_exact"`` (the examples the screen left), ``"attack"`` (the
      one-step attack), ``"triage"`` (the first round of test 3),
      ``"triage_lanczos"`` (its second round), ``"sound"``; timing waits
      for each stage's results).
    **options: passed to :func:`lipjax.local_lipschitz_bound` (sound mode
      only: ``lanczos_steps``, ``failure_probability``, ``dense``, ...),
      except the certificate's own: ``pairwise`` (default True: the
      per-class-pair bound of :mod:`lipjax._src.pairwise` beside the
      product bound), ``pair_classes`` (default None: every class; an
      integer ``k``: only the ``k`` classes with the smallest product-bound
      margins get the pair bound, one backward pass of the network per
      class) and ``box_clip`` (default True: the last layer's box-clipped
      translation bound).

  Returns:
    A :class:`Certificate` with ``(B,)`` fields.
  """
  if options.get("mode", "sound") != "sound":
    raise ValueError("certify uses sound bounds only; estimate mode is for training")
  options.pop("mode", None)
  if "global_norms" in options:
    raise ValueError("certify computes the global norms itself; do not pass global_norms")
  model, variables = frontends.resolve(model, variables)
  if triage_steps < 1:
    raise ValueError(f"triage_steps must be >= 1, got {triage_steps}")
  _check_optional_count("attack", attack, 0)
  check_choice("bound", bound, lipschitz.BOUNDS)
  for flag in ("pairwise", "box_clip"):
    if not isinstance(options.get(flag, True), bool):
      raise ValueError(f"{flag} must be True or False, got {options[flag]!r}")
  _check_optional_count("pair_classes", options.get("pair_classes"), 1)
  if bound == "local":
    lipschitz.check_local_options(**{k: v for k, v in options.items()
                                     if k not in ("pairwise", "box_clip", "pair_classes")})
  x, eps = lipschitz.check_inputs(model, x, eps, variables)
  model = frontends.keyed(model, variables, x.shape[1:])   # caches by traced structure
  n = x.shape[0]
  num_classes = trace_lib.trace(model, variables, tuple(x.shape[1:]),
                              x.dtype)[-1].out_shape[0]
  y = check_labels(y, n, num_classes)
  key = jax.random.PRNGKey(0) if key is None else key
  timer = _Stats(stats)
  pnorms = _ParameterNorms(model, variables, tuple(x.shape[1:]), jax.random.fold_in(key, 4),
                           timer, cache=bool(cache))
  if bound == "local" and triage:
    return _certify_triaged(model, variables, pnorms, x, y, eps, batch_size, key, jit,
                            int(triage_steps), options, timer, bool(screen), attack)
  if bound == "global":
    options = {k: v for k, v in options.items() if k == "failure_probability"}
    return _global_pass(model, variables, pnorms, x, y, eps, batch_size, key, jit, options,
                        timer, bool(screen))
  gn = pnorms.get("sound", options.get("dense", "exact"),
                  options.get("failure_probability", 1e-9))
  with timer.stage("sound", n) as done:
    out = _certify_chunks(model, variables, (gn, pnorms.abs_norms(x.dtype)), x, y, eps,
                          bound, batch_size, key, jit, options)
    done(out)
  return out


class _Stats:
  """Per-stage seconds and example counts for ``certify(..., stats=...)``."""

  def __init__(self, target: Optional[dict]):
    self.target = target

  @contextlib.contextmanager
  def stage(self, name: str, count: int):
    if self.target is None:
      yield lambda result: None
      return
    start = time.perf_counter()
    yield lambda result: jax.block_until_ready(result)
    entry = self.target.setdefault(name, {"seconds": 0.0, "examples": 0})
    entry["seconds"] += time.perf_counter() - start
    entry["examples"] += int(count)


def _bucket(n: int, limit: Optional[int]) -> int:
  """Padded size of a chunk of ``n`` examples: ``8 * 2^k`` or ``12 * 2^k``, at most ``limit``.

  Subsets of any size then share a few compiled shapes, and padding wastes
  at most a third of a chunk.
  """
  size = 8
  while size < n:
    size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
  return size if limit is None else min(size, limit)


def _certify_chunks(model, variables, gnorms, x, y, eps, bound, batch_size, key, jit,
                    options, bucket=False, size=None):
  """Certifies ``x`` chunk by chunk with the compiled per-chunk function.

  Chunks hold ``batch_size`` examples, the last one padded to ``batch_size``;
  with ``bucket`` (subsets of varying size) the examples are spread evenly
  over ``ceil(n / batch_size)`` chunks, each padded to the bucket size of the
  largest (see :func:`_bucket`); ``size`` fixes the chunk size instead. Every
  chunk of a call has one shape, so one call compiles the per-chunk function
  at most once (compiling costs more than many padded examples). Padding
  repeats the last example with ``eps = 0`` and is dropped from the result.
  """
  n = x.shape[0]
  if size is not None:
    batch_size = size
  elif batch_size is None or batch_size >= n:
    batch_size = _bucket(n, batch_size) if bucket else n
  elif bucket:
    batch_size = _bucket(-(-n // -(-n // batch_size)), batch_size)
  fn = (_jitted(model, bound, tuple(sorted(options.items()))) if jit else
        functools.partial(_call_plain, model, bound, options))
  out = []
  for i, start in enumerate(range(0, n, batch_size)):
    stop = min(start + batch_size, n)
    xs, ys, es = x[start:stop], y[start:stop], eps[start:stop]
    pad = batch_size - (stop - start)
    if pad:
      xs = jnp.concatenate([xs, jnp.repeat(xs[-1:], pad, 0)])
      ys = jnp.concatenate([ys, jnp.repeat(ys[-1:], pad, 0)])
      es = jnp.concatenate([es, jnp.zeros((pad,), es.dtype)])
    res = fn(variables, gnorms, xs, ys, es, jax.random.fold_in(key, i))
    out.append(jax.tree_util.tree_map(lambda a, m=stop - start: a[:m], res))
  if len(out) == 1:
    return out[0]
  return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *out)


def _global_pass(model, variables, pnorms, x, y, eps, batch_size, key, jit, options, timer,
                 screen):
  """The exact global certificate of every example (stage ``"global"``).

  With ``screen`` (and a network :func:`screenable` covers) a forward pass
  with the norm-based rounding bound (:func:`screen_arrays`) runs first, and
  only the examples it neither certifies nor rules out get the exact
  certificate (stage ``"global_exact"``): the certified set is the exact
  certificate's (whose margin is never below the screen's); the examples
  the screen decides are reported with its (sound) margin and robust
  radius.
  """
  n = x.shape[0]
  fp = options.get("failure_probability", 1e-9)
  gn = (pnorms.get("global", failure_probability=fp), pnorms.abs_norms(x.dtype))
  opts = {"failure_probability": fp} if "failure_probability" in options else {}
  with timer.stage("global", n) as done:
    if not (screen and screenable(pnorms.stages)):
      out = _certify_chunks(model, variables, gn, x, y, eps, "global", batch_size, key, jit,
                            opts)
      done(out)
      return out
    cert, hopeless = _certify_chunks(model, variables, gn, x, y, eps, "screen", batch_size,
                                     key, jit, {"failure_probability": fp})
    hopeless = np.asarray(hopeless)
    # Ruled out: not certified (margin <= 0 already; kept so explicitly).
    cert = dataclasses.replace(cert, certified=cert.certified & ~jnp.asarray(hopeless),
                               margin=jnp.where(jnp.asarray(hopeless),
                                                jnp.minimum(cert.margin, 0.0), cert.margin))
    # Certified by the screen: so is it by the exact certificate, whose
    # rounding bound is the smaller of the screen's and the boxes'.
    idx = np.nonzero(~hopeless & ~np.asarray(cert.certified))[0]
    if idx.size:
      with timer.stage("global_exact", idx.size):
        # Bucketed chunks (a few shapes in all, compiled once each): the
        # examples left are few, and padding them to a full chunk would
        # cost up to twice their own time.
        exact = _certify_chunks(model, variables, gn, x[idx], y[idx], eps[idx], "global",
                                batch_size, key, jit, opts, bucket=True)
        ji = jnp.asarray(idx)
        cert = jax.tree_util.tree_map(lambda g, s: g.at[ji].set(s.astype(g.dtype)), cert,
                                      exact)
    done(cert)
  return cert


def _triage_rounds(steps: int):
  """``(stage, key fold, options)`` of each round of estimates from below."""
  # One pair bound per example (its most threatening class): a margin that
  # class's estimates put at or below 0 suffices, at a ninth of the pair
  # bounds' cost for ten classes.
  return (("triage", 12, dict(lanczos_steps=1, rounding=False, pair_classes=1)),
          ("triage_lanczos", 2, dict(lanczos_steps=steps, pair_classes=1)))


def _certify_triaged(model, variables, pnorms, x, y, eps, batch_size, key, jit, steps,
                     options, timer, screen, attack=None):
  glob_opts = {k: v for k, v in options.items() if k == "failure_probability"}
  glob = _global_pass(model, variables, pnorms, x, y, eps, batch_size,
                      jax.random.fold_in(key, 1), jit, glob_opts, timer, screen)
  undecided = np.asarray((glob.predicted == y) & ~glob.certified)
  idx = np.nonzero(undecided)[0]
  if attack is not None and idx.size and idx.size >= attack:
    # A counterexample in the ball settles an example for every sound bound.
    with timer.stage("attack", idx.size):
      broken = _certify_chunks(model, variables, (None, None), x[idx], y[idx], eps[idx],
                               "attack", batch_size, key, jit, {}, bucket=True)
      idx = idx[~np.asarray(broken)]
  if idx.size:
    gn_lower = pnorms.get("lower", failure_probability=options.get("failure_probability",
                                                                   1e-9))
    starts = pnorms.top_vectors()
    absn = pnorms.abs_norms(x.dtype)
    # Two rounds of estimates from below: a cheap one for every undecided
    # example (one application of each masked layer to its start vector,
    # no rounding bounds), then ``steps`` Lanczos steps with the rounding
    # bounds for those the first leaves.
    for stage, fold, extra in _triage_rounds(steps):
      if not idx.size:
        break
      lower_opts = dict(options, mode="lower", **extra)
      lower_opts.pop("dense", None)
      with timer.stage(stage, idx.size):
        low = _certify_chunks(model, variables, ((gn_lower, starts), absn), x[idx], y[idx],
                              eps[idx], "lower", batch_size, jax.random.fold_in(key, fold),
                              jit, lower_opts, bucket=True)
        # A margin that is not positive with the lower estimates cannot be
        # with the sound bound; NaN or inf stays undecided (the sound run
        # then says no).
        hopeless = np.asarray((low.margin <= 0) & jnp.isfinite(low.margin))
      idx = idx[~hopeless]
  if not idx.size:
    return glob
  gn_sound = pnorms.get("sound", options.get("dense", "exact"),
                        options.get("failure_probability", 1e-9))
  with timer.stage("sound", idx.size) as done:
    sound = _certify_chunks(model, variables, (gn_sound, pnorms.abs_norms(x.dtype)), x[idx],
                            y[idx], eps[idx], "local", batch_size, jax.random.fold_in(key, 3),
                            jit, options, bucket=True)
    ji = jnp.asarray(idx)
    out = jax.tree_util.tree_map(lambda g, s: g.at[ji].set(s.astype(g.dtype)), glob, sound)
    done(out)
  return out
