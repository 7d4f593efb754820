"""Projection shortcuts, nested residual blocks and pair-wise MaxMin, against independent truth.

Models written the ways users write them (Flax linen and NNX): a ResNet
basic block with a 1x1 stride-2 projection shortcut ``relu(f(h) + P h)`` (with
and without bias, with inference BatchNorm), a dense projection, a residual
block inside another block's branch, and MaxMin / GroupSort-2 over adjacent
channel pairs (``z.reshape(..., C // 2, 2)`` then ``max`` / ``min`` over the
last axis, put back by stacking or concatenation).

Truth: the models' own ``apply`` (float64 SVDs of ``jax.jacfwd`` Jacobians at
the centre, at sampled points of the ball and at points found by gradient
ascent of the difference quotient), a float64 forward pass for the rounding
bounds, explicit products of numpy SVDs for global bounds, hand-set weights
with an exact expected local bound, and an L2 PGD attack on certified points.
"""

from flax import nnx
import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lipjax
from lipjax._src import interpret
from lipjax._src import trace as trace_lib
from lipjax._src.graph import Block

import _bounds_util as U
from test_flax_models import (CLASSES, SHAPE, _clusters, _flatten, _jacobian_norms, _pgd,
                              _quotient_ascent, _random_variables)

B = 3


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


class ProjectionResNet(fnn.Module):
  """Stem, a basic block with a 1x1 stride-2 projection shortcut (inference
  BatchNorm on both paths), an identity block, a dense head."""

  bias: bool = True

  @fnn.compact
  def __call__(self, x):
    h = fnn.relu(fnn.Conv(4, (3, 3), padding="SAME", name="stem")(x))
    bn = lambda n: fnn.BatchNorm(use_running_average=True, name=n)   # noqa: E731
    y = fnn.relu(bn("bn1")(fnn.Conv(6, (3, 3), strides=2, padding=1, name="conv1")(h)))
    y = bn("bn2")(fnn.Conv(6, (3, 3), padding="SAME", name="conv2")(y))
    p = fnn.Conv(6, (1, 1), strides=2, use_bias=self.bias, name="proj")(h)
    h = fnn.relu(y + bn("bnp")(p))
    h = fnn.relu(h + fnn.Conv(6, (3, 3), padding="SAME", name="conv3")(
        fnn.relu(fnn.Conv(6, (3, 3), padding="SAME", name="conv4")(h))))
    return fnn.Dense(CLASSES, name="head")(_flatten(h))


class DenseProjection(fnn.Module):
  """``relu(D1 h + D3 relu(D2 h))`` on a dense layer's output, then a head."""

  @fnn.compact
  def __call__(self, x):
    h = fnn.relu(fnn.Dense(6)(_flatten(x)))
    h = fnn.Dense(5)(h) + fnn.Dense(5)(fnn.relu(fnn.Dense(7)(h)))
    return fnn.Dense(CLASSES)(fnn.relu(h))


class Nested(fnn.Module):
  """A residual block inside another block's branch (and a clipped inner sum)."""

  @fnn.compact
  def __call__(self, x):
    h = fnn.relu(fnn.Conv(4, (3, 3), strides=2, padding=1)(x))
    g = fnn.relu(fnn.Conv(4, (3, 3), padding=1)(h))
    g = jnp.clip(g + fnn.Conv(4, (3, 3), padding=1)(fnn.relu(fnn.Conv(4, (3, 3),
                                                                        padding=1)(g))),
                 0.0, 1.5)
    h = fnn.relu(h + fnn.Conv(4, (3, 3), padding=1)(g))
    return fnn.Dense(CLASSES)(_flatten(h))


