"""Plain Flax models and pure functions, traced to a jaxpr, against independent truth.

Truth: the models' own ``apply`` (forward passes, ``jax.jacfwd`` Jacobians with
float64 SVDs at the centre, at sampled points and at points of the ball found
by gradient ascent of the difference quotient), the same network written in
``lipjax.nn`` with the same weights, explicit matrices with numpy SVDs, and an
L2 PGD attack on every certified point.
"""

import functools

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lipjax
import lipjax.training
from lipjax import nn as lnn
from lipjax._src import frontends
from lipjax._src import trace as trace_lib

import _bounds_util as U

B = 3
CLASSES = 3
SHAPE = (6, 6, 2)


# ---------------------------------------------------------------------------
# The same network in lipjax.nn and in plain Flax
# ---------------------------------------------------------------------------


def _maxmin(z, upper, lower):
  a, b = jnp.split(z, 2, axis=-1)
  return jnp.concatenate([jnp.minimum(jnp.maximum(a, b), upper),
                          jnp.maximum(jnp.minimum(a, b), lower)], axis=-1)


class FlaxConvNet(fnn.Module):
  """``U.conv_model(kind)`` written the way a Flax user would."""

  kind: str

  def _act(self, z, i):
    if self.kind == "clipped_relu":
      theta = self.param(f"theta{i}", fnn.initializers.constant(0.5), z.shape[1:])
      if i == 1:
        return jnp.clip(z, 0.0, theta)
      return jnp.minimum(jnp.maximum(z, 0.0), theta)
    half = z.shape[1:-1] + (z.shape[-1] // 2,)
    upper = self.param(f"upper{i}", fnn.initializers.constant(0.3), half)
    lower = self.param(f"lower{i}", fnn.initializers.constant(-0.3), half)
    return _maxmin(z, upper, lower)

  @fnn.compact
  def __call__(self, x):
    x = fnn.Conv(4, (3, 3), padding=1, name="conv0")(x)
    x = self._act(x, 1)
    x = fnn.Conv(4, (4, 4), strides=2, padding=1, name="conv2")(x)
    x = self._act(x, 3)
    x = x.reshape((x.shape[0], -1))
    x = fnn.Dense(8, name="dense5")(x)
    x = self._act(x, 6)
    return fnn.Dense(CLASSES, name="dense7")(x)


def _to_flax(kind, lnn_variables):
  p = lnn_variables["params"]
  out = {"conv0": p["layers_0"], "conv2": p["layers_2"], "dense5": p["layers_5"],
         "dense7": p["layers_7"]}
  for i in (1, 3, 6):
    if kind == "clipped_relu":
      out[f"theta{i}"] = p[f"layers_{i}"]["theta"]
    else:
      out[f"upper{i}"] = p[f"layers_{i}"]["upper"]
      out[f"lower{i}"] = p[f"layers_{i}"]["lower"]
  return {"params": out}


def _random_variables(model, seed):
  """Variables of ``model`` with random values (numpy; no eager Flax init).

  Kernels ``N(0, 1/fan_in)``, biases ``N(0, 0.3^2)``, thresholds named
  ``theta*`` / ``threshold`` uniform in ``[0.1, 1]``, ``upper*`` in
  ``[0.05, 0.6]``, ``lower*`` in ``[-0.6, -0.05]``.
  """
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
  rng = np.random.default_rng(seed)

  def fill(path, a):
    name = str(path[-1].key)
    if name == "kernel":
      v = rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))
    elif name == "bias":
      v = 0.3 * rng.normal(size=a.shape)
    elif name.startswith(("theta", "threshold", "level")):
      v = rng.uniform(0.1, 1.0, size=a.shape)
    elif name.startswith("upper"):
      v = rng.uniform(0.05, 0.6, size=a.shape)
    elif name.startswith("lower"):
      v = -rng.uniform(0.05, 0.6, size=a.shape)
    elif name == "mean":
      v = 0.3 * rng.normal(size=a.shape)
    elif name in ("var", "scale"):
      v = rng.uniform(0.5, 2.0, size=a.shape)
    else:
      raise ValueError(name)
    return jnp.asarray(v, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _pair(kind):
  model = U.conv_model(kind, input_shape=SHAPE, classes=CLASSES)
  v = _random_variables(model, 3)
  flax_model = FlaxConvNet(kind)
  fv = _to_flax(kind, v)
  # The Flax form has the same variables, under its own names.
  ref = jax.eval_shape(flax_model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
  assert (jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(fv))
  x = jax.random.uniform(jax.random.PRNGKey(4), (B,) + SHAPE)
  return model, v, flax_model, fv, x


def _assert_same_stages(stages, native):
  """The same layers with the same parameters: every bound then runs the same
  code on the same arrays."""
  assert [type(s.layer) for s in stages] == [type(s.layer) for s in native]
  assert [type(s.activation) for s in stages] == [type(s.activation) for s in native]
  assert [s.out_shape for s in stages] == [s.out_shape for s in native]
  for s, t in zip(stages, native):
    np.testing.assert_array_equal(s.params["kernel"], t.params["kernel"])
    bias = lambda st: jnp.broadcast_to(st.layer.bias(st.params), st.out_shape)
    np.testing.assert_array_equal(bias(s), bias(t))
    if t.activation is not None:
      assert sorted(s.act_params) == sorted(t.act_params)
      for k in t.act_params:
        np.testing.assert_array_equal(s.act_params[k], t.act_params[k])


@pytest.mark.parametrize("kind", ["clipped_relu", "clipped_maxmin"])
def test_flax_and_lipjax_forms_agree(kind):
  model, v, fm, fv, x = _pair(kind)
  np.testing.assert_allclose(fm.apply(fv, x), model.apply(v, x), rtol=1e-5, atol=1e-6)
  _assert_same_stages(trace_lib.trace(fm, fv, SHAPE), trace_lib.trace(model, v, SHAPE))
  if kind != "clipped_relu":
    return   # the end-to-end checks below run the same code for both activations
  y = jnp.argmax(model.apply(v, x), -1)
  # certify's local bound (sound mode) is local_lipschitz_bound's.
  ca = lipjax.certify(fm, fv, x, y, 0.1, triage=False)
  cb = lipjax.certify(model, v, x, y, 0.1, triage=False)
  np.testing.assert_allclose(ca.lipschitz, cb.lipschitz, rtol=1e-5)
  np.testing.assert_array_equal(ca.failure_probability, cb.failure_probability)
  np.testing.assert_array_equal(ca.certified, cb.certified)
  np.testing.assert_allclose(ca.margin, cb.margin, rtol=1e-4, atol=1e-6)
  ga = lipjax.global_lipschitz_bound(fm, fv, input_shape=SHAPE)
  gb = lipjax.global_lipschitz_bound(model, v)
  np.testing.assert_allclose(ga, gb, rtol=1e-5)


def test_lipjax_layers_inside_a_traced_function_agree():
  """lipjax.nn layers (MaxMin by slicing, clipped ReLU) read from the jaxpr, not
  from the layer protocol, give the native bound."""
  model = lnn.Sequential((lnn.Conv(4, 3, 2, 1), lnn.ClippedMaxMin(0.3),
                          lnn.Conv(4, 3, 1, 1), lnn.ClippedReLU(0.5), lnn.Flatten(),
                          lnn.Dense(CLASSES)), input_shape=SHAPE)
  v = _random_variables(model, 5)
  fn = lambda variables, xb: model.apply(variables, xb)
  stages = trace_lib.trace(fn, v, SHAPE)
  assert [type(s.activation).__name__ for s in stages] == ["ClippedMaxMin", "ClippedReLU",
                                                           "NoneType"]
  _assert_same_stages(stages, trace_lib.trace(model, v, SHAPE))


# ---------------------------------------------------------------------------
# Models written the ways users write them
# ---------------------------------------------------------------------------


def _flatten(x):
  return x.reshape((x.shape[0], -1))


def sequential_model():
  """A list-built ``flax.linen.Sequential``: SAME stride 2, SAME with a 4x4
  kernel (asymmetric padding), no bias, activation functions, a lambda."""
  return fnn.Sequential([
      fnn.Conv(3, (3, 3), strides=2, padding="SAME"), fnn.relu,
      fnn.Conv(4, (4, 4), padding="SAME", use_bias=False), jax.nn.relu,
      _flatten, fnn.Dense(6), fnn.relu, fnn.Dense(CLASSES)])


class CompactNet(fnn.Module):
  """VALID conv, constant clip, average pooling, learnable clamp, MaxMin
  without clipping, an explicit padding conv."""

  @fnn.compact
  def __call__(self, x):
    x = fnn.Conv(4, (3, 3), padding="VALID")(x)
    x = jnp.clip(x, 0.0, 0.8)
    x = fnn.avg_pool(x, (2, 2), strides=(2, 2))
    x = fnn.Conv(4, (2, 2), padding=((1, 0), (0, 1)))(x)
    theta = self.param("threshold", fnn.initializers.constant(0.6), (4,))
    x = jnp.minimum(jnp.maximum(x, 0.0), theta)
    x = _flatten(x)
    x = fnn.Dense(6)(x)
    a, b = jnp.split(x, 2, axis=-1)
    x = jnp.concatenate([jnp.maximum(a, b), jnp.minimum(a, b)], axis=-1)
    return fnn.Dense(CLASSES)(x)


class LinearResidualNet(fnn.Module):
  """A LiResNet-style block ``relu(h + conv(h) + b)``: one linear segment."""

  @fnn.compact
  def __call__(self, x):
    h = fnn.relu(fnn.Conv(4, (3, 3), padding="SAME")(x))
    h = fnn.relu(h + fnn.Conv(4, (3, 3), padding="SAME")(h))
    return fnn.Dense(CLASSES)(_flatten(h))


class ConvBatchNormNet(fnn.Module):
  """Conv -> BatchNorm (running statistics) -> relu: a per-channel scaling."""

  @fnn.compact
  def __call__(self, x):
    h = fnn.Conv(4, (3, 3), strides=2, padding=1)(x)
    h = fnn.relu(fnn.BatchNorm(use_running_average=True)(h))
    return fnn.Dense(CLASSES)(_flatten(h))


def mlp_function(variables, x):
  """A pure function of (variables, x)."""
  p = variables["params"]
  h = jax.nn.relu(_flatten(x) @ p["w1"] + p["b1"])
  h = jnp.clip(h @ p["w2"] + p["b2"], 0.0, p["t2"])
  return h @ p["w3"] + p["b3"]


def _mlp_variables(key):
  ks = jax.random.split(key, 4)
  d = int(np.prod(SHAPE))
  n = lambda k, s, sc: sc * jax.random.normal(k, s)
  return {"params": {"w1": n(ks[0], (d, 10), 0.15), "b1": 0.5 + n(ks[1], (10,), 0.3),
                     "w2": n(ks[2], (10, 8), 0.15), "b2": 0.4 + n(ks[3], (8,), 0.1),
                     "t2": jnp.linspace(0.1, 1.2, 8), "w3": n(ks[0], (8, CLASSES), 0.5),
                     "b3": jnp.zeros((CLASSES,))}}


@functools.lru_cache(maxsize=None)
def _user_model(name):
  key = jax.random.PRNGKey(11)
  if name == "function":
    return mlp_function, _mlp_variables(key)
  model = {"sequential": sequential_model, "compact": CompactNet,
           "linear_residual": LinearResidualNet, "conv_bn": ConvBatchNormNet}[name]()
  return model, _random_variables(model, 11)


USER_MODELS = ("sequential", "compact", "linear_residual", "function")


def test_stages_of_user_models():
  """Each pattern becomes the intended stage (so the exact rules apply)."""
  def kinds(name):
    model, v = _user_model(name)
    return [(type(s.layer).__name__, type(s.activation).__name__)
            for s in trace_lib.trace(model, v, SHAPE)]
  # SAME with stride 2 on an even size pads (0, 1), a 4x4 SAME kernel (1, 2):
  # both are convolutions with the circulant global norm, not lipjax.nn.Conv.
  assert kinds("sequential") == [("TracedConv", "ReLU"), ("TracedConv", "ReLU"),
                                 ("Dense", "ReLU"), ("Dense", "NoneType")]
  assert kinds("compact") == [("Conv", "ClippedReLU"), ("TracedLinear", "ClippedReLU"),
                              ("Dense", "PairMaxMin"), ("Dense", "NoneType")]
  assert kinds("linear_residual") == [("Conv", "ReLU"), ("TracedResidualConv", "ReLU"),
                                      ("Dense", "NoneType")]
  assert kinds("function") == [("Dense", "ReLU"), ("Dense", "ClippedReLU"),
                               ("Dense", "NoneType")]
  assert kinds("conv_bn") == [("TracedConv", "ReLU"), ("Dense", "NoneType")]


def _apply(model):
  return frontends.as_model(model).apply


@pytest.mark.parametrize("name", USER_MODELS + ("conv_bn",))
def test_stages_replay_the_users_forward_pass(name):
  model, v = _user_model(name)
  x = jax.random.uniform(jax.random.PRNGKey(7), (5,) + SHAPE)
  h = x
  for st in trace_lib.trace(model, v, SHAPE):
    z = st.affine(h)
    h = z if st.activation is None else st.activation.forward(st.act_params, z)
  np.testing.assert_allclose(h, _apply(model)(v, x), rtol=1e-5, atol=1e-6)


def _jacobian_norms(apply, v, pts):
  f = lambda p: apply(v, p[None])[0]
  jac = jax.jit(jax.vmap(jax.jacfwd(f)))(pts)
  jac = np.asarray(jac, np.float64).reshape(pts.shape[0], jac.shape[1], -1)
  return np.linalg.svd(jac, compute_uv=False)[:, 0]


def _quotient_ascent(apply, v, x, eps, key, steps=40, restarts=4):
  """Pairs ``a, b`` of the ball maximising ``||f(a) - f(b)|| / ||a - b||``
  (restarts x B pairs), by projected normalised gradient ascent."""
  eps_b = jnp.full((x.shape[0],), eps)
  k1, k2 = jax.random.split(key)
  a0 = U.sample_ball(k1, x, eps_b, restarts, uniform_radius=True)
  b0 = U.project(a0 + 0.05 * eps * U.normalised(jax.random.normal(k2, a0.shape), 2), x, eps_b)

  def quotient(a, bb):
    num = jnp.sqrt(jnp.sum(jnp.square(apply(v, a) - apply(v, bb)), -1) + 1e-30)
    den = jnp.sqrt(jnp.sum(jnp.square((a - bb).reshape(a.shape[0], -1)), -1) + 1e-30)
    return num / den

  def one(a, bb):
    def body(t, carry):
      a, bb = carry
      step = 0.1 * eps * (1.0 - t / steps) + 0.002 * eps
      ga, gb = jax.grad(lambda a, bb: jnp.sum(jnp.log(quotient(a, bb))), (0, 1))(a, bb)
      return (U.project(a + step * U.normalised(ga, 1), x, eps_b),
              U.project(bb + step * U.normalised(gb, 1), x, eps_b))
    a, bb = jax.lax.fori_loop(0, steps, body, (a, bb))
    return quotient(a, bb), a

  return jax.jit(jax.vmap(one))(a0, b0)


@pytest.mark.parametrize("name", USER_MODELS)
def test_bound_covers_exact_jacobians_and_local_below_global(name):
  model, v = _user_model(name)
  apply = _apply(model)
  x = jax.random.uniform(jax.random.PRNGKey(8), (B,) + SHAPE)
  eps = 0.25
  res, bound, glob = U.ordered_bounds(model, v, x, eps, lower=False)
  pts = [x, U.sample_ball(jax.random.PRNGKey(9), x, eps, 12, uniform_radius=True)]
  quot, best = _quotient_ascent(apply, v, x, eps, jax.random.PRNGKey(10))
  assert np.all(np.asarray(quot) <= bound[None] * (1 + 1e-4))
  pts.append(best)
  pts = jnp.concatenate([p.reshape((-1,) + SHAPE) for p in pts])   # example-major rows
  norms = _jacobian_norms(apply, v, pts).reshape(-1, B)
  worst = norms.max(axis=0)
  assert np.all(worst <= bound * (1 + 1e-5)), (worst, bound)
  # The test has teeth: the bound is not vacuous.
  assert np.max(worst / bound) >= 0.05, (worst, bound)


def test_dense_only_function_is_deterministic_and_hand_set_value_is_exact():
  """A two-layer function with hand-set weights: on the ball the second hidden
  neuron is off, so the local bound is exactly ``|w2[0]| * 2``."""
  def fn(v, x):
    return jax.nn.relu(x @ v["w1"] + v["b1"]) @ v["w2"]
  v = {"w1": jnp.array([[2.0, 0.0], [0.0, 1.0]]), "b1": jnp.array([0.0, -10.0]),
       "w2": jnp.array([[1.5, -0.5], [1.0, 1.0]])}
  x = jnp.array([[1.0, 1.0]])
  res = lipjax.local_lipschitz_bound(fn, v, x, 0.5)
  exact = 2.0 * np.linalg.norm([1.5, -0.5])
  assert exact <= float(res.bound[0]) <= exact * (1 + 3e-4)
  assert float(res.failure_probability[0]) == 0.0
  glob = float(lipjax.global_lipschitz_bound(fn, v, input_shape=(2,)))
  ref = np.linalg.svd(np.array([[2.0, 0.0], [0.0, 1.0]]), compute_uv=False)[0] * \
      np.linalg.svd(np.asarray(v["w2"]), compute_uv=False)[0]
  assert ref <= glob <= ref * (1 + 3e-4)


# ---------------------------------------------------------------------------
# Linear rules of traced segments against explicit matrices
# ---------------------------------------------------------------------------


def _circular_conv_norm(kernel_hwio, n, stride=1):
  """Exact norm of the circular correlation with ``kernel`` on an ``n x n``
  grid with the given stride, from its explicit matrix."""
  kh, kw, ci, co = kernel_hwio.shape
  s, n_out = stride, n // stride
  m = np.zeros((n_out * n_out * co, n * n * ci))
  for p in range(n_out):
    for q in range(n_out):
      for a in range(kh):
        for b in range(kw):
          r = (p * n_out + q) * co
          c = (((s * p + a) % n) * n + (s * q + b) % n) * ci
          m[r:r + co, c:c + ci] += kernel_hwio[a, b].T
  return np.linalg.svd(m, compute_uv=False)[0]


def _explicit(st):
  n = int(np.prod(st.in_shape))
  basis = jnp.eye(n).reshape((n,) + st.in_shape)
  return np.asarray(st.linear(basis), np.float64).reshape(n, -1).T


@pytest.mark.parametrize("name, index", [("compact", 1), ("linear_residual", 1),
                                         ("sequential", 1), ("conv_bn", 0)])
def test_traced_segment_rules_against_explicit_matrix(name, index):
  model, v = _user_model(name)
  st = trace_lib.trace(model, v, SHAPE)[index]
  w = _explicit(st)
  h = jax.random.uniform(jax.random.PRNGKey(12), (4,) + st.in_shape)
  absw = np.asarray(st.abs_linear(h), np.float64).reshape(4, -1)
  exact = np.asarray(h, np.float64).reshape(4, -1) @ np.abs(w).T
  assert np.all(absw >= exact * (1 - 1e-5) - 1e-6)   # |W| h, upper bound
  sigma = np.linalg.svd(w, compute_uv=False)[0]
  _, per_layer = lipjax.global_lipschitz_bound(model, v, input_shape=SHAPE, per_layer=True)
  g = float(per_layer[index])
  assert sigma * (1 - 1e-5) <= g
  if name == "compact":
    # avg-pool then conv: the explicit Jacobian's SVD, exact up to the slack.
    assert g <= sigma * (1 + 2e-4)
  else:
    # A convolution's circulant bound: the exact norm of the circular
    # correlation on the zero-padded grid (6x6 for a 4x4 SAME kernel on 3x3,
    # 8x8 for a 3x3 SAME kernel on 6x6); for h + conv(h), of the kernel with
    # the identity added at the centre tap (never 1 + ||W||).
    layer = {"sequential": "layers_2", "linear_residual": "Conv_1", "conv_bn": "Conv_0"}[name]
    kernel = np.asarray(v["params"][layer]["kernel"], np.float64)
    if name == "linear_residual":
      kernel[1, 1] += np.eye(kernel.shape[2])
      w_only = w - np.eye(w.shape[0])
      assert g < 1 + np.linalg.svd(w_only, compute_uv=False)[0]
    if name == "conv_bn":   # the BatchNorm's per-channel factor, folded in
      bn, stats = v["params"]["BatchNorm_0"], v["batch_stats"]["BatchNorm_0"]
      kernel = kernel * np.asarray(bn["scale"]) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
    # Zero-padded grids: 3 + 1 + 2, 6 + 1 + 1, 6 + 1 + 1 (stride 2).
    grid, stride = {"sequential": (6, 1), "linear_residual": (8, 1), "conv_bn": (8, 2)}[name]
    circ = _circular_conv_norm(kernel, grid, stride)
    assert circ * (1 - 1e-5) <= g <= circ * (1 + 2e-4)
  rows = np.linalg.norm(w, axis=1)
  rn = st.layer.row_norms(st.params, st.layer_in_shape)
  if rn is not None:
    assert np.all(np.asarray(rn).reshape(-1) >= rows * (1 - 1e-5))


# ---------------------------------------------------------------------------
# Certificates survive an attack
# ---------------------------------------------------------------------------


def _clusters(key, n):
  k1, k2, k3 = jax.random.split(key, 3)
  d = int(np.prod(SHAPE))
  means = jax.random.normal(k1, (CLASSES, d))
  means = 2.5 * means / jnp.linalg.norm(means, axis=1, keepdims=True)
  y = jax.random.randint(k2, (n,), 0, CLASSES)
  x = 0.5 + means[y] + 0.15 * jax.random.normal(k3, (n, d))
  return x.reshape((n,) + SHAPE), y


def _pgd(apply, v, x, y, eps, key, steps=40, restarts=3):
  eps_b = jnp.full((x.shape[0],), eps)
  starts = jnp.concatenate([x[None], U.sample_ball(key, x, eps_b, restarts - 1,
                                                    uniform_radius=True)])
  onehot = jax.nn.one_hot(y, CLASSES)

  def margin(xp):
    z = apply(v, xp)
    return jnp.max(jnp.where(onehot > 0, -jnp.inf, z), -1) - jnp.sum(z * onehot, -1)

  adv = jax.vmap(lambda x0: U.pgd_maximise(margin, x, eps_b, x0, steps)[1])(starts)
  return jnp.max(jax.vmap(margin)(adv), 0)     # (B,) worst margin found


def test_trained_flax_model_certificates_survive_pgd():
  model = CompactNet()
  x, y = _clusters(jax.random.PRNGKey(13), 160)
  v = _random_variables(model, 0)
  opt = optax.adam(1e-2)
  state = opt.init(v)

  @jax.jit
  def step(v, state):
    loss = lambda v: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(v, x[:128]), y[:128]).mean()
    g = jax.grad(loss)(v)
    u, state = opt.update(g, state, v)
    return optax.apply_updates(v, u), state

  for _ in range(60):
    v, state = step(v, state)
  xt, yt = x[128:], y[128:]
  eps = 0.2
  local = np.asarray(lipjax.certify(model, v, xt, yt, eps, triage=False).certified)
  assert local.mean() > 0.2, local.mean()       # the test has teeth
  attack = jax.jit(functools.partial(_pgd, model.apply))
  worst = np.asarray(attack(v, xt, yt, eps, jax.random.PRNGKey(14)))
  assert not np.any(local & (worst > 0)), "a certified point was flipped"
  # The attack works: at a larger radius it flips points.
  worst_big = np.asarray(attack(v, xt, yt, 3.0, jax.random.PRNGKey(15)))
  assert np.mean(worst_big > 0) > 0.3


# ---------------------------------------------------------------------------
# Unsupported operations: one line, naming them
# ---------------------------------------------------------------------------


class _Probe(fnn.Module):
  kind: str

  @fnn.compact
  def __call__(self, x):
    h = fnn.Dense(8)(_flatten(x))
    if self.kind == "max_pool":
      h = fnn.max_pool(h.reshape(h.shape[0], 2, 2, 2), (2, 2)).reshape(h.shape[0], -1)
    elif self.kind == "softmax":
      h = jax.nn.softmax(h)
    elif self.kind == "sin":
      h = jnp.sin(h)
    elif self.kind == "product":
      h = h * fnn.Dense(8)(_flatten(x))
    elif self.kind == "batch_stats":
      h = h - jnp.mean(h, axis=0, keepdims=True)
    elif self.kind == "residual":   # a skip used by two sums (blocks join two paths)
      h = fnn.relu(h)
      y = h + fnn.Dense(8)(fnn.relu(fnn.Dense(8)(h)))
      h = y + h
    elif self.kind == "dense_concat":   # DenseNet-style concatenation of two layers
      h = fnn.relu(h)
      h = fnn.Dense(8)(jnp.concatenate([h, fnn.relu(fnn.Dense(8)(h))], axis=-1))
    elif self.kind == "attention":
      q = h.reshape(h.shape[0], 2, 4)
      h = fnn.MultiHeadDotProductAttention(num_heads=2)(q).reshape(h.shape[0], -1)
    return fnn.Dense(CLASSES)(fnn.relu(h))


@pytest.mark.parametrize("kind, names", [
    ("max_pool", ["reduce_window_max"]),
    ("softmax", ["reduce_max", "exp"]),
    ("sin", ["sin"]),
    ("product", ["multiplication of two values"]),
    ("batch_stats", ["batch axis"]),
    ("residual", ["used elsewhere"]),
    ("dense_concat", ["concatenate of values from different layers"]),
    ("attention", ["product of two values"]),
])
def test_unsupported_operations_raise_one_line_naming_them(kind, names):
  model = _Probe(kind)
  x = jnp.ones((2,) + SHAPE)
  v = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                             jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
  calls = (lambda: lipjax.local_lipschitz_bound(model, v, x, 0.1),
           lambda: lipjax.global_lipschitz_bound(model, v, input_shape=SHAPE),
           lambda: lipjax.certify(model, v, x, jnp.zeros(2, jnp.int32), 0.1))
  for call in calls:
    with pytest.raises(lipjax.UnsupportedModelError) as err:
      call()
    msg = str(err.value)
    assert "\n" not in msg
    assert any(n in msg for n in names), msg
    assert "_Probe" in msg and "test_flax_models.py:" in msg   # module path and line
    assert "supported:" in msg and "flax.linen.Dense" in msg


def test_model_ending_in_an_activation_and_bad_models_are_rejected():
  end = fnn.Sequential([fnn.Dense(4), fnn.relu, fnn.Dense(CLASSES), fnn.relu])
  v = end.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
  with pytest.raises(lipjax.UnsupportedModelError, match="end with a linear layer"):
    lipjax.local_lipschitz_bound(end, v, jnp.ones((2, 3)), 0.1)
  with pytest.raises(TypeError, match="flax.linen.Module or a function"):
    lipjax.local_lipschitz_bound("not a model", v, jnp.ones((2, 3)), 0.1)
  with pytest.raises(ValueError, match="input_shape"):
    lipjax.global_lipschitz_bound(end, v)


# ---------------------------------------------------------------------------
# jit, vmap, caching and training
# ---------------------------------------------------------------------------


def test_jit_and_vmap_over_a_flax_model():
  model = fnn.Sequential([fnn.Dense(6), fnn.relu, fnn.Dense(CLASSES)])
  xs = jax.random.uniform(jax.random.PRNGKey(1), (3, 4, 5))
  inits = [model.init(jax.random.PRNGKey(s), xs[0, :1]) for s in range(3)]
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *inits)

  def bound(v, x):
    return lipjax.local_lipschitz_bound(model, v, x, 0.1).bound

  eager = np.stack([np.asarray(bound(v, x)) for v, x in zip(inits, xs)])
  np.testing.assert_allclose(jax.jit(jax.vmap(bound))(stacked, xs), eager, rtol=1e-5)
  # The unhashable (list-built) model is compiled once, not once per call.
  from lipjax._src import lipschitz   # pylint: disable=import-outside-toplevel
  before = lipschitz.compiled_local.cache_info().hits
  bound(inits[0], xs[0])
  assert lipschitz.compiled_local.cache_info().hits == before + 1


