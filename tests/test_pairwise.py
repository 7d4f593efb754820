"""Per-class-pair bounds (lipjax._src.pairwise) against independent truth.

Truth for the margin ``g = z_i - z_y`` of every class pair:

* exhaustive enumeration, on small MLPs, of every activation pattern the
  boxes allow (each unstable unit's slope 0 or 1, a vertex of the slope
  set), with explicit float64 matrices: the largest ``||grad g||`` over the
  patterns is the exact maximum over the relaxed Jacobian set, and the bound
  is never below it;
* the gradient norm of ``g`` (``jax.jacfwd`` of the model's own ``apply``) at
  points sampled in the ball, and the difference quotient
  ``|g(a) - g(b)| / ||a - b||`` maximised by projected gradient ascent over
  pairs of the ball;
* certification with the pair bounds never certifies less than the product
  bound alone, and PGD never flips a certified point.
"""

import dataclasses
import functools
import itertools

import jax
import flax.linen as fnn
import jax.numpy as jnp
import numpy as np
import pytest

import lipjax
import lipjax.evaluation
import lipjax.training
from lipjax import models
from lipjax import nn as lnn
from lipjax._src.graph import Block, Graph
from lipjax._src import lipschitz, margins, pairwise
from lipjax._src import trace as trace_lib
from lipjax._src.certify import abs_norm_bounds
from lipjax._src.rules import relu as relu_rules

import _bounds_util as U

RTOL = 1e-5


def _pair_bounds(model, variables, x, eps, labels):
  """The smaller of two pair bounds, so that every check below holds for both:
  with the local bound's own boxes, and as ``certify`` computes them (slopes
  of the global-norm boxes, local norms where their masks allow)."""
  lb = lipjax.local_lipschitz_bound(model, variables, x, eps)
  stages = trace_lib.trace(model, variables, tuple(x.shape[1:]))
  abs_norms = abs_norm_bounds(stages)
  own = pairwise.pair_bounds(stages, lb.layers, lb.layer_norms, labels, sound=True,
                             abs_norms=abs_norms, global_norms=lb.global_norms)
  boxes, joins = lipschitz.ball_bounds(stages, x, jnp.full((x.shape[0],), eps),
                                       list(lb.global_norms), with_joins=True)
  mixed = pairwise.pair_bounds(stages, boxes, lb.layer_norms, labels, sound=True,
                               abs_norms=abs_norms, norm_layers=lb.layers,
                               global_norms=lb.global_norms, joins=joins)
  assert mixed is not None
  # The local bound carries no join boxes: a network with blocks has only the
  # certificate's form.
  assert (own is None) == bool(stages.blocks)
  pair = np.asarray(mixed, np.float64)
  if own is not None:
    pair = np.minimum(np.asarray(own, np.float64), pair)
  return pair, lb, stages


def _slope_choices(act, params, lower, upper):
  """Per unit of one activation (flattened), the slopes a vertex may take."""
  lo, hi = np.asarray(lower, np.float64).ravel(), np.asarray(upper, np.float64).ravel()
  if isinstance(act, relu_rules.ClippedReLU):
    theta = np.asarray(params["theta"], np.float64).ravel()
  else:
    theta = np.full_like(lo, np.inf)
  out = []
  for l, h, t in zip(lo, hi, theta):
    if h <= 0 or l >= t or t <= 0:
      out.append((0.0,))
    elif l >= 0 and h <= t:
      out.append((1.0,))
    else:
      out.append((0.0, 1.0))
  return out


@pytest.mark.parametrize("kind,seed", [("relu", 0), ("clipped_relu", 1), ("clipped_relu", 2)])
def test_bound_covers_every_allowed_activation_pattern(kind, seed):
  model = U.mlp_model(kind, features=4, widths=(6, 5), classes=3)
  variables = U.init_random(model, jax.random.PRNGKey(40 + seed))
  x = jax.random.uniform(jax.random.PRNGKey(50 + seed), (3, 4))
  y = jnp.asarray([0, 1, 2])
  eps = 0.4
  pair, lb, stages = _pair_bounds(model, variables, x, eps, y)
  mats = [np.asarray(jax.vmap(lambda e, st=st: st.linear(e[None])[0])(
      jnp.eye(int(np.prod(st.in_shape)))), np.float64).T for st in stages]   # (out, in)
  checked = 0
  for b in range(x.shape[0]):
    choices = []
    for l, st in enumerate(stages[:-1]):
      choices.append(_slope_choices(st.activation, st.act_params, lb.layers[l].lower[b],
                                    lb.layers[l].upper[b]))
    flat = [c for layer in choices for c in layer]
    assert sum(len(c) > 1 for c in flat) >= 2, "the case should have unstable units"
    sizes = [len(layer) for layer in choices]
    best = np.zeros(3)
    for pattern in itertools.product(*flat):
      j = mats[0]
      start = 0
      for l, n in enumerate(sizes):
        d = np.asarray(pattern[start:start + n])
        start += n
        j = mats[l + 1] @ (d[:, None] * j)
      for i in range(3):
        if i != int(y[b]):
          best[i] = max(best[i], np.linalg.norm(j[i] - j[int(y[b])]))
    for i in range(3):
      if i != int(y[b]):
        assert pair[b, i] >= best[i] * (1 - RTOL), (b, i, pair[b, i], best[i])
        checked += 1
    assert pair[b, int(y[b])] == 0.0
  assert checked == 6