def _groupsort(z, form):
  """GroupSort-2 over adjacent pairs of the last axis, as users write it."""
  s = z.shape
  r = z.reshape(s[:-1] + (s[-1] // 2, 2))
  if form == "stack":
    return jnp.stack([r.max(-1), r.min(-1)], axis=-1).reshape(s)
  if form == "concat":
    return jnp.concatenate([jnp.max(r, axis=-1), jnp.min(r, axis=-1)], axis=-1)
  if form == "keepdims":
    return jnp.concatenate([r.min(-1, keepdims=True), r.max(-1, keepdims=True)],
                           axis=-1).reshape(s)
  if form == "index":
    a, b = r[..., 0], r[..., 1]
    return jnp.stack([jnp.maximum(a, b), jnp.minimum(a, b)], axis=-1).reshape(s)
  if form == "strided":
    a, b = z[..., ::2], z[..., 1::2]
    return jnp.concatenate([jnp.maximum(a, b), jnp.minimum(a, b)], axis=-1)
  if form == "sort":
    return jnp.sort(r, axis=-1).reshape(s)
  raise ValueError(form)


class PairMaxMinNet(fnn.Module):
  """Conv and dense layers with GroupSort-2 over adjacent pairs (three ways)."""

  form: str = "stack"

  @fnn.compact
  def __call__(self, x):
    h = _groupsort(fnn.Conv(4, (3, 3), strides=2, padding=1)(x), self.form)
    h = _groupsort(fnn.Conv(6, (3, 3), padding=1)(h), self.form)
    h = fnn.Dense(8)(_flatten(h))
    upper = self.param("upper", fnn.initializers.constant(0.6), (4,))
    r = h.reshape(h.shape[:-1] + (4, 2))
    h = jnp.stack([jnp.minimum(r.max(-1), upper), r.min(-1)], axis=-1).reshape(h.shape)
    return fnn.Dense(CLASSES)(h)


class NnxProjection(nnx.Module):
  """The projection block in NNX: ``relu(conv(relu(conv_s2(h))) + conv1x1_s2(h))``."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(SHAPE[-1], 4, (3, 3), padding=1, rngs=rngs)
    self.conv1 = nnx.Conv(4, 6, (3, 3), strides=2, padding=1, rngs=rngs)
    self.conv2 = nnx.Conv(6, 6, (3, 3), padding=1, rngs=rngs)
    self.proj = nnx.Conv(4, 6, (1, 1), strides=2, use_bias=False, rngs=rngs)
    self.head = nnx.Linear(54, CLASSES, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.stem(x))
    h = nnx.relu(self.conv2(nnx.relu(self.conv1(h))) + self.proj(h))
    return self.head(h.reshape(h.shape[0], -1))


class Twice(fnn.Module):
  """A skip value used by two sums: still refused."""

  @fnn.compact
  def __call__(self, x):
    h = fnn.relu(fnn.Dense(6)(_flatten(x)))
    y = h + fnn.Dense(6)(fnn.relu(fnn.Dense(6)(h)))
    return fnn.Dense(CLASSES)(y + h)


_MODELS = {
    "projection": lambda: ProjectionResNet(),
    "projection_no_bias": lambda: ProjectionResNet(bias=False),
    "dense_projection": lambda: DenseProjection(),
    "nested": lambda: Nested(),
    "maxmin_stack": lambda: PairMaxMinNet("stack"),
    "maxmin_concat": lambda: PairMaxMinNet("concat"),
    "maxmin_keepdims": lambda: PairMaxMinNet("keepdims"),
    "maxmin_index": lambda: PairMaxMinNet("index"),
    "maxmin_strided": lambda: PairMaxMinNet("strided"),
    "maxmin_sort": lambda: PairMaxMinNet("sort"),
}
_CACHE = {}


def _model(name):
  if name not in _CACHE:
    model = _MODELS[name]()
    v = _random_variables(model, 3)
    if "batch_stats" in v:   # tame BatchNorm: each factor at most 1
      v = jax.tree_util.tree_map_with_path(
          lambda p, a: jnp.abs(a) + 1.0 if str(p[-1].key) == "var" else a, v)
    _CACHE[name] = (model, v)
  return _CACHE[name]


def _structure(items):
  out = []
  for item in items:
    if isinstance(item, Block):
      out.append(("block", tuple(_structure(p) for p in item.paths),
                  type(item.activation).__name__))
    else:
      out.append(type(item.activation).__name__)
  return out


# ---------------------------------------------------------------------------
# Structure and forward pass
# ---------------------------------------------------------------------------


def test_blocks_are_traced_as_intended():
  def structure(name):
    model, v = _model(name)
    return _structure(trace_lib.trace(model, v, SHAPE).items)

  assert structure("projection") == [
      "ReLU", ("block", (["ReLU", "Identity"], ["Identity"]), "ReLU"),
      ("block", ([], ["ReLU", "Identity"]), "ReLU"), "NoneType"]
  assert structure("dense_projection") == [
      "ReLU", ("block", (["Identity"], ["ReLU", "Identity"]), "ReLU"), "NoneType"]
  assert structure("nested") == [
      "ReLU", ("block", ([], ["ReLU", ("block", ([], ["ReLU", "Identity"]), "ClippedReLU"),
                             "Identity"]), "ReLU"), "NoneType"]
  want = {"stack": ("interleaved", True), "concat": ("halves", True),
          "keepdims": ("interleaved", False), "index": ("interleaved", True),
          "strided": ("halves", True), "sort": ("interleaved", False)}
  for form, (layout, max_first) in want.items():
    assert structure(f"maxmin_{form}") == ["PairMaxMin", "PairMaxMin", "PairMaxMin",
                                           "NoneType"], form
    model, v = _model(f"maxmin_{form}")
    graph = trace_lib.trace(model, v, SHAPE)
    assert [(st.activation.pairs, st.activation.layout, st.activation.max_first)
            for st in graph[:2]] == [("adjacent", layout, max_first)] * 2, form
  # The projections are convolutions with their own exact rules.
  model, v = _model("projection")
  assert [type(st.layer).__name__ for st in trace_lib.trace(model, v, SHAPE)] == [
      "Conv", "TracedConv", "TracedConv", "TracedConv", "Conv", "Conv", "Dense"]


@pytest.mark.parametrize("name", tuple(_MODELS))
def test_graph_replays_the_forward_pass(name):
  model, v = _model(name)
  x = jax.random.uniform(jax.random.PRNGKey(7), (4,) + SHAPE)
  graph = trace_lib.trace(model, v, SHAPE)
  np.testing.assert_allclose(interpret.forward(graph, x), model.apply(v, x), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(interpret.smoothed_forward(graph, x, 1e-6), model.apply(v, x),
                             rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Soundness
# ---------------------------------------------------------------------------


# The MaxMin forms differ only in how the same activation is written (the
# structure test and the forward replay check each); two stand for all here.
# (projection_no_bias, the same block without the shortcut's bias, is checked
# against PGD in test_certified_points_survive_pgd.)
@pytest.mark.parametrize("name", ["projection", "dense_projection", "nested", "maxmin_stack",
                                  "maxmin_sort"])
def test_bound_covers_exact_jacobians_and_modes_are_ordered(name):
  model, v = _model(name)
  x = jax.random.uniform(jax.random.PRNGKey(8), (B,) + SHAPE)
  eps = 0.3
  res, bound, glob = U.ordered_bounds(model, v, x, eps)
  quot, best = _quotient_ascent(model.apply, v, x, eps, jax.random.PRNGKey(10), steps=25,
                                restarts=2)
  assert np.all(np.asarray(quot) <= bound[None] * (1 + 1e-4))
  pts = [x, U.sample_ball(jax.random.PRNGKey(9), x, eps, 6, uniform_radius=True), best]
  pts = jnp.concatenate([p.reshape((-1,) + SHAPE) for p in pts])
  worst = _jacobian_norms(model.apply, v, pts).reshape(-1, B).max(axis=0)
  assert np.all(worst <= bound * (1 + 1e-5)), (worst, bound)
  assert np.max(worst / bound) >= 0.01, (worst, bound)   # not vacuous
  # The global bound covers Jacobians anywhere.
  far = jax.random.uniform(jax.random.PRNGKey(11), (16,) + SHAPE, minval=-2, maxval=2)
  assert np.all(_jacobian_norms(model.apply, v, far) <= glob * (1 + 1e-5))


@pytest.mark.parametrize("name", ["projection", "nested", "maxmin_stack"])
def test_rounding_bound_covers_the_float32_forward_pass(name):
  model, v = _model(name)
  x = jax.random.uniform(jax.random.PRNGKey(3), (B,) + SHAPE)
  U.assert_rounding_bound_covers_float32(model, v, x, 0.2)


def test_global_bound_of_a_dense_projection_is_the_sum_of_the_paths():
  model, v = _model("dense_projection")
  total, per = lipjax.global_lipschitz_bound(model, v, input_shape=SHAPE, per_layer=True)
  p = v["params"]
  svd = lambda w: np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)[0]   # noqa: E731
  # Stage order: stem, the projection (its path is traced first), the branch
  # (Dense_3 applied first: Flax names the outer Dense(5) when it is built),
  # the head.
  expected = [svd(p["Dense_0"]["kernel"]), svd(p["Dense_1"]["kernel"]),
              svd(p["Dense_3"]["kernel"]), svd(p["Dense_2"]["kernel"]),
              svd(p["Dense_4"]["kernel"])]
  per = [float(g) for g in per]
  assert np.all(np.asarray(per) >= np.asarray(expected))
  np.testing.assert_allclose(per, expected, rtol=3e-4)
  want = per[0] * (per[1] + per[2] * per[3]) * (1 + 2.0 ** -23) * per[4]
  np.testing.assert_allclose(float(total), want, rtol=1e-6)


def test_hand_set_projection_block_has_the_exact_local_bound():
  """``relu(W2 relu(W1 x + b1) + P x)`` with ``W1``'s units off on the ball:
  the block is ``relu(P x)`` there, and its bound is ``||D P||`` times the
  head's column-masked norm."""
  def fn(w, x):
    h = jax.nn.relu(x @ w["w1"] + w["b1"]) @ w["w2"] + x @ w["p"]
    return jax.nn.relu(h) @ w["head"]

  w = {"w1": jnp.array([[1.0, 0.0], [0.0, 1.0]]), "b1": jnp.array([-10.0, -10.0]),
       "w2": jnp.array([[3.0, 1.0], [1.0, 3.0]]), "p": jnp.array([[2.0, 0.0], [0.0, 0.5]]),
       "head": jnp.array([[1.0, -1.0], [2.0, 0.0]])}
  x = jnp.array([[1.0, 1.0]])
  res = lipjax.local_lipschitz_bound(fn, w, x, 0.1)
  # Both block outputs vary (P x > 0 on the ball): ||P|| = 2, ||head|| exact.
  exact = 2.0 * np.linalg.svd(np.asarray(w["head"]), compute_uv=False)[0]
  assert exact <= float(res.bound[0]) <= exact * (1 + 4e-4)
  assert float(res.failure_probability[0]) == 0.0
  # Stages: W1, W2 (the branch), P, the head; W1's units are off on the ball.
  np.testing.assert_allclose(np.asarray(res.layer_norms[0]), 0.0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(res.layer_norms[1]), 0.0, atol=1e-7)
  glob = float(lipjax.global_lipschitz_bound(fn, w, input_shape=(2,)))
  svd = lambda a: np.linalg.svd(np.asarray(a), compute_uv=False)[0]   # noqa: E731
  assert float(res.bound[0]) <= glob
  np.testing.assert_allclose(glob, (svd(w["w1"]) * svd(w["w2"]) + svd(w["p"])) * svd(w["head"]),
                             rtol=4e-4)


def test_nnx_projection_block_matches_its_linen_form():
  model = NnxProjection(nnx.Rngs(0))

  class Linen(fnn.Module):
    @fnn.compact
    def __call__(self, x):
      h = fnn.relu(fnn.Conv(4, (3, 3), padding=1, name="stem")(x))
      y = fnn.Conv(6, (3, 3), padding=1, name="conv2")(
          fnn.relu(fnn.Conv(6, (3, 3), strides=2, padding=1, name="conv1")(h)))
      h = fnn.relu(y + fnn.Conv(6, (1, 1), strides=2, use_bias=False, name="proj")(h))
      return fnn.Dense(CLASSES, name="head")(_flatten(h))

  s = nnx.state(model)
  v = {"params": {n: {k: s[n][k][...] for k in s[n]} for n in ("stem", "conv1", "conv2",
                                                                  "proj", "head")}}
  linen = Linen()
  x = jax.random.uniform(jax.random.PRNGKey(5), (B,) + SHAPE)
  np.testing.assert_allclose(model(x), linen.apply(v, x), rtol=1e-5, atol=1e-6)
  a = lipjax.local_lipschitz_bound(model, None, x, 0.2)
  b = lipjax.local_lipschitz_bound(linen, v, x, 0.2)
  np.testing.assert_array_equal(np.asarray(a.bound), np.asarray(b.bound))
  y = jnp.argmax(model(x), -1)
  # Every margin the sound one (no triage): the same certificate, bit for bit.
  np.testing.assert_array_equal(
      np.asarray(lipjax.certify(model, None, x, y, 0.02, triage=False).margin),
      np.asarray(lipjax.certify(linen, v, x, y, 0.02, triage=False).margin))


@pytest.mark.parametrize("name", ["projection_no_bias", "nested", "maxmin_strided"])
def test_certified_points_survive_pgd(name):
  model, v = _model(name)
  # Class 0 gets a margin (its logit's bias raised), so that some points are
  # certified at a radius where PGD can still try.
  v = jax.tree_util.tree_map_with_path(
      lambda p, a: a.at[0].add(0.8) if str(p[-1].key) == "bias" and a.shape == (CLASSES,)
      else a, v)
  x, _ = _clusters(jax.random.PRNGKey(13), 24)
  y = jnp.argmax(model.apply(v, x), -1)
  eps = 0.02
  cert = lipjax.certify(model, v, x, y, eps)
  local = np.asarray(cert.certified)
  assert local.any(), np.asarray(cert.margin)
  if name == "nested":   # the triage decides as the sound certificate alone
    sound = np.asarray(lipjax.certify(model, v, x, y, eps, triage=False).certified)
    np.testing.assert_array_equal(local, sound)
  glob = np.asarray(lipjax.certify(model, v, x, y, eps, bound="global").certified)
  assert not np.any(glob & ~local)
  worst = np.asarray(_pgd(model.apply, v, x, y, eps, jax.random.PRNGKey(14)))
  assert not np.any(local & (worst > 0)), "a certified point was flipped"


def test_a_skip_used_by_two_sums_is_refused_in_one_line():
  model = Twice()
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
  with pytest.raises(lipjax.UnsupportedModelError) as e:
    lipjax.local_lipschitz_bound(model, v, jnp.zeros((1,) + SHAPE), 0.1)
  msg = str(e.value)
  assert "\n" not in msg and "used elsewhere" in msg and len(msg) <= 215, msg
  assert "test_blocks.py:" in msg, msg
