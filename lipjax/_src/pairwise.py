"""Per-class-pair local Lipschitz bounds from the linearised midpoint network.

The product of per-layer norms bounds the Jacobian of a chain
``J = A_{L-1} D_{L-2} A_{L-2} ... D_0 A_0`` by ``prod_l ||D_l A_l D_{l-1}||``
and so loses every alignment between layers. This module bounds, for the
margin ``g = z_i - z_y`` of one class pair (``c = e_i - e_y``), the norm of
``c^T J`` over every Jacobian the ball allows, by splitting each activation's
slopes into a fixed midpoint and a bounded remainder.

Slopes. On its pre-activation box an elementwise activation unit is
*constant* (slope 0: the masks), *stably active* (slope 1 on the whole box,
e.g. a clipped ReLU with ``lb >= 0`` and ``ub <= theta``) or *unstable*
(slopes in ``[0, 1]``): the activation's rule says which
(:meth:`~lipjax._src.rules.base.ActivationRule.active`). So ``D_k = M_k + Delta_k`` with the midpoint
``M_k`` (0, 1 or 1/2) and ``|Delta_k| <= r_k`` elementwise (``r_k`` = 1/2 on
the unstable units, 0 elsewhere). Any other 1-Lipschitz activation (MaxMin,
registered ones) gets ``M_k = 0`` and a remainder of norm at most 1 on its
varying units.

Bound. ``J`` is multilinear in the slopes, so telescoping over the layers
(the last one whose slopes differ from the midpoint) gives, exactly,

  ``c^T J = c^T T + sum_k (v_k * delta_k)^T J_{<k}``

with ``T`` the midpoint network's (linear) Jacobian, ``v_k`` the cotangent
of ``c`` pulled back through the midpoint layers above activation ``k``, and
``J_{<k}`` the Jacobian from the input to pre-activation ``k`` at a point of
the ball. Hence

  ``||c^T J|| <= ||c^T T|| + sum_k ||v_k * r_k||_2 * U_k``

with ``U_k >= ||P_k J_{<k}||`` over the ball (``P_k``: the varying rows of
layer ``k``), here ``prod_{l <= k} s_l`` with the per-layer local norms
``s_l >= ||D^r_l A_l D^c_{l-1}||`` of the product bound. ``||c^T T||`` and
every ``v_k`` come from one backward pass of ``c`` through the midpoint
network (exact vector norms, no power method); with every unit stable the
bound is the exact norm of the margin's gradient, and with every unit
unstable it is still below the product bound's ``||D (w_i - w_y)|| prod s``
up to the alignment it gains.

Sound mode bounds the float32 rounding of that backward pass (each
transposed layer: ``gamma_n || |A| || ||w||`` per application, carried
through the layers by the local norms) and rounds every sum and product up.
Blocks. The Jacobian of a network with residual blocks is a sum over the
graph's paths, still affine in each activation's slopes, so the same
telescoping holds with the activations in walk order: ``v_k`` is the
midpoint network's cotangent at activation ``k``'s output (one backward
walk of the graph: a block's join hands its cotangent to every path, an
identity path included, and the block's input sums them), and ``U_k``
bounds the Jacobian from the input to ``k``'s pre-activation, the product
bound along the graph (a block's join: the sum of its paths' prefixes). A
post-join activation takes its slopes from the join's box
(:class:`~lipjax._src.interpret.JoinBounds`, recorded by the same
propagation as the stages' boxes). The identity before a join has slope 1
everywhere. In sound mode the rounding of the paths' sum is bounded too,
and a replayed traced map (a LiResNet block ``h + conv(h)``) bounds the
operations of its transpose (``LinearRule.adjoint_terms``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lipjax._src import per_example, rounding
from lipjax._src.graph import Block, Graph, Pass, Stage, last_stage
from lipjax._src.interpret import JoinBounds, LayerBounds

Array = jax.Array

__all__ = ["midpoint_slopes", "pair_bounds", "supports"]


def supports(stages) -> bool:
  """Whether :func:`pair_bounds` applies: the last layer has an explicit
  matrix, and every block joins its paths with a rule that has a transpose
  (a residual sum: each path receives the join's cotangent)."""
  for block in getattr(stages, "blocks", ()):
    if block.combine.transpose(jnp.zeros((1,)), len(block.paths)) is None:
      return False
  return stages[-1].layer.explicit_matrix(stages[-1].params) is not None


def midpoint_slopes(stage: Stage, bounds: LayerBounds) -> Tuple[Array, Array, bool]:
  """Midpoint slopes and their radius for one hidden stage's activation.

  Args:
    stage: a hidden stage (with an activation).
    bounds: its :class:`~lipjax._src.interpret.LayerBounds` (pre-activation
      box and masks).

  Returns:
    ``(mid, rad, elementwise)``: ``(B, *out)`` arrays. For elementwise
    activations with slopes in ``[0, 1]`` (those whose rule answers
    :meth:`~lipjax._src.rules.base.ActivationRule.active`: ReLU, clipped
    ReLU, clamps, identity): ``mid`` is 0 on constant units, 1 on stably active ones and
    1/2 on the others, where ``rad`` is 1/2 (0 elsewhere). Otherwise
    ``mid = 0`` and ``rad`` is the column mask (a remainder of norm <= 1 on
    the varying outputs). NaN bounds make a unit unstable.
  """
  return _slopes(stage.activation, stage.act_params, bounds.lower, bounds.upper,
                 bounds.col_mask)


def _slopes(rule, params, lower, upper, col):
  """:func:`midpoint_slopes` of one activation rule on the box ``[lower, upper]``."""
  if getattr(rule, "linear", False):   # the identity: slope 1 everywhere
    return jnp.ones_like(col), jnp.zeros_like(col), True
  active = rule.active(params, lower, upper)
  if active is None:
    return jnp.zeros_like(col), col, False
  varying = col > 0
  stable = varying & active
  unstable = varying & ~active
  dtype = col.dtype
  mid = jnp.where(stable, 1.0, jnp.where(unstable, 0.5, 0.0)).astype(dtype)
  rad = jnp.where(unstable, 0.5, 0.0).astype(dtype)
  return mid, rad, True


def _flat_norm(v: Array) -> Array:
  return per_example.l2_norm(v)


class _Prefix(Pass):
  """Per activation, a bound on the norm of the Jacobian from the input to
  its pre-activation over the ball (the product bound's prefix)."""

  def __init__(self, factors):
    self.factors = factors
    self.stage_prefix = {}
    self.join_prefix = {}

  def stage(self, st, carry):
    p = self.factors[st.index] if carry is None else carry * self.factors[st.index]
    self.stage_prefix[st.index] = p
    return p

  def join(self, block, carry, outs):
    one = 1.0 if carry is None else carry
    p = block.combine.lipschitz([one if o is None else o for o in outs])
    self.join_prefix[id(block)] = p
    return p


class _Sources(Pass):
  """Per stage, the stage whose ``col_mask`` is its input's column mask
  (None for the network input)."""

  def __init__(self):
    self.source = {}

  def stage(self, st, carry):
    self.source[st.index] = carry
    return st.index

  def join(self, block, carry, outs):
    # interpret writes the block's column mask into each path's last stage.
    del outs
    for path in block.paths:
      last = last_stage(path)
      if last is not None:
        return last.index
    return carry


def pair_bounds(stages, layers: Sequence[LayerBounds],
                layer_norms: Sequence[Array], labels: Array, *, sound: bool = True,
                abs_norms: Optional[Sequence[Array]] = None,
                norm_layers: Optional[Sequence[LayerBounds]] = None,
                global_norms: Optional[Sequence[Array]] = None,
                joins: Optional[Sequence[JoinBounds]] = None,
                classes: Optional[Array] = None) -> Optional[Array]:
  """``(B, C)`` bounds on the local Lipschitz constant of ``z_i - z_{labels}``.

  Args:
    stages: the :class:`~lipjax._src.graph.Graph` from
      :func:`lipjax._src.trace.trace` (see :func:`supports`; otherwise None
      is returned).
    layers: per stage, the :class:`~lipjax._src.interpret.LayerBounds` of
      the ball (sound boxes in sound mode).
    layer_norms: per stage, ``(B,)`` or scalar bounds ``s_l`` on
      ``||D^r_l A_l D^c_{l-1}||`` (the product bound's factors; only the
      hidden stages' are used), with the masks of ``layers`` or, when given,
      of ``norm_layers``.
    labels: ``(B,)`` integer classes ``y``.
    sound: True: every float32 rounding of the computation is bounded and
      the result rounded up (needs ``abs_norms``, and ``global_norms`` for a
      network with blocks). False (estimates for training and triage): the
      plain float computation, differentiable with respect to the parameters
      (the slopes are constants).
    abs_norms: sound mode, per hidden stage, a rigorous bound on
      ``|| |A_l| ||_2`` (e.g. :func:`lipjax._src.certify.abs_norm_bounds`;
      the last stage's entry is not used).
    norm_layers: the :class:`~lipjax._src.interpret.LayerBounds` whose
      masks ``layer_norms`` hold under, when they are not those of
      ``layers`` (e.g. the local bound's own boxes, while ``layers`` are
      boxes from the global norms). A layer's norm then serves an example
      only where its row and column masks keep every unit that ``layers``
      keeps; elsewhere ``global_norms`` (required with ``norm_layers``)
      stand in, valid for any rows and columns.
    global_norms: per stage, scalar bounds on ``||A_l||``.
    joins: for a network with blocks, the blocks'
      :class:`~lipjax._src.interpret.JoinBounds` from the same propagation
      as ``layers`` (in the order of ``stages.blocks``); without them such
      a network gets None.

  Returns:
    ``(B, C)`` with 0 at ``labels``; in sound mode an upper bound on the
    Lipschitz constant of the exact ``z_i - z_y`` over the ball, given that
    the boxes contain the exact pre-activations and ``layer_norms`` are
    upper bounds. NaN where anything is not finite. None for networks
    :func:`supports` rejects.
  """
  if not isinstance(stages, Graph):
    stages = Graph(stages)
  if not supports(stages):
    return None
  blocks = stages.blocks
  if blocks and (joins is None or len(joins) != len(blocks)):
    return None
  if sound and abs_norms is None:
    raise ValueError("sound pair bounds need abs_norms (bounds on || |A| ||)")
  if sound and blocks and global_norms is None:
    raise ValueError("sound pair bounds of a network with blocks need global_norms")
  last = stages[-1]
  b = labels.shape[0]
  c = int(last.out_shape[0])
  dtype = last.dtype
  u = rounding.U
  v_op = rounding.operand_roundoff() if sound else 0.0
  onehot = jax.nn.one_hot(labels, c, dtype=dtype)
  if classes is None:
    classes = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
  classes = jnp.asarray(classes, jnp.int32)
  k_pairs = int(classes.shape[1])
  # Cotangents e_i - e_y for each class i of ``classes``, as B * k examples.
  cot = (jax.nn.one_hot(classes, c, dtype=dtype) - onehot[:, None, :]).reshape(b * k_pairs, c)

  def per_pair(a):   # (B,) or (B, *shape) -> (B * k, *shape)
    a = jnp.asarray(a)
    if a.ndim == 0:
      return a
    return jnp.repeat(a, k_pairs, axis=0)

  v = last.adjoint(cot)                                  # cotangent at the last input
  err = jnp.zeros((b * k_pairs,), dtype)
  if sound:
    # fl(W^T (e_i - e_y)): entry j sums two nonzero products, w_ij - w_yj, so
    # it errs by at most coef (|w_ij| + |w_yj|): in l2, coef (||w_i|| + ||w_y||).
    mat = last.layer.explicit_matrix(last.params)
    rows = jnp.sqrt(jnp.sum(jnp.square(mat), axis=1)) * rounding.upper_factor(mat.shape[1])
    pair_rows = rows[classes] + rows[labels][:, None]                   # (B, k)
    err = (rounding.dot_coefficient(c, v_op) * pair_rows.reshape(b * k_pairs)
           + rounding.underflow_term(c, 1.0) * np.sqrt(mat.shape[1]))
  hidden = len(stages) - 1
  factors = [jnp.asarray(n, dtype) for n in layer_norms[:hidden]]
  if norm_layers is not None:
    if global_norms is None:
      raise ValueError("norm_layers needs global_norms")
    # A norm under masks M' bounds the map under masks M only where M <= M'.
    def within(a, bnd):
      return jnp.all((a.reshape(b, -1) <= bnd.reshape(b, -1)), axis=1)
    sources = _Sources()
    stages.walk(sources, None, upto_logits=False)
    def cols_in(k):
      j = sources.source[k]
      if j is None:
        return jnp.ones((b,), bool)
      return within(layers[j].col_mask, norm_layers[j].col_mask)
    factors = [jnp.where(within(lb.row_mask, nl.row_mask) & cols_in(k), f,
                         jnp.asarray(global_norms[k], dtype))
               for k, (f, lb, nl) in enumerate(zip(factors, layers[:hidden],
                                                   norm_layers[:hidden]))]
  prefix = _Prefix(factors)
  stages.walk(prefix, None, upto_logits=False)
  join_of = {id(bl): jb for bl, jb in zip(blocks, joins or ())}
  terms = []

  def term(v, rad, err, pre):
    """The remainder's term of one activation: ``||v * r|| U`` (rounded)."""
    size = int(np.prod(v.shape[1:]))
    t = _flat_norm(v * rad)
    if sound:
      # ||v * r|| <= ||v~ * r|| + max(r) ||v~ - v||, r <= 1.
      t = t * rounding.upper_factor(size) + err
    terms.append(t * per_pair(pre))

  def back_stage(st, v, err):
    """From the cotangent at ``st``'s activation output to its input's."""
    k = st.index
    mid, rad, _ = midpoint_slopes(st, layers[k])
    if not getattr(st.activation, "linear", False):
      term(v, per_pair(rad), err, prefix.stage_prefix[k])
    size = int(np.prod(v.shape[1:]))
    w = v * per_pair(mid)
    v = st.adjoint(w)
    if sound:
      n_out = int(np.prod(st.out_shape))
      if st.layer.replays:   # the transpose of a replayed program
        n_out = int(st.layer.adjoint_terms(st.params, st.out_shape))
      w_norm = _flat_norm(w) * rounding.upper_factor(size)
      # The error carried on the units the next slopes keep: the local norm
      # covers it where ``w`` lives on this layer's varying rows (the slopes
      # of a nonlinear activation); the identity's may reach any row.
      carry = (jnp.asarray(global_norms[k], dtype) if getattr(st.activation, "linear", False)
               else per_pair(factors[k]))
      err = (carry * err
             + rounding.dot_coefficient(n_out, v_op) * jnp.asarray(abs_norms[k], dtype)
             * w_norm + rounding.underflow_term(n_out, w_norm) + size * 2.0 ** -149)
      err = err * (1.0 + 8 * u)   # the products and sums just computed
    return v, err

  def back_block(block, v, err):
    """From the cotangent at the block's output to its input's."""
    if block.activation is not None:
      jb = join_of[id(block)]
      mid, rad, _ = _slopes(block.activation, block.act_params, jb.lower, jb.upper,
                            jb.col_mask)
      if not getattr(block.activation, "linear", False):
        term(v, per_pair(rad), err, prefix.join_prefix[id(block)])
      v = v * per_pair(mid)
      if sound:
        err = err + int(np.prod(v.shape[1:])) * 2.0 ** -149
    outs = [back_items(path, w, err)
            for path, w in zip(block.paths, block.combine.transpose(v, len(block.paths)))]
    v_in = outs[0][0]
    for o, _ in outs[1:]:
      v_in = v_in + o
    e_in = outs[0][1]
    for _, e in outs[1:]:
      e_in = e_in + e
    if sound:
      # The float32 sum of the paths' cotangents: at most gamma_m sum |v_p|.
      size = int(np.prod(v_in.shape[1:]))
      mags = sum(_flat_norm(o) for o, _ in outs) * rounding.upper_factor(size)
      e_in = (e_in + rounding.dot_coefficient(len(outs), 0.0) * mags) * (1.0 + 8 * u)
    return v_in, e_in

  def back_items(items, v, err):
    for item in reversed(items):
      if isinstance(item, Block):
        v, err = back_block(item, v, err)
      else:
        v, err = back_stage(item, v, err)
    return v, err

  v, err = back_items(stages.items[:-1], v, err)
  size = int(np.prod(v.shape[1:]))
  head = _flat_norm(v)
  if sound:
    head = head * rounding.upper_factor(size) + err
  total = jnp.zeros((b * k_pairs,), dtype)
  for t in terms:
    total = total + t
  out = head + total
  if sound:
    # Sums and products of nonnegative terms: the prefixes (a product per
    # stage, a sum and a product per block), the terms and their sum.
    out = out * rounding.upper_factor(2 * len(stages) + 4 * len(blocks) + 8)
  out = out.reshape(b, k_pairs)
  full = jnp.full((b, c), jnp.inf, dtype)
  full = full.at[jnp.arange(b)[:, None], classes].set(out)
  return jnp.where(onehot > 0, 0.0, full)
