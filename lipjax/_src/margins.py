"""Margin maths shared by certificates and training losses.

With the last layer ``z = W h + b`` (``W`` of shape ``(C, m)``), a bound ``K``
on the Lipschitz constant of ``h`` over the ball and a column mask ``D`` of
the entries of ``h`` that can vary there, the logit gap against class ``i``
moves by at most ``eps K ||D (w_i - w_y)||_2`` (the paper's Delta_iy). These
functions compute the pieces; :mod:`lipjax._src.certify` adds rounding
bounds for a certificate, :mod:`lipjax.training.losses` feeds the deltas to
the GloRo and BCP losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lipjax._src import interpret, per_example

Array = jax.Array

__all__ = ["box_ball_support", "class_differences", "last_layer_columns", "logit_deltas",
           "pair_differences", "pair_norms", "support_terms"]


def class_differences(mat: Array, labels: Array) -> Array:
  """``(B, C, m)`` rows ``w_i - w_{labels_b}`` of the ``(C, m)`` last-layer matrix."""
  return mat[None, :, :] - mat[labels][:, None, :]


def pair_differences(mat: Array, col: Array, labels: Array) -> Array:
  """``(B, C, m)`` rows ``D_b (w_i - w_{labels_b})``.

  Args:
    mat: ``(C, m)`` last-layer matrix.
    col: ``(B, m)`` 0/1 column mask (ones: no mask).
    labels: ``(B,)`` integer classes.
  """
  return class_differences(mat, labels) * col[:, None, :]


def pair_norms(mat: Array, col: Array, labels: Array) -> Array:
  """``(B, C)`` norms ``||D_b (w_i - w_{labels_b})||_2`` (0 for ``i = labels_b``).

  Differentiable everywhere: the gradient at a zero row is 0, not NaN.
  """
  return per_example.safe_sqrt(jnp.sum(jnp.square(pair_differences(mat, col, labels)),
                                        axis=-1))


def logit_deltas(eps: Array, inner: Array, norms: Array) -> Array:
  """``(B, C)`` bounds ``eps_b K_b ||D_b (w_i - w_y)||`` on the gaps' change.

  Args:
    eps: ``(B,)`` radii.
    inner: ``(B,)`` Lipschitz bound of the network below the last layer.
    norms: ``(B, C)`` from :func:`pair_norms`.
  """
  return (eps * inner)[:, None] * norms


def last_layer_columns(stages, layers: list, batch: int) -> Array:
  """``(B, m)`` 0/1 mask of the last layer's inputs that vary over the ball.

  Args:
    stages: the graph of :func:`lipjax._src.trace.trace`.
    layers: per-stage :class:`lipjax._src.interpret.LayerBounds` (e.g.
      ``LocalBound.layers``); ones when the network has a single stage.
    batch: ``B``.
  """
  last = stages[-1]
  if len(layers) < 2:
    return jnp.ones((batch, int(np.prod(last.layer_in_shape))))
  prev: interpret.LayerBounds = layers[-2]
  return last.layer_input(prev.col_mask).reshape(batch, -1)


def box_ball_support(a: Array, lower: Array, upper: Array, radius: Array):
  """Largest ``a . delta`` over ``||delta||_2 <= radius``, ``lower <= delta <= upper``.

  The last layer's box-clipped translation (BCP): ``delta`` is how far the
  penultimate activation moves inside the ball, known to lie both within
  ``radius`` of the centre (the Lipschitz bound) and inside the interval box.
  For ``lower <= 0 <= upper`` the maximiser is ``clip(lam a, lower, upper)``
  with the ``lam >= 0`` at which its norm reaches ``radius`` (or every entry
  clipped); ``lam`` is found exactly from the sorted breakpoints
  ``|corner_j / a_j|``, no iteration. The value returned is the dual bound

    ``radius ||a - nu||_2 + sum_j max(nu_j lower_j, nu_j upper_j)``

  with the optimal multiplier ``nu = a - clip(a, lower / lam, upper / lam)``.
  In exact arithmetic it equals the maximum, and *any* ``nu`` makes it an
  upper bound (weak duality), which is what a rigorous evaluation uses
  (``nu`` is returned for that; it carries no gradient). Gradients flow
  through ``a``, the box and ``radius``.

  Args:
    a: ``(..., m)`` directions (last-layer row differences).
    lower, upper: ``(..., m)`` box of ``delta`` (``lower <= 0 <= upper``),
      broadcast against ``a``.
    radius: ``(...)`` ball radii ``>= 0``.

  Returns:
    ``(value (...), nu (..., m))``; ``value <= radius ||a||`` and at most the
    box's own maximum ``sum_j max(a_j lower_j, a_j upper_j)``, up to rounding.
  """
  lower, upper = jnp.broadcast_to(lower, a.shape), jnp.broadcast_to(upper, a.shape)
  nu = jax.lax.stop_gradient(_support_multiplier(a, lower, upper, radius))
  rest = per_example.safe_sqrt(jnp.sum(jnp.square(a - nu), axis=-1))
  return radius * rest + jnp.sum(support_terms(nu, lower, upper), axis=-1), nu


def support_terms(nu: Array, lower: Array, upper: Array) -> Array:
  """``max(nu_j lower_j, nu_j upper_j)``, 0 where ``nu_j = 0`` (also for an
  infinite face, where the product would be NaN)."""
  return jnp.where(nu != 0, jnp.maximum(nu * lower, nu * upper), 0.0)


def _support_multiplier(a, lower, upper, radius):
  """The dual multiplier ``nu`` of :func:`box_ball_support` (no gradient)."""
  corner = jnp.where(a > 0, upper, lower)            # where clipping stops entry j
  absa, absc = jnp.abs(a), jnp.abs(corner)
  brk = jnp.where(absa > 0, absc / jnp.where(absa > 0, absa, 1.0), jnp.inf)
  order = jnp.argsort(brk, axis=-1)
  t = jnp.take_along_axis(brk, order, axis=-1)
  a2 = jnp.take_along_axis(jnp.square(absa), order, axis=-1)
  c2 = jnp.take_along_axis(jnp.square(absc), order, axis=-1)
  clipped_sq = jnp.cumsum(c2, axis=-1)                 # entries 1..k at their corners
  # Entries k+1..m free (a suffix sum: no cancellation when sizes vary widely).
  suffix = jnp.flip(jnp.cumsum(jnp.flip(a2, -1), axis=-1), -1)
  free_sq = jnp.concatenate([suffix[..., 1:], jnp.zeros_like(suffix[..., :1])], axis=-1)
  # Squared norm of the maximiser at lam = t_k; non-decreasing in k.
  at_break = jnp.where(jnp.isfinite(t), clipped_sq + jnp.square(jnp.where(
      jnp.isfinite(t), t, 0.0)) * free_sq, jnp.inf)
  r2 = jnp.square(radius)[..., None]
  k = jnp.sum(at_break <= r2, axis=-1, keepdims=True)  # breakpoints passed
  idx = jnp.maximum(k - 1, 0)
  c_k = jnp.where(k > 0, jnp.take_along_axis(clipped_sq, idx, axis=-1), 0.0)
  f_k = jnp.where(k > 0, jnp.take_along_axis(free_sq, idx, axis=-1),
                  suffix[..., :1])
  lam2 = jnp.maximum(r2 - c_k, 0.0) / jnp.where(f_k > 0, f_k, 1.0)
  lam = jnp.where(f_k > 0, jnp.sqrt(lam2), jnp.inf)    # (..., 1); inf: all clipped
  clipped = brk < lam
  safe = jnp.where(jnp.isfinite(lam) & (lam > 0), lam, 1.0)
  return jnp.where(clipped, jnp.where(jnp.isfinite(lam), a - corner / safe, a), 0.0)
