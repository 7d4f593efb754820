"""Soundness at the edges of float32: rounding, cancellation, overflow, and
the guarantee each bound reports.

Truth: an exact forward pass in float64 written here from the layer
definitions (numpy only; float64 is exact enough to expose float32 rounding,
its own error being 2^29 times smaller), explicit matrices with
``numpy.linalg.svd``, closed-form boundary distances of linear classifiers,
and the float32 ``model.apply`` itself at points of the ball.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lipjax
from lipjax import nn as lnn
from lipjax._src import lipschitz, rounding
from lipjax._src import trace as trace_lib

import _bounds_util as U

# These regressions are about the float32 forward pass users run: they run at
# XLA's default optimisation level (tests/test_default_xla.py).
pytestmark = pytest.mark.default_xla


# ---------------------------------------------------------------------------
# Exact (float64) forward pass, independent of lipjax.bounds
# ---------------------------------------------------------------------------


def _conv64(h, kernel, stride, padding):
  k, _, _, cout = kernel.shape
  hp = np.pad(h, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho = (hp.shape[1] - k) // stride + 1
  wo = (hp.shape[2] - k) // stride + 1
  out = np.zeros((h.shape[0], ho, wo, cout))
  for di in range(k):
    for dj in range(k):
      patch = hp[:, di:di + stride * (ho - 1) + 1:stride, dj:dj + stride * (wo - 1) + 1:stride]
      out += patch @ kernel[di, dj]
  return out


def _pool64(h, window, stride):
  ho = (h.shape[1] - window) // stride + 1
  wo = (h.shape[2] - window) // stride + 1
  out = np.zeros((h.shape[0], ho, wo, h.shape[3]))
  for di in range(window):
    for dj in range(window):
      out += h[:, di:di + stride * (ho - 1) + 1:stride, dj:dj + stride * (wo - 1) + 1:stride]
  return out / (window * window)


def exact_forward(model, variables, x):
  """Per linear layer, its exact output (pre-activation), float64."""
  h = np.asarray(x, np.float64)
  pre = []
  for i, layer in enumerate(model.layers):
    p = {k: np.asarray(a, np.float64)
         for k, a in variables["params"].get(f"layers_{i}", {}).items()}
    if isinstance(layer, lnn.Dense):
      h = h @ p["kernel"] + p.get("bias", 0.0)
    elif isinstance(layer, lnn.Conv):
      h = _conv64(h, p["kernel"], layer.stride, layer.padding) + p.get("bias", 0.0)
    elif isinstance(layer, lnn.AvgPool):
      h = _pool64(h, layer.window, layer.stride)
    elif isinstance(layer, lnn.Flatten):
      h = h.reshape(h.shape[0], -1)
      continue
    elif isinstance(layer, lnn.ReLU):
      h = np.maximum(h, 0.0)
      continue
    elif isinstance(layer, lnn.ClippedReLU):
      h = np.minimum(np.maximum(h, 0.0), p["theta"])
      continue
    elif isinstance(layer, lnn.ClippedMaxMin):
      c = h.shape[-1] // 2
      a, b = h[..., :c], h[..., c:]
      h = np.concatenate([np.minimum(np.maximum(a, b), p["upper"]),
                          np.maximum(np.minimum(a, b), p["lower"])], axis=-1)
      continue
    else:
      raise TypeError(type(layer))
    pre.append(h)
  return pre


def _with_bias_scale(variables, scale, key):
  """Random biases of size ``scale`` (logits and pre-activations far from 0)."""
  def f(path, a):
    if path[-1].key == "bias":
      return scale * jax.random.normal(jax.random.fold_in(key, a.size), a.shape)
    return a
  return jax.tree_util.tree_map_with_path(f, variables)


# ---------------------------------------------------------------------------
# 1. The forward-pass rounding bound and the boxes, against float64 truth
# ---------------------------------------------------------------------------


def _rounding_cases():
  mlp = U.mlp_model("clipped_relu", features=6, widths=(40, 30))
  conv = lnn.Sequential((lnn.Conv(6, 3, 1, 1), lnn.ClippedMaxMin(0.3), lnn.AvgPool(2, 2),
                         lnn.Conv(4, 3, 1, 0), lnn.ReLU(), lnn.Flatten(), lnn.Dense(3)),
                        input_shape=(8, 8, 2))
  return {"mlp": mlp, "conv": conv}


@pytest.mark.parametrize("name,which", [("mlp", "local"), ("mlp", "global"),
                                        ("conv", "global")])
def test_rounding_bounds_and_boxes_hold_at_points_of_the_ball(name, which):
  model = _rounding_cases()[name]
  v = _with_bias_scale(U.init_random(model, jax.random.PRNGKey(3)), 30.0,
                       jax.random.PRNGKey(4))
  x = jax.random.uniform(jax.random.PRNGKey(5), (3,) + model.input_shape)
  eps = 0.2
  if which == "local":
    layers = lipjax.local_lipschitz_bound(model, v, x, eps).layers
  else:
    stages = trace_lib.trace(model, v, model.input_shape)
    _, gn = lipjax.global_lipschitz_bound(model, v, per_layer=True)
    layers = lipschitz.ball_bounds(stages, x, jnp.full((3,), eps), gn)
  pts = U.sample_ball(jax.random.PRNGKey(6), x, eps, 16)     # (n, B, ...)
  pts = jnp.concatenate([x[None], pts], axis=0)
  worst = 0.0
  for p in pts:
    fl = U.pre_activations(model, v, p)
    ex = exact_forward(model, v, p)
    for lb, zf, ze in zip(layers, fl, ex):
      err = np.asarray(lb.error, np.float64)
      lo, hi = np.asarray(lb.lower, np.float64), np.asarray(lb.upper, np.float64)
      gap = np.abs(np.asarray(zf, np.float64) - ze)
      assert np.all(gap <= err), "float32 pre-activation outside its rounding bound"
      assert np.all((lo <= ze) & (ze <= hi)), "exact pre-activation outside its box"
      worst = max(worst, float(np.max(gap / np.maximum(err, 1e-30))))
  # The bound is not vacuous: the observed error reaches a visible fraction of it.
  assert worst > 1e-4
  # ... and it is small next to the values (a few ulps of the magnitudes summed).
  z_last = np.abs(np.asarray(layers[-1].center))
  assert np.all(np.asarray(layers[-1].error) < 1e-3 * (1.0 + z_last.max()))


# ---------------------------------------------------------------------------
# 1. Logit rounding: the linear classifier of the report, exact truth
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [100.0, 1000.0])
def test_large_logits_near_the_boundary_are_not_certified_past_it(bias):
  # z = W^T x + b with b = (bias, bias): the exact decision boundary is the
  # hyperplane a . x = 0, a = w_0 - w_1, at exact distance |a . x| / ||a||.
  # Points close to it, eps just inside what float32 logits suggest: every
  # certificate must hold for the exact network (eps < exact distance) and
  # for float32 model.apply on the segment towards the boundary.
  model = lnn.Sequential((lnn.Dense(2),), input_shape=(4,))
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
  v = {"params": {"layers_0": {"kernel": v["params"]["layers_0"]["kernel"],
                               "bias": jnp.full((2,), bias)}}}
  w = np.asarray(v["params"]["layers_0"]["kernel"], np.float64)
  a = w[:, 0] - w[:, 1]
  an = a / np.linalg.norm(a)
  rng = np.random.default_rng(0)
  n = 60
  x = rng.uniform(0, 1, (n, 4))
  x = x - np.outer(x @ a / (a @ a), a)
  x = x + np.outer(rng.uniform(1e-5, 3e-3, n) * rng.choice([-1, 1], n), an)
  x = x.astype(np.float32)
  x64 = x.astype(np.float64)
  z = np.asarray(model.apply(v, x))
  y = z.argmax(1)
  exact = np.abs(x64 @ a) / np.linalg.norm(a)
  exact_y = (x64 @ w).argmax(1)
  float_dist = np.abs(z[:, 0].astype(np.float64) - z[:, 1]) / np.linalg.norm(a)
  total = 0
  # Just inside what the float32 gap suggests (the float32 error of a logit
  # near 100 is an ulp, 7.6e-6), and well inside.
  for eps in [float_dist - off / np.linalg.norm(a) for off in (2e-6, 8e-6, 3e-5)] + \
      [0.5 * float_dist]:
    eps = np.maximum(eps, 0.0).astype(np.float32)
    for kw in ({}, {"triage": False}, {"bound": "global"}):
      cert = np.asarray(lipjax.certify(model, v, x, y, jnp.asarray(eps), **kw).certified)
      total += cert.sum()
      bad = cert & ((eps >= exact) | (exact_y != y))
      assert not np.any(bad), f"{kw}: certified past the exact boundary: {np.nonzero(bad)[0]}"
      for i in np.nonzero(cert)[0]:
        t = np.linspace(0.0, float(eps[i]), 400)
        seg = (x64[i] - np.sign(x64[i] @ a) * t[:, None] * an).astype(np.float32)
        seg = seg[np.linalg.norm(seg.astype(np.float64) - x64[i], axis=1) <= eps[i]]
        pred = np.asarray(model.apply(v, seg)).argmax(1)
        assert np.all(pred == y[i]), f"{kw}: float32 model.apply flips inside the ball"
  if bias == 100.0:
    assert total > 0    # the rounding allowance does not certify nothing


def test_robust_radius_accounts_for_rounding():
  model = lnn.Sequential((lnn.Dense(2),), input_shape=(4,))
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
  v = {"params": {"layers_0": {"kernel": v["params"]["layers_0"]["kernel"],
                               "bias": jnp.full((2,), 1000.0)}}}
  w = np.asarray(v["params"]["layers_0"]["kernel"], np.float64)
  a = w[:, 0] - w[:, 1]
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (64, 4))
  x = (x - np.outer(x @ a / (a @ a), a) * rng.uniform(0.99, 1.01, (64, 1))).astype(np.float32)
  y = np.asarray(model.apply(v, x)).argmax(1)
  cert = lipjax.certify(model, v, x, y, 1.0)
  exact = np.abs(x.astype(np.float64) @ a) / np.linalg.norm(a)
  exact_y = (x.astype(np.float64) @ w).argmax(1)
  rr = np.asarray(cert.robust_radius, np.float64)
  assert np.all((rr < exact) | (rr == 0))
  assert np.all((exact_y == y) | (rr == 0))


# ---------------------------------------------------------------------------
# 2. Cancellation in a pre-activation sum
# ---------------------------------------------------------------------------


def _cancelling_layer(n=256):
  """Weights of size 1e3 whose float32 sum at x has the wrong sign."""
  rng = np.random.default_rng(1)
  for _ in range(200):
    w = (rng.standard_normal(n) * 1e3).astype(np.float32)
    x = rng.uniform(0, 1, n).astype(np.float32)
    s_exact = float(np.dot(x.astype(np.float64), w.astype(np.float64)))
    s_float = float((jnp.asarray(x)[None] @ jnp.asarray(w)[:, None])[0, 0])
    if s_float < s_exact:
      b = np.float32(-s_exact - (s_float - s_exact) / 2)
      if s_exact + float(b) > 0 and s_float + float(b) < 0:
        return w, x, b
  raise AssertionError("no cancelling case found")


def test_cancelling_sum_keeps_the_neuron_varying():
  n = 256
  w, x, b = _cancelling_layer(n)
  model = lnn.Sequential((lnn.Dense(1), lnn.ReLU(), lnn.Dense(2)), input_shape=(n,))
  w2 = np.array([[1.0, -1.0]], np.float32)
  v = {"params": {"layers_0": {"kernel": jnp.asarray(w)[:, None], "bias": jnp.asarray([b])},
                  "layers_2": {"kernel": jnp.asarray(w2), "bias": jnp.zeros(2)}}}
  xs = jnp.asarray(x)[None]
  z_float = float(U.pre_activations(model, v, xs)[0][0, 0])
  z_exact = float(exact_forward(model, v, xs)[0][0, 0])
  assert z_float < 0 < z_exact    # the float32 centre has the wrong sign
  # The exact Jacobian at x (the neuron is active): w2^T w^T, norm ||w|| ||w2||.
  jac = np.linalg.norm(w.astype(np.float64)) * np.linalg.norm(w2.astype(np.float64))
  for eps in (0.0, 1e-10, 1e-6):
    lb = lipjax.local_lipschitz_bound(model, v, xs, eps)
    assert float(lb.layers[0].col_mask[0, 0]) == 1.0
    assert float(lb.layers[0].lower[0, 0]) <= z_exact <= float(lb.layers[0].upper[0, 0])
    assert float(lb.bound[0]) >= jac
    for kw in ({}, {"dense": "lanczos"}):
      lb = lipjax.local_lipschitz_bound(model, v, xs, eps, **kw)
      assert float(lb.bound[0]) >= jac * (1 - 1e-6)


# ---------------------------------------------------------------------------
# 3. NaN and inf: never certified
# ---------------------------------------------------------------------------


def _scaled(v, layers, factor):
  p = dict(v["params"])
  for k in layers:
    p[k] = dict(p[k], kernel=p[k]["kernel"] * factor)
  return {"params": p}


def _mlp():
  """The MLP of this section's tests: one model and input shape (16, 8), so
  they share its compiled certificates (XLA's default level compiles slowly)."""
  return lnn.Sequential((lnn.Dense(16), lnn.ReLU(), lnn.Dense(16), lnn.ClippedReLU(1.0),
                         lnn.Dense(3)), input_shape=(8,))


def test_infinite_product_of_norms_certifies_nothing():
  # Finite logits (the clipped ReLU bounds the activations) and finite
  # per-layer norms, but their product overflows to inf.
  layers = ("layers_2", "layers_4")
  model = _mlp()
  v = _scaled(U.init_random(model, jax.random.PRNGKey(12)), layers, 1e20)
  x = jax.random.uniform(jax.random.PRNGKey(1), (16, 8))
  y = jnp.argmax(model.apply(v, x), -1)
  for kw in ({}, {"triage": False}, {"bound": "global"}):
    for eps in (1e-30, 0.1):
      cert = lipjax.certify(model, v, x, y, eps, **kw)
      c = np.asarray(cert.certified)
      assert not np.any(c), f"{kw} eps={eps}: certified with lipschitz {cert.lipschitz}"
      np.testing.assert_array_equal(np.asarray(cert.radius), 0.0)
      np.testing.assert_array_equal(np.asarray(cert.robust_radius), 0.0)


def test_certified_points_have_finite_fields():
  model = _mlp()
  base = U.init_random(model, jax.random.PRNGKey(12))
  x = jax.random.uniform(jax.random.PRNGKey(1), (16, 8))
  for layers in (("layers_0",), ("layers_4",)):
    v = _scaled(base, layers, 1e20)
    y = jnp.argmax(model.apply(v, x), -1)
    for kw in ({}, {"triage": False}, {"bound": "global"}):
      cert = lipjax.certify(model, v, x, y, 1e-30, **kw)
      c = np.asarray(cert.certified)
      assert np.all(np.isfinite(np.asarray(cert.lipschitz))[c])
      assert np.all(np.isfinite(np.asarray(cert.margin))[c])


@pytest.mark.parametrize("bound", ["local", "global"])
def test_nan_hidden_bias_certifies_nothing(bound):
  model = _mlp()
  v = U.init_random(model, jax.random.PRNGKey(2))
  x = jax.random.uniform(jax.random.PRNGKey(3), (16, 8))
  y = jnp.argmax(model.apply(v, x), -1)
  assert np.any(np.asarray(lipjax.certify(model, v, x, y, 1e-3, bound=bound).certified))
  bad = U.set_param(v, "layers_2", "bias", (1,), jnp.nan)
  cert = lipjax.certify(model, bad, x, y, 1e-3, bound=bound)
  assert not np.any(np.asarray(cert.certified))
  np.testing.assert_array_equal(np.asarray(cert.robust_radius), 0.0)


# ---------------------------------------------------------------------------
# 4. Global norms: AvgPool's exact rule, and the reported guarantee
# ---------------------------------------------------------------------------


def _pool_matrix(h, w, c, window, stride):
  ho, wo = (h - window) // stride + 1, (w - window) // stride + 1
  m = np.zeros((ho * wo * c, h * w * c))
  for i in range(ho):
    for j in range(wo):
      for ch in range(c):
        for di in range(window):
          for dj in range(window):
            m[(i * wo + j) * c + ch,
              ((stride * i + di) * w + stride * j + dj) * c + ch] = 1.0 / window ** 2
  return m


@pytest.mark.parametrize("shape,window,stride", [((4, 4, 1), 2, 2), ((6, 6, 2), 3, 1),
                                                 ((7, 5, 1), 3, 2), ((5, 6, 3), 2, 1),
                                                 ((9, 9, 1), 3, 3)])
def test_avgpool_rules_against_the_explicit_matrix(shape, window, stride):
  from lipjax._src import rules   # pylint: disable=import-outside-toplevel
  layer = rules.module_rule(lnn.AvgPool(window, stride))   # lipjax.nn.AvgPool's rule
  m = _pool_matrix(*shape, window, stride)
  sigma = np.linalg.svd(m, compute_uv=False)[0]
  bound = float(layer.global_norm({}, shape))
  assert bound >= sigma
  # Never above the l1/l_inf bound sqrt(max col sum * max row sum) ...
  assert bound <= np.sqrt(m.sum(0).max() * m.sum(1).max()) * (1 + 2e-4)
  if window == stride:   # ... and exact for disjoint windows: 1 / window.
    np.testing.assert_allclose(bound, 1.0 / window, rtol=2e-4)
  h = jax.random.uniform(jax.random.PRNGKey(0), (2,) + shape)
  flat = np.asarray(h, np.float64).reshape(2, -1)
  np.testing.assert_allclose(np.asarray(layer.abs_forward({}, h)).reshape(2, -1),
                             flat @ np.abs(m).T, rtol=1e-6)
  rows = np.asarray(layer.row_norms({}, shape)).reshape(-1)
  np.testing.assert_allclose(rows, np.linalg.norm(m, axis=1), rtol=1e-6)
  assert layer.fan_in({}, shape) == np.count_nonzero(m, axis=1).max()


def test_large_avgpool_global_bound_is_deterministic():
  model = lnn.Sequential((lnn.AvgPool(2, 2), lnn.Flatten(), lnn.Dense(3)),
                         input_shape=(64, 64, 4))
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 4)))
  stages = trace_lib.trace(model, v, model.input_shape)
  assert not lipschitz.needs_probabilistic_global(stages[0])
  _, gn = lipjax.global_lipschitz_bound(model, v, per_layer=True)
  np.testing.assert_allclose(float(gn[0]), 0.5, rtol=2e-4)
  assert float(gn[0]) >= 0.5
  g = lipjax.bound_guarantee(model, v, bound="global")
  assert g.deterministic and g.failure_probability == 0.0
  assert dict(g.layers)[stages[0].name] == "deterministic"
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 64, 64, 4))
  y = jnp.argmax(model.apply(v, x), -1)
  cert = lipjax.certify(model, v, x, y, 1e-3, bound="global")
  assert np.all(np.asarray(cert.certified))
  np.testing.assert_array_equal(np.asarray(cert.failure_probability), 0.0)


