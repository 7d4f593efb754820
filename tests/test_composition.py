"""Using lipjax's bounds inside models and training loops lipjax did not define.

Covers: a user's Flax module holding a lipjax extractor as a submodule, a
bound penalty in the user's own Optax loop, ``jax.grad`` through
``local_lipschitz_bound`` against central finite differences (float64),
``jit``/``vmap`` over the bound, errors for unsupported layers, and a new
linear layer (average pooling) defined by its forward map only.
"""

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lipjax
from lipjax import nn as lnn
from examples import compose_flax, custom_linear_layer


def _small_dense():
  return lnn.Sequential((lnn.Dense(6), lnn.ReLU(), lnn.Dense(5),
                         lnn.ClippedReLU(theta_init=0.5), lnn.Dense(3)), input_shape=(4,))


# ---------------------------------------------------------------------------
# A lipjax extractor inside the user's Flax module
# ---------------------------------------------------------------------------


def test_submodule_bound_uses_the_submodules_variables():
  net = compose_flax.UserNet(compose_flax.feature_extractor())
  x, _ = compose_flax.toy_data(16)
  variables = net.init(jax.random.PRNGKey(0), x[:1])
  sub = {"params": variables["params"]["features"]}
  # The submodule applied alone gives the same features as inside the parent.
  _, inter = net.apply(variables, x, capture_intermediates=True)
  feats = inter["intermediates"]["features"]["__call__"][0]
  np.testing.assert_allclose(net.features.apply(sub, x), feats, rtol=1e-5, atol=1e-6)
  res = lipjax.local_lipschitz_bound(net.features, sub, x, 0.1)
  assert res.bound.shape == (16,)
  # Independent truth: Jacobian norms at points of each ball stay below the bound.
  jac = jax.vmap(jax.jacobian(lambda xi: net.features.apply(sub, xi[None])[0]))
  rng = np.random.default_rng(0)
  for _ in range(4):
    d = rng.normal(size=x.shape)
    d *= 0.1 * rng.random((16, 1)) / np.linalg.norm(d, axis=1, keepdims=True)
    norms = np.linalg.svd(np.asarray(jac(x + d), np.float64), compute_uv=False)[:, 0]
    assert np.all(norms <= np.asarray(res.bound) * (1 + 1e-5))
  glob = float(lipjax.global_lipschitz_bound(net.features, sub))
  assert np.all(np.asarray(res.bound) <= glob * (1 + 1e-5))


def test_wrong_variables_get_a_clear_error():
  net = compose_flax.UserNet(compose_flax.feature_extractor())
  x, _ = compose_flax.toy_data(4)
  variables = net.init(jax.random.PRNGKey(0), x[:1])
  with pytest.raises(lipjax.UnsupportedModelError, match=r"variables\['params'\]\[NAME\]"):
    lipjax.local_lipschitz_bound(net.features, variables, x, 0.1)   # parent's variables
  with pytest.raises(lipjax.UnsupportedModelError, match="UserNet"):
    lipjax.local_lipschitz_bound(net, variables, x, 0.1)   # the whole user model


def test_bound_penalty_in_users_optax_loop_lowers_the_sound_bound():
  net = compose_flax.UserNet(compose_flax.feature_extractor())
  x, y = compose_flax.toy_data()
  init = net.init(jax.random.PRNGKey(0), x[:1])["params"]
  params, history = compose_flax.train(net, x, y, steps=40, weight=0.1)
  before = compose_flax.feature_bound(net, init, x[:64], 0.1)
  after = compose_flax.feature_bound(net, params, x[:64], 0.1)
  acc = float(jnp.mean(jnp.argmax(net.apply({"params": params}, x), -1) == y))
  assert acc > 0.9
  assert history[-1][0] < history[0][0]
  assert history[-1][1] < history[0][1]        # the penalised estimate went down
  assert float(jnp.median(after)) < 0.85 * float(jnp.median(before))   # sound bound too


# ---------------------------------------------------------------------------
# jax.grad against finite differences
# ---------------------------------------------------------------------------