def _residual_conv(kind):
  """conv -> act -> act(h + conv(act(conv(h)))) -> strided conv -> act -> fc."""
  act = U.activation
  return lnn.Sequential(
      (lnn.Conv(4, kernel_size=3, stride=1, padding=1), act(kind),
       lnn.Residual((lnn.Conv(4, kernel_size=3, stride=1, padding=1), act(kind),
                     lnn.Conv(4, kernel_size=3, stride=1, padding=1)), activation=act(kind)),
       lnn.Conv(4, kernel_size=4, stride=2, padding=1), act(kind),
       lnn.Flatten(), lnn.Dense(8), act(kind), lnn.Dense(3)), input_shape=(6, 6, 2))


def _models():
  out = {}
  for i, kind in enumerate(("relu", "clipped_relu", "clipped_maxmin")):
    m = U.conv_model(kind)
    out[f"conv-{kind}"] = (m, U.init_random(m, jax.random.PRNGKey(60 + i)))
  m = _residual_conv("clipped_relu")
  out["res-clipped_relu"] = (m, U.init_random(m, jax.random.PRNGKey(66)))
  m = models.LiResNet(num_classes=3, width=4, blocks=2, neck=8, input_shape=(6, 6, 2),
                      block_scale=0.5)
  out["liresnet"] = (m, U.randomize(m.init(jax.random.PRNGKey(68), jnp.zeros((1, 6, 6, 2))),
                                    jax.random.PRNGKey(69)))
  return out


MODELS = _models()


@functools.lru_cache(maxsize=None)
def _margin_ascent(name, steps=50, restarts=6):
  """Jitted search for pairs ``a, b`` of the ball maximising each class pair's
  difference quotient ``|g(a) - g(b)| / ||a - b||`` (``g = z_i - z_y``)."""
  model, variables = MODELS[name]

  def quotient(a, bb, i, y):
    fa, fb = model.apply(variables, a), model.apply(variables, bb)
    ga = jnp.take_along_axis(fa, i[:, None], 1)[:, 0] - jnp.take_along_axis(fa, y[:, None], 1)[:, 0]
    gb = jnp.take_along_axis(fb, i[:, None], 1)[:, 0] - jnp.take_along_axis(fb, y[:, None], 1)[:, 0]
    den = jnp.sqrt(jnp.sum(jnp.square((a - bb).reshape(a.shape[0], -1)), -1) + 1e-30)
    return jnp.abs(ga - gb) / den

  def run(x, eps, i, y, key):
    eps_b = jnp.full((x.shape[0],), eps)
    k1, k2 = jax.random.split(key)
    a0 = U.sample_ball(k1, x, eps_b, restarts, uniform_radius=True)
    dirs = U.normalised(jax.random.normal(k2, a0.shape), 2)
    b0 = U.project(a0 + 0.05 * eps * dirs, x, eps_b)

    def one(a, bb):
      def body(t, carry):
        a, bb, best = carry
        step = 0.1 * eps * (1.0 - t / steps) + 0.002 * eps
        obj = lambda a, bb: jnp.sum(jnp.log(quotient(a, bb, i, y) + 1e-30))
        ga, gb = jax.grad(obj, (0, 1))(a, bb)
        a = U.project(a + step * U.normalised(ga, 1), x, eps_b)
        bb = U.project(bb + step * U.normalised(gb, 1), x, eps_b)
        return a, bb, jnp.maximum(best, quotient(a, bb, i, y))
      _, _, best = jax.lax.fori_loop(0, steps, body, (a, bb, quotient(a, bb, i, y)))
      return best

    return jnp.max(jax.vmap(one)(a0, b0), axis=0)

  return jax.jit(run)


