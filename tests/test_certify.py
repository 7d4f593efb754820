"""Certificates against an independent L2 PGD attack, and input validation.

Truth: our own projected-gradient attack (margin loss, several random starts,
projection onto the l2 ball) run at the certified radius. A certified point
that the attack flips would be a soundness bug. Models: briefly trained tiny
networks (so that a real fraction certifies) and random ones.
"""

import functools
import importlib

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lipjax
from lipjax import nn as lnn
from lipjax._src import certify as certify_lib
from lipjax._src import trace as trace_lib

import _bounds_util as U

CLASSES = 3
N_TEST = 48


# ---------------------------------------------------------------------------
# Synthetic data and training
# ---------------------------------------------------------------------------


def clusters(key, n, shape, sep=3.0, noise=0.15):
  """``n`` points of ``CLASSES`` Gaussian clusters whose means are ``sep``
  apart (pairwise distance ``sep`` for orthogonal-ish means)."""
  k1, k2, k3 = jax.random.split(key, 3)
  d = int(np.prod(shape))
  means = jax.random.normal(k1, (CLASSES, d))
  means = sep * means / jnp.linalg.norm(means, axis=1, keepdims=True) / np.sqrt(2)
  y = jax.random.randint(k2, (n,), 0, CLASSES)
  x = 0.5 + means[y] + noise * jax.random.normal(k3, (n, d))
  return x.reshape((n,) + tuple(shape)), y


def train(model, x, y, steps=60, lr=1e-2):
  v = model.init(jax.random.PRNGKey(0), x[:1])
  opt = optax.adam(lr)
  state = opt.init(v)

  @jax.jit
  def step(v, state):
    def loss(v):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y).mean()
    l, g = jax.value_and_grad(loss)(v)
    updates, state = opt.update(g, state, v)
    return optax.apply_updates(v, updates), state, l

  for _ in range(steps):
    v, state, l = step(v, state)
  return v, float(l)


def _mlp():
  return lnn.Sequential((lnn.Dense(16), lnn.ReLU(), lnn.Dense(16), lnn.ClippedReLU(1.0),
                         lnn.Dense(CLASSES)), input_shape=(8,))


def _conv():
  return lnn.Sequential((lnn.Conv(4, 3, 1, 1), lnn.ClippedReLU(1.0), lnn.Conv(4, 4, 2, 1),
                         lnn.ReLU(), lnn.Flatten(), lnn.Dense(CLASSES)),
                        input_shape=(6, 6, 1))


class Trained:

  def __init__(self, name, model, eps):
    self.name, self.model, self.eps = name, model, eps
    x, y = clusters(jax.random.PRNGKey(1), 256 + N_TEST, model.input_shape)
    self.variables, self.loss = train(model, x[:256], y[:256])
    self.x, self.y = x[256:], y[256:]
    self.attack = make_attack(model)


def make_attack(model):
  return jax.jit(functools.partial(pgd_attack, model))


def pgd_attack(model, variables, x, y, eps, key, steps=60, restarts=4):
  """L2 PGD on the margin ``max_{i != y} z_i - z_y``; ``eps`` is ``(B,)``.

  Returns the most adversarial point found per example (over the restarts:
  one from ``x`` itself, the others from uniform points of the ball).
  """
  starts = U.sample_ball(key, x, eps, restarts - 1, uniform_radius=True)
  starts = jnp.concatenate([x[None], starts])
  onehot = jax.nn.one_hot(y, CLASSES)

  def margin(xp):
    z = model.apply(variables, xp)
    zy = jnp.sum(z * onehot, -1)
    zo = jnp.max(jnp.where(onehot > 0, -jnp.inf, z), -1)
    return zo - zy

  def one(x0):
    return U.pgd_maximise(margin, x, eps, x0, steps)[1]

  adv = jax.vmap(one)(starts)                               # (R, B, ...)
  m = jax.vmap(margin)(adv)                                 # (R, B)
  best = jnp.argmax(m, 0)
  return jnp.take_along_axis(adv, best.reshape((1, -1) + (1,) * (x.ndim - 1)), 0)[0]


@functools.lru_cache(maxsize=None)
def _trained(name):
  if name == "mlp":
    return Trained("mlp", _mlp(), 0.7)
  return Trained("conv", _conv(), 0.5)


@pytest.fixture(scope="module", params=["mlp", "conv"])
def trained(request):
  return _trained(request.param)


@pytest.fixture(scope="module")
def random_conv():
  model = U.conv_model("clipped_maxmin")
  v = U.init_random(model, jax.random.PRNGKey(9))
  x = jax.random.uniform(jax.random.PRNGKey(10), (16, 6, 6, 2))
  y = jnp.argmax(model.apply(v, x), -1)   # labels = predictions: some certify
  return model, v, x, y, make_attack(model)


def _check_consistency(model, v, x, y, eps, cert):
  eps_b = np.broadcast_to(np.asarray(eps, cert.radius.dtype), (x.shape[0],))
  pred = np.asarray(cert.predicted)
  certified = np.asarray(cert.certified)
  assert cert.certified.dtype == jnp.bool_
  np.testing.assert_array_equal(pred, np.argmax(np.asarray(model.apply(v, x)), -1))
  assert np.all(pred[certified] == np.asarray(y)[certified])
  np.testing.assert_array_equal(np.asarray(cert.radius), np.where(certified, eps_b, 0.0))
  rr = np.asarray(cert.robust_radius)
  assert np.all(rr >= 0) and np.all(rr <= eps_b)
  assert np.all(rr[certified] == eps_b[certified])
  margin = np.asarray(cert.margin)
  np.testing.assert_array_equal(certified, (margin > 0) & (pred == np.asarray(y)))


def _flipped(model, v, x_adv, labels):
  return np.asarray(jnp.argmax(model.apply(v, x_adv), -1)) != np.asarray(labels)


# ---------------------------------------------------------------------------
# Soundness against PGD
# ---------------------------------------------------------------------------


def test_trained_models_certify_some_and_pgd_flips_none_of_them(trained):
  t = trained
  model, v, x, y, eps = t.model, t.variables, t.x, t.y, t.eps
  acc = float(jnp.mean(jnp.argmax(model.apply(v, x), -1) == y))
  assert acc >= 0.9, (t.name, acc, t.loss)
  cert = lipjax.certify(model, v, x, y, eps)
  _check_consistency(model, v, x, y, eps, cert)
  certified = np.asarray(cert.certified)
  assert certified.sum() >= 3, (t.name, certified.mean())
  eps_b = jnp.full((x.shape[0],), eps)
  adv = t.attack(v, x, y, eps_b, jax.random.PRNGKey(0))
  d = np.linalg.norm(np.asarray(adv - x).reshape(x.shape[0], -1), axis=1)
  assert np.all(d <= eps * (1 + 1e-5))
  flipped = _flipped(model, v, adv, y)
  assert not np.any(flipped & certified), (t.name, np.where(flipped & certified))
  # The attack is real: on a ball 3x larger it flips many points.
  big = t.attack(v, x, y, 3 * eps_b, jax.random.PRNGKey(1))
  assert _flipped(model, v, big, y).mean() >= 0.25


