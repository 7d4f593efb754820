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

__all__ = ["class_differences", "last_layer_columns", "logit_deltas", "pair_differences",
           "pair_norms"]


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