@pytest.mark.parametrize("name,eps", [("conv-relu", 0.5), ("conv-clipped_relu", 0.1),
                                      ("conv-clipped_maxmin", 0.5), ("liresnet", 0.1)])
def test_bound_covers_gradients_and_difference_quotients(name, eps):
  model, variables = MODELS[name]
  x = jax.random.uniform(jax.random.PRNGKey(70), (3,) + model.input_shape)
  y = jnp.argmax(model.apply(variables, x), -1)
  pair, lb, _ = _pair_bounds(model, variables, x, eps, y)
  prod = np.asarray(lb.bound, np.float64)
  c = pair.shape[1]
  # Gradient norms of every pair's margin at points of the ball.
  pts = U.sample_ball(jax.random.PRNGKey(71), x, jnp.full((3,), eps), 64, uniform_radius=True)
  f = lambda p: model.apply(variables, p[None])[0]
  jac = jax.jit(jax.vmap(jax.vmap(jax.jacfwd(f))))(pts)          # (N, B, C, *in)
  jac = np.asarray(jac, np.float64).reshape(pts.shape[0], 3, c, -1)
  yy = np.asarray(y)
  for b in range(3):
    g = jac[:, b] - jac[:, b, yy[b]][:, None]                    # (N, C, in)
    norms = np.linalg.norm(g, axis=-1).max(axis=0)
    assert np.all(pair[b] >= norms * (1 - RTOL)), (b, pair[b], norms)
  # Difference quotients from ascent, pair by pair.
  for i in range(c):
    idx = jnp.full((3,), i)
    q = np.asarray(_margin_ascent(name)(x, eps, idx, y, jax.random.PRNGKey(72 + i)))
    for b in range(3):
      if i != yy[b]:
        assert pair[b, i] >= q[b] * (1 - RTOL), (b, i, pair[b, i], q[b])
  assert np.all(np.isfinite(pair)) and np.all(prod > 0)


@pytest.mark.parametrize("name", ["conv-clipped_relu", "conv-clipped_maxmin",
                                  "res-clipped_relu"])
def test_certify_never_certifies_less_and_pgd_breaks_nothing(name):
  model, variables = MODELS[name]
  x = jax.random.uniform(jax.random.PRNGKey(80), (16,) + model.input_shape)
  y = jnp.argmax(model.apply(variables, x), -1)   # every point correctly classified
  for eps in (0.05, 0.2):
    cert = lipjax.certify(model, variables, x, y, eps, triage=False)
    stages = trace_lib.trace(model, variables, tuple(x.shape[1:]))
    # The same certificate with the product bound alone (no pair bounds).
    lb = lipjax.local_lipschitz_bound(model, variables, x, eps)
    inner = stages.product(lb.layer_norms[:-1], logits=False)
    logits = np.asarray(lb.logits, np.float64)
    mat = np.asarray(stages[-1].layer.explicit_matrix(stages[-1].params), np.float64)
    col = np.asarray(margins.last_layer_columns(stages, lb.layers, 16))
    for b in range(16):
      gap = logits[b, int(y[b])] - logits[b]
      pn = np.linalg.norm((mat - mat[int(y[b])]) * col[b], axis=1)
      clear = np.all((gap - eps * float(inner[b]) * pn * (1 + 1e-3) > 1e-4)[
          np.arange(mat.shape[0]) != int(y[b])])
      if clear:   # the product bound alone certifies it with room to spare
        assert bool(cert.certified[b]), (b, eps)
    attacked = lipjax.evaluation.pgd_attack(model.apply, variables, x, y, eps, steps=40,
                                            restarts=2, key=jax.random.PRNGKey(81))
    broken = np.asarray(attacked.success)
    assert not np.any(np.asarray(cert.certified) & broken)


@pytest.mark.parametrize("name", ["mlp", "projection"])
def test_all_stable_network_gets_the_exact_gradient_norm(name):
  # A tiny eps keeps every unit stable: the bound is the margin gradient's
  # norm (through the blocks too), where the product bound is larger.
  if name == "mlp":
    model = U.mlp_model("clipped_relu", features=4, widths=(6, 5), classes=3)
    variables = U.init_random(model, jax.random.PRNGKey(90))
  else:
    model = _ProjectionNet()
    variables = U.randomize(model.init(jax.random.PRNGKey(6), jnp.zeros((1, 4))),
                            jax.random.PRNGKey(7))
  x = jax.random.uniform(jax.random.PRNGKey(91), (3, 4))
  y = jnp.asarray([2, 0, 1])
  pair, lb, stages = _pair_bounds(model, variables, x, 1e-4, y)
  f = lambda p: model.apply(variables, p[None])[0]
  jac = np.asarray(jax.vmap(jax.jacfwd(f))(x), np.float64)
  for b in range(3):
    for i in range(3):
      if i == int(y[b]):
        continue
      truth = np.linalg.norm(jac[b, i] - jac[b, int(y[b])])
      assert truth * (1 - RTOL) <= pair[b, i] <= truth * 1.01 + 1e-6, (b, i, pair[b, i], truth)
  # The product bound is looser here (it ignores the alignment of the layers).
  assert np.all(np.max(pair, axis=1) <= np.asarray(lb.bound) * 1.01)