def test_robust_radius_survives_pgd(trained):
  # robust_radius is a certified radius for the *prediction*, valid for every
  # point: PGD inside it must not change the prediction.
  t = trained
  model, v, x = t.model, t.variables, t.x
  cert = lipjax.certify(model, v, x, t.y, t.eps)
  pred = cert.predicted
  rr = np.asarray(cert.robust_radius)
  assert np.any((rr > 0) & (rr < t.eps)) or np.all(rr > 0)
  adv = t.attack(v, x, pred, jnp.asarray(rr), jax.random.PRNGKey(2))
  assert not np.any(_flipped(model, v, adv, pred) & (rr > 0))


def test_global_certificate_implies_local(trained):
  t = trained
  model, v, x, y = t.model, t.variables, t.x, t.y
  for eps in (0.5 * t.eps, t.eps):
    loc = lipjax.certify(model, v, x, y, eps, triage=False)
    assert np.all(np.asarray(loc.local))
    glo = lipjax.certify(model, v, x, y, eps, bound="global")
    _check_consistency(model, v, x, y, eps, glo)
    lg, gl = np.asarray(loc.certified), np.asarray(glo.certified)
    assert np.all(lg[gl]), "a point certified globally is not certified locally"
    assert np.all(np.asarray(loc.margin)[gl] >= np.asarray(glo.margin)[gl] - 1e-5)
    g = float(lipjax.global_lipschitz_bound(model, v))
    np.testing.assert_allclose(np.asarray(glo.lipschitz), g, rtol=1e-5)
    assert np.all(np.asarray(loc.lipschitz) <= g * (1 + 1e-5))
    np.testing.assert_array_equal(np.asarray(glo.failure_probability), 0.0)
  # Local is strictly stronger here (the point of the method).
  assert lg.sum() > gl.sum()


def test_triage_decides_exactly_as_the_full_local_certificate(trained):
  t = trained
  model, v, x, y = t.model, t.variables, t.x, t.y
  for eps in (0.5 * t.eps, t.eps, 2 * t.eps):
    full = lipjax.certify(model, v, x, y, eps, triage=False)
    tri = lipjax.certify(model, v, x, y, eps)
    _check_consistency(model, v, x, y, eps, tri)
    np.testing.assert_array_equal(np.asarray(tri.certified), np.asarray(full.certified))
    glo = lipjax.certify(model, v, x, y, eps, bound="global")
    used = np.asarray(tri.local)
    # Only correct predictions the global bound does not certify reach the
    # sound local bound; their results are the full run's.
    undecided = np.asarray((glo.predicted == y) & ~glo.certified)
    assert np.all(used <= undecided)
    # (up to the Lanczos start vectors, which differ between the two runs)
    for f in ("margin", "lipschitz", "failure_probability"):
      np.testing.assert_allclose(np.asarray(getattr(tri, f))[used],
                                 np.asarray(getattr(full, f))[used], rtol=1e-3, atol=1e-4)
    # Everything else carries the exact global certificate.
    for f in ("certified", "margin", "lipschitz", "robust_radius"):
      np.testing.assert_array_equal(np.asarray(getattr(tri, f))[~used],
                                    np.asarray(getattr(glo, f))[~used])
    np.testing.assert_array_equal(np.asarray(tri.failure_probability)[~used], 0.0)
    # The one-step attack first (attack=0: whatever the count) decides the same.
    stats = {}
    att = lipjax.certify(model, v, x, y, eps, attack=0, stats=stats)
    np.testing.assert_array_equal(np.asarray(att.certified), np.asarray(full.certified))
    assert stats.get("attack", {"examples": 0})["examples"] == int(undecided.sum())
    broken = np.asarray(certify_lib.falsify_arrays(model, v, x, y, eps))
    assert not np.any(broken & np.asarray(full.certified))
    assert not np.any(broken & np.asarray(att.local))   # settled before the bounds


# The conv model alone: the check's logic does not depend on the layer kinds,
# so the MLP would repeat it.
@pytest.mark.parametrize("trained", ["conv"], indirect=True)
def test_global_screen_certifies_exactly_the_exact_global_set(trained):
  # The screen (forward pass, norm-based rounding bound) may only rule out
  # examples the exact global certificate does not certify. Radii right at
  # each example's exact robust radius (1e-6 either side) put margins at 0.
  t = trained
  model, v, x, y = t.model, t.variables, t.x, t.y
  ref = lipjax.certify(model, v, x, y, t.eps, bound="global", screen=False)
  rr = np.asarray(ref.robust_radius)
  edge = np.where(rr > 0, rr, t.eps).astype(np.float32)
  cases = [t.eps, 0.3 * t.eps, edge * (1 - 1e-6), edge * (1 + 1e-6)]
  for eps in cases:
    exact = lipjax.certify(model, v, x, y, eps, bound="global", screen=False)
    stats = {}
    fast = lipjax.certify(model, v, x, y, eps, bound="global", stats=stats)
    _check_consistency(model, v, x, y, eps, fast)
    np.testing.assert_array_equal(np.asarray(fast.certified), np.asarray(exact.certified))
    np.testing.assert_array_equal(np.asarray(fast.predicted), np.asarray(exact.predicted))
    kept = stats.get("global_exact", {"examples": 0})["examples"]
    assert kept < len(y) or np.all(np.asarray(exact.certified))
    # Ruled out: sound radii within a hair of the exact ones.
    np.testing.assert_allclose(np.asarray(fast.robust_radius), np.asarray(exact.robust_radius),
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(fast.lipschitz), np.asarray(exact.lipschitz))
  tri = lipjax.certify(model, v, x, y, t.eps, screen=False)
  np.testing.assert_array_equal(np.asarray(lipjax.certify(model, v, x, y, t.eps).certified),
                                np.asarray(tri.certified))


# The conv model alone: the check's logic does not depend on the layer kinds,
# so the MLP would repeat it.
@pytest.mark.parametrize("trained", ["conv"], indirect=True)
def test_screen_rules_out_only_what_no_evaluation_of_the_exact_certificate_certifies(trained):
  # The screen's "hopeless" test bounds the margin of the exact global
  # certificate computed in any other float32 evaluation (another chunk
  # size rounds the logits differently): at radii within 1e-6 of each
  # example's robust radius no evaluation, batch of one included, may
  # certify an example the screen ruled out.
  certify_lib = importlib.import_module("lipjax._src.certify")
  t = trained
  model, v, x, y = t.model, t.variables, t.x, t.y
  gn = lipjax.global_lipschitz_bound(model, v, input_shape=x.shape[1:], per_layer=True)[1]
  ref = lipjax.certify(model, v, x, y, t.eps, bound="global", screen=False)
  rr = np.asarray(ref.robust_radius)
  edge = np.where(rr > 0, rr, t.eps).astype(np.float32)
  exact = jax.jit(lambda v_, x_, y_, e_, g_: certify_lib.certify_arrays(
      model, v_, x_, y_, e_, bound="global", global_norms=g_))
  ruled_out = 0
  for eps in (edge * (1 - 1e-6), edge * (1 + 1e-6), jnp.full_like(edge, t.eps)):
    _, hopeless = certify_lib.screen_arrays(model, v, x, y, eps, gn)
    hopeless = np.asarray(hopeless)
    ruled_out += int(hopeless.sum())
    for size in (1, 6, len(y)):
      for start in range(0, len(y) - size + 1, size):
        sl = slice(start, start + size)
        c = exact(v, x[sl], y[sl], eps[sl], gn)
        assert not np.any(hopeless[sl] & np.asarray(c.certified)), (size, start)
  assert ruled_out > 0


