"""Each rule on hand-set cases with exact expected values, and against sampled truth.

Activations: exact output boxes, masks and rounding-error bounds on hand-set
boxes; then, on random boxes, every sampled point's output lies in the
interval rule's box, an output flagged constant is constant, and the
rounding-error bound covers perturbed inputs. Linear rules: exact ``|W| h``,
row norms, global norm, adjoint and fan-in against the explicit matrix built
with numpy. Blocks: the residual sum's boxes, radii, errors and factor.

A new rule gets the same two kinds of test (see CONTRIBUTING.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lipjax._src import interpret, rounding
from lipjax._src.rules import conv, dense, maxmin, pooling, relu, residual

INF = np.inf
f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))   # noqa: E731


# ---------------------------------------------------------------------------
# Activations: hand-set cases
# ---------------------------------------------------------------------------


def test_relu_clipped_relu_clamp_identity_boxes_are_exact():
  lb = f32([-2.0, -1.0, 0.5, -0.5, 1.5])
  ub = f32([-1.0, 0.5, 1.0, 3.0, 2.0])
  lo, hi = relu.ReLU().interval({}, lb, ub)
  np.testing.assert_array_equal(lo, [0, 0, 0.5, 0, 1.5])
  np.testing.assert_array_equal(hi, [0, 0.5, 1.0, 3.0, 2.0])
  theta = f32([1.0, 1.0, 1.0, 2.0, 1.0])
  lo, hi = relu.ClippedReLU().interval({"theta": theta}, lb, ub)
  np.testing.assert_array_equal(lo, [0, 0, 0.5, 0, 1.0])
  np.testing.assert_array_equal(hi, [0, 0.5, 1.0, 2.0, 1.0])
  _, col = relu.ClippedReLU().mask({"theta": theta}, lb, ub)
  np.testing.assert_array_equal(col, [0, 1, 1, 1, 0])
  clamp = {"lower": f32([-1.5, -INF, 0.0, 0.0, 0.0]), "upper": f32([-1.2, 0.0, 0.7, INF, 5.0])}
  lo, hi = relu.Clamp().interval(clamp, lb, ub)
  np.testing.assert_array_equal(lo, np.float32([-1.5, -1.0, 0.5, 0.0, 1.5]))
  np.testing.assert_array_equal(hi, np.float32([-1.2, 0.0, 0.7, 3.0, 2.0]))
  lo, hi = relu.Identity().interval({}, lb, ub)
  np.testing.assert_array_equal(lo, lb)
  np.testing.assert_array_equal(hi, ub)


def test_elementwise_rounding_error_is_the_input_error_or_the_width():
  # Entry 0: in the linear part, the error passes through (0.01); entry 1:
  # always 0 on the widened box (width 0, up to the smallest rounding
  # allowance); entry 2: theta = 0.1 clips both sides of the widened box
  # [-0.55, 0.55], whose output width 0.1 (rounded up) is below ez = 0.5.
  z_lo, z_hi = f32([0.2, -3.0, -0.05]), f32([0.4, -2.0, 0.05])
  ez = f32([0.01, 0.01, 0.5])
  dz = f32([9.0])
  theta = {"theta": f32([1.0, 1.0, 0.1])}
  e = np.asarray(relu.ClippedReLU().rounding_error(theta, z_lo[None], z_hi[None], ez[None], dz))
  assert e[0, 0] == np.float32(0.01)
  assert 0.0 < e[0, 1] <= 2.0 ** -120
  assert np.float32(0.1) <= e[0, 2] <= 0.1 * (1 + 1e-6)


def test_pair_maxmin_over_adjacent_pairs_boxes_masks_and_errors_are_exact():
  # Pairs (0, 1), (2, 3), (4, 5) of the last axis.
  lb = f32([2.0, -1.0, -1.0, -1.0, -3.0, -3.0])
  ub = f32([3.0, 0.5, 1.0, 1.0, -2.0, -2.5])
  params = {"max_lower": f32([-INF, -INF, -INF]), "max_upper": f32([1.0, INF, 1.0]),
            "min_lower": f32([-INF, -INF, -2.6]), "min_upper": f32([INF, INF, INF])}
  for layout, order in (("interleaved", lambda hi, lo: np.stack([hi, lo], -1).reshape(-1)),
                        ("halves", lambda hi, lo: np.concatenate([hi, lo])),
                        ("stacked", lambda hi, lo: np.stack([hi, lo], -1))):
    act = maxmin.PairMaxMin(max_first=True, pairs="adjacent", layout=layout)
    lo, hi = act.interval(params, lb, ub)
    # max parts: pair 0 in [2, 3] clipped at 1 -> [1, 1]; pair 1 [-1, 1]; pair 2 [-3, -2].
    # min parts: pair 0 [-1, 0.5]; pair 1 [-1, 1]; pair 2 [-3, -2.5] clamped below at -2.6.
    np.testing.assert_array_equal(lo, order(np.float32([1, -1, -3]),
                                            np.float32([-1, -1, -2.6])))
    np.testing.assert_array_equal(hi, order(np.float32([1, 1, -2]),
                                            np.float32([0.5, 1, -2.5])))
    row, col = act.mask(params, lb, ub)
    np.testing.assert_array_equal(col, order(np.float32([0, 1, 1]), np.float32([1, 1, 1])))
    np.testing.assert_array_equal(row, [1, 1, 1, 1, 1, 1])
    ez = f32([0.1, 0.3, 0.0, 0.2, 0.05, 0.0])
    e = np.asarray(act.propagated_error(ez[None], None, None))[0]
    np.testing.assert_array_equal(e, order(np.float32([0.3, 0.2, 0.05]),
                                           np.float32([0.3, 0.2, 0.05])))
    z = jnp.asarray([[1.0, 2.0, -1.0, 5.0, 0.0, 0.0]])
    out = np.asarray(act.forward(params, z))[0]
    np.testing.assert_array_equal(out, order(np.float32([1, 5, 0]), np.float32([1, -1, 0])))
  # A pair whose two outputs are constant leaves the rows.
  act = maxmin.PairMaxMin(max_first=False, pairs="adjacent", layout="interleaved")
  tight = dict(params, min_upper=f32([-5.0, INF, INF]))
  row, col = act.mask(tight, lb, ub)
  np.testing.assert_array_equal(col, [0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(row, [0, 0, 1, 1, 1, 1])


# ---------------------------------------------------------------------------
# Activations: sampled truth
# ---------------------------------------------------------------------------


def _random_box(key, shape):
  k1, k2 = jax.random.split(key)
  c = 2.0 * jax.random.normal(k1, shape)
  w = jnp.abs(jax.random.normal(k2, shape)) * jnp.where(jax.random.uniform(k2, shape) < 0.2,
                                                        0.0, 1.0)
  return c - w, c + w


_ACTIVATIONS = {
    "relu": (relu.ReLU(), lambda s: {}),
    "clipped_relu": (relu.ClippedReLU(), lambda s: {"theta": jnp.linspace(-0.2, 1.5, s[-1])}),
    "clamp": (relu.Clamp(), lambda s: {"lower": jnp.linspace(-1.0, 0.5, s[-1]),
                                        "upper": jnp.linspace(-0.5, 2.0, s[-1])}),
    "clipped_maxmin": (maxmin.ClippedMaxMin(),
                       lambda s: {"upper": jnp.linspace(0.1, 1.0, s[-1] // 2),
                                  "lower": -jnp.linspace(0.1, 1.0, s[-1] // 2)}),
}
for _pairs in ("halves", "adjacent"):
  for _layout in ("halves", "interleaved", "stacked"):
    _ACTIVATIONS[f"pair_{_pairs}_{_layout}"] = (
        maxmin.PairMaxMin(max_first=_layout != "halves", pairs=_pairs, layout=_layout),
        lambda s: {"max_lower": jnp.full((s[-1] // 2,), -INF),
                   "max_upper": jnp.linspace(0.0, 2.0, s[-1] // 2),
                   "min_lower": jnp.linspace(-2.0, 0.0, s[-1] // 2),
                   "min_upper": jnp.full((s[-1] // 2,), INF)})


@pytest.mark.parametrize("name", sorted(_ACTIVATIONS))
def test_activation_rules_hold_on_sampled_points(name):
  act, make = _ACTIVATIONS[name]
  shape = (5, 8)
  params = make(shape)
  lb, ub = _random_box(jax.random.PRNGKey(0), shape)
  lo, hi = act.interval(params, lb, ub)
  row, col = act.mask(params, lb, ub)
  t = jax.random.uniform(jax.random.PRNGKey(1), (64,) + shape)
  z = lb[None] + t * (ub - lb)[None]
  z = jnp.concatenate([z, lb[None], ub[None]])
  out = jax.vmap(lambda zz: act.forward(params, zz))(z)
  assert np.all(np.asarray(out) >= np.asarray(lo)[None])
  assert np.all(np.asarray(out) <= np.asarray(hi)[None])
  constant = np.all(np.asarray(out) == np.asarray(out)[:1], axis=0)
  assert np.all(constant[np.asarray(col) == 0])
  # Rows: an input is deleted only if no output moves when it moves.
  assert np.all(np.asarray(row) >= 0)
  # Rounding: a perturbed input within ez gives an output within the bound.
  ez = 0.05 * jnp.abs(jax.random.normal(jax.random.PRNGKey(2), shape))
  dz = jnp.sqrt(jnp.sum(jnp.square(ez), axis=-1)) * 1.0001
  err = act.rounding_error(params, lb, ub, ez, dz)
  s = jax.random.uniform(jax.random.PRNGKey(3), (64,) + shape, minval=-1.0, maxval=1.0)
  moved = jax.vmap(lambda zz, ss: act.forward(params, zz + ss * ez))(z[:64], s)
  diff = np.abs(np.asarray(moved) - np.asarray(out[:64]))
  assert np.all(diff <= np.asarray(err)[None] * (1 + 1e-6) + 1e-7), name


# ---------------------------------------------------------------------------
# Linear rules against explicit matrices
# ---------------------------------------------------------------------------


def _matrix(rule, params, in_shape):
  n = int(np.prod(in_shape))
  basis = jnp.eye(n).reshape((n,) + tuple(in_shape))
  return np.asarray(rule.forward(params, basis), np.float64).reshape(n, -1).T


def test_dense_rule_is_exact_on_a_hand_set_kernel():
  kernel = f32([[1.0, -2.0, 0.5], [3.0, 4.0, -1.0]])   # (in 2, out 3)
  rule, params = dense.Dense(), {"kernel": kernel, "bias": f32([1.0, 0.0, -1.0])}
  h = f32([[1.0, 2.0]])
  np.testing.assert_array_equal(rule.forward(params, h), [[7.0, 6.0, -1.5]])
  np.testing.assert_array_equal(rule.affine(params, h), [[8.0, 6.0, -2.5]])
  np.testing.assert_array_equal(rule.abs_forward(params, h), [[7.0, 10.0, 2.5]])
  np.testing.assert_allclose(rule.row_norms(params, (2,)), np.sqrt([10.0, 20.0, 1.25]),
                             rtol=1e-6)
  sigma = np.linalg.svd(np.asarray(kernel, np.float64), compute_uv=False)[0]
  g = float(rule.global_norm(params, (2,)))
  assert sigma <= g <= sigma * (1 + 2e-4)
  np.testing.assert_array_equal(rule.explicit_matrix(params), np.asarray(kernel).T)
  assert rule.fan_in(params, (2,)) == 2


@pytest.mark.parametrize("stride, padding, ksize", [(1, 1, 3), (2, 1, 4), (2, 0, 3)])
def test_conv_rule_against_the_explicit_matrix(stride, padding, ksize):
  in_shape = (5, 5, 2)
  kernel = jax.random.normal(jax.random.PRNGKey(stride + ksize), (ksize, ksize, 2, 3))
  rule = conv.Conv(kernel_size=ksize, stride=stride, padding=padding)
  params = {"kernel": kernel, "bias": f32([0.5, -0.5, 0.0])}
  m = _matrix(rule, params, in_shape)
  out_shape = jax.eval_shape(lambda h: rule.forward(params, h),
                             jax.ShapeDtypeStruct((1,) + in_shape, jnp.float32)).shape[1:]
  h = jax.random.uniform(jax.random.PRNGKey(9), (2,) + in_shape)
  hf = np.asarray(h, np.float64).reshape(2, -1)
  np.testing.assert_allclose(np.asarray(rule.forward_for_adjoint(params, h)).reshape(2, -1),
                             hf @ m.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(rule.abs_forward(params, h)).reshape(2, -1),
                             hf @ np.abs(m).T, rtol=1e-5, atol=1e-5)
  z = jax.random.normal(jax.random.PRNGKey(10), (2,) + tuple(out_shape))
  np.testing.assert_allclose(np.asarray(rule.adjoint(params, z, in_shape)).reshape(2, -1),
                             np.asarray(z, np.float64).reshape(2, -1) @ m, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(rule.row_norms(params, in_shape)).reshape(-1)
                >= np.linalg.norm(m, axis=1) * (1 - 1e-6))
  sigma = np.linalg.svd(m, compute_uv=False)[0]
  assert sigma * (1 - 1e-6) <= float(rule.global_norm(params, in_shape))
  assert rule.fan_in(params, in_shape) >= np.count_nonzero(m, axis=1).max()


def test_avg_pool_rule_against_the_explicit_matrix():
  rule = pooling.AvgPool(window=2, stride=2)
  in_shape = (4, 6, 3)
  m = _matrix(rule, {}, in_shape)
  sigma = np.linalg.svd(m, compute_uv=False)[0]
  g = float(rule.global_norm({}, in_shape))
  assert sigma * (1 - 1e-6) <= g <= sigma * (1 + 2e-4)
  np.testing.assert_allclose(np.asarray(rule.row_norms({}, in_shape)).reshape(-1),
                             np.linalg.norm(m, axis=1), rtol=1e-6)
  assert rule.fan_in({}, in_shape) == np.count_nonzero(m, axis=1).max() == 4


# ---------------------------------------------------------------------------
# Blocks: the residual sum
# ---------------------------------------------------------------------------


def test_residual_sum_adds_boxes_radii_and_errors():
  rule = residual.ResidualSum()
  one = lambda v: jnp.asarray([[v]], jnp.float32)   # noqa: E731
  a = interpret.Carry(one(1.0), one(0.5), one(2.0), jnp.asarray([0.3]), one(1e-3),
                      jnp.asarray([1e-3]), one(1.0))
  b = interpret.Carry(one(-1.0), one(-2.0), one(0.0), jnp.asarray([0.2]), one(0.0),
                      jnp.asarray([0.0]), one(0.0))
  c, lo, hi, r, e, d, col = rule.boxes([a, b], True)
  assert float(c[0, 0]) == 0.0 and float(col[0, 0]) == 1.0
  assert float(lo[0, 0]) <= -1.5 and float(hi[0, 0]) >= 2.0
  assert float(lo[0, 0]) > -1.5 - 1e-6 and float(hi[0, 0]) < 2.0 + 1e-6
  assert 0.5 <= float(r[0]) <= 0.5 * (1 + 1e-6)
  mag = 2.0 + 1e-3 + 2.0   # max |box| + error, per path
  assert float(e[0, 0]) >= 1e-3 + rounding.U * mag
  assert float(d[0]) >= 1e-3
  np.testing.assert_allclose(float(rule.lipschitz([2.0, 1.0])), 3.0 * (1 + 2.0 ** -23))
  np.testing.assert_array_equal(rule.forward([one(1.0), one(2.5)]), one(3.5))