class _Ramp(lnn.LinearLayer):
  """A user layer without its own global norm: ``h -> h * ramp`` (with the
  optional exact rules that keep its rounding bound tight)."""

  def __call__(self, h):
    return self.linear({}, h)

  def linear(self, params, h):
    ramp = jnp.linspace(0.5, 1.0, int(np.prod(h.shape[1:]))).reshape(h.shape[1:])
    return h * ramp

  def abs_linear(self, params, h):
    return self.linear(params, h)

  def fan_in(self, params, in_shape):
    return 1


def test_lanczos_global_norm_reports_its_failure_probability():
  # 64 * 65 = 4160 inputs: an explicit Jacobian would have more than 2^24 entries.
  model = lnn.Sequential((_Ramp(), lnn.Flatten(), lnn.Dense(3)), input_shape=(64, 65, 1))
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 65, 1)))
  stages = trace_lib.trace(model, v, model.input_shape)
  assert lipschitz.needs_probabilistic_global(stages[0])
  g = lipjax.bound_guarantee(model, v, bound="global", failure_probability=1e-7)
  assert not g.deterministic and g.failure_probability == 1e-7
  assert dict(g.layers)[stages[0].name] == "probabilistic"
  _, gn = lipjax.global_lipschitz_bound(model, v, per_layer=True)
  assert 1.0 <= float(gn[0]) < 1.1      # the true norm is max(ramp) = 1
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 64, 65, 1))
  y = jnp.argmax(model.apply(v, x), -1)
  glob = lipjax.certify(model, v, x, y, 1e-3, bound="global", failure_probability=1e-7)
  assert np.all(np.asarray(glob.certified))
  np.testing.assert_allclose(np.asarray(glob.failure_probability), 1e-7)
  tri = lipjax.certify(model, v, x, y, 1e-3, failure_probability=1e-7)
  assert np.all(np.asarray(tri.certified)) and not np.any(np.asarray(tri.local))
  np.testing.assert_allclose(np.asarray(tri.failure_probability), 1e-7)