def test_norm_rounding_bound_covers_float32_gaps():
  # Large inputs make float32 rounding visible; the bound E_iy on
  # |fl(z_y - z_i) - (z_y - z_i)| must hold at sampled points of the ball
  # against a float64 evaluation of the same network.
  certify_lib = importlib.import_module("lipjax._src.certify")
  model = _mlp()
  v = U.init_random(model, jax.random.PRNGKey(3))
  x = 300.0 * jax.random.normal(jax.random.PRNGKey(4), (6, 8))
  eps = jnp.full((6,), 2.0)
  stages = trace_lib.trace(model, v, (8,))
  gn = lipjax.global_lipschitz_bound(model, v, per_layer=True)[1]
  e, d, rho = certify_lib._norm_rounding(stages, x, eps, gn)
  pts = U.sample_ball(jax.random.PRNGKey(5), x, eps, 8, uniform_radius=True)
  prm = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v["params"])
  theta = prm.get("layers_3", {}).get("theta", 1.0)

  def exact(h):
    h = np.asarray(h, np.float64)
    for k, name in enumerate(("layers_0", "layers_2", "layers_4")):
      h = h @ prm[name]["kernel"] + prm[name]["bias"]
      if k == 0:
        h = np.maximum(h, 0)
      elif k == 1:
        h = np.minimum(np.maximum(h, 0), theta)
    return h

  w_last = prm["layers_4"]["kernel"]
  for p in pts:
    z32 = np.asarray(model.apply(v, p), np.float64)
    z64 = exact(p)
    dev = np.abs(z32 - z64)
    bound = np.asarray(rho) + np.linalg.norm(w_last, axis=0)[None] * np.asarray(d)[:, None]
    assert np.all(dev <= bound), (dev.max(), bound.min())


def _abs_matrix_norm(st):
  """``|| |W| ||_2`` of a stage's linear layer from its explicit matrix (float64 SVD)."""
  n = int(np.prod(st.in_shape))
  basis = jnp.eye(n, dtype=jnp.float32).reshape((n,) + tuple(st.in_shape))
  cols = np.asarray(jax.vmap(lambda e: st.abs_linear(e[None])[0])(basis), np.float64)
  return np.linalg.svd(cols.reshape(n, -1), compute_uv=False)[0]


@pytest.mark.parametrize("kind", ["dense", "conv_s1", "conv_s2", "conv_p0"])
def test_abs_norm_bound_is_an_upper_bound_close_to_the_norm(kind):
  # The rounding bound's || |W| ||_2 (Collatz-Wielandt on |W|^T |W|) against
  # the SVD of the explicit |W|: never below, and well below the old
  # sqrt(max row sum * max column sum) bound.
  certify_lib = importlib.import_module("lipjax._src.certify")
  layer, shape = {
      "dense": (lnn.Dense(24), (40,)),
      "conv_s1": (lnn.Conv(6, 3, 1, 1), (9, 9, 3)),
      "conv_s2": (lnn.Conv(5, 4, 2, 1), (10, 10, 2)),
      "conv_p0": (lnn.Conv(4, 3, 2, 0), (7, 8, 3)),
  }[kind]
  model = lnn.Sequential((layer, lnn.ReLU(), lnn.Flatten(), lnn.Dense(CLASSES)),
                         input_shape=shape)
  for seed in range(3):
    v = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + shape))
    st = trace_lib.trace(model, v, shape)[0]
    exact = _abs_matrix_norm(st)
    got = float(certify_lib._abs_norm_bound(st))
    crude = float(certify_lib._abs_norm_bound(st, iterations=0))
    assert exact <= got <= 1.02 * exact, (kind, seed, exact, got)
    assert got <= crude
    # And the bounds the screen uses are these, one per stage.
    stages = trace_lib.trace(model, v, shape)
    absn = certify_lib.abs_norm_bounds(stages)
    assert len(absn) == len(stages) and float(absn[0]) == got


def test_abs_norm_bound_at_the_edges_of_float32():
  # Tiny weights whose products underflow, zeros, huge, inf and NaN: the
  # bound stays above the exact norm, inf stays inf and NaN stays NaN.
  certify_lib = importlib.import_module("lipjax._src.certify")
  model = lnn.Sequential((lnn.Dense(6), lnn.ReLU(), lnn.Dense(CLASSES)), input_shape=(5,))
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))

  def bound_with(kernel):
    w = jax.tree_util.tree_map(lambda a: a, v)
    w["params"]["layers_0"]["kernel"] = jnp.asarray(kernel, jnp.float32)
    st = trace_lib.trace(model, w, (5,))[0]
    return float(certify_lib._abs_norm_bound(st))

  k = np.asarray(v["params"]["layers_0"]["kernel"], np.float64)
  for scale in (1e-40, 1e-30, 1.0, 1e15):
    kern = (k * scale).astype(np.float32)
    exact = np.linalg.svd(np.abs(kern.astype(np.float64)), compute_uv=False)[0]
    assert bound_with(kern) >= exact, scale
  assert bound_with(np.zeros((5, 6))) >= 0.0
  assert bound_with(np.where(np.eye(5, 6) > 0, np.inf, k)) == np.inf
  assert np.isnan(bound_with(np.where(np.eye(5, 6) > 0, np.nan, k)))


# The conv model alone: the check's logic does not depend on the layer kinds,
# so the MLP would repeat it.
@pytest.mark.parametrize("trained", ["conv"], indirect=True)
def test_lower_mode_is_below_the_sound_bound(trained):
  t = trained
  model, v, x = t.model, t.variables, t.x
  for eps in (0.5 * t.eps, t.eps):
    sound = lipjax.local_lipschitz_bound(model, v, x, eps)
    low = lipjax.local_lipschitz_bound(model, v, x, eps, mode="lower", lanczos_steps=4)
    assert np.all(np.asarray(low.bound) <= np.asarray(sound.bound) * (1 + 1e-5))
    for (r_s, c_s), (r_l, c_l) in zip(sound.masks, low.masks):
      assert np.all(np.asarray(r_l) <= np.asarray(r_s))
      assert np.all(np.asarray(c_l) <= np.asarray(c_s))
    np.testing.assert_array_equal(np.asarray(low.failure_probability), 1.0)


