"""Activation-status masks on hand-set boxes: a unit is constant exactly when
its activation is constant on its box (every clipped activation, lipjax's and
the traced ones), checked against exact expected masks and against a dense
grid of the box."""

import jax.numpy as jnp
import numpy as np
import pytest

from lipjax import nn as lnn
from lipjax._src import rules
from lipjax._src.rules import maxmin, relu

INF = np.inf


def _grid_constant(act, params, lb, ub, n=101):
  """Per entry of an elementwise activation: constant on [lb, ub] (dense grid + ends)."""
  t = np.linspace(0.0, 1.0, n)[:, None]
  z = jnp.asarray(lb[None] + t * (ub - lb)[None], jnp.float32)
  out = np.asarray(act.forward(params, z))
  return np.all(out == out[:1], axis=0)


# (lb, ub, theta, expected varying)
CLIPPED_RELU = [
    (-1.0, -0.5, 1.0, 0),    # always 0
    (-1.0, 0.0, 1.0, 0),     # ub = 0: always 0
    (1.2, 3.0, 1.0, 0),      # always theta
    (1.0, 3.0, 1.0, 0),      # lb = theta: always theta
    (-1.0, 0.5, 1.0, 1),     # crosses 0
    (0.5, 2.0, 1.0, 1),      # crosses theta
    (0.2, 0.4, 1.0, 1),      # linear part
    (-1.0, 1.0, 0.0, 0),     # theta = 0: always 0 although lb < 0 < ub
    (-1.0, 1.0, -0.5, 0),    # theta < 0 (unprojected): always theta
    (0.3, 0.3, 1.0, 0),      # degenerate box
]


def test_clipped_relu_masks_are_exact():
  lb, ub, theta, want = (np.array(c, np.float32) for c in zip(*CLIPPED_RELU))
  act = rules.module_rule(lnn.ClippedReLU())   # lipjax.nn.ClippedReLU's rule
  params = {"theta": jnp.asarray(theta)}
  row, col = act.mask(params, jnp.asarray(lb), jnp.asarray(ub))
  np.testing.assert_array_equal(np.asarray(col), want)
  np.testing.assert_array_equal(np.asarray(row), want)
  np.testing.assert_array_equal(np.asarray(col) == 0,
                                _grid_constant(act, params, lb, ub))


def test_relu_and_identity_masks_are_exact():
  lb = np.array([-2.0, -1.0, 0.0, 0.5, 1.0], np.float32)
  ub = np.array([-1.0, 0.0, 1.0, 0.5, 2.0], np.float32)
  _, col = rules.module_rule(lnn.ReLU()).mask({}, jnp.asarray(lb), jnp.asarray(ub))
  np.testing.assert_array_equal(np.asarray(col), [0, 0, 1, 0, 1])
  _, col = relu.Identity().mask({}, jnp.asarray(lb), jnp.asarray(ub))
  np.testing.assert_array_equal(np.asarray(col), [1, 1, 1, 0, 1])


def test_traced_clamp_masks_are_exact():
  lb = np.array([-1.0, -1.0, 2.0, 0.0, -1.0, -3.0], np.float32)
  ub = np.array([1.0, -0.5, 3.0, 0.5, 1.0, 3.0], np.float32)
  lower = np.array([0.0, 0.0, 0.0, 0.0, 0.5, -INF], np.float32)
  upper = np.array([0.0, 1.0, 1.0, 1.0, 0.2, INF], np.float32)   # 1st: empty range; 5th: upper < lower
  act = relu.Clamp()
  params = {"lower": jnp.asarray(lower), "upper": jnp.asarray(upper)}
  _, col = act.mask(params, jnp.asarray(lb), jnp.asarray(ub))
  np.testing.assert_array_equal(np.asarray(col), [0, 0, 0, 1, 0, 1])
  np.testing.assert_array_equal(np.asarray(col) == 0, _grid_constant(act, params, lb, ub))


def test_nan_bounds_count_as_varying():
  nan = jnp.asarray([np.nan], jnp.float32)
  one = jnp.ones((1,), jnp.float32)
  for act, params in [(relu.ReLU(), {}), (relu.ClippedReLU(), {"theta": one}),
                      (relu.Clamp(), {"lower": 0 * one, "upper": one})]:
    _, col = act.mask(params, nan, one)
    assert float(col[0]) == 1.0
    _, col = act.mask(params, -one, nan)
    assert float(col[0]) == 1.0


@pytest.mark.parametrize("traced", [False, True])
def test_maxmin_masks_are_exact(traced):
  # Pairs (a_k, b_k) on channels k and k + 3.
  la = np.array([2.0, -1.0, -3.0], np.float32)
  ua = np.array([3.0, 1.0, -2.0], np.float32)
  lb = np.array([-1.0, -1.0, -3.0], np.float32)
  ub = np.array([0.5, 1.0, -2.5], np.float32)
  low, upp = np.concatenate([la, lb]), np.concatenate([ua, ub])
  if traced:
    act = maxmin.PairMaxMin(max_first=True)
    # The max part is clipped from above at 1 (pair 0: max >= 2, constant),
    # the min part from below at -1 (pair 2: min <= -2.5, constant); pair 1's
    # max part has an empty clamp range (max_upper <= max_lower): constant.
    params = {"max_lower": jnp.asarray([-INF, 0.5, -INF], jnp.float32),
              "max_upper": jnp.asarray([1.0, 0.5, 1.0], jnp.float32),
              "min_lower": jnp.asarray([-1.0, -1.0, -1.0], jnp.float32),
              "min_upper": jnp.asarray([INF, INF, INF], jnp.float32)}
    want_col = [0, 0, 1, 1, 1, 0]
  else:
    act = rules.module_rule(lnn.ClippedMaxMin())
    params = {"upper": jnp.asarray([1.0, 1.0, 1.0], jnp.float32),
              "lower": jnp.asarray([-1.0, -1.0, -1.0], jnp.float32)}
    want_col = [0, 1, 1, 1, 1, 0]
  row, col = act.mask(params, jnp.asarray(low), jnp.asarray(upp))
  np.testing.assert_array_equal(np.asarray(col), want_col)
  pair = np.maximum(np.array(want_col[:3]), np.array(want_col[3:]))
  np.testing.assert_array_equal(np.asarray(row), np.concatenate([pair, pair]))
  # Against a grid of the box: an output is constant exactly when flagged.
  g = np.linspace(0.0, 1.0, 41)
  a = la[None, None] + g[:, None, None] * (ua - la)[None, None]
  b = lb[None, None] + g[None, :, None] * (ub - lb)[None, None]
  a, b = np.broadcast_arrays(a, b)
  z = jnp.asarray(np.concatenate([a, b], axis=-1).reshape(-1, 6))
  out = np.asarray(act.forward(params, z))
  constant = np.all(out == out[:1], axis=0)
  np.testing.assert_array_equal(constant, np.asarray(col) == 0)