def test_dense_and_conv_guarantees():
  model = U.conv_model("relu")
  v = U.init_random(model, jax.random.PRNGKey(0))
  g = lipjax.bound_guarantee(model, v, bound="global")
  assert g.deterministic
  assert [r for _, r in g.layers] == ["deterministic", "deterministic", "exact", "exact"]
  loc = lipjax.bound_guarantee(model, v, bound="local")
  assert loc.failure_probability == 1e-9
  assert [r for _, r in loc.layers] == ["probabilistic"] * 2 + ["exact"] * 2


# ---------------------------------------------------------------------------
# Matmul precision
# ---------------------------------------------------------------------------


def test_operand_roundoff_follows_backend_and_precision():
  assert rounding.operand_roundoff("cpu", None) == 0.0
  assert rounding.operand_roundoff("cpu", "float32") == 0.0
  assert rounding.operand_roundoff("gpu", None) == 2.0 ** -10
  assert rounding.operand_roundoff("gpu", "highest") == 0.0
  assert rounding.operand_roundoff("gpu", jax.lax.Precision.HIGHEST) == 0.0
  assert rounding.operand_roundoff("tpu", None) == 2.0 ** -7
  assert rounding.operand_roundoff("tpu", "highest") == 2.0 ** -21
  assert rounding.operand_roundoff("cpu", "bfloat16") == 2.0 ** -7
  assert rounding.operand_roundoff("gpu", "TF32_TF32_F32") == 2.0 ** -10
  with pytest.raises(ValueError, match="not covered"):
    rounding.operand_roundoff("gpu", "BF16_BF16_BF16")


def test_reduced_matmul_precision_shrinks_the_margins():
  model = U.mlp_model("relu")
  v = _with_bias_scale(U.init_random(model, jax.random.PRNGKey(2)), 10.0,
                       jax.random.PRNGKey(3))
  x = jax.random.uniform(jax.random.PRNGKey(3), (8, 5))
  y = jnp.argmax(model.apply(v, x), -1)
  full = lipjax.certify(model, v, x, y, 1e-3, triage=False)
  with jax.default_matmul_precision("bfloat16"):
    reduced = lipjax.certify(model, v, x, y, 1e-3, triage=False)
  assert np.all(np.asarray(reduced.margin) < np.asarray(full.margin))

