"""Residual networks ``y = post(h + f(h))`` with a nonlinear branch, against independent truth.

Truth: the models' own ``apply`` (float64 SVDs of ``jax.jacfwd`` Jacobians at
the centre, at sampled points of the ball and at points found by gradient
ascent of the difference quotient), a float64 forward pass for the rounding
bounds, and an L2 PGD attack on every certified point.
"""

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lipjax
import lipjax.training
from lipjax import nn as lnn
from lipjax._src import interpret
from lipjax._src import trace as trace_lib
from lipjax._src.graph import Block, stages_of

import _bounds_util as U
from test_flax_models import (CLASSES, SHAPE, _clusters, _flatten, _jacobian_norms,
                              _pgd, _quotient_ascent, _random_variables)

B = 3


class ResBlock(fnn.Module):
  """``relu(h + conv(relu(conv(h))))`` (ResNet basic block)."""

  @fnn.compact
  def __call__(self, h):
    f = fnn.relu(fnn.Conv(4, (3, 3), padding="SAME")(h))
    return fnn.relu(h + fnn.Conv(4, (3, 3), padding="SAME")(f))


class ResCNN(fnn.Module):
  """Conv stem, a basic block, a block whose branch ends with a clipped
  activation and has no post activation, and a dense head."""

  @fnn.compact
  def __call__(self, x):
    h = fnn.relu(fnn.Conv(4, (3, 3), strides=2, padding=1)(x))
    h = ResBlock()(h)
    f = jnp.clip(fnn.Conv(4, (3, 3), padding=1)(h), 0.0, 0.7)
    h = h + f
    return fnn.Dense(CLASSES)(_flatten(h))


class ResMLP(fnn.Module):
  """Dense residual blocks: a MaxMin branch ending with a linear map, then a
  clipped post activation with a learnable threshold; the skip is the input."""

  @fnn.compact
  def __call__(self, x):
    x = _flatten(x)
    h = fnn.Dense(8)(x)
    a, b = jnp.split(h, 2, axis=-1)
    h = jnp.concatenate([jnp.maximum(a, b), jnp.minimum(a, b)], axis=-1)
    f = fnn.relu(fnn.Dense(6)(h))
    h = h + fnn.Dense(8)(f)
    theta = self.param("theta", fnn.initializers.constant(0.8), (8,))
    h = jnp.minimum(jnp.maximum(h, 0.0), theta)
    return fnn.Dense(CLASSES)(h)


def input_residual_sequential():
  """A residual block on the model input, inside a ``flax.linen.Sequential``."""
  return fnn.Sequential([InputBlock(), fnn.Conv(3, (3, 3), strides=2, padding=1), fnn.relu,
                         ResBlockSmall(), _flatten, fnn.Dense(CLASSES)])


class InputBlock(fnn.Module):

  @fnn.compact
  def __call__(self, x):
    return x + fnn.Conv(SHAPE[-1], (3, 3), padding=1)(fnn.relu(fnn.Conv(3, (3, 3),
                                                                       padding=1)(x)))


class ResBlockSmall(fnn.Module):

  @fnn.compact
  def __call__(self, h):
    return fnn.relu(h + fnn.Conv(3, (3, 3), padding=1)(fnn.relu(
        fnn.Conv(3, (3, 3), padding=1)(h))))


def lipjax_residual_sequential():
  """:class:`ResCNN` written with ``lipjax.nn.Sequential`` and ``lipjax.nn.Residual``."""
  return lnn.Sequential((
      lnn.Conv(4, 3, stride=2, padding=1), lnn.ReLU(),
      lnn.Residual((lnn.Conv(4, 3), lnn.ReLU(), lnn.Conv(4, 3)), activation=lnn.ReLU()),
      lnn.Residual((lnn.Conv(4, 3), lnn.ClippedReLU())),
      lnn.Flatten(), lnn.Dense(CLASSES)), input_shape=SHAPE)


_MODELS = {"cnn": ResCNN, "mlp": ResMLP, "sequential": input_residual_sequential,
           "lipjax": lipjax_residual_sequential}
_CACHE = {}