class _ProjectionNet(fnn.Module):
  """A block with a post activation, then a projection shortcut
  ``relu(P g + W relu(V g))`` (plain Flax, traced)."""

  @fnn.compact
  def __call__(self, x):
    h = fnn.relu(fnn.Dense(4)(x))
    g = fnn.relu(h + fnn.Dense(4)(fnn.relu(fnn.Dense(3)(h))))
    z = fnn.Dense(3, use_bias=False)(g) + fnn.Dense(3)(fnn.relu(fnn.Dense(3)(g)))
    return fnn.Dense(3)(fnn.relu(z))


class _NestedNet(fnn.Module):
  """A block nested in another block's path (plain Flax, traced)."""

  @fnn.compact
  def __call__(self, x):
    h = fnn.relu(fnn.Dense(3)(x))
    g = fnn.relu(fnn.Dense(3)(h))
    g = g + fnn.Dense(3)(fnn.relu(fnn.Dense(3)(g)))
    return fnn.Dense(3)(fnn.relu(h + fnn.Dense(3)(g)))


def _graph_jacobian(items, mats, slopes, j):
  """float64 Jacobian of ``items`` from ``j`` (``(n, n_in)``) with fixed slopes."""
  for item in items:
    if isinstance(item, Block):
      outs = [_graph_jacobian(path, mats, slopes, j) for path in item.paths]
      j = sum(outs)
      if item.activation is not None:
        j = slopes[("join", id(item))][:, None] * j
    else:
      j = mats[item.index] @ j
      if item.activation is not None and not item.activation.linear:
        j = slopes[("stage", item.index)][:, None] * j
  return j


@pytest.mark.parametrize("name", ["residual", "projection", "nested"])
def test_residual_bound_covers_every_allowed_activation_pattern(name):
  # Blocks: every pattern of slopes the boxes allow (inner and post-join
  # activations), the exact float64 Jacobian of the graph for each.
  if name == "residual":
    model = lnn.Sequential((lnn.Dense(4), lnn.ReLU(),
                            lnn.Residual((lnn.Dense(3), lnn.ReLU(), lnn.Dense(4)),
                                         activation=lnn.ReLU()), lnn.Dense(3)),
                           input_shape=(4,))
  else:
    model = _ProjectionNet() if name == "projection" else _NestedNet()
  variables = U.randomize(model.init(jax.random.PRNGKey(3), jnp.zeros((1, 4))),
                          jax.random.PRNGKey(4))
  x = jax.random.uniform(jax.random.PRNGKey(5), (6, 4))
  y = jnp.asarray([0, 1, 2, 0, 1, 2])
  stages = trace_lib.trace(model, variables, (4,))
  assert stages.blocks and pairwise.supports(stages)
  if name == "nested":
    assert any(isinstance(it, Block) for bl in stages.blocks for p in bl.paths for it in p)
  mats = [np.asarray(jax.vmap(lambda e, st=st: st.linear(e[None])[0])(
      jnp.eye(int(np.prod(st.in_shape)))), np.float64).reshape(
          int(np.prod(st.in_shape)), -1).T for st in stages]
  checked = 0
  for eps in (0.1, 0.3):
    pair, lb, _ = _pair_bounds(model, variables, x, eps, y)
    boxes, joins = lipschitz.ball_bounds(stages, x, jnp.full((6,), eps),
                                         list(lb.global_norms), with_joins=True)
    for b in range(6):
      units = []   # (key, choices per unit)
      for st in stages[:-1]:
        if not st.activation.linear:
          units.append((("stage", st.index), _slope_choices(
              st.activation, st.act_params, boxes[st.index].lower[b],
              boxes[st.index].upper[b])))
      for block, jb in zip(stages.blocks, joins):
        if block.activation is not None:
          units.append((("join", id(block)), _slope_choices(
              block.activation, block.act_params, jb.lower[b], jb.upper[b])))
      flat = [c for _, ch in units for c in ch]
      n_unstable = sum(len(c) > 1 for c in flat)
      if not 2 <= n_unstable <= 12:
        continue
      best = np.zeros(3)
      for pattern in itertools.product(*flat):
        slopes, start = {}, 0
        for key, ch in units:
          slopes[key] = np.asarray(pattern[start:start + len(ch)])
          start += len(ch)
        j = _graph_jacobian(stages.items, mats, slopes, np.eye(4))
        for i in range(3):
          best[i] = max(best[i], np.linalg.norm(j[i] - j[int(y[b])]))
      for i in range(3):
        if i != int(y[b]):
          assert pair[b, i] >= best[i] * (1 - RTOL), (eps, b, i, pair[b, i], best[i])
          checked += 1
  assert checked >= 6


