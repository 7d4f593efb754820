"""The last layer's box-clipped translation (BCP) against independent truth.

``margins.box_ball_support`` maximises ``a . delta`` over the intersection of
an l2 ball and a box. Truth: hand-set cases with exact values, a float64
bisection on the primal ``clip(lam a, lower, upper)`` written here in NumPy,
and SciPy's SLSQP on small random problems. The certificate's rigorous
float32 evaluation must stay above the float64 optimum; margins with the
box-clipped bound must never be below those without it, and must stay below
every gap an attack reaches in the ball.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize

import lipjax
from lipjax import training
from lipjax._src import certify as certify_lib
from lipjax._src import margins, norms, rounding
from lipjax.training import losses

import _bounds_util as U


def _support(a, lo, hi, r):
  value, nu = margins.box_ball_support(jnp.asarray(a), jnp.asarray(lo), jnp.asarray(hi),
                                       jnp.asarray(r))
  return np.asarray(value), np.asarray(nu)


def _primal_f64(a, lo, hi, r):
  """max a.delta over the ball and box: bisection on lam in clip(lam a, lo, hi)."""
  a, lo, hi = (np.asarray(t, np.float64) for t in (a, lo, hi))
  far = np.where(a > 0, hi, np.where(a < 0, lo, 0.0))
  if np.linalg.norm(far) <= r:
    return float(a @ far)
  lo_l, hi_l = 0.0, 1.0
  while np.linalg.norm(np.clip(hi_l * a, lo, hi)) < r:
    hi_l *= 2.0
  for _ in range(200):
    mid = 0.5 * (lo_l + hi_l)
    if np.linalg.norm(np.clip(mid * a, lo, hi)) < r:
      lo_l = mid
    else:
      hi_l = mid
  return float(a @ np.clip(hi_l * a, lo, hi))


# ---------------------------------------------------------------------------
# The support function: golden cases
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("a,lo,hi,r,expected", [
    # The box does not bind: the ball's answer r ||a||.
    ((1.0, 1.0), (-1.0, -1.0), (1.0, 1.0), 1.0, np.sqrt(2.0)),
    # One entry clipped at 0.1, the rest of the radius goes to the other.
    ((1.0, 1.0), (-1.0, -1.0), (0.1, 1.0), 1.0, 0.1 + np.sqrt(0.99)),
    # Negative direction: the lower face binds.
    ((-2.0, 0.0), (-0.25, -1.0), (1.0, 1.0), 1.0, 0.5),
    # The box inside the ball: the box's own maximum.
    ((1.0, -3.0, 2.0), (-0.1, -0.2, -0.3), (0.1, 0.2, 0.3), 5.0, 0.1 + 0.6 + 0.6),
    # Zero-width entries (constant units) drop out.
    ((3.0, 4.0), (0.0, -1.0), (0.0, 1.0), 0.5, 2.0),
    # Zero radius, zero direction.
    ((1.0, 2.0), (-1.0, -1.0), (1.0, 1.0), 0.0, 0.0),
    ((0.0, 0.0), (-1.0, -1.0), (1.0, 1.0), 1.0, 0.0),
])
def test_support_golden_cases(a, lo, hi, r, expected):
  value, _ = _support(np.asarray(a, np.float32), np.asarray(lo, np.float32),
                      np.asarray(hi, np.float32), np.float32(r))
  np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7)


def test_support_matches_slsqp_and_bisection_on_random_problems():
  rng = np.random.default_rng(0)
  for _ in range(150):
    m = int(rng.integers(1, 7))
    a = rng.normal(size=m) * (rng.random(m) > 0.2)
    lo = -rng.random(m) * rng.choice([0.0, 0.3, 2.0], size=m)
    hi = rng.random(m) * rng.choice([0.0, 0.3, 2.0], size=m)
    r = float(rng.random() * 2)
    value, _ = _support(a.astype(np.float32), lo.astype(np.float32), hi.astype(np.float32),
                        np.float32(r))
    truth = _primal_f64(a.astype(np.float32), lo.astype(np.float32), hi.astype(np.float32),
                        np.float32(r))
    assert abs(float(value) - truth) <= 1e-5 * (1 + abs(truth)), (a, lo, hi, r, value, truth)
    best = 0.0
    for s in range(3):
      res = optimize.minimize(lambda d: -a @ d, np.clip(rng.normal(size=m) * 0.1, lo, hi),
                              bounds=list(zip(lo, hi)), method="SLSQP",
                              constraints=[{"type": "ineq", "fun": lambda d: r * r - d @ d}],
                              options={"ftol": 1e-12, "maxiter": 300})
      if res.success and res.x @ res.x <= r * r * (1 + 1e-9):
        best = max(best, float(a @ res.x))
    assert float(value) >= best - 1e-5 * (1 + best), (a, lo, hi, r, value, best)
    assert float(value) <= r * np.linalg.norm(a) * (1 + 1e-6) + 1e-7
    assert float(value) <= np.sum(np.maximum(a * lo, a * hi)) * (1 + 1e-6) + 1e-7


def test_support_is_differentiable_and_batched():
  a = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 6))
  lo = -jax.random.uniform(jax.random.PRNGKey(1), (4, 1, 6))
  hi = jax.random.uniform(jax.random.PRNGKey(2), (4, 1, 6))
  r = jnp.full((4, 1), 0.7)
  value, nu = margins.box_ball_support(a, lo, hi, r)
  assert value.shape == (4, 3) and nu.shape == (4, 3, 6)
  g = jax.grad(lambda a, lo, hi, r: jnp.sum(margins.box_ball_support(a, lo, hi, r)[0]),
               argnums=(0, 1, 2, 3))(a, lo, hi, r)
  assert all(bool(jnp.all(jnp.isfinite(t))) for t in g)
  # d value / d radius = ||a - nu|| >= 0: a larger ball never lowers the bound.
  assert bool(jnp.all(g[3] >= 0))
  # Finite differences agree with the gradient in the radius.
  h = 1e-3
  up = margins.box_ball_support(a, lo, hi, r + h)[0]
  down = margins.box_ball_support(a, lo, hi, r - h)[0]
  np.testing.assert_allclose(np.sum(up - down) / (2 * h), float(jnp.sum(g[3])), rtol=2e-2)


# ---------------------------------------------------------------------------
# The certificate's rigorous float32 evaluation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("m", [3, 100, 777])
def test_rigorous_move_is_above_the_float64_optimum(m):
  rng = np.random.default_rng(m)
  b, c, depth = 6, 4, 3
  # Entries over many binades, so that rounding matters.
  a = (rng.normal(size=(b, c, m)) * 10.0 ** rng.uniform(-3, 2, size=(b, c, m))).astype(
      np.float32)
  center = rng.normal(size=(b, m)).astype(np.float32)
  lo = (center - rng.random((b, m)) * rng.choice([0.0, 1e-3, 0.5], size=(b, m))).astype(
      np.float32)
  hi = (center + rng.random((b, m)) * rng.choice([0.0, 1e-3, 0.5], size=(b, m))).astype(
      np.float32)
  # Faces at infinity (an overflowed box): the ball alone bounds those entries.
  lo[0, 0], hi[1, m - 1] = -np.inf, np.inf
  e = (rng.random((b, m)) * 1e-6).astype(np.float32)
  scale = (rng.random(b) * 2).astype(np.float32)
  a_norm = jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(a)), axis=-1)) * rounding.upper_factor(m + 4)
  move = np.asarray(certify_lib._box_clipped_move(jnp.asarray(a), a_norm, jnp.asarray(lo),   # pylint: disable=protected-access
                                                  jnp.asarray(hi), jnp.asarray(center),
                                                  jnp.asarray(e), jnp.asarray(scale), depth))
  assert np.all(np.isfinite(move))
  r64 = scale.astype(np.float64) * (1 + norms.ROUNDING_SLACK) * rounding.upper_factor(depth + 8)
  for i in range(b):
    dlo = np.minimum(lo[i].astype(np.float64) - center[i] - e[i], 0.0)
    dhi = np.maximum(hi[i].astype(np.float64) - center[i] + e[i], 0.0)
    for k in range(c):
      truth = _primal_f64(a[i, k], dlo, dhi, r64[i])
      assert move[i, k] >= truth, (i, k, move[i, k], truth)
      # Not much above: the exact a is known to u |a| per entry only.
      slack = 4 * rounding.U * r64[i] * np.linalg.norm(a[i, k].astype(np.float64))
      assert move[i, k] <= truth * (1 + 1e-4) + slack, (i, k, move[i, k], truth)


# ---------------------------------------------------------------------------
# Certificates with the box-clipped bound
# ---------------------------------------------------------------------------


def _trained_mlp():
  sys.path.insert(0, __file__.rsplit("/", 1)[0])
  import test_certify   # pylint: disable=import-outside-toplevel
  return test_certify._trained("mlp")   # pylint: disable=protected-access


def test_box_clipped_margins_are_never_lower_and_hold_against_pgd():
  t = _trained_mlp()
  model, v, x, y = t.model, t.variables, t.x, t.y
  gained_total = 0
  for eps in (t.eps, 1.0):
    plain = lipjax.certify(model, v, x, y, eps, box_clip=False, triage=False)
    clipped = lipjax.certify(model, v, x, y, eps, triage=False)
    assert bool(jnp.all(clipped.margin >= plain.margin))
    assert bool(jnp.all(clipped.certified | ~plain.certified))
    # The triage decides exactly as the full certificate.
    triaged = lipjax.certify(model, v, x, y, eps)
    np.testing.assert_array_equal(np.asarray(triaged.certified), np.asarray(clipped.certified))
    gained_total += int(np.sum(np.asarray(clipped.margin - plain.margin) > 0))
    # Every margin is below the smallest float32 gap an attack finds.
    # All six starts in one batch (one compiled attack).
    b, starts_n = x.shape[0], 6
    onehot = jnp.tile(jax.nn.one_hot(y, 3), (starts_n, 1))

    def neg_gap(xp):
      z = model.apply(v, xp)
      oh = onehot[:xp.shape[0]]
      return jnp.max(jnp.where(oh > 0, -jnp.inf, z), -1) - jnp.sum(z * oh, -1)

    eps_b = jnp.full((b,), eps)
    starts = jnp.concatenate([x[None], U.sample_ball(jax.random.PRNGKey(3), x, eps_b,
                                                     starts_n - 1, uniform_radius=True)])
    tiled = lambda a: jnp.tile(a, (starts_n,) + (1,) * (a.ndim - 1))   # noqa: E731
    best = U.pgd_maximise(neg_gap, tiled(x), tiled(eps_b), starts.reshape(tiled(x).shape), 80)[1]
    worst = jnp.max(neg_gap(best).reshape(starts_n, b), 0)
    samples = U.sample_ball(jax.random.PRNGKey(4), x, eps_b, 64)
    worst = jnp.maximum(worst, jnp.max(jax.vmap(neg_gap)(samples), 0))
    assert bool(jnp.all(-worst >= clipped.margin)), np.asarray(-worst - clipped.margin).min()
  # The bound binds on some examples (else this test would not test it).
  assert gained_total >= 5, gained_total


def test_box_clip_option_is_checked():
  t = _trained_mlp()
  with pytest.raises(ValueError, match="box_clip must be True or False"):
    lipjax.certify(t.model, t.variables, t.x, t.y, 0.1, box_clip="yes")
  for bad in (0, -1, 1.5, True, "2"):
    with pytest.raises(ValueError, match="pair_classes must be None or an integer >= 1"):
      lipjax.certify(t.model, t.variables, t.x, t.y, 0.1, pair_classes=bad)


# ---------------------------------------------------------------------------
# Training deltas
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bound", ["local", "global"])
def test_box_clipped_training_deltas_are_smaller_and_differentiable(bound):
  model = U.mlp_model("clipped_relu", widths=(12, 10))
  v = U.init_random(model, jax.random.PRNGKey(1))
  x = jax.random.uniform(jax.random.PRNGKey(2), (8, 5))
  y = jnp.arange(8) % 3
  # Compiled: one program each costs less than running the bound op by op.
  deltas = jax.jit(lambda v, box_clip: losses.worst_case_deltas(
      model, v, x, y, 0.8, bound=bound, box_clip=box_clip)[1], static_argnums=1)
  plain, clipped = deltas(v, False), deltas(v, True)
  assert bool(jnp.all(clipped <= plain * (1 + 1e-6) + 1e-7))
  assert bool(jnp.all(clipped[jnp.arange(8), y] == 0))
  assert float(jnp.sum(clipped)) < float(jnp.sum(plain))

  def loss(params):
    logits, d, _ = losses.worst_case_deltas(model, {"params": params}, x, y, 0.8,
                                            bound=bound, box_clip=True)
    return losses.gloro_loss(logits, d, y)

  g = jax.jit(jax.grad(loss))(v["params"])
  assert all(bool(jnp.all(jnp.isfinite(t))) for t in jax.tree_util.tree_leaves(g))
  with pytest.raises(ValueError, match="box_clip must be True or False"):
    losses.worst_case_deltas(model, v, x, y, 0.8, bound=bound, box_clip=1)


@pytest.mark.parametrize("options", [{"box_clip": True},
                                     {"box_clip": True, "radius_grad": True}])
def test_a_training_step_with_box_clip_lowers_the_loss(options):
  model = U.mlp_model("clipped_relu", widths=(12, 10))
  v = U.init_random(model, jax.random.PRNGKey(5))
  x = jax.random.uniform(jax.random.PRNGKey(6), (64, 5))
  y = (x[:, 0] > 0.5).astype(jnp.int32)
  opt = optax.adam(1e-2)
  step = training.make_train_step(model, opt, loss="gloro", bound="local",
                                  eps_schedule=0.1, bound_options=options)
  state = training.create_train_state(v["params"], opt, rng=0,
                                      power=training.init_power_state(model, v))
  losses_seen = []
  for _ in range(12):
    state, metrics = step(state, x, y)
    losses_seen.append(float(metrics["loss"]))
  assert losses_seen[-1] < losses_seen[0], losses_seen


# ---------------------------------------------------------------------------
# Gradients through the intermediate radii
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bound,estimator", [("local", "lanczos"), ("local", "power"),
                                             ("global", "lanczos")])
def test_radius_grad_keeps_the_deltas_and_adds_the_path_through_the_boxes(bound, estimator):
  # Local bound: the per-example radius norms (Lanczos, intermediate "local")
  # or the running global norms (power method, intermediate "global");
  # global bound: the boxes of the box-clipped term.
  # Wide enough that the ball, not interval arithmetic, sets part of the
  # penultimate box (so the radii reach the box-clipped term).
  model = U.mlp_model("clipped_relu", features=20, widths=(40, 40))
  v = U.init_random(model, jax.random.PRNGKey(1))
  x = jax.random.uniform(jax.random.PRNGKey(2), (8, 20))
  y = jnp.arange(8) % 3
  power = losses.init_power_state(model, v, (20,))

  @jax.jit
  def run(params):
    out = {}
    for box_clip in (False, True):
      for radius_grad in (False, True):
        def loss(p, box_clip=box_clip, radius_grad=radius_grad):
          _, d, _ = losses.worst_case_deltas(model, {"params": p}, x, y, 0.8, bound=bound,
                                             power=power, box_clip=box_clip,
                                             radius_grad=radius_grad, estimator=estimator)
          return jnp.sum(d), d
        (_, d), g = jax.value_and_grad(loss, has_aux=True)(p)
        out[box_clip, radius_grad] = d, g
    return out

  p = v["params"]
  out = run(p)
  flat = lambda g: np.concatenate([np.ravel(t) for t in jax.tree_util.tree_leaves(g)])  # noqa: E731
  for box_clip in (False, True):
    (d0, _), (d1, g1) = out[box_clip, False], out[box_clip, True]
    # The same numbers forward; finite gradients.
    np.testing.assert_array_equal(np.asarray(d0), np.asarray(d1))
    assert np.all(np.isfinite(flat(g1)))
  # Without a term built on the boxes the radii reach the deltas only through
  # the (discrete) masks: the same gradient. With the box-clipped term they
  # add a path.
  np.testing.assert_allclose(flat(out[False, True][1]), flat(out[False, False][1]),
                             rtol=1e-6, atol=1e-7)
  assert np.max(np.abs(flat(out[True, True][1]) - flat(out[True, False][1]))) > 1e-6


def test_radius_grad_option_is_checked():
  model = U.mlp_model("clipped_relu", widths=(12, 10))
  v = U.init_random(model, jax.random.PRNGKey(5))
  x = jax.random.uniform(jax.random.PRNGKey(6), (4, 5))
  y = jnp.arange(4) % 3
  with pytest.raises(ValueError, match="radius_grad must be True or False"):
    losses.worst_case_deltas(model, v, x, y, 0.1, radius_grad="yes")
  with pytest.raises(ValueError, match="radius_grad is for mode='estimate'"):
    lipjax.local_lipschitz_bound(model, v, x, 0.1, radius_grad=True)
  with pytest.raises(ValueError, match="pass global_state"):
    lipjax.local_lipschitz_bound(model, v, x, 0.1, mode="estimate", intermediate="global",
                                 radius_grad=True)