# The conv model alone: the check's logic does not depend on the layer kinds,
# so the MLP would repeat it.
@pytest.mark.parametrize("trained", ["conv"], indirect=True)
def test_lower_margins_without_rounding_stay_above_the_sound_margins(trained):
  # The triage's first round: one-step estimates, no rounding bounds. Its
  # boxes lie inside the sound boxes and its margins above the sound ones,
  # so "not positive" there proves "not certified" by the sound bound.
  t = trained
  model, v, x, y = t.model, t.variables, t.x, t.y
  starts = lipjax.bounds.global_top_vectors(model, v, input_shape=tuple(x.shape[1:]))
  # Compiled once per option set, reused across the three radii (the
  # un-jitted path: test_batching_and_jit_do_not_change_results).
  certify_arrays = jax.jit(certify_lib.certify_arrays, static_argnums=0,
                           static_argnames=("mode", "lanczos_steps", "rounding",
                                            "pair_classes", "pairwise"))
  for eps in (0.5 * t.eps, t.eps, 2 * t.eps):
    sound = certify_arrays(model, v, x, y, eps)
    low = certify_arrays(model, v, x, y, eps, mode="lower", lanczos_steps=1, rounding=False,
                         state=starts)
    assert np.all(np.asarray(low.margin) >= np.asarray(sound.margin))
    assert np.all(np.asarray(low.lipschitz) <= np.asarray(sound.lipschitz) * (1 + 1e-5))
    # The triage's form: one pair bound per example, that pair's margin
    # alone; a minimum over fewer classes, still above the sound margin.
    one = certify_arrays(model, v, x, y, eps, mode="lower", lanczos_steps=1, rounding=False,
                         state=starts, pair_classes=1)
    right = np.asarray(low.predicted) == np.asarray(y)
    # (The pair bounds' sums run in another batch shape: ulps apart.)
    tol = 1e-5 * np.abs(np.asarray(sound.margin)) + 1e-6
    assert np.all(np.asarray(one.margin) >= np.asarray(sound.margin))
    assert np.all(np.asarray(one.margin)[right] >= np.asarray(low.margin)[right] - tol[right])
    # Sound mode with fewer pair bounds: between the product bound alone
    # and the full pair bounds.
    part = certify_arrays(model, v, x, y, eps, pair_classes=1)
    bare = certify_arrays(model, v, x, y, eps, pairwise=False)
    assert np.all(np.asarray(part.margin) <= np.asarray(sound.margin) + tol)
    assert np.all(np.asarray(part.margin) >= np.asarray(bare.margin) - tol)
    lb_s = lipjax.local_lipschitz_bound(model, v, x, eps)
    lb_l = lipjax.local_lipschitz_bound(model, v, x, eps, mode="lower", lanczos_steps=1,
                                        rounding=False, state=starts)
    for s_, l_ in zip(lb_s.layers, lb_l.layers):
      assert np.all(np.asarray(l_.lower) >= np.asarray(s_.lower))
      assert np.all(np.asarray(l_.upper) <= np.asarray(s_.upper))
      assert np.all(np.isnan(np.asarray(l_.error)))
  with pytest.raises(ValueError, match="rounding=False is for mode='lower'"):
    lipjax.local_lipschitz_bound(model, v, x, t.eps, rounding=False)
  with pytest.raises(ValueError, match="rounding=False is for mode='lower'"):
    lipjax.certify(model, v, x, y, t.eps, rounding=False)


# The conv model alone: the check's logic does not depend on the layer kinds,
# so the MLP would repeat it.
@pytest.mark.parametrize("trained", ["conv"], indirect=True)
def test_global_top_vectors_and_lower_mode_started_from_them(trained):
  t = trained
  model, v, x = t.model, t.variables, t.x
  shape = tuple(x.shape[1:])
  starts = lipjax.bounds.global_top_vectors(model, v, input_shape=shape, iterations=200)
  stages = trace_lib.trace(model, v, shape)
  assert len(starts.vectors) == len(stages)
  for st, u in zip(stages, starts.vectors):
    assert u.shape == (1,) + tuple(st.in_shape)
    np.testing.assert_allclose(float(jnp.linalg.norm(u)), 1.0, rtol=1e-5)
    # Against the SVD of the layer's explicit matrix: a top right singular
    # vector (the Rayleigh quotient reaches the top singular value).
    jac = np.asarray(jax.jacfwd(lambda h, st=st: st.linear(h[None])[0])(
        jnp.zeros(st.in_shape)), np.float64).reshape(-1, int(np.prod(st.in_shape)))
    top = np.linalg.svd(jac, compute_uv=False)[0]
    got = np.linalg.norm(jac @ np.asarray(u, np.float64).reshape(-1))
    np.testing.assert_allclose(got, top, rtol=1e-3)
  for eps in (0.5 * t.eps, t.eps):
    sound = lipjax.local_lipschitz_bound(model, v, x, eps)
    for steps, rounding in ((2, True), (1, False)):
      low = lipjax.local_lipschitz_bound(model, v, x, eps, mode="lower",
                                         lanczos_steps=steps, state=starts,
                                         rounding=rounding)
      assert np.all(np.asarray(low.bound) <= np.asarray(sound.bound) * (1 + 1e-5))
      for n_l, n_s in zip(low.layer_norms, sound.layer_norms):
        assert np.all(np.asarray(n_l) <= np.asarray(n_s) * (1 + 1e-5))
      for (r_s, c_s), (r_l, c_l) in zip(sound.masks, low.masks):
        assert np.all(np.asarray(r_l) <= np.asarray(r_s))
        assert np.all(np.asarray(c_l) <= np.asarray(c_s))
  bad = lipjax.bounds.PowerState(starts.vectors[:-1])
  with pytest.raises(ValueError, match="one per linear layer"):
    lipjax.local_lipschitz_bound(model, v, x, t.eps, mode="lower", state=bad)
  wrong = lipjax.bounds.PowerState((jnp.ones((2, 3)),) + starts.vectors[1:])
  with pytest.raises(ValueError, match="has shape"):
    lipjax.local_lipschitz_bound(model, v, x, t.eps, mode="lower", state=wrong)


def test_triage_with_global_intermediate_radii_decides_as_the_full_certificate():
  # The lower pass of the triage mirrors intermediate="global" (it used to
  # reject the option and crash as soon as a point reached it).
  t = _trained("conv")
  model, v, x, y = t.model, t.variables, t.x, t.y
  eps = t.eps
  full = lipjax.certify(model, v, x, y, eps, intermediate="global", triage=False)
  tri = lipjax.certify(model, v, x, y, eps, intermediate="global")
  _check_consistency(model, v, x, y, eps, tri)
  np.testing.assert_array_equal(np.asarray(tri.certified), np.asarray(full.certified))
  assert np.any(np.asarray(tri.local))   # some point got past the global and lower tests
  # The intermediate radii use the exact global norms in both modes, so the
  # masks are the same and every lower norm is below the sound one.
  sound = lipjax.local_lipschitz_bound(model, v, x, eps, intermediate="global")
  low = lipjax.local_lipschitz_bound(model, v, x, eps, intermediate="global",
                                     mode="lower", lanczos_steps=4)
  for (r_s, c_s), (r_l, c_l) in zip(sound.masks, low.masks):
    np.testing.assert_array_equal(np.asarray(r_l), np.asarray(r_s))
    np.testing.assert_array_equal(np.asarray(c_l), np.asarray(c_s))
  for n_l, n_s in zip(low.layer_norms, sound.layer_norms):
    assert np.all(np.asarray(n_l) <= np.asarray(n_s) * (1 + 1e-5))


@pytest.mark.parametrize("bound", ["local", "global"])
def test_linear_model_certificate_is_exact(bound):
  # For a linear classifier the certificate is exact: the prediction p is
  # robust at eps iff eps < min_i (z_p - z_i) / ||w_p - w_i||. So the result
  # is known in closed form and PGD (exact here) must flip every other point.
  model = lnn.Sequential((lnn.Dense(CLASSES),), input_shape=(8,))
  v = U.init_random(model, jax.random.PRNGKey(17))
  x = jax.random.uniform(jax.random.PRNGKey(18), (32, 8))
  z = np.asarray(model.apply(v, x), np.float64)
  w = np.asarray(v["params"]["layers_0"]["kernel"], np.float64).T   # (C, in)
  p = z.argmax(1)
  ratios = np.full((32, CLASSES), np.inf)
  for i in range(CLASSES):
    num = z[np.arange(32), p] - z[:, i]
    den = np.linalg.norm(w[p] - w[i], axis=1)
    ratios[:, i] = np.where(p == i, np.inf, num / np.where(p == i, 1.0, den))
  exact = ratios.min(1)
  eps = float(np.median(exact))
  cert = lipjax.certify(model, v, x, jnp.asarray(p), eps, bound=bound)
  certified = np.asarray(cert.certified)
  clear = np.abs(exact - eps) > 1e-3 * eps
  np.testing.assert_array_equal(certified[clear], (exact > eps)[clear])
  np.testing.assert_allclose(np.asarray(cert.robust_radius), np.minimum(exact, eps),
                             rtol=1e-3)
  adv = make_attack(model)(v, x, jnp.asarray(p), jnp.full((32,), eps),
                           jax.random.PRNGKey(5))
  flipped = _flipped(model, v, adv, p)
  assert not np.any(flipped & certified)
  np.testing.assert_array_equal(flipped[clear], (exact < eps)[clear])