def test_fresh_functions_of_one_structure_share_compiled_code():
  """Caches are keyed by the traced structure, not by the function object: a
  fresh wrapper per call compiles once; other constants are another model."""
  from lipjax._src import lipschitz   # pylint: disable=import-outside-toplevel
  model = fnn.Sequential([fnn.Dense(6), fnn.relu, fnn.Dense(CLASSES)])
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 5))
  v = model.init(jax.random.PRNGKey(0), x[:1])
  scale = jnp.ones((CLASSES,))

  def wrapper(s):
    return lambda vv, xx: model.apply(vv, xx) * s

  first = lipjax.local_lipschitz_bound(wrapper(scale), v, x, 0.1).bound
  info = lipschitz.compiled_local.cache_info()
  again = lipjax.local_lipschitz_bound(wrapper(jnp.ones((CLASSES,))), v, x, 0.1).bound
  after = lipschitz.compiled_local.cache_info()
  assert (after.hits, after.misses) == (info.hits + 1, info.misses)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
  doubled = lipjax.local_lipschitz_bound(wrapper(2.0 * scale), v, x, 0.1).bound
  assert lipschitz.compiled_local.cache_info().misses == after.misses + 1
  np.testing.assert_allclose(np.asarray(doubled), 2.0 * np.asarray(first), rtol=1e-5)