def _model(name):
  if name not in _CACHE:
    model = _MODELS[name]()
    _CACHE[name] = (model, _random_variables(model, 3))
  return _CACHE[name]


def _block_ends(items, ends):
  """Per identity-shortcut block: its branch's last stage -> (its first stage,
  the activation after the sum)."""
  for item in items:
    if isinstance(item, Block):
      for path in item.paths:
        _block_ends(path, ends)
      (branch,) = [p for p in item.paths if p]
      flat = stages_of(branch)
      ends[flat[-1].index] = (flat[0].index, type(item.activation).__name__)
  return ends


def test_blocks_are_traced_as_intended():
  def structure(name):
    model, v = _model(name)
    graph = trace_lib.trace(model, v, SHAPE)
    ends = _block_ends(graph.items, {})
    return [(type(st.activation).__name__, ends.get(st.index)) for st in graph]

  assert structure("cnn") == [("ReLU", None), ("ReLU", None), ("Identity", (1, "ReLU")),
                              ("ClippedReLU", (3, "NoneType")), ("NoneType", None)]
  assert structure("mlp") == [("PairMaxMin", None), ("ReLU", None),
                              ("Identity", (1, "ClippedReLU")), ("NoneType", None)]
  # A learnable threshold of the activation after a residual sum is kept
  # feasible by the training step like any other.
  model, v = _model("mlp")
  leaves = jax.tree_util.tree_leaves_with_path(v)
  names = [jax.tree_util.keystr(leaves[i][0])
           for i in trace_lib.threshold_leaves(model, v, SHAPE)]
  assert names == ["['params']['theta']"], names
  assert structure("lipjax") == [("ReLU", None), ("ReLU", None), ("Identity", (1, "ReLU")),
                                 ("ClippedReLU", (3, "NoneType")), ("NoneType", None)]
  assert structure("sequential") == [("ReLU", None), ("Identity", (0, "NoneType")),
                                     ("ReLU", None), ("ReLU", None),
                                     ("Identity", (3, "ReLU")), ("NoneType", None)]