def test_one_step_attack_on_a_two_class_linear_model_is_exact():
  # For z = W x + b with two classes, the step against the margin's gradient
  # is the shortest way to the boundary: an example is broken exactly when
  # its distance to the boundary is below the step, eps (1 - 1e-3).
  model = lnn.Sequential((lnn.Dense(2),), input_shape=(6,))
  v = U.init_random(model, jax.random.PRNGKey(21))
  x = jax.random.uniform(jax.random.PRNGKey(22), (64, 6))
  z = np.asarray(model.apply(v, x), np.float64)
  w = np.asarray(v["params"]["layers_0"]["kernel"], np.float64).T   # (2, in)
  y = z.argmax(1)
  dist = (z.max(1) - z.min(1)) / np.linalg.norm(w[0] - w[1])
  eps = float(np.median(dist))
  broken = np.asarray(certify_lib.falsify_arrays(model, v, x, jnp.asarray(y), eps))
  step = eps * (1 - 1e-3)
  clear = np.abs(dist - step) > 1e-3 * eps
  assert clear.sum() >= 48
  np.testing.assert_array_equal(broken[clear], (dist < step)[clear])
  # A zero radius or a flat margin breaks nothing; a NaN input is refused.
  assert not np.any(np.asarray(certify_lib.falsify_arrays(model, v, x, jnp.asarray(y), 0.0)))
  flat = jax.tree_util.tree_map(jnp.zeros_like, v)
  assert not np.any(np.asarray(certify_lib.falsify_arrays(model, flat, x, jnp.asarray(y),
                                                          eps)))
  xn = x.at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="NaN"):
    certify_lib.falsify_arrays(model, v, xn, jnp.asarray(y), eps)
  # Under jit the same examples are broken, and a NaN row (not checked
  # there) is not.
  jitted = jax.jit(certify_lib.falsify_arrays, static_argnums=0)
  np.testing.assert_array_equal(np.asarray(jitted(model, v, x, jnp.asarray(y), eps)), broken)
  assert not np.asarray(jitted(model, v, xn, jnp.asarray(y), eps))[0]


def test_one_step_attack_refuses_a_step_that_rounding_takes_out_of_the_ball():
  # One input coordinate near 1e4, where float32 spacing is u = 2^-10: the
  # step of 1.6 u from c + u to c - 0.6 u rounds to c - u, 2 u away, outside
  # the ball of radius 1.6 u, and there the other class wins. That point is
  # no counterexample, so the example is not marked; with a radius of
  # 2.5 u (the same rounded point, now inside) it is.
  model = lnn.Sequential((lnn.Dense(2),), input_shape=(1,))
  c, u = 10000.0, 2.0 ** -10
  v = {"params": {"layers_0": {"kernel": jnp.array([[1.0, -1.0]], jnp.float32),
                               "bias": jnp.array([-c, c], jnp.float32)}}}
  x = jnp.array([[c + u]], jnp.float32)
  y = jnp.array([0])
  out = certify_lib.falsify_arrays(model, v, x, y, 1.6 * u / (1 - 1e-3))
  assert not np.asarray(out)[0]
  assert np.asarray(certify_lib.falsify_arrays(model, v, x, y, 2.5 * u))[0]


def test_random_model_certificates_survive_pgd(random_conv):
  model, v, x, y, attack = random_conv
  for eps in (0.02, 0.1):
    adv = attack(v, x, y, jnp.full((x.shape[0],), eps), jax.random.PRNGKey(3))
    for triage in (True, False):
      cert = lipjax.certify(model, v, x, y, eps, triage=triage)
      _check_consistency(model, v, x, y, eps, cert)
      certified = np.asarray(cert.certified)
      assert not np.any(_flipped(model, v, adv, y) & certified)
      fp, local = np.asarray(cert.failure_probability), np.asarray(cert.local)
      assert np.all((fp[local] > 0) & (fp[local] <= 1e-9 * (1 + 1e-6)))   # conv: Lanczos
      assert np.all(fp[~local] == 0)                # the exact global certificate
      if not triage:
        assert np.all(local)
  cert = lipjax.certify(model, v, x, y, 0.02)
  assert np.asarray(cert.certified).sum() >= 2


def test_per_example_eps(random_conv):
  model, v, x, y, attack = random_conv
  eps = jnp.linspace(0.0, 0.2, x.shape[0])
  cert = lipjax.certify(model, v, x, y, eps)
  _check_consistency(model, v, x, y, eps, cert)
  assert bool(cert.certified[0])        # eps = 0 and y = prediction
  adv = attack(v, x, y, eps, jax.random.PRNGKey(4))
  assert not np.any(_flipped(model, v, adv, y) & np.asarray(cert.certified))


def test_wrong_labels_are_never_certified(random_conv):
  model, v, x, y, _ = random_conv
  wrong = (y + 1) % CLASSES
  cert = lipjax.certify(model, v, x, wrong, 0.0)
  assert not np.any(np.asarray(cert.certified))
  np.testing.assert_array_equal(np.asarray(cert.radius), 0.0)
  # robust_radius is about the prediction: unaffected by the label.
  right = lipjax.certify(model, v, x, y, 0.0)
  np.testing.assert_array_equal(np.asarray(cert.robust_radius),
                                np.asarray(right.robust_radius))


# ---------------------------------------------------------------------------
# float64
# ---------------------------------------------------------------------------


def _to64(tree):
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def test_float64_conv_model_certifies_in_float64(random_conv):
  # Under x64 a model with float64 parameters is bounded and certified in
  # float64 end to end (it used to raise a TypeError inside the bounds).
  model, v, x, y, attack = random_conv
  eps = 0.35   # the local bound certifies some points here, the global none
  # A float32 attack (compiled once for this module), evaluated in float64 below.
  adv32 = attack(v, x, y, jnp.full((x.shape[0],), eps), jax.random.PRNGKey(3))
  with jax.enable_x64(True):
    v64 = _to64(v)
    x64 = _to64(x) + 1e-11 * jax.random.normal(jax.random.PRNGKey(0), x.shape, jnp.float64)
    z = model.apply(v64, x64)
    assert lipjax.global_lipschitz_bound(model, v64).dtype == jnp.float64
    cert = lipjax.certify(model, v64, x64, y, eps)
    for f in ("margin", "lipschitz", "robust_radius"):
      assert getattr(cert, f).dtype == jnp.float64, f
    _check_consistency(model, v64, x64, y, eps, cert)
    np.testing.assert_array_equal(np.asarray(cert.predicted), np.argmax(np.asarray(z), -1))
    certified = np.asarray(cert.certified)
    assert certified.sum() >= 2 and np.any(np.asarray(cert.local))
    adv = U.project(_to64(adv32), x64, jnp.full((x.shape[0],), eps, jnp.float64))
    flipped = _flipped(model, v64, adv, y)
    assert not np.any(flipped & certified)
    # float32 parameters with float64 inputs: computed in float64 as well.
    mixed = lipjax.certify(model, v, x64, y, eps, bound="global")
    assert mixed.margin.dtype == jnp.float64


