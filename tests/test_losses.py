"""Training losses and the running power state against hand computations.

Truth is computed here in float64 numpy from the raw kernels: the interval
box of the first hidden layer (``x +- eps`` through ``W``, intersected with
the ball projection ``z +- eps ||w_k||``), the resulting activation masks, and
numpy SVDs of the (masked) weight matrices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lipjax
from lipjax._src import norms
from lipjax._src import trace as trace_lib
from lipjax import nn as lnn
from lipjax import training

import _bounds_util as U

EPS = 0.3


def _one_hidden(act):
  return lnn.Sequential((lnn.Dense(6), act, lnn.Dense(3)), input_shape=(4,))


def _first_layer_box(v, x, eps):
  """Pre-activation box of the hidden layer, by hand (float64)."""
  w = np.asarray(v["params"]["layers_0"]["kernel"], np.float64)   # (in, out)
  bias = np.asarray(v["params"]["layers_0"]["bias"], np.float64)
  x = np.asarray(x, np.float64)
  z = x @ w + bias
  half = np.minimum(eps * np.abs(w).sum(0), eps * np.linalg.norm(w, axis=0))
  return z - half, z + half


def _aux(model, v, x, y, eps, **kw):
  fn = jax.jit(lambda vv, xx: training.worst_case_deltas(model, vv, xx, y, eps, **kw))
  return fn(v, x)


@pytest.mark.parametrize("kind", ["clipped_relu", "clipped_maxmin"])
def test_sparsity_loss_matches_hand_computation(kind):
  model = _one_hidden(U.activation(kind))
  v = U.init_random(model, jax.random.PRNGKey(0))
  x = jax.random.uniform(jax.random.PRNGKey(1), (5, 4))
  y = jnp.array([0, 1, 2, 0, 1])
  _, _, aux = _aux(model, v, x, y, EPS, iterations=1)
  got = float(training.sparsity_loss(model, v, aux))
  lo, hi = _first_layer_box(v, x, EPS)
  p = v["params"]["layers_1"]
  if kind == "clipped_relu":
    theta = np.asarray(p["theta"], np.float64)
    want = np.mean(np.maximum(hi, 0)) + 0.1 * np.mean(np.maximum(theta - lo, 0))
  else:
    upper = np.asarray(p["upper"], np.float64)
    lower = np.asarray(p["lower"], np.float64)
    lo_max = np.maximum(lo[:, :3], lo[:, 3:])
    hi_min = np.minimum(hi[:, :3], hi[:, 3:])
    want = np.mean(np.maximum(upper - lo_max, 0)) + np.mean(np.maximum(hi_min - lower, 0))
  assert want > 0.05   # the check is not vacuous
  # Boxes are widened by ~1e-5 relative for rounding safety.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # Passing the LocalBound directly is the same; a global-bound aux gives 0.
  np.testing.assert_allclose(training.sparsity_loss(model, v, aux["local_bound"]), got,
                             rtol=1e-6)
  _, _, aux_g = _aux(model, v, x, y, EPS, bound="global")
  assert float(training.sparsity_loss(model, v, aux_g)) == 0.0
  # It has a finite, nonzero gradient with respect to the parameters.
  def f(vv):
    _, _, a = training.worst_case_deltas(model, vv, x, y, EPS, iterations=1)
    return training.sparsity_loss(model, vv, a)
  g = jax.grad(lambda p: f({"params": p}))(v["params"])
  flat = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(g)])
  assert np.all(np.isfinite(flat)) and np.any(flat != 0)


def _explicit_local_deltas(v, x, y, eps):
  lo, hi = _first_layer_box(v, x, eps)
  theta = np.asarray(v["params"]["layers_1"]["theta"], np.float64)
  varying = ~((hi <= 0) | (lo >= theta))                  # (B, 6)
  w1 = np.asarray(v["params"]["layers_0"]["kernel"], np.float64).T   # (6, in)
  w2 = np.asarray(v["params"]["layers_2"]["kernel"], np.float64).T   # (3, 6)
  out = np.zeros((x.shape[0], 3))
  for b in range(x.shape[0]):
    s1 = np.linalg.svd(w1 * varying[b][:, None], compute_uv=False)[0]
    for i in range(3):
      out[b, i] = eps * s1 * np.linalg.norm((w2[i] - w2[int(y[b])]) * varying[b])
  return out, varying


def test_worst_case_deltas_match_explicit_formula():
  model = _one_hidden(lnn.ClippedReLU(theta_init=0.5))
  v = U.init_random(model, jax.random.PRNGKey(2))
  x = jax.random.uniform(jax.random.PRNGKey(3), (6, 4))
  y = jnp.array([0, 1, 2, 0, 1, 2])
  want, varying = _explicit_local_deltas(v, x, y, EPS)
  assert 0 < varying.sum() < varying.size    # some neurons constant, some not
  power = training.init_power_state(model, v, key=jax.random.PRNGKey(4), iterations=300)
  logits, deltas, aux = _aux(model, v, x, y, EPS, iterations=25, power=power,
                             global_iterations=1)
  np.testing.assert_allclose(logits, model.apply(v, x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(deltas, want, rtol=1e-3, atol=1e-6)
  assert np.all(np.asarray(deltas)[np.arange(6), np.asarray(y)] == 0)
  mask = np.asarray(aux["local_bound"].layers[0].col_mask) > 0
  np.testing.assert_array_equal(mask, varying)
  # Global bound: eps ||W1|| ||w_i - w_y||.
  _, dg, aux_g = _aux(model, v, x, y, EPS, bound="global", iterations=1, power=power)
  w1 = np.asarray(v["params"]["layers_0"]["kernel"], np.float64)
  w2 = np.asarray(v["params"]["layers_2"]["kernel"], np.float64).T
  s1 = np.linalg.svd(w1, compute_uv=False)[0]
  want_g = EPS * s1 * np.linalg.norm(w2[None, :, :] - w2[np.asarray(y)][:, None, :], axis=-1)
  np.testing.assert_allclose(dg, want_g, rtol=1e-3, atol=1e-6)
  assert aux_g["local_bound"] is None
  # Contract: the power state keeps its structure and shapes.
  for new in (aux["power"], aux_g["power"]):
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(power)
    assert [a.shape for a in new.vectors] == [(1, 4), (1, 6)]


def _explicit_top_singular_values(model, v):
  stages = trace_lib.trace(model, v, model.input_shape)
  out = []
  for st in stages:
    mat = np.asarray(norms.explicit_jacobian(st.linear, st.in_shape),
                     np.float64)
    out.append((st, np.linalg.svd(mat, compute_uv=False)[0]))
  return out


def test_power_state_converges_to_top_singular_values():
  model = U.conv_model("clipped_relu")
  v = U.init_random(model, jax.random.PRNGKey(5))
  x = jax.random.uniform(jax.random.PRNGKey(6), (4,) + model.input_shape)
  y = jnp.arange(4) % 3
  truth = _explicit_top_singular_values(model, v)
  step = jax.jit(lambda vv, p: training.worst_case_deltas(
      model, vv, x, y, 0.1, iterations=1, power=p, global_iterations=2,
      estimator="power")[2]["power"])

  def rel_err(p):
    return np.array([abs(float(jnp.linalg.norm(st.linear(u))) - s) / s
                     for (st, s), u in zip(truth, p.vectors)])

  power = training.init_power_state(model, v, key=jax.random.PRNGKey(7), iterations=0)
  first = rel_err(power)
  for _ in range(30):
    power = step(v, power)
  last = rel_err(power)
  assert np.all(first > 1e-2)   # a random start is far off
  assert np.all(last < 2e-3), last
  for u in power.vectors:
    np.testing.assert_allclose(float(jnp.linalg.norm(u)), 1.0, rtol=1e-5)


def test_lanczos_state_follows_the_union_masked_maps():
  # The Lanczos estimator's running vectors converge to the top right singular
  # vectors of each layer's map under the union of the batch's masks, and each
  # example's estimate to its own masked norm (explicit matrices, numpy SVD).
  model = U.conv_model("clipped_relu")
  v = U.init_random(model, jax.random.PRNGKey(5))
  x = jax.random.uniform(jax.random.PRNGKey(6), (4,) + model.input_shape)
  y = jnp.arange(4) % 3
  eps = 0.3
  call = jax.jit(lambda p: training.worst_case_deltas(model, v, x, y, eps, power=p,
                                                      estimator="lanczos"))
  power = training.init_power_state(model, v, key=jax.random.PRNGKey(7), iterations=0)
  for _ in range(4):
    _, _, aux = call(power)
    power = aux["power"]
  _, _, aux = call(power)
  lb = aux["local_bound"]
  stages = trace_lib.trace(model, v, model.input_shape)
  col_prev = jnp.ones_like(x)
  checked = 0
  for l, st in enumerate(stages):
    mat = np.asarray(norms.explicit_jacobian(st.linear, st.in_shape),
                     np.float64)
    row = np.asarray(lb.layers[l].row_mask).reshape(4, -1)
    col = np.asarray(col_prev).reshape(4, -1)
    union = np.max(row, 0)[:, None] * mat * np.max(col, 0)[None, :]
    top = np.linalg.svd(union, compute_uv=False)[0]
    u = np.asarray(power.vectors[l], np.float64).reshape(-1)
    if top > 0:
      np.testing.assert_allclose(np.linalg.norm(union @ u), top, rtol=1e-3)
    for b in range(4):
      own = np.linalg.svd(row[b][:, None] * mat * col[b][None, :], compute_uv=False)[0]
      est = float(np.asarray(aux["layer_norms"][l])[b])
      assert est <= own * (1 + 1e-4) + 1e-6          # an estimate from below
      assert est >= own * 0.97, (l, b, est, own)      # and a close one
      checked += 1
    col_prev = lb.layers[l].col_mask
  assert checked == 4 * len(stages)


def test_fresh_state_and_bad_state():
  model = _one_hidden(lnn.ClippedReLU(theta_init=0.5))
  v = U.init_random(model, jax.random.PRNGKey(8))
  x = jax.random.uniform(jax.random.PRNGKey(9), (3, 4))
  y = jnp.array([0, 1, 2])
  _, _, aux = training.worst_case_deltas(model, v, x, y, EPS, power=None,
                                         key=jax.random.PRNGKey(1))
  assert [a.shape for a in aux["power"].vectors] == [(1, 4), (1, 6)]
  bad = lipjax.PowerState((jnp.ones((1, 4)),))
  with pytest.raises(ValueError, match="power state"):
    training.worst_case_deltas(model, v, x, y, EPS, power=bad)
  bad = lipjax.PowerState((jnp.ones((3, 4)), jnp.ones((3, 6))))
  with pytest.raises(ValueError, match="shape"):
    training.worst_case_deltas(model, v, x, y, EPS, power=bad)
  with pytest.raises(ValueError, match="bound"):
    training.worst_case_deltas(model, v, x, y, EPS, bound="nope")
