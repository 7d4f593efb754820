"""Local and global Lipschitz bounds against independent truth.

Truth: the spectral norm (numpy SVD) of the logits' Jacobian (``jax.jacfwd`` of
the model's own ``apply``) at the centre, at points sampled in the ball and at
points found by projected gradient ascent of the difference quotient
``||f(a) - f(b)|| / ||a - b||`` over pairs in the ball (the Jacobian's norm is
piecewise constant for these networks, so its gradient is zero almost
everywhere; the difference quotient has useful gradients and is itself a lower
bound of the Lipschitz constant on the ball).
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lipjax
from lipjax._src import trace as trace_lib
from lipjax import nn as lnn

import _bounds_util as U
import conftest

B = 3
RTOL = 1e-5


def _models():
  out = {}
  for i, kind in enumerate(("clipped_relu", "clipped_maxmin")):
    m = U.conv_model(kind)
    out[f"conv-{kind}"] = (m, U.init_random(m, jax.random.PRNGKey(20 + i)))
  m = U.mlp_model("clipped_relu")
  out["mlp-clipped_relu"] = (m, U.init_random(m, jax.random.PRNGKey(30)))
  return out


MODELS = _models()
# Models on which the compile-heavy checks (outer jit, gradients) run.
HEAVY = ("conv-clipped_relu", "mlp-clipped_relu")


def _x(model, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(100 + seed), (B,) + model.input_shape)


@pytest.fixture(scope="module", params=sorted(MODELS))
def net(request):
  model, variables = MODELS[request.param]
  return request.param, model, variables, _x(model)


def _jacobian_norms(model, variables, pts):
  """Spectral norms of the logits' Jacobian at ``(N, *shape)`` points."""
  f = lambda p: model.apply(variables, p[None])[0]
  jac = jax.jit(jax.vmap(jax.jacfwd(f)))(pts)
  jac = np.asarray(jac, np.float64).reshape(pts.shape[0], jac.shape[1], -1)
  return np.linalg.svd(jac, compute_uv=False)[:, 0]


@functools.lru_cache(maxsize=None)
def _quotient_ascent(name, steps=60, restarts=8):
  """Jitted search for pairs ``a, b`` in the ball maximising the difference
  quotient, ``restarts`` starts per example."""
  model, variables = MODELS[name]

  def quotient(a, bb):
    fa, fb = model.apply(variables, a), model.apply(variables, bb)
    num = jnp.sqrt(jnp.sum(jnp.square(fa - fb), -1) + 1e-30)
    den = jnp.sqrt(jnp.sum(jnp.square((a - bb).reshape(a.shape[0], -1)), -1) + 1e-30)
    return num / den

  def run(x, eps, key):
    eps_b = jnp.full((x.shape[0],), eps)
    k1, k2 = jax.random.split(key)
    a0 = U.sample_ball(k1, x, eps_b, restarts, uniform_radius=True)
    dirs = U.normalised(jax.random.normal(k2, a0.shape), 2)
    b0 = U.project(a0 + 0.05 * eps * dirs, x, eps_b)

    def one(a, bb):
      def body(t, carry):
        a, bb, best, best_a, best_b = carry
        step = 0.1 * eps * (1.0 - t / steps) + 0.002 * eps
        ga, gb = jax.grad(lambda a, bb: jnp.sum(jnp.log(quotient(a, bb))), (0, 1))(a, bb)
        a = U.project(a + step * U.normalised(ga, 1), x, eps_b)
        bb = U.project(bb + step * U.normalised(gb, 1), x, eps_b)
        q = quotient(a, bb)
        better = q > best
        bc = lambda s: s.reshape((-1,) + (1,) * (a.ndim - 1))
        best_a = jnp.where(bc(better), a, best_a)
        best_b = jnp.where(bc(better), bb, best_b)
        return a, bb, jnp.maximum(q, best), best_a, best_b
      init = (a, bb, quotient(a, bb), a, bb)
      _, _, best, best_a, best_b = jax.lax.fori_loop(0, steps, body, init)
      return best, best_a, best_b

    return jax.vmap(one)(a0, b0)

  return jax.jit(run)