def test_float64_inputs_are_not_rounded_to_float32():
  # z = (x - 1, 1 - x): at x = 1 - 1e-12 class 1 wins in float64, while the
  # float32 rounding of x (1.0) gives a tie (class 0). The bounds must use
  # the centre the user evaluates.
  model = lnn.Sequential((lnn.Dense(2),), input_shape=(1,))
  with jax.enable_x64(True):
    v = {"params": {"layers_0": {"kernel": jnp.array([[1.0, -1.0]]),
                                 "bias": jnp.array([-1.0, 1.0])}}}
    x = jnp.array([[1.0 - 1e-12]])
    z = model.apply(v, x)
    assert int(jnp.argmax(z[0])) == 1
    lb = lipjax.local_lipschitz_bound(model, v, x, 1e-13)
    np.testing.assert_allclose(np.asarray(lb.logits), np.asarray(z), rtol=1e-12)
    for bound in ("local", "global"):
      cert = lipjax.certify(model, v, x, jnp.array([1]), 1e-13, bound=bound)
      assert int(cert.predicted[0]) == 1, bound


# ---------------------------------------------------------------------------
# Batching and jit
# ---------------------------------------------------------------------------


def test_batching_and_jit_do_not_change_results():
  # A dense-only model: its bounds are deterministic, so results must match
  # exactly across chunkings (conv layers draw per-chunk Lanczos starts).
  t = _trained("mlp")
  model, v, x, y = t.model, t.variables, t.x[:20], t.y[:20]
  # The sound certificate alone (triage=False): one program per call, and
  # un-jitted it runs op by op.
  whole = lipjax.certify(model, v, x, y, t.eps, batch_size=None, triage=False)
  chunked = lipjax.certify(model, v, x, y, t.eps, batch_size=7, triage=False)
  plain = lipjax.certify(model, v, x, y, t.eps, jit=False, triage=False)
  for other in (chunked, plain):
    np.testing.assert_array_equal(np.asarray(other.certified), np.asarray(whole.certified))
    np.testing.assert_array_equal(np.asarray(other.predicted), np.asarray(whole.predicted))
    np.testing.assert_allclose(np.asarray(other.margin), np.asarray(whole.margin),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(other.robust_radius),
                               np.asarray(whole.robust_radius), rtol=1e-5, atol=1e-7)
  assert chunked.certified.shape == (20,)


# ---------------------------------------------------------------------------
# Parameter-only work: once per call, reused across calls only for the same bytes
# ---------------------------------------------------------------------------


def _clear_compiled():
  certify_lib.clear_caches()
  jax.clear_caches()


@pytest.fixture
def host_svd_calls(monkeypatch):
  """Records every host SVD of a global norm (one per layer per computation)."""
  from lipjax._src import norms
  calls = []
  original = norms._host_top_singular

  def spy(mats):
    calls.append(np.shape(mats))
    return original(mats)

  monkeypatch.setattr(norms, "_host_top_singular", spy)
  _clear_compiled()   # compiled code holds the callback it was traced with
  yield calls
  monkeypatch.undo()
  _clear_compiled()


@pytest.mark.parametrize("kw", [dict(bound="global"), dict(), dict(triage=False)],
                         ids=["global", "triage", "local"])
def test_global_norms_are_computed_once_per_call_not_per_chunk(host_svd_calls, kw):
  t = _trained("mlp")
  model, v, x, y = t.model, t.variables, t.x[:20], t.y[:20]
  stats = {}
  cert = lipjax.certify(model, v, x, y, t.eps, batch_size=4, stats=stats, **kw)  # 5 chunks
  assert len(host_svd_calls) == 3, host_svd_calls   # three dense layers, once each
  assert stats["norms"]["seconds"] >= 0
  if kw.get("triage", True) and "bound" not in kw:
    assert stats["global"]["examples"] == 20
    assert stats.get("sound", {"examples": 0})["examples"] == int(np.sum(cert.local))
    # Each round of the triage sees only what the previous stage left.
    first = stats.get("triage", {"examples": 0})["examples"]
    assert stats.get("triage_lanczos", {"examples": 0})["examples"] <= first <= 20
  # The same call again recomputes them (no cache unless asked for).
  lipjax.certify(model, v, x, y, t.eps, batch_size=4, **kw)
  assert len(host_svd_calls) == 6


def test_norm_cache_never_serves_changed_parameters(host_svd_calls):
  t = _trained("mlp")
  model, x, y, eps = t.model, t.x[:12], t.y[:12], t.eps
  v = jax.tree_util.tree_map(np.array, t.variables)   # mutable numpy leaves
  first = lipjax.certify(model, v, x, y, eps, cache=True)
  calls = len(host_svd_calls)
  assert calls == 3
  for bound in ("local", "global"):   # same bytes: served from the cache
    again = lipjax.certify(model, v, x, y, eps, bound=bound, cache=True)
    if bound == "local":
      np.testing.assert_array_equal(np.asarray(again.certified), np.asarray(first.certified))
  assert len(host_svd_calls) == calls
  np.testing.assert_array_equal(np.asarray(again.lipschitz),
                                np.asarray(lipjax.certify(model, v, x, y, eps,
                                                          bound="global").lipschitz))
  calls = len(host_svd_calls)
  # In place (same objects, new bytes): the cache must notice.
  v["params"]["layers_4"]["kernel"] *= 3.0
  changed = lipjax.certify(model, v, x, y, eps, bound="global", cache=True)
  assert len(host_svd_calls) == calls + 3
  fresh = lipjax.certify(model, v, x, y, eps, bound="global")
  np.testing.assert_array_equal(np.asarray(changed.lipschitz), np.asarray(fresh.lipschitz))
  np.testing.assert_allclose(np.asarray(changed.lipschitz),
                             3.0 * np.asarray(again.lipschitz), rtol=1e-4)
  # A new parameter set with one threshold changed: the local certificate
  # equals the uncached one.
  v2 = jax.tree_util.tree_map(np.array, v)
  v2["params"]["layers_3"] = jax.tree_util.tree_map(lambda a: a * 0.5, v2["params"]["layers_3"])
  for kw in (dict(), dict(triage=False)):
    c = lipjax.certify(model, v2, x, y, eps, cache=True, **kw)
    u = lipjax.certify(model, v2, x, y, eps, **kw)
    for f in ("certified", "margin", "lipschitz"):
      np.testing.assert_array_equal(np.asarray(getattr(c, f)), np.asarray(getattr(u, f)))


def test_local_bound_with_precomputed_global_norms_is_unchanged():
  from lipjax._src import lipschitz
  t = _trained("conv")
  model, v, x = t.model, t.variables, t.x[:8]
  gn = lipschitz.layer_global_norms(model, v)
  _, per_layer = lipjax.global_lipschitz_bound(model, v, per_layer=True)
  np.testing.assert_allclose(np.asarray(gn), np.asarray(per_layer), rtol=1e-6)
  for mode in ("sound", "lower"):
    a = lipjax.local_lipschitz_bound(model, v, x, t.eps, mode=mode)
    b = lipjax.local_lipschitz_bound(model, v, x, t.eps, mode=mode, global_norms=gn)
    np.testing.assert_allclose(np.asarray(b.bound), np.asarray(a.bound), rtol=1e-6)
  with pytest.raises(ValueError, match="3 scalars"):
    lipjax.local_lipschitz_bound(model, v, x, t.eps, global_norms=gn[:2])
  with pytest.raises(ValueError, match="global_norms"):
    lipjax.certify(model, v, x, t.y[:8], t.eps, global_norms=gn)