@pytest.mark.parametrize("name", tuple(_MODELS))
def test_stages_replay_the_forward_pass(name):
  model, v = _model(name)
  x = jax.random.uniform(jax.random.PRNGKey(7), (4,) + SHAPE)
  np.testing.assert_allclose(interpret.forward(trace_lib.trace(model, v, SHAPE), x),
                             model.apply(v, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", tuple(_MODELS))
def test_tightness_surrogate_is_the_residual_network(name):
  # The smooth surrogate the Jacobian search ascends must be the same network
  # (skip connections included), up to the softplus smoothing.
  from lipjax.evaluation import tightness   # pylint: disable=import-outside-toplevel
  model, v = _model(name)
  x = jax.random.uniform(jax.random.PRNGKey(8), (4,) + SHAPE)
  np.testing.assert_allclose(tightness.smoothed_forward(model, v, x, 1e-6),
                             model.apply(v, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", tuple(_MODELS))
def test_bound_covers_exact_jacobians_and_modes_are_ordered(name):
  model, v = _model(name)
  x = jax.random.uniform(jax.random.PRNGKey(8), (B,) + SHAPE)
  eps = 0.3
  res, bound, glob = U.ordered_bounds(model, v, x, eps)
  if name == "mlp":
    est = lipjax.local_lipschitz_bound(model, v, x, eps, mode="estimate", iterations=20)
    assert np.all(np.isfinite(np.asarray(est.bound)))
  quot, best = _quotient_ascent(model.apply, v, x, eps, jax.random.PRNGKey(10), steps=25,
                                restarts=2)
  assert np.all(np.asarray(quot) <= bound[None] * (1 + 1e-4))
  pts = [x, U.sample_ball(jax.random.PRNGKey(9), x, eps, 6, uniform_radius=True), best]
  pts = jnp.concatenate([p.reshape((-1,) + SHAPE) for p in pts])
  worst = _jacobian_norms(model.apply, v, pts).reshape(-1, B).max(axis=0)
  assert np.all(worst <= bound * (1 + 1e-5)), (worst, bound)
  assert np.max(worst / bound) >= 0.05, (worst, bound)   # not vacuous


class ResMLPLipjaxLayers(fnn.Module):
  """:class:`ResMLP` with lipjax.nn layers and activations in place of Flax's."""

  @fnn.compact
  def __call__(self, x):
    x = _flatten(x)
    h = lnn.Dense(8, name="Dense_0")(x)
    a, b = jnp.split(h, 2, axis=-1)
    h = jnp.concatenate([jnp.maximum(a, b), jnp.minimum(a, b)], axis=-1)
    f = lnn.ReLU()(lnn.Dense(6, name="Dense_1")(h))
    h = h + lnn.Dense(8, name="Dense_2")(f)
    theta = self.param("theta", fnn.initializers.constant(0.8), (8,))
    h = jnp.minimum(jax.nn.relu(h), theta)   # what lipjax.nn.ClippedReLU computes
    return lnn.Dense(CLASSES, name="Dense_3")(h)


def test_lipjax_layers_and_flax_layers_give_the_same_bounds():
  model, v = _model("mlp")
  other = ResMLPLipjaxLayers()
  x = jax.random.uniform(jax.random.PRNGKey(5), (B,) + SHAPE)
  np.testing.assert_allclose(other.apply(v, x), model.apply(v, x), rtol=1e-6)
  a = lipjax.local_lipschitz_bound(model, v, x, 0.3)
  b = lipjax.local_lipschitz_bound(other, v, x, 0.3)
  np.testing.assert_allclose(np.asarray(a.bound), np.asarray(b.bound), rtol=1e-5)
  np.testing.assert_allclose(float(lipjax.global_lipschitz_bound(model, v, input_shape=SHAPE)),
                             float(lipjax.global_lipschitz_bound(other, v, input_shape=SHAPE)),
                             rtol=1e-6)


def test_lipjax_residual_blocks_and_the_flax_residual_network_agree():
  # ResCNN's weights moved into its lipjax.nn.Sequential / Residual form (the
  # constant clip at 0.7 becomes a threshold of 0.7): same logits, bounds,
  # masks and certificates.
  model, v = _model("cnn")
  other = lipjax_residual_sequential()
  p = v["params"]
  w = {"params": {
      "layers_0": p["Conv_0"],
      "layers_2": {"layers_0": p["ResBlock_0"]["Conv_0"], "layers_2": p["ResBlock_0"]["Conv_1"]},
      "layers_3": {"layers_0": p["Conv_1"], "layers_1": {"theta": jnp.full((3, 3, 4), 0.7)}},
      "layers_5": p["Dense_0"]}}
  shapes = jax.eval_shape(other.init, jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(w)
  x = jax.random.uniform(jax.random.PRNGKey(6), (B,) + SHAPE)
  np.testing.assert_allclose(other.apply(w, x), model.apply(v, x), rtol=1e-5, atol=1e-6)
  for eps in (0.05, 0.3):
    a = lipjax.local_lipschitz_bound(model, v, x, eps)
    b = lipjax.local_lipschitz_bound(other, w, x, eps)
    np.testing.assert_allclose(np.asarray(b.bound), np.asarray(a.bound), rtol=1e-5)
  np.testing.assert_allclose(float(lipjax.global_lipschitz_bound(other, w)),
                             float(lipjax.global_lipschitz_bound(model, v, input_shape=SHAPE)),
                             rtol=1e-6)
  y = jnp.argmax(model.apply(v, x), -1)
  ca = lipjax.certify(model, v, x, y, 0.01, triage=False)   # every margin the sound one
  cb = lipjax.certify(other, w, x, y, 0.01, triage=False)
  np.testing.assert_array_equal(np.asarray(cb.certified), np.asarray(ca.certified))
  np.testing.assert_allclose(np.asarray(cb.margin), np.asarray(ca.margin), rtol=1e-4, atol=1e-6)
  # The training step runs on it and keeps the block's threshold feasible.
  opt = optax.sgd(50.0)
  power = lipjax.training.init_power_state(other, w, input_shape=SHAPE)
  state = lipjax.training.create_train_state(w["params"], opt, rng=0, power=power)
  step = lipjax.training.make_train_step(other, opt, loss="gloro", bound="local",
                                         iterations=2, eps_schedule=0.1)
  xs, ys = _clusters(jax.random.PRNGKey(13), 32)
  for _ in range(3):
    state, metrics = step(state, xs, ys)
    assert np.isfinite(float(metrics["loss"]))
  theta = np.asarray(state.params["layers_3"]["layers_1"]["theta"])
  assert theta.min() >= 0.0 and not np.allclose(theta, 0.7)
  # A branch that changes the shape is a one-line error at init.
  bad = lnn.Sequential((lnn.Dense(4), lnn.ReLU(), lnn.Residual((lnn.Dense(3),)),
                        lnn.Dense(CLASSES)), input_shape=(5,))
  with pytest.raises(ValueError, match="must keep the shape"):
    bad.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))


def test_lipjax_residual_blocks_in_any_position_are_sound_or_refused_in_one_line():
  d = lambda n=6: lnn.Dense(n)   # noqa: E731
  ok = {
      "on the input": (lnn.Residual((lnn.Dense(5), lnn.ReLU(), lnn.Dense(5))), d(CLASSES)),
      "empty branch": (d(), lnn.ReLU(), lnn.Residual(()), d(CLASSES)),
      # A block on a linear layer's output: its skip runs through that layer
      # (a projection shortcut from the block's input).
      "after a linear layer": (d(), lnn.Residual((d(), lnn.ReLU(), d()), lnn.ReLU()),
                               d(CLASSES)),
      "consecutive": (d(), lnn.ReLU(), lnn.Residual((d(),), lnn.ReLU()),
                      lnn.Residual((d(), lnn.ReLU(), d())),
                      lnn.Residual((d(), lnn.ClippedMaxMin(), d()), lnn.ClippedReLU()),
                      d(CLASSES)),
  }
  x = jax.random.uniform(jax.random.PRNGKey(2), (B, 5))
  eps = 0.2
  for name, layers in ok.items():
    model = lnn.Sequential(layers, input_shape=(5,))
    v = _random_variables_for(model, (5,))
    bound = np.asarray(lipjax.local_lipschitz_bound(model, v, x, eps).bound, np.float64)
    glob = float(lipjax.global_lipschitz_bound(model, v))
    assert np.all(bound <= glob * (1 + 1e-5)), name
    pts = jnp.concatenate([x[None], U.sample_ball(jax.random.PRNGKey(3), x, eps, 8)])
    worst = _jacobian_norms(model.apply, v, pts.reshape(-1, 5)).reshape(-1, B).max(axis=0)
    assert np.all(worst <= bound * (1 + 1e-5)), (name, worst, bound)
  refused = {
      "two activations in a row": (d(), lnn.ReLU(), lnn.Residual((lnn.ReLU(),)), d(CLASSES)),
  }
  for words, layers in refused.items():
    model = lnn.Sequential(layers, input_shape=(5,))
    v = model.init(jax.random.PRNGKey(0), x)
    with pytest.raises(lipjax.UnsupportedModelError) as e:
      lipjax.local_lipschitz_bound(model, v, x, eps)
    assert "\n" not in str(e.value) and words in str(e.value), str(e.value)


def _random_variables_for(model, shape):
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
  return U.randomize(v, jax.random.PRNGKey(4))


def test_global_bound_is_one_plus_branch_product_and_covers_jacobians():
  model, v = _model("mlp")
  total, per = lipjax.global_lipschitz_bound(model, v, input_shape=SHAPE, per_layer=True)
  per = [float(p) for p in per]
  # Explicit matrices, numpy SVDs: stages are Dense layers (and the traced MaxMin).
  p = v["params"]
  svd = lambda w: np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[0]
  expected = [svd(p["Dense_0"]["kernel"]), svd(p["Dense_1"]["kernel"]),
              svd(p["Dense_2"]["kernel"]), svd(p["Dense_3"]["kernel"])]
  # Sound global norms: at or just above the exact ones (rounding slack).
  assert np.all(np.asarray(per) >= np.asarray(expected))
  np.testing.assert_allclose(per, expected, rtol=3e-4)
  want = per[0] * (1 + per[1] * per[2]) * per[3]
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  x = jax.random.uniform(jax.random.PRNGKey(1), (64,) + SHAPE, minval=-2, maxval=2)
  assert np.all(_jacobian_norms(model.apply, v, x) <= float(total) * (1 + 1e-5))


def test_local_bound_uses_the_masks_inside_the_branch():
  """A branch whose hidden layer is off on the ball contributes nothing: the
  block is the identity there and the bound is that of the rest."""
  model, v = _model("mlp")
  p = jax.tree_util.tree_map(lambda a: a, v["params"])
  p["Dense_1"] = {"kernel": p["Dense_1"]["kernel"], "bias": jnp.full((6,), -50.0)}
  v2 = {"params": p}
  x = jax.random.uniform(jax.random.PRNGKey(2), (B,) + SHAPE)
  res = lipjax.local_lipschitz_bound(model, v2, x, 0.1)
  norms_ = [np.asarray(n) for n in res.layer_norms]
  np.testing.assert_allclose(norms_[1], 0.0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(res.bound),
                             norms_[0] * (1 + 0.0) * norms_[3] * (1 + 2.0 ** -23), rtol=1e-6)


def test_rounding_bound_covers_the_float32_forward_pass():
  model, v = _model("cnn")
  x = jax.random.uniform(jax.random.PRNGKey(3), (B,) + SHAPE)
  U.assert_rounding_bound_covers_float32(model, v, x, 0.2)


def test_certificates_survive_pgd_and_training_step_runs():
  model = ResMLP()
  x, y = _clusters(jax.random.PRNGKey(13), 160)
  v = _random_variables(model, 0)
  opt = optax.adam(1e-2)
  power = lipjax.training.init_power_state(model, v, input_shape=SHAPE)
  state = lipjax.training.create_train_state(v["params"], opt, rng=0, power=power)
  step = lipjax.training.make_train_step(model, opt, loss="gloro", bound="local",
                                         iterations=2, eps_schedule=0.1)
  losses = []
  for _ in range(40):
    state, metrics = step(state, x[:128], y[:128])
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  v = {"params": state.params}
  xt, yt = x[128:], y[128:]
  eps = 0.15
  cert = lipjax.certify(model, v, xt, yt, eps, triage=False)
  local = np.asarray(cert.certified)
  assert local.mean() > 0.2, local.mean()
  glob = np.asarray(lipjax.certify(model, v, xt, yt, eps, bound="global").certified)
  assert not np.any(glob & ~local)    # the local certificate is never weaker here
  worst = np.asarray(_pgd(model.apply, v, xt, yt, eps, jax.random.PRNGKey(14)))
  assert not np.any(local & (worst > 0)), "a certified point was flipped"
  worst_big = np.asarray(_pgd(model.apply, v, xt, yt, 3.0, jax.random.PRNGKey(15)))
  assert np.mean(worst_big > 0) > 0.3


def test_projection_and_nested_blocks_are_bounded_and_a_shared_skip_is_refused():
  class Nested(fnn.Module):
    @fnn.compact
    def __call__(self, x):
      h = fnn.relu(fnn.Dense(6)(_flatten(x)))
      g = fnn.relu(fnn.Dense(6)(h))
      g = g + fnn.Dense(6)(fnn.relu(fnn.Dense(6)(g)))
      return fnn.Dense(CLASSES)(h + fnn.Dense(6)(g))

  class Projection(fnn.Module):
    @fnn.compact
    def __call__(self, x):
      h = fnn.relu(fnn.Dense(6)(_flatten(x)))
      return fnn.Dense(CLASSES)(fnn.Dense(6)(h) + fnn.Dense(6)(fnn.relu(fnn.Dense(6)(h))))

  class Twice(fnn.Module):
    @fnn.compact
    def __call__(self, x):
      h = fnn.relu(fnn.Dense(6)(_flatten(x)))
      y = h + fnn.Dense(6)(fnn.relu(fnn.Dense(6)(h)))
      return fnn.Dense(CLASSES)(y + h)

  x = jax.random.uniform(jax.random.PRNGKey(2), (B,) + SHAPE)
  eps = 0.2
  for cls in (Nested, Projection):   # refused before nested blocks and projections
    model = cls()
    v = _random_variables(model, 4)
    bound = np.asarray(lipjax.local_lipschitz_bound(model, v, x, eps).bound, np.float64)
    glob = float(lipjax.global_lipschitz_bound(model, v, input_shape=SHAPE))
    assert np.all(bound <= glob * (1 + 1e-5)), cls.__name__
    pts = jnp.concatenate([x[None], U.sample_ball(jax.random.PRNGKey(3), x, eps, 8)])
    worst = _jacobian_norms(model.apply, v, pts.reshape((-1,) + SHAPE)).reshape(-1, B).max(0)
    assert np.all(worst <= bound * (1 + 1e-5)), (cls.__name__, worst, bound)
  model = Twice()
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
  with pytest.raises(lipjax.UnsupportedModelError) as e:
    lipjax.local_lipschitz_bound(model, v, jnp.zeros((1,) + SHAPE), 0.1)
  msg = str(e.value)
  assert "\n" not in msg and "used elsewhere" in msg, msg


# ---------------------------------------------------------------------------
# The LiResNet-style zoo model and models named by import path
# ---------------------------------------------------------------------------


def _tiny_liresnet(activation):
  return lipjax.models.get("liresnet", num_classes=CLASSES, activation=activation, width=4,
                           blocks=2, neck=8, input_shape=SHAPE)


@pytest.mark.parametrize("activation", ["clipped_maxmin"])
def test_liresnet_blocks_are_joint_operators_and_bound_is_sound(activation):
  model = _tiny_liresnet(activation)
  v = _random_variables(model, 5)
  stages = trace_lib.trace(model, v, SHAPE)
  assert [type(st.layer).__name__ for st in stages] == [
      "Conv", "TracedResidualConv", "TracedResidualConv", "Conv", "Dense", "Dense"]
  # I + W as one convolution: its global norm is the joint circulant norm,
  # below 1 + ||W|| and at least the spectral norm of the explicit I + W.
  st = stages[1]
  k = np.asarray(v["params"]["block_0"]["kernel"], np.float64)
  in_shape = SHAPE[:2] + (k.shape[2],)
  n_in = int(np.prod(in_shape))
  jac = jax.jacfwd(lambda e: st.linear(e.reshape((1,) + in_shape)).reshape(-1))(
      jnp.zeros((n_in,)))
  mat = np.asarray(jac, np.float64)
  joint = np.linalg.svd(mat, compute_uv=False)[0]
  gnorm = float(st.layer.global_norm(st.params, st.layer_in_shape))
  conv_only = np.linalg.svd(mat - np.eye(n_in), compute_uv=False)[0]
  assert joint * (1 - 1e-5) <= gnorm < 1 + conv_only
  x = jax.random.uniform(jax.random.PRNGKey(8), (B,) + SHAPE)
  eps = 0.3
  bound = np.asarray(lipjax.local_lipschitz_bound(model, v, x, eps).bound, np.float64)
  glob = float(lipjax.global_lipschitz_bound(model, v, input_shape=SHAPE))
  assert np.all(bound <= glob * (1 + 1e-5))
  pts = jnp.concatenate([x, U.sample_ball(jax.random.PRNGKey(9), x, eps, 4,
                                          uniform_radius=True).reshape((-1,) + SHAPE)])
  worst = _jacobian_norms(model.apply, v, pts).reshape(-1, B).max(axis=0)
  assert np.all(worst <= bound * (1 + 1e-5)), (worst, bound)


def test_rounding_model_of_a_residual_convolution_sums_w_and_the_identity():
  # A centre tap of -I cancels the identity in I + W, so |I + W| drops the
  # centre; the replayed h + conv(h) still sums |W| h and h in float32, so
  # the rounding model must see |W| + I (hand-set: explicit matrices).
  model = _tiny_liresnet("clipped_relu")
  v = _random_variables(model, 5)
  k = np.array(v["params"]["block_0"]["kernel"])
  kh, kw, c, _ = k.shape
  k[kh // 2, kw // 2] = -np.eye(c)
  v["params"]["block_0"]["kernel"] = jnp.asarray(k)
  st = trace_lib.trace(model, v, SHAPE)[1]
  assert type(st.layer).__name__ == "TracedResidualConv"
  in_shape = SHAPE[:2] + (c,)
  n = int(np.prod(in_shape))
  lin = np.asarray(jax.jacfwd(lambda e: st.linear(e.reshape((1,) + in_shape)).reshape(-1))(
      jnp.zeros((n,))), np.float64)                  # I + W, explicit
  w = lin - np.eye(n)
  h = np.asarray(jax.random.uniform(jax.random.PRNGKey(2), (n,)), np.float64)
  want_round = np.abs(w) @ h + h
  want_abs = np.abs(lin) @ h
  assert np.all(np.diag(lin) == 0) and np.all(want_abs < want_round - 1e-3)
  got_round = np.asarray(st.rounding_abs_linear(jnp.asarray(h, jnp.float32).reshape(
      (1,) + in_shape)), np.float64).reshape(-1)
  got_abs = np.asarray(st.abs_linear(jnp.asarray(h, jnp.float32).reshape(
      (1,) + in_shape)), np.float64).reshape(-1)
  np.testing.assert_allclose(got_round, want_round, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_abs, want_abs, rtol=1e-5, atol=1e-6)


def test_liresnet_trains_with_the_local_bound():
  model = _tiny_liresnet("clipped_relu")
  x, y = _clusters(jax.random.PRNGKey(16), 16)
  v = model.init(jax.random.PRNGKey(0), x[:1])
  opt = optax.adam(1e-2)
  power = lipjax.training.init_power_state(model, v, input_shape=SHAPE)
  state = lipjax.training.create_train_state(v["params"], opt, rng=0, power=power)
  step = lipjax.training.make_train_step(model, opt, loss="gloro", bound="local",
                                         iterations=1, eps_schedule=0.1)
  state, metrics = step(state, x, y)
  assert np.isfinite(float(metrics["loss"]))
  for name in ("stem", "block_0", "block_1", "down", "neck", "head"):
    assert np.any(np.asarray(state.params[name]["kernel"])
                  != np.asarray(v["params"][name]["kernel"])), name


class TinyUserNet(fnn.Module):
  """A user model for the launcher's import-path option."""

  num_classes: int = 10
  width: int = 4

  @fnn.compact
  def __call__(self, x):
    h = fnn.relu(fnn.Conv(self.width, (3, 3), strides=2, padding=1)(x))
    h = h + fnn.Conv(self.width, (3, 3), padding=1)(fnn.relu(
        fnn.Conv(self.width, (3, 3), padding=1)(h)))
    return fnn.Dense(self.num_classes)(_flatten(h))


def test_launcher_builds_a_model_named_by_import_path():
  from experiments import train_lib
  from experiments.cli import InputError
  from experiments.configs import base
  cfg = base.get_config().to_dict()
  cfg.update(model="test_residual:TinyUserNet", num_classes=3,
             model_options={"width": 2})
  train_lib.check_config(cfg)
  model = train_lib.build_model(cfg, SHAPE)
  assert isinstance(model, TinyUserNet) and (model.num_classes, model.width) == (3, 2)
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
  res = lipjax.local_lipschitz_bound(model, v, jnp.ones((2,) + SHAPE), 0.1)
  assert np.all(np.isfinite(np.asarray(res.bound)))
  liresnet = train_lib.build_model(dict(cfg, model="liresnet",
                                        model_options={"blocks": 1}), SHAPE)
  assert liresnet.blocks == 1 and liresnet.num_classes == 3
  for path, words in (("no_such_package_xyz.nets:Net", "cannot import"),
                      ("test_residual:NoSuchNet", "has no attribute"),
                      ("resnet50", "import path"), ("test_residual:", "import path"),
                      ("test_residual:CLASSES", "not a flax.linen.Module")):
    with pytest.raises(InputError) as e:
      train_lib.check_config(dict(cfg, model=path))
      train_lib.build_model(dict(cfg, model=path), SHAPE)
    assert "\n" not in str(e.value) and words in str(e.value), str(e.value)
  with pytest.raises(InputError, match="unknown option"):
    train_lib.build_model(dict(cfg, model="liresnet", model_options={"depth": 3}), SHAPE)