def _fd_check(iterations, grad):
  """Directional derivative by autodiff vs central differences, in float64.

  Float64 power vectors are passed as the warm start so that the whole
  computation runs in float64 (``jax.linear_transpose`` keeps the dtype of
  the vectors it transposes at).
  """
  model = _small_dense()
  with jax.enable_x64(True):
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 4), dtype=jnp.float64)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                    model.init(jax.random.PRNGKey(0), x)["params"])
    shapes = [(3, 4), (3, 6), (3, 5)]
    state = lipjax.PowerState(tuple(
        jax.random.normal(jax.random.PRNGKey(10 + i), s, jnp.float64)
        for i, s in enumerate(shapes)))
    weights = jnp.array([1.0, 2.0, 3.0])

    def run(p):
      return lipjax.local_lipschitz_bound(model, {"params": p}, x, 0.05, mode="estimate",
                                          iterations=iterations, grad=grad, state=state)

    def objective(p):
      return jnp.sum(run(p).bound * weights)

    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    direction = jax.tree_util.tree_unflatten(
        tree, [jax.random.normal(k, a.shape, jnp.float64) for a, k in zip(leaves, keys)])
    g = jax.grad(objective)(params)
    auto = sum(float(jnp.vdot(a, b)) for a, b in
               zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(direction)))
    h = 1e-6
    plus = jax.tree_util.tree_map(lambda a, b: a + h * b, params, direction)
    minus = jax.tree_util.tree_map(lambda a, b: a - h * b, params, direction)
    r_plus, r_minus, r0 = run(plus), run(minus), run(params)
    # The masks must not flip inside the step (else the function is not smooth
    # there); some neurons must be constant so that the masks matter.
    for a, b in zip(jax.tree_util.tree_leaves(r_plus.masks),
                    jax.tree_util.tree_leaves(r_minus.masks)):
      np.testing.assert_array_equal(a, b)
    assert 0 < float(jnp.mean(r0.masks[1][1])) < 1
    assert r0.bound.dtype == jnp.float64
    fd = float(jnp.sum((r_plus.bound - r_minus.bound) * weights)) / (2 * h)
  return auto, fd


def test_grad_through_iterations_matches_finite_differences():
  auto, fd = _fd_check(iterations=3, grad="through")
  assert abs(auto - fd) <= 1e-6 * max(1.0, abs(fd)), (auto, fd)


def test_global_bound_is_differentiable():
  # A sound, differentiable regulariser: the exact global bound (dense SVDs).
  model = _small_dense()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
  f = lambda p: lipjax.global_lipschitz_bound(model, {"params": p})
  d = jax.tree_util.tree_map(lambda a: jnp.sign(a) + 0.5, params)
  auto = sum(float(jnp.vdot(a, b)) for a, b in zip(
      jax.tree_util.tree_leaves(jax.grad(f)(params)), jax.tree_util.tree_leaves(d)))
  h = 1e-3   # float32 inside the bound: a larger step, a looser tolerance
  fd = float(f(jax.tree_util.tree_map(lambda a, b: a + h * b, params, d))
             - f(jax.tree_util.tree_map(lambda a, b: a - h * b, params, d))) / (2 * h)
  assert abs(auto - fd) <= 1e-2 * max(1.0, abs(fd)), (auto, fd)


# ---------------------------------------------------------------------------
# jit and vmap
# ---------------------------------------------------------------------------


def test_jit_and_vmap_over_the_bound():
  model = _small_dense()
  xs = jax.random.uniform(jax.random.PRNGKey(1), (3, 5, 4))     # 3 batches of 5
  inits = [model.init(jax.random.PRNGKey(s), xs[0, :1])["params"] for s in range(3)]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *inits)
  for mode in ("sound", "estimate"):
    def bound(p, x, mode=mode):
      return lipjax.local_lipschitz_bound(model, {"params": p}, x, 0.1, mode=mode).bound
    eager = np.stack([np.asarray(bound(p, x)) for p, x in zip(inits, xs)])
    # jit of vmap over an ensemble of parameter sets, each with its own batch.
    batched = jax.jit(jax.vmap(bound))(stacked, xs)
    np.testing.assert_allclose(batched, eager, rtol=1e-5)
    assert np.all(np.isfinite(eager)) and np.all(eager > 0)


# ---------------------------------------------------------------------------
# Unsupported layers
# ---------------------------------------------------------------------------


