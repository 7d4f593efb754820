"""The shared margin maths (lipjax._src.margins) on hand-set cases."""

import jax
import jax.numpy as jnp
import numpy as np

import lipjax
from lipjax import nn as lnn
from lipjax._src import margins
from lipjax._src import trace as trace_lib
from lipjax.training import losses

MAT = jnp.asarray([[1.0, 2.0, 0.0],
                   [0.0, -1.0, 3.0],
                   [2.0, 2.0, 2.0]])


def test_pair_differences_and_norms_by_hand():
  col = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
  labels = jnp.asarray([0, 2])
  diff = np.asarray(margins.pair_differences(MAT, col, labels))
  # Example 0, label 0: w_i - w_0.
  np.testing.assert_array_equal(diff[0], [[0, 0, 0], [-1, -3, 3], [1, 0, 2]])
  # Example 1, label 2, middle column masked: (w_i - w_2) * [1, 0, 1].
  np.testing.assert_array_equal(diff[1], [[-1, 0, -2], [-2, 0, 1], [0, 0, 0]])
  pn = np.asarray(margins.pair_norms(MAT, col, labels))
  np.testing.assert_allclose(pn, [[0, np.sqrt(19), np.sqrt(5)], [np.sqrt(5), np.sqrt(5), 0]],
                             rtol=1e-6)
  deltas = np.asarray(margins.logit_deltas(jnp.asarray([0.5, 2.0]), jnp.asarray([3.0, 1.0]),
                                           jnp.asarray(pn)))
  np.testing.assert_allclose(deltas, pn * np.asarray([[1.5], [2.0]]), rtol=1e-6)


def test_pair_norms_gradient_is_finite_at_the_label_row():
  col = jnp.ones((1, 3))
  g = jax.grad(lambda m: jnp.sum(margins.pair_norms(m, col, jnp.asarray([1]))))(MAT)
  assert np.all(np.isfinite(np.asarray(g)))
  # d/dW of ||w_0 - w_1|| + ||w_2 - w_1||: unit vectors, summed on row 1.
  u0 = (MAT[0] - MAT[1]) / jnp.linalg.norm(MAT[0] - MAT[1])
  u2 = (MAT[2] - MAT[1]) / jnp.linalg.norm(MAT[2] - MAT[1])
  np.testing.assert_allclose(np.asarray(g), np.asarray(jnp.stack([u0, -u0 - u2, u2])),
                             rtol=1e-5, atol=1e-6)


def _model():
  return lnn.Sequential((lnn.Dense(6), lnn.ReLU(), lnn.Dense(5), lnn.ClippedReLU(1.0),
                         lnn.Dense(3)), input_shape=(4,))


def test_last_layer_columns_are_the_penultimate_varying_mask():
  model = _model()
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
  x = jax.random.normal(jax.random.PRNGKey(1), (7, 4))
  lb = lipjax.local_lipschitz_bound(model, v, x, 0.05)
  stages = trace_lib.trace(model, v, (4,))
  col = np.asarray(margins.last_layer_columns(stages, lb.layers, 7))
  assert col.shape == (7, 5)
  # Varying entries of the clipped ReLU (theta 1): its pre-activation box is
  # neither below 0 nor above 1 (recomputed here from the boxes).
  lo, hi = np.asarray(lb.layers[1].lower), np.asarray(lb.layers[1].upper)
  np.testing.assert_array_equal(col, ~((hi <= 0.0) | (lo >= 1.0)))
  assert 0 < col.sum() < col.size   # some masked, some not: the check can fail
  one = lnn.Sequential((lnn.Dense(3),), input_shape=(4,))
  v1 = one.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
  lb1 = lipjax.local_lipschitz_bound(one, v1, x, 0.05)
  st1 = trace_lib.trace(one, v1, (4,))
  np.testing.assert_array_equal(margins.last_layer_columns(st1, lb1.layers, 7), np.ones((7, 4)))


def test_training_deltas_are_eps_times_inner_times_masked_pair_norms():
  model = _model()
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
  x = jax.random.normal(jax.random.PRNGKey(1), (7, 4))
  y = jnp.asarray([0, 1, 2, 0, 1, 2, 0])
  _, deltas, aux = losses.worst_case_deltas(model, v, x, y, 0.3, bound="local", iterations=5)
  lb = aux["local_bound"]
  stages = trace_lib.trace(model, v, (4,))
  inner = np.asarray(lb.layer_norms[0]) * np.asarray(lb.layer_norms[1])
  mat = np.asarray(stages[-1].layer.explicit_matrix(stages[-1].params))
  col = np.asarray(lb.layers[1].col_mask)
  expect = np.zeros((7, 3))
  for b in range(7):
    for i in range(3):
      expect[b, i] = 0.3 * inner[b] * np.linalg.norm((mat[i] - mat[int(y[b])]) * col[b])
  np.testing.assert_allclose(np.asarray(deltas), expect, rtol=2e-5, atol=1e-7)