def test_joins_without_boxes_or_a_nonlinear_join_get_no_pair_bound():
  model = lnn.Sequential(
      (lnn.Dense(4), lnn.ReLU(), lnn.Residual((lnn.Dense(4), lnn.ReLU(), lnn.Dense(4))),
       lnn.Dense(3)), input_shape=(4,))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
  stages = trace_lib.trace(model, variables, (4,))
  assert pairwise.supports(stages)
  x = jnp.zeros((1, 4))
  layers = lipschitz.ball_bounds(stages, x, jnp.full((1,), 0.1), [1.0] * len(stages))
  assert pairwise.pair_bounds(stages, layers, [1.0] * len(stages), jnp.zeros((1,), jnp.int32),
                              sound=False) is None

  class Product(type(stages.blocks[0].combine)):
    def transpose(self, cotangent, num_paths):
      return None

  block = stages.blocks[0]
  other = Graph(tuple(
      dataclasses.replace(it, combine=Product()) if it is block else it
      for it in stages.items))
  assert not pairwise.supports(other)


def test_training_loss_with_pairs_keeps_the_product_bound_on_residual_networks():
  # The training estimate records no join boxes: a network with blocks gets
  # the product bound's deltas with or without pair=True.
  model = lnn.Sequential(
      (lnn.Dense(4), lnn.ReLU(), lnn.Residual((lnn.Dense(4), lnn.ReLU(), lnn.Dense(4)),
                                              activation=lnn.ReLU()), lnn.Dense(3)),
      input_shape=(4,))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 4))
  y = jnp.asarray([0, 1, 2, 0])
  _, with_pairs, _ = lipjax.training.worst_case_deltas(model, variables, x, y, 0.2,
                                                       pair=True, key=jax.random.PRNGKey(2))
  _, without, _ = lipjax.training.worst_case_deltas(model, variables, x, y, 0.2,
                                                    key=jax.random.PRNGKey(2))
  assert np.all(np.isfinite(np.asarray(with_pairs)))
  np.testing.assert_array_equal(np.asarray(with_pairs), np.asarray(without))


@pytest.mark.parametrize("name", ["conv-clipped_relu", "res-clipped_relu"])
def test_bounds_of_chosen_classes_equal_the_full_bounds_there(name):
  # ``classes`` only selects which pairs are computed: each chosen pair's
  # bound is the one the full computation gives, the others are inf (no
  # bound) and the label's entry is 0.
  model, variables = MODELS[name]
  x = jax.random.uniform(jax.random.PRNGKey(82), (6,) + model.input_shape)
  eps = jnp.full((6,), 0.1)
  labels = jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32)
  chosen = jnp.asarray([[1, 2], [0, 0], [1, 0], [2, 1], [2, 0], [0, 1]], jnp.int32)
  lb = lipjax.local_lipschitz_bound(model, variables, x, eps)
  stages = trace_lib.trace(model, variables, tuple(x.shape[1:]))
  boxes, joins = lipschitz.ball_bounds(stages, x, eps, list(lb.global_norms),
                                       with_joins=True)
  for sound in (True, False):
    kw = dict(abs_norms=abs_norm_bounds(stages), norm_layers=lb.layers,
              global_norms=lb.global_norms) if sound else {}
    full = np.asarray(pairwise.pair_bounds(stages, boxes, lb.layer_norms, labels,
                                           sound=sound, joins=joins, **kw))
    part = np.asarray(pairwise.pair_bounds(stages, boxes, lb.layer_norms, labels,
                                           sound=sound, joins=joins, classes=chosen, **kw))
    assert part.shape == full.shape == (6, 3)
    for b in range(6):
      for i in range(3):
        if i == int(labels[b]):
          assert part[b, i] == 0.0
        elif i in np.asarray(chosen[b]):
          np.testing.assert_allclose(part[b, i], full[b, i], rtol=RTOL)
          assert np.isfinite(part[b, i]) and part[b, i] > 0
        else:
          assert part[b, i] == np.inf, (sound, b, i)