# ---------------------------------------------------------------------------
# Local vs global
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_local_is_at_most_global(net, eps):
  name, model, v, x = net
  g, gn = lipjax.global_lipschitz_bound(model, v, per_layer=True)
  lb = lipjax.local_lipschitz_bound(model, v, x, eps)
  bound = np.asarray(lb.bound)
  assert bound.shape == (B,)
  assert np.all(np.isfinite(bound)) and np.all(bound >= 0)
  assert np.all(bound <= float(g) * (1 + RTOL)), (bound, float(g))
  for s, gl in zip(lb.layer_norms, gn):
    assert np.all(np.asarray(s) <= float(gl) * (1 + RTOL))
  for a, b_ in zip(lb.global_norms, gn):
    np.testing.assert_allclose(float(a), float(b_), rtol=RTOL)
  np.testing.assert_allclose(float(g), np.prod([float(a) for a in gn]), rtol=RTOL)
  np.testing.assert_allclose(bound, np.prod(np.stack([np.asarray(s) for s in
                                                      lb.layer_norms]), 0), rtol=RTOL)
  assert np.all(np.asarray(lb.estimate) <= bound * (1 + RTOL))
  fp = np.asarray(lb.failure_probability)
  if name.startswith("mlp"):
    np.testing.assert_array_equal(fp, 0.0)   # dense layers: deterministic
  else:
    assert np.all((fp > 0) & (fp <= 1e-9 * (1 + 1e-6)))


def _exact_layer_norm(model, v, l, in_shape):
  """Exact ||W_l|| from the explicit Jacobian of linear layer ``l`` alone."""
  idx = U.linear_indices(model)[l]
  layer = model.layers[idx]
  params = v["params"].get(f"layers_{idx}", {})
  f = lambda h: layer.apply({"params": params}, h[None])[0]   # affine: its Jacobian is W
  jac = jax.jacfwd(f)(jnp.zeros(in_shape))
  return float(np.linalg.svd(np.asarray(jac).reshape(-1, int(np.prod(in_shape))),
                             compute_uv=False)[0])