# ---------------------------------------------------------------------------
# NaN parameters
# ---------------------------------------------------------------------------


NAN_EPS = 0.1


@pytest.fixture(scope="module")
def nan_case():
  model = _mlp()
  v = U.init_random(model, jax.random.PRNGKey(12))
  x, _ = clusters(jax.random.PRNGKey(13), 8, (8,))
  y = jnp.argmax(model.apply(v, x), -1)
  lb = lipjax.local_lipschitz_bound(model, v, x, NAN_EPS)
  # A column of the last layer that varies for example 0 (a NaN in a column
  # deleted by the mask would be multiplied away in the masked norm).
  last_col = int(np.argmax(np.asarray(lb.layers[1].col_mask[0])))
  assert float(lb.layers[1].col_mask[0, last_col]) == 1.0
  return model, v, x, y, last_col


@pytest.mark.parametrize("which", ["first_kernel", "theta", "last_kernel", "last_bias"])
@pytest.mark.parametrize("bound", ["local", "global"])
def test_nan_parameter_certifies_nothing(nan_case, which, bound):
  model, v, x, y, last_col = nan_case
  layer, name, index = {
      "first_kernel": ("layers_0", "kernel", (0, 0)),
      "theta": ("layers_3", "theta", (2,)),
      "last_kernel": ("layers_4", "kernel", (last_col, 1)),
      "last_bias": ("layers_4", "bias", (0,)),
  }[which]
  ok = lipjax.certify(model, v, x, y, NAN_EPS, bound=bound)
  assert np.any(np.asarray(ok.certified))
  bad = U.set_param(v, layer, name, index, jnp.nan)
  error = None
  try:
    cert = lipjax.certify(model, bad, x, y, NAN_EPS, bound=bound)
  except Exception as e:   # pylint: disable=broad-except
    error = e
  if error is not None:    # a clear error is acceptable, an opaque one is not
    head = str(error).lower().split("traceback")[0]
    assert "nan" in head or "finite" in head, (
        f"unclear error for a NaN parameter: {type(error).__name__}: {str(error)[:200]}")
    return
  assert not np.any(np.asarray(cert.certified))
  np.testing.assert_array_equal(np.asarray(cert.radius), 0.0)
  np.testing.assert_array_equal(np.asarray(cert.robust_radius), 0.0)


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
  model = _mlp()
  v = U.init_random(model, jax.random.PRNGKey(14))
  x, y = clusters(jax.random.PRNGKey(15), 4, (8,))
  return model, v, x, y


@pytest.mark.parametrize("eps,match", [(-0.1, ">= 0"), (float("nan"), "finite"),
                                       (float("inf"), "finite"),
                                       (np.array([0.1, -0.1, 0.1, 0.1]), ">= 0"),
                                       (np.array([0.1, 0.1]), "shape")])
def test_bad_eps_raises(small, eps, match):
  model, v, x, y = small
  with pytest.raises(ValueError, match=match):
    lipjax.certify(model, v, x, y, eps)
  with pytest.raises(ValueError, match=match):
    lipjax.local_lipschitz_bound(model, v, x, eps)


def test_bad_x_raises(small):
  model, v, x, y = small
  with pytest.raises(ValueError, match="NaN or inf"):
    lipjax.certify(model, v, x.at[1, 3].set(jnp.nan), y, 0.1)
  with pytest.raises(ValueError, match="NaN or inf"):
    lipjax.local_lipschitz_bound(model, v, x.at[0, 0].set(jnp.inf), 0.1)
  with pytest.raises(ValueError, match="shape"):
    lipjax.certify(model, v, x[0], y[:1], 0.1)                    # missing batch axis
  with pytest.raises(ValueError, match="shape"):
    lipjax.certify(model, v, x[:, :5], y, 0.1)                     # wrong features
  with pytest.raises(ValueError, match="shape"):
    lipjax.certify(model, v, x.reshape(4, 2, 4), y, 0.1)           # wrong rank
  with pytest.raises(ValueError, match="empty"):
    lipjax.certify(model, v, x[:0], y[:0], 0.1)
  with pytest.raises(TypeError, match="floating"):
    lipjax.certify(model, v, (x * 10).astype(jnp.int32), y, 0.1)


def test_bad_x_shape_for_conv_model_raises():
  model = U.conv_model("relu")
  v = U.init_random(model, jax.random.PRNGKey(16))
  y = jnp.zeros((2,), jnp.int32)
  for bad in (jnp.zeros((2, 6, 6)), jnp.zeros((2, 6, 6, 3)), jnp.zeros((2, 7, 6, 2)),
              jnp.zeros((2, 72))):
    with pytest.raises(ValueError, match="shape"):
      lipjax.certify(model, v, bad, y, 0.1)
    with pytest.raises(ValueError, match="shape"):
      lipjax.local_lipschitz_bound(model, v, bad, 0.1)


def _one_line_error(exc_type, pattern, fn):
  with pytest.raises(exc_type, match=pattern) as info:
    fn()
  assert "\n" not in str(info.value)


def test_empty_layer_outputs_raise_one_line():
  key = jax.random.PRNGKey(0)
  conv = lnn.Sequential((lnn.Conv(4, kernel_size=7, stride=2, padding=0), lnn.ReLU(),
                         lnn.Flatten(), lnn.Dense(CLASSES)), input_shape=(5, 6, 1))
  msg = (r"layers_0 \(Conv\): input shape \(5, 6, 1\) with kernel 7, stride 2, "
         r"padding 0 gives an empty output")
  x = jnp.zeros((2, 5, 6, 1))
  y = jnp.zeros((2,), jnp.int32)
  _one_line_error(ValueError, msg, lambda: conv.init(key, x))
  # Parameters made by hand reach the bounds: the same line, before any work.
  v = {"params": {"layers_0": {"kernel": jnp.ones((7, 7, 1, 4)), "bias": jnp.zeros(4)},
                  "layers_3": {"kernel": jnp.ones((0, CLASSES)), "bias": jnp.zeros(CLASSES)}}}
  _one_line_error(ValueError, msg, lambda: lipjax.global_lipschitz_bound(conv, v))
  _one_line_error(ValueError, msg, lambda: lipjax.local_lipschitz_bound(conv, v, x, 0.1))
  _one_line_error(ValueError, msg, lambda: lipjax.certify(conv, v, x, y, 0.1))
  pool = lnn.Sequential((lnn.AvgPool(window=6, stride=2), lnn.Flatten(),
                         lnn.Dense(CLASSES)), input_shape=(5, 6, 1))
  pool_msg = r"layers_0 \(AvgPool\): input shape \(5, 6, 1\) with window 6, stride 2"
  _one_line_error(ValueError, pool_msg, lambda: pool.init(key, x))
  v_pool = {"params": {"layers_2": {"kernel": jnp.ones((0, CLASSES)),
                                    "bias": jnp.zeros(CLASSES)}}}
  _one_line_error(ValueError, pool_msg, lambda: lipjax.global_lipschitz_bound(pool, v_pool))
  dense0 = lnn.Sequential((lnn.Dense(0), lnn.ReLU(), lnn.Dense(CLASSES)), input_shape=(4,))
  _one_line_error(ValueError, r"layers_0 \(Dense\): features must be a positive integer",
                  lambda: dense0.init(key, jnp.zeros((1, 4))))
  v0 = {"params": {"layers_0": {"kernel": jnp.ones((4, 0)), "bias": jnp.zeros(0)},
                   "layers_2": {"kernel": jnp.ones((0, CLASSES)), "bias": jnp.zeros(CLASSES)}}}
  _one_line_error(ValueError, r"layers_0 \(Dense\): input shape \(4,\) gives output "
                  r"shape \(0,\), which is empty",
                  lambda: lipjax.local_lipschitz_bound(dense0, v0, jnp.zeros((1, 4)), 0.1))
  bad_stride = lnn.Sequential((lnn.Conv(4, 3, stride=0), lnn.Flatten(), lnn.Dense(2)),
                              input_shape=(5, 6, 1))
  _one_line_error(ValueError, r"layers_0 \(Conv\): stride must be a positive integer",
                  lambda: bad_stride.init(key, x))