class _Swish(fnn.Module):
  def __call__(self, z):
    return z * jax.nn.sigmoid(z)


@pytest.mark.parametrize("layer, name", [
    (fnn.BatchNorm(use_running_average=True), "BatchNorm"),
    (_Swish(), "_Swish"),
])
def test_unsupported_layer_error_names_it_and_lists_supported(layer, name):
  model = lnn.Sequential((lnn.Dense(6), layer, lnn.Dense(3)), input_shape=(4,))
  x = jnp.ones((2, 4))
  variables = model.init(jax.random.PRNGKey(0), x)
  for call in (lambda: lipjax.local_lipschitz_bound(model, variables, x, 0.1),
               lambda: lipjax.global_lipschitz_bound(model, variables),
               lambda: lipjax.certify(model, variables, x, jnp.zeros(2, jnp.int32), 0.1)):
    with pytest.raises(lipjax.UnsupportedModelError) as err:
      call()
    msg = str(err.value)
    assert name in msg and "layers_1" in msg
    for supported in ("lipjax.nn.Dense", "lipjax.nn.Conv", "lipjax.nn.ClippedReLU",
                      "lipjax.nn.LinearLayer", "lipjax.nn.Activation"):
      assert supported in msg


# ---------------------------------------------------------------------------
# A new linear layer from its forward map only (examples/custom_linear_layer.py)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pooled_model():
  model = custom_linear_layer.make_model()
  x, y = custom_linear_layer.toy_data(120)
  variables = custom_linear_layer.train(model, x, y)
  return model, variables, x, y, lipjax.certify(model, variables, x, y, 0.8)


def test_new_linear_layer_norm_matches_numpy_svd(pooled_model):
  model, variables, x, _, cert = pooled_model
  # The pooling matrix built independently in numpy.
  mat = custom_linear_layer.pooling_matrix(8, 8, 4, 2)
  h = np.random.default_rng(0).random((3, 8, 8, 4)).astype(np.float32)
  np.testing.assert_allclose(
      custom_linear_layer.MeanPool(2).linear({}, jnp.asarray(h)).reshape(3, -1),
      h.reshape(3, -1) @ mat.T, rtol=1e-6)
  ref = np.linalg.svd(mat, compute_uv=False)[0]
  _, per_layer = lipjax.global_lipschitz_bound(model, variables, per_layer=True)
  assert ref <= float(per_layer[1]) <= ref * (1 + 1e-3)
  # Independent truth: the network's Jacobian norm at points of each ball is
  # below the local bound the certificate used.
  jac = jax.vmap(jax.jacobian(lambda xi: model.apply(variables, xi[None])[0]))
  d = np.random.default_rng(1).normal(size=(16, 8, 8, 1))
  d *= 0.8 / np.linalg.norm(d.reshape(16, -1), axis=1)[:, None, None, None]
  bound = np.asarray(cert.lipschitz)[:16]
  assert np.all(np.isfinite(bound))
  for pts in (x[:16], x[:16] + d):
    j = np.asarray(jac(pts), np.float64).reshape(16, 3, -1)
    assert np.all(np.linalg.svd(j, compute_uv=False)[:, 0] <= bound)


def test_new_linear_layer_certificates_survive_pgd(pooled_model):
  model, variables, x, y, cert = pooled_model
  certified = np.asarray(cert.certified)
  assert 0.2 < certified.mean()
  adv = custom_linear_layer.pgd_l2(model, variables, x, y, 0.8)
  assert np.all(np.linalg.norm(np.asarray(adv - x).reshape(len(x), -1), axis=1) <= 0.8 + 1e-4)
  broken = np.asarray(jnp.argmax(model.apply(variables, adv), -1) != y)
  assert not np.any(certified & broken)
  # The attack is strong enough to matter: at a larger radius it breaks most
  # points, and none of those was certified there.
  cert2 = lipjax.certify(model, variables, x, y, 2.0)
  adv2 = custom_linear_layer.pgd_l2(model, variables, x, y, 2.0)
  broken2 = np.asarray(jnp.argmax(model.apply(variables, adv2), -1) != y)
  assert broken2.mean() > 0.5
  assert not np.any(np.asarray(cert2.certified) & broken2)
