"""The leaky ReLU rule (the worked example of CONTRIBUTING.md), against exact values
and independent truth.

Hand-set boxes with exact expected output boxes, masks and error bounds;
sampled points of random boxes inside the interval rule's boxes; and
networks written with ``jax.nn.leaky_relu``, ``jnp.where`` and
``jnp.maximum`` bounded soundly (float64 SVDs of exact Jacobians at points of
the ball, a float64 forward pass for the rounding bound, PGD on certified
points).
"""

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lipjax
from lipjax._src import rounding
from lipjax._src import trace as trace_lib
from lipjax._src.rules.leaky_relu import LeakyReLU

import _bounds_util as U
from test_flax_models import CLASSES, SHAPE, _flatten, _jacobian_norms, _pgd, _random_variables

B = 3


def test_leaky_relu_boxes_masks_and_errors_on_hand_set_cases():
  act = LeakyReLU()
  params = {"slope": jnp.full((4,), 0.25, jnp.float32)}
  lb = jnp.asarray([-4.0, -2.0, 1.0, 0.0], jnp.float32)
  ub = jnp.asarray([-2.0, 2.0, 3.0, 0.0], jnp.float32)
  lo, hi = act.interval(params, lb, ub)
  want_lo, want_hi = np.float32([-1.0, -0.5, 1.0, 0.0]), np.float32([-0.5, 2.0, 3.0, 0.0])
  # Exact values, widened by one float32 rounding (3u |t| + 2^-124).
  slack = lambda t: 3 * rounding.U * np.abs(t) + 2.0 ** -124   # noqa: E731
  np.testing.assert_allclose(np.asarray(lo), want_lo - slack(want_lo), rtol=0, atol=1e-12)
  np.testing.assert_allclose(np.asarray(hi), want_hi + slack(want_hi), rtol=0, atol=1e-12)
  row, col = act.mask(params, lb, ub)
  np.testing.assert_array_equal(col, [1, 1, 1, 1])   # never constant (a product rounds)
  np.testing.assert_array_equal(row, col)
  z = jnp.asarray([-3.0, -0.5, 0.0, 2.0], jnp.float32)
  np.testing.assert_array_equal(act.forward(params, z), jax.nn.leaky_relu(z, 0.25))
  err = np.asarray(act.evaluation_error(params, lb, ub))
  np.testing.assert_allclose(err, 2 * rounding.U * np.float32([1.0, 0.5, 0.75, 0.0])
                             + 2.0 ** -126, rtol=1e-6)


def test_leaky_relu_rules_hold_on_sampled_points():
  act = LeakyReLU()
  shape = (6, 10)
  params = {"slope": jnp.linspace(0.0, 1.0, shape[-1])}
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  c = 2.0 * jax.random.normal(k1, shape)
  w = jnp.abs(jax.random.normal(k2, shape))
  lb, ub = c - w, c + w
  lo, hi = act.interval(params, lb, ub)
  t = jax.random.uniform(k3, (64,) + shape)
  out = jax.vmap(lambda zz: act.forward(params, zz))(lb[None] + t * (ub - lb)[None])
  assert np.all(np.asarray(out) >= np.asarray(lo)[None])
  assert np.all(np.asarray(out) <= np.asarray(hi)[None])
  # A perturbation within ez moves the output by at most the rounding bound.
  ez = 0.05 * w
  err = np.asarray(act.rounding_error(params, lb, ub, ez, jnp.full((6,), 9.0)))
  z = lb[None] + t * (ub - lb)[None]
  s = jax.random.uniform(k1, z.shape, minval=-1.0, maxval=1.0)
  moved = jax.vmap(lambda zz, ss: act.forward(params, zz + ss * ez))(z, s)
  assert np.all(np.abs(np.asarray(moved) - np.asarray(out)) <= err[None] * (1 + 1e-6) + 1e-7)


class LeakyNet(fnn.Module):
  """Conv and dense layers with leaky ReLUs written three ways."""

  @fnn.compact
  def __call__(self, x):
    h = jax.nn.leaky_relu(fnn.Conv(4, (3, 3), strides=2, padding=1)(x), 0.1)
    z = fnn.Conv(4, (3, 3), padding=1)(h)
    h = jnp.where(z > 0, z, 0.3 * z)
    z = fnn.Dense(8)(_flatten(h))
    h = jnp.maximum(z, 0.5 * z)
    return fnn.Dense(CLASSES)(h)


def test_traced_leaky_relus_are_bounded_soundly():
  model = LeakyNet()
  v = _random_variables(model, 2)
  graph = trace_lib.trace(model, v, SHAPE)
  assert [type(st.activation).__name__ for st in graph] == ["LeakyReLU"] * 3 + ["NoneType"]
  x = jax.random.uniform(jax.random.PRNGKey(8), (B,) + SHAPE)
  eps = 0.3
  res = lipjax.local_lipschitz_bound(model, v, x, eps)
  bound = np.asarray(res.bound, np.float64)
  glob = float(lipjax.global_lipschitz_bound(model, v, input_shape=SHAPE))
  assert np.all(bound <= glob * (1 + 1e-5))
  pts = jnp.concatenate([x, U.sample_ball(jax.random.PRNGKey(9), x, eps, 8,
                                          uniform_radius=True).reshape((-1,) + SHAPE)])
  worst = _jacobian_norms(model.apply, v, pts).reshape(-1, B).max(axis=0)
  assert np.all(worst <= bound * (1 + 1e-5)) and np.max(worst / bound) >= 0.05, (worst, bound)
  # The rounding bound covers the float32 forward pass.
  err = np.asarray(res.layers[-1].error)
  p = U.sample_ball(jax.random.PRNGKey(4), x, jnp.full((B,), eps), 4).reshape((-1,) + SHAPE)
  z32 = np.asarray(model.apply(v, p))
  with jax.enable_x64(True):
    v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), v)
    z64 = np.asarray(model.apply(v64, jnp.asarray(np.asarray(p), jnp.float64)))
  assert np.all(np.abs(z32 - z64).reshape(4, B, -1) <= err[None])
  # Certified points survive PGD.
  y = jnp.argmax(model.apply(v, x), -1)
  cert = np.asarray(lipjax.certify(model, v, x, y, 0.01).certified)
  worst_margin = np.asarray(_pgd(model.apply, v, x, y, 0.01, jax.random.PRNGKey(14)))
  assert not np.any(cert & (worst_margin > 0))


@pytest.mark.parametrize("slope", [-0.1, 1.5])
def test_a_slope_outside_zero_one_is_refused_in_one_line(slope):
  def fn(w, x):
    return jax.nn.leaky_relu(x @ w["a"], slope) @ w["b"]

  w = {"a": jnp.ones((3, 4)), "b": jnp.ones((4, 2))}
  with pytest.raises(lipjax.UnsupportedModelError) as e:
    lipjax.local_lipschitz_bound(fn, w, jnp.ones((1, 3)), 0.1)
  assert "\n" not in str(e.value)