class ClippedMLP(fnn.Module):

  @fnn.compact
  def __call__(self, x):
    h = fnn.Dense(12)(_flatten(x))
    level = self.param("level", fnn.initializers.constant(1.0), (12,))
    h = jnp.clip(h, 0.0, level)
    return fnn.Dense(CLASSES)(h)


def test_training_step_on_a_flax_model():
  model = ClippedMLP()
  x, y = _clusters(jax.random.PRNGKey(16), 32)
  v = _random_variables(model, 1)
  # A threshold that starts infeasible is projected back to >= 0 by the step,
  # although its name is not lipjax's "theta".
  v = {"params": {**v["params"], "level": v["params"]["level"].at[:3].set(-0.5)}}
  opt = optax.adam(1e-2)
  power = lipjax.training.init_power_state(model, v, input_shape=SHAPE)
  state = lipjax.training.create_train_state(v["params"], opt, rng=0, power=power)
  step = lipjax.training.make_train_step(model, opt, loss="gloro", bound="local",
                                         iterations=2, eps_schedule=0.2)
  losses = []
  for _ in range(4):
    state, metrics = step(state, x, y)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  level = np.asarray(state.params["level"])
  assert np.all(level >= 0)
  res = lipjax.local_lipschitz_bound(model, {"params": state.params}, x[:4], 0.2)
  assert np.all(np.isfinite(np.asarray(res.bound)))