def _unclipped(v):
  """Clipped-ReLU thresholds so high that no neuron saturates: with eps huge,
  every neuron then varies (a clipped layer's outputs are bounded, so the
  next layer can have neurons that are constant for every eps otherwise)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(v)
  return jax.tree_util.tree_unflatten(
      treedef, [jnp.full_like(a, 1e7) if p[-1].key == "theta" else a for p, a in leaves])


def test_masks_that_keep_everything_share_one_unmasked_run(net):
  # In one batch, examples whose masks keep every neuron (huge eps) share a
  # single Lanczos run on the unmasked layer while the others run their own
  # masked ones: each local norm must still bound the explicit masked
  # matrix ||D_r W D_c|| (SVD), the full ones tightly.
  name, model, v, x = net
  if name.startswith("mlp"):
    pytest.skip("dense layers use the exact masked norm, no Lanczos")
  v = _unclipped(v)
  eps = jnp.where(jnp.arange(x.shape[0]) % 2 == 0, 1e4, 0.05).astype(jnp.float32)
  lb = lipjax.local_lipschitz_bound(model, v, x, eps)
  stages = trace_lib.trace(model, v, tuple(x.shape[1:]))
  full_seen = part_seen = False
  for l, st in enumerate(stages):
    if st.layer.explicit_matrix(st.params) is not None:
      continue
    n = int(np.prod(st.in_shape))
    basis = jnp.eye(n, dtype=jnp.float32).reshape((n,) + tuple(st.in_shape))
    w = np.asarray(jax.vmap(lambda e_: st.linear(e_[None])[0])(basis), np.float64)
    w = w.reshape(n, -1).T                                     # (out, in)
    layer = lb.layers[l]
    rows = np.asarray(layer.row_mask).reshape(x.shape[0], -1)
    cols = (np.ones((x.shape[0], n)) if l == 0 else
            np.asarray(lb.layers[l - 1].col_mask).reshape(x.shape[0], -1))
    s = np.asarray(lb.layer_norms[l])
    for b in range(x.shape[0]):
      exact = np.linalg.svd(rows[b][:, None] * w * cols[b][None, :], compute_uv=False)[0]
      assert s[b] >= exact, (name, l, b, s[b], exact)
      if rows[b].min() == 1 and cols[b].min() == 1:
        full_seen = True
        assert s[b] <= exact * 1.02, (name, l, b, s[b], exact)
      else:
        part_seen = True
  assert full_seen and part_seen


def test_local_equals_global_when_every_neuron_varies(net):
  name, model, v, x = net
  v = _unclipped(v)
  g, gn = lipjax.global_lipschitz_bound(model, v, per_layer=True)
  lb = lipjax.local_lipschitz_bound(model, v, x, 1e4)
  for layer in lb.layers:
    np.testing.assert_array_equal(np.asarray(layer.col_mask), 1.0)
    np.testing.assert_array_equal(np.asarray(layer.row_mask), 1.0)
  if name.startswith("mlp"):
    np.testing.assert_allclose(np.asarray(lb.bound), float(g), rtol=RTOL)
    return
  # Convolutions: the sound local norm is min(Lanczos upper bound, circulant
  # bound), and the Lanczos bound (within ~1% of the exact norm) is often
  # below the circulant one, so with nothing masked, local is between the
  # product of exact norms and the global bound; dense layers match exactly.
  exact = []
  in_shape = model.input_shape
  for l, (s, gl) in enumerate(zip(lb.layer_norms, gn)):
    layer = model.layers[U.linear_indices(model)[l]]
    if isinstance(layer, lnn.Dense):
      in_shape = (int(np.prod(in_shape)),)
    e = _exact_layer_norm(model, v, l, in_shape)
    exact.append(e)
    s = np.asarray(s)
    assert np.all(s >= e) and np.all(s <= float(gl) * (1 + RTOL)), (l, s, e, float(gl))
    if isinstance(layer, lnn.Dense):
      np.testing.assert_allclose(s, float(gl), rtol=RTOL)
    else:
      assert np.all(s <= e * 1.02)   # the Lanczos slack at 100 steps
    in_shape = tuple(np.asarray(lb.layers[l].center).shape[1:])
  assert np.all(np.asarray(lb.bound) >= np.prod(exact))
  assert np.all(np.asarray(lb.bound) <= float(g) * (1 + RTOL))


def test_local_equals_global_for_relu_mlp():
  model = U.mlp_model("relu")
  v = U.init_random(model, jax.random.PRNGKey(33))
  x = _x(model)
  g = float(lipjax.global_lipschitz_bound(model, v))
  lb = lipjax.local_lipschitz_bound(model, v, x, 1e4)
  np.testing.assert_allclose(np.asarray(lb.bound), g, rtol=RTOL)
  # ... and strictly below it on a small ball where some neurons are dead.
  small = lipjax.local_lipschitz_bound(model, v, x, 0.01)
  assert np.all(np.asarray(small.bound) < g)


# ---------------------------------------------------------------------------
# The bound is above the Jacobian norm everywhere in the ball
# ---------------------------------------------------------------------------


def _quotients(model, v, a, bb):
  """Difference quotients recomputed outside the search, and their rounding
  error allowance (float32 logits: ~1e-6 relative)."""
  fa = np.asarray(model.apply(v, a), np.float64)
  fb = np.asarray(model.apply(v, bb), np.float64)
  den = np.linalg.norm(np.asarray(a - bb, np.float64).reshape(a.shape[0], -1), axis=1)
  num = np.linalg.norm(fa - fb, axis=1)
  allowance = 1e-6 * (1 + np.abs(fa).max(1) + np.abs(fb).max(1))
  ok = den > 1e-4
  return np.where(ok, num / np.maximum(den, 1e-30), 0.0), np.where(
      ok, allowance / np.maximum(den, 1e-30), 0.0)


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_bound_covers_jacobian_and_difference_quotients(net, eps):
  name, model, v, x = net
  lb = lipjax.local_lipschitz_bound(model, v, x, eps)
  bound = np.asarray(lb.bound)
  eps_b = jnp.full((B,), eps)
  samples = U.sample_ball(jax.random.PRNGKey(1), x, eps_b, 48)
  inner = U.sample_ball(jax.random.PRNGKey(2), x, eps_b, 16, uniform_radius=True)
  _, best_a, best_b = _quotient_ascent(name)(x, jnp.float32(eps), jax.random.PRNGKey(3))
  # Points: centre, samples, ascent end points and the midpoints of the pairs.
  pts = jnp.concatenate([x[None], samples, inner, best_a, best_b,
                         0.5 * (best_a + best_b)])
  n = pts.shape[0]
  norms = _jacobian_norms(model, v, pts.reshape((-1,) + x.shape[1:])).reshape(n, B)
  assert np.all(norms <= bound[None] * (1 + RTOL)), (
      name, eps, float(np.max(norms / np.maximum(bound[None], 1e-30))))
  flat = lambda a: a.reshape((-1,) + x.shape[1:])
  q, allow = _quotients(model, v, flat(best_a), flat(best_b))
  q, allow = q.reshape(-1, B), allow.reshape(-1, B)
  assert np.all(q <= bound[None] * (1 + 1e-4) + allow), (name, eps, q.max(0), bound)
  # Random pairs too (not only the optimised ones).
  q2, allow2 = _quotients(model, v, flat(samples[:24]), flat(samples[24:]))
  assert np.all(q2.reshape(-1, B) <= bound[None] * (1 + 1e-4) + allow2.reshape(-1, B))
  # The search is not vacuous where the bound is not 0.
  assert np.all((q.max(0) > 0) | (bound == 0))
  # The global bound covers them too.
  g = float(lipjax.global_lipschitz_bound(model, v))
  assert np.max(norms) <= g * (1 + RTOL)


def test_bound_ratio_report(net):
  """Tightness figure (bound / best lower bound found); asserts only sanity."""
  name, model, v, x = net
  eps = 0.3
  lb = lipjax.local_lipschitz_bound(model, v, x, eps)
  g = float(lipjax.global_lipschitz_bound(model, v))
  _, a, bb = _quotient_ascent(name)(x, jnp.float32(eps), jax.random.PRNGKey(3))
  q, _ = _quotients(model, v, a.reshape((-1,) + x.shape[1:]),
                    bb.reshape((-1,) + x.shape[1:]))
  best = q.reshape(-1, B).max(0)
  ratio = np.asarray(lb.bound) / np.maximum(best, 1e-30)
  print(f"\n{name}: eps={eps} local={np.round(np.asarray(lb.bound), 3)} global={g:.3f} "
        f"best quotient={np.round(best, 3)} local/best={np.round(ratio, 2)}")
  assert np.all(ratio >= 1 - 1e-4)


# ---------------------------------------------------------------------------
# jit, estimate mode, gradients, warm starts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", HEAVY)
def test_jitted_and_unjitted_agree(name):
  model, v = MODELS[name]
  x = _x(model)
  eps = 0.2
  plain = lipjax.local_lipschitz_bound(model, v, x, eps).bound
  jitted = jax.jit(lambda vv, xx: lipjax.local_lipschitz_bound(model, vv, xx, eps).bound)
  np.testing.assert_allclose(np.asarray(jitted(v, x)), np.asarray(plain), rtol=RTOL)


def _random_state(model, key):
  """A cold start given explicitly (same compiled function as warm starts)."""
  stages = trace_lib.trace(model, MODELS_BY_MODEL[id(model)], model.input_shape)
  shapes = [(B,) + st.in_shape for st in stages]
  keys = jax.random.split(key, len(shapes))
  return lipjax.PowerState(tuple(jax.random.normal(k, s) for k, s in zip(keys, shapes)))


MODELS_BY_MODEL = {id(m): v for m, v in MODELS.values()}


def test_estimate_is_below_sound(net):
  name, model, v, x = net
  for eps in (0.05, 0.3):
    est = lipjax.local_lipschitz_bound(model, v, x, eps, mode="estimate", iterations=2,
                                       state=_random_state(model, jax.random.PRNGKey(1)))
    # Estimate mode uses global norms for the intermediate radii (its masks
    # are those of intermediate="global"): compare with the sound bound on
    # the same masks.
    sound = lipjax.local_lipschitz_bound(model, v, x, eps, intermediate="global")
    for le, ls in zip(est.layers, sound.layers):
      np.testing.assert_array_equal(np.asarray(le.col_mask), np.asarray(ls.col_mask))
    assert np.all(np.asarray(est.bound) <= np.asarray(sound.bound) * (1 + 1e-5))
    for se, ss in zip(est.layer_norms, sound.layer_norms):
      assert np.all(np.asarray(se) <= np.asarray(ss) * (1 + 1e-5))
    np.testing.assert_array_equal(np.asarray(est.failure_probability), 1.0)
    # The default sound bound (local intermediate radii) is never looser.
    default = lipjax.local_lipschitz_bound(model, v, x, eps)
    assert np.all(np.asarray(default.bound) <= np.asarray(sound.bound) * (1 + 1e-5))
    assert np.all(np.asarray(est.bound) <= np.asarray(default.bound) * (1 + 1e-5))


@pytest.mark.parametrize("name,grad", [("conv-clipped_relu", "constant"),
                                       ("conv-clipped_relu", "through"),
                                       # One example of this random MLP has a
                                       # hidden layer with every neuron constant
                                       # at eps=0.1 (see the test below).
                                       ("mlp-clipped_relu", "constant")])
def test_estimate_gradients_are_finite(name, grad):
  model, v = MODELS[name]
  x = _x(model)

  def loss(vv):
    return jnp.sum(lipjax.local_lipschitz_bound(model, vv, x, 0.1, mode="estimate",
                                                iterations=2, grad=grad).bound)

  val, g = jax.value_and_grad(loss)(v)
  assert np.isfinite(float(val))
  bad = {jax.tree_util.keystr(p): bool(jnp.all(jnp.isfinite(a)))
         for p, a in jax.tree_util.tree_leaves_with_path(g)}
  assert all(bad.values()), f"non-finite gradient entries: {bad}"
  # Not identically zero: the bound depends on the kernels.
  assert any(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree_util.tree_leaves(g))


@pytest.mark.parametrize("grad", ["constant", "through"])
def test_estimate_gradients_are_finite_when_a_layer_is_all_constant(grad):
  # A hidden layer whose neurons are all constant on the ball (here: dead
  # ReLUs; in training, saturated clipped ReLUs do this too) makes the masked
  # operator zero. The bound is then 0 and its gradient must stay finite: a
  # NaN gradient poisons the whole batch's update.
  model = U.mlp_model("relu")
  v = U.init_random(model, jax.random.PRNGKey(5))
  v = U.set_param(v, "layers_2", "bias", slice(None), -100.0)
  x = _x(model)

  def loss(vv):
    return jnp.sum(lipjax.local_lipschitz_bound(model, vv, x, 0.1, mode="estimate",
                                                iterations=2, grad=grad).bound)

  val, g = jax.value_and_grad(loss)(v)
  assert float(val) == 0.0
  bad = {jax.tree_util.keystr(p): bool(jnp.all(jnp.isfinite(a)))
         for p, a in jax.tree_util.tree_leaves_with_path(g)}
  assert all(bad.values()), f"non-finite gradient entries: {bad}"


def test_warm_start_improves_estimate(net):
  name, model, v, x = net
  eps = 0.2
  target = np.asarray(lipjax.local_lipschitz_bound(model, v, x, eps,
                                                   intermediate="global").bound)
  first = lipjax.local_lipschitz_bound(model, v, x, eps, mode="estimate", iterations=2,
                                       state=_random_state(model, jax.random.PRNGKey(7)))
  cur = first
  history = [np.asarray(first.bound)]
  for _ in range(6):
    cur = lipjax.local_lipschitz_bound(model, v, x, eps, mode="estimate", iterations=2,
                                       state=cur.state)
    history.append(np.asarray(cur.bound))
  history = np.stack(history)
  # Each warm-started call is at least as high as the previous one (the power
  # method's ||A u_k|| is non-decreasing in k), and never above the sound value.
  assert np.all(np.diff(history, axis=0) >= -1e-5 * history[1:])
  assert np.all(history <= target[None] * (1 + 1e-5))
  assert np.all(np.abs(target - history[-1]) <= np.abs(target - history[0]) + 1e-6)
  # A cold start with the same number of iterations is not better.
  cold = lipjax.local_lipschitz_bound(model, v, x, eps, mode="estimate", iterations=2,
                                      state=_random_state(model, jax.random.PRNGKey(8)))
  assert np.all(history[-1] >= np.asarray(cold.bound) * (1 - 1e-5))
  # Mismatched state is a clear error.
  bad = lipjax.PowerState(tuple(a[:1] for a in cur.state.vectors))
  with pytest.raises(ValueError, match="state"):
    lipjax.local_lipschitz_bound(model, v, x, eps, mode="estimate", iterations=2,
                                 state=bad)


def test_dense_lanczos_option_is_also_sound():
  model, v = MODELS["mlp-clipped_relu"]
  x = _x(model)
  eps = 0.3
  exact = lipjax.local_lipschitz_bound(model, v, x, eps)
  lanczos = lipjax.local_lipschitz_bound(model, v, x, eps, dense="lanczos")
  assert np.all(np.asarray(lanczos.bound) >= np.asarray(exact.bound) * (1 - 1e-5))
  assert np.all(np.asarray(lanczos.bound) <= np.asarray(exact.bound) * 1.1)
  assert np.all(np.asarray(lanczos.failure_probability) > 0)


def test_nan_parameters_never_give_a_finite_bound():
  # A NaN parameter makes the network's output NaN; a finite (e.g. zero)
  # Lipschitz "bound" reported as sound would be wrong.
  model, v = MODELS["conv-clipped_relu"]
  x = _x(model)
  for layer, pname, index in (("layers_0", "bias", (1,)), ("layers_1", "theta", (0, 0, 0))):
    bad = U.set_param(v, layer, pname, index, jnp.nan)
    assert not np.all(np.isfinite(np.asarray(model.apply(bad, x))))
    error = None
    try:
      lb = lipjax.local_lipschitz_bound(model, bad, x, 0.1)
    except Exception as e:   # pylint: disable=broad-except
      error = e
    if error is not None:    # a clear error is fine
      head = str(error).lower().split("traceback")[0]
      assert "nan" in head or "finite" in head, str(error)[:200]
      continue
    assert not np.any(np.isfinite(np.asarray(lb.bound))), (
        layer, pname, np.asarray(lb.bound))


def test_concurrent_dispatches_do_not_deadlock():
  # Several bound computations dispatched asynchronously at once: batched
  # LAPACK kernels inside XLA computations deadlocked here (two SVDs waiting
  # on one CPU thread pool), so global norms are computed on the host. A
  # small conv model (one compiled estimate, dispatched four times: the
  # default level's compile is most of the test's time). Run in
  # a subprocess so that a hang fails the test instead of stalling the suite,
  # with the XLA settings users run (multi-threaded, not the tests' own).
  code = (
      "import jax, jax.numpy as jnp, lipjax\n"
      "from lipjax import nn\n"
      "model = nn.Sequential((nn.Conv(8, 3, 1, 1), nn.ClippedReLU(1.0), nn.Conv(8, 4, 2, 1),\n"
      "                       nn.ClippedReLU(1.0), nn.Flatten(), nn.Dense(10)),\n"
      "                      input_shape=(12, 12, 1))\n"
      "v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 1)))\n"
      "x = jax.random.uniform(jax.random.PRNGKey(1), (8, 12, 12, 1))\n"
      "rs = [lipjax.local_lipschitz_bound(model, v, x, 1.58, mode='estimate')\n"
      "      for _ in range(4)]\n"
      "gs = [lipjax.global_lipschitz_bound(model, v) for _ in range(4)]\n"
      "jax.block_until_ready((rs, gs))\n"
      "assert all(float(g) == float(gs[0]) for g in gs)\n"
      "print('done')\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=240, env=conftest.default_xla_env())
  assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]