def test_bad_labels_raise(small):
  model, v, x, y = small
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    lipjax.certify(model, v, x, y.at[0].set(CLASSES), 0.1)
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    lipjax.certify(model, v, x, y.at[2].set(-1), 0.1)
  with pytest.raises(ValueError, match="shape"):
    lipjax.certify(model, v, x, y[:3], 0.1)
  with pytest.raises(ValueError, match="shape"):
    lipjax.certify(model, v, x, y[:, None], 0.1)
  with pytest.raises(TypeError, match="integer"):
    lipjax.certify(model, v, x, y.astype(jnp.float32), 0.1)
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    lipjax.certify(model, v, x, y.at[0].set(CLASSES), 0.1, bound="global")


def test_bad_options_raise(small):
  model, v, x, y = small
  with pytest.raises(ValueError, match="bound"):
    lipjax.certify(model, v, x, y, 0.1, bound="lipschitz")
  with pytest.raises(ValueError, match="sound"):
    lipjax.certify(model, v, x, y, 0.1, mode="estimate")
  with pytest.raises(ValueError, match="mode"):
    lipjax.local_lipschitz_bound(model, v, x, 0.1, mode="upper")
  for bad in (-1, 1.5, True, "2"):
    with pytest.raises(ValueError, match="attack must be None or an integer >= 0"):
      lipjax.certify(model, v, x, y, 0.1, attack=bad)


def test_unsupported_flax_layer_is_named():
  model = lnn.Sequential((lnn.Dense(6), lnn.ReLU(), fnn.Dense(5), lnn.ReLU(),
                          lnn.Dense(CLASSES)), input_shape=(8,))
  x = jnp.zeros((2, 8))
  v = model.init(jax.random.PRNGKey(0), x)
  y = jnp.zeros((2,), jnp.int32)
  calls = (lambda: lipjax.certify(model, v, x, y, 0.1),
           lambda: lipjax.certify(model, v, x, y, 0.1, bound="global"),
           lambda: lipjax.local_lipschitz_bound(model, v, x, 0.1),
           lambda: lipjax.global_lipschitz_bound(model, v))
  for call in calls:
    with pytest.raises(lipjax.UnsupportedModelError) as info:
      call()
    msg = str(info.value)
    assert "layers_2" in msg and "flax.linen" in msg and "Dense" in msg, msg


def test_unsupported_activation_and_model_kinds():
  x = jnp.zeros((2, 8))
  y = jnp.zeros((2,), jnp.int32)
  tanh_model = lnn.Sequential((lnn.Dense(6), fnn.tanh, lnn.Dense(CLASSES)),
                              input_shape=(8,))
  v = tanh_model.init(jax.random.PRNGKey(0), x)
  with pytest.raises(lipjax.UnsupportedModelError, match="layers_1"):
    lipjax.certify(tanh_model, v, x, y, 0.1)
  # Plain Flax models are traced: a tanh there is named with its module path.
  plain = fnn.Sequential([fnn.Dense(6), fnn.tanh, fnn.Dense(CLASSES)])
  pv = plain.init(jax.random.PRNGKey(0), x)
  with pytest.raises(lipjax.UnsupportedModelError, match="'tanh' at module Sequential"):
    lipjax.certify(plain, pv, x, y, 0.1)
  ends_with_activation = lnn.Sequential((lnn.Dense(6), lnn.ReLU()), input_shape=(8,))
  ev = ends_with_activation.init(jax.random.PRNGKey(0), x)
  with pytest.raises(lipjax.UnsupportedModelError, match="linear"):
    lipjax.certify(ends_with_activation, ev, x, y, 0.1)


# ---------------------------------------------------------------------------
# One certificate, whatever eps it is asked at
# ---------------------------------------------------------------------------


def _wide_input_model():
  """28x28 inputs, so that boxes of an l2 ball are wide in every coordinate,
  and a bias giving class 0 a margin of about twice the global bound's
  radius unit: robust radii near 2, where the rounding bounds matter."""
  model = lnn.Sequential((lnn.Conv(8, 3, 1, 1), lnn.ReLU(), lnn.Conv(8, 3, 2, 1), lnn.ReLU(),
                          lnn.Flatten(), lnn.Dense(64), lnn.ReLU(), lnn.Dense(10)),
                         input_shape=(28, 28, 1))
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  lip = float(lipjax.global_lipschitz_bound(model, v, input_shape=(28, 28, 1)))
  v = jax.tree_util.tree_map(
      lambda a: a.at[0].set(2.0 * np.sqrt(2.0) * lip) if a.shape == (10,) else a, v)
  x = jax.random.uniform(jax.random.PRNGKey(1), (12, 28, 28, 1))
  return model, v, x, jnp.zeros((12,), jnp.int32)


@pytest.mark.parametrize("precision", ["float32", "tensorfloat32"])
def test_robust_radius_at_a_large_eps_is_certified_by_a_call_at_that_radius(precision):
  # The robust radius r(R) returned by a call at R is a promise: a call at any
  # radius below it certifies. The screen's norm-based rounding bound and the
  # boxes' bound used to disagree, so a call at R = 3 returned radii above 2.5
  # that a call at 2.5 refused. (tensorfloat32: larger rounding, same rule.)
  model, v, x, y = _wide_input_model()
  with jax.default_matmul_precision(precision):
    for big in (2.6, 3.0):
      for screen in (True, False):
        cap = lipjax.certify(model, v, x, y, big, bound="global", screen=screen)
        rr = np.asarray(cap.robust_radius)
        inside = (rr > 0.05) & (rr < big)
        assert inside.sum() >= 4, rr   # the check below has points to bite on
        r = jnp.asarray(rr[inside] * (1.0 - 1e-3))
        for kw in ({"bound": "global", "screen": True}, {"bound": "global", "screen": False},
                   {}):
          c = lipjax.certify(model, v, x[inside], y[inside], r, **kw)
          assert np.all(np.asarray(c.certified)), (precision, big, screen, kw, rr[inside])


def test_global_certificate_is_monotone_in_eps():
  model, v, x, y = _wide_input_model()
  eps = np.linspace(1.5, 3.0, 7)
  certified = np.stack([np.asarray(lipjax.certify(model, v, x, y, e, bound="global").certified)
                        for e in eps])
  assert certified[0].all() and not certified[-1].any()
  # Certified at a radius: certified at every smaller one.
  assert np.all(certified[:-1] >= certified[1:])
