"""Interval bounds and activation-status masks against sampled truth.

For each activation, a small conv+dense network with random biases and
per-neuron thresholds is bounded on ``B(x, eps)``; then points of the ball are
drawn (uniform in the ball, uniform radius, and the end points of projected
gradient ascent/descent on every single pre-activation), pushed through the
model's own Flax forward pass, and checked against ``LocalBound.layers``:

* every pre-activation lies in ``[lower, upper]``;
* every stage input lies in ``[input_lower, input_upper]`` and within
  ``radius_in`` of the clean one;
* every output flagged constant (``col_mask == 0``) takes the same value at all
  points, and every deleted row (``row_mask == 0``) feeds only constant outputs;
* centres equal the clean forward pass.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lipjax

import _bounds_util as U

B = 3
N_SAMPLES = 200
PGD_STEPS = 40


class Case:
  """A model, its random parameters, inputs and a jitted PGD search."""

  def __init__(self, kind, seed):
    self.kind = kind
    self.model = U.conv_model(kind)
    self.variables = U.init_random(self.model, jax.random.PRNGKey(seed))
    self.x = jax.random.uniform(jax.random.PRNGKey(seed + 1000), (B, 6, 6, 2))
    self._pgd = jax.jit(self._pgd_impl)
    self._eval = jax.jit(self._eval_impl)
    self._points = {}

  def _flat_pre(self, xp):
    pre = U.pre_activations(self.model, self.variables, xp)
    return jnp.concatenate([p.reshape(p.shape[0], -1) for p in pre], axis=1)

  def _pgd_impl(self, eps, key):
    """Ascent and descent on every pre-activation, for every example."""
    n = self._flat_pre(self.x).shape[1]
    idx = jnp.concatenate([jnp.arange(n), jnp.arange(n)])
    sign = jnp.concatenate([jnp.ones(n), -jnp.ones(n)])
    eps_b = jnp.full((B,), eps)
    x0 = U.sample_ball(key, self.x, eps_b, 2 * n, uniform_radius=True)

    def one(i, s, start):
      obj = lambda xp: s * self._flat_pre(xp)[:, i]
      return U.pgd_maximise(obj, self.x, eps_b, start, PGD_STEPS)

    final, best = jax.vmap(one)(idx, sign, x0)
    return jnp.concatenate([final, best])

  def _eval_impl(self, pts):
    """pre-activations, stage inputs and activation outputs at ``(N, B, ...)``."""
    flat = pts.reshape((-1,) + pts.shape[2:])
    def split(a):
      return a.reshape(pts.shape[:2] + a.shape[1:])
    pre = [split(a) for a in U.pre_activations(self.model, self.variables, flat)]
    ins = [split(a) for a in U.stage_inputs(self.model, self.variables, flat)]
    post = [split(a) for a in U.post_activations(self.model, self.variables, flat)]
    return pre, ins, post

  def points(self, eps, seed=0):
    if (eps, seed) not in self._points:
      self._points[(eps, seed)] = self._make_points(eps, seed)
    return self._points[(eps, seed)]

  def _make_points(self, eps, seed):
    key = jax.random.PRNGKey(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    eps_b = jnp.full((B,), eps)
    pts = [self.x[None],
           U.sample_ball(k1, self.x, eps_b, N_SAMPLES),
           U.sample_ball(k2, self.x, eps_b, N_SAMPLES // 2, uniform_radius=True),
           self._pgd(jnp.float32(eps), k3)]
    pts = jnp.concatenate(pts)
    # Every point is inside the ball (independent check of the helpers).
    d = np.asarray(U._bnorm((pts - self.x[None]).reshape(-1, *self.x.shape[1:])))
    assert np.all(d <= eps * (1 + 1e-5))
    return pts


@pytest.fixture(scope="module", params=U.ACTIVATIONS)
def case(request):
  return Case(request.param, seed=U.ACTIVATIONS.index(request.param) * 7 + 1)


def _check_bounds(case, lb, eps, pts):
  pre, ins, post = case._eval(pts)
  layers = lb.layers
  assert len(layers) == len(pre) == 4
  n_const = 0
  n_var = 0
  for l, (layer, z, h) in enumerate(zip(layers, pre, ins)):
    lo, hi = np.asarray(layer.lower), np.asarray(layer.upper)
    z = np.asarray(z)
    tol = 1e-6 * (1 + np.abs(z))
    assert np.all(z >= lo[None] - tol), (
        l, float(np.max(lo[None] - z)), "pre-activation below its lower bound")
    assert np.all(z <= hi[None] + tol), (
        l, float(np.max(z - hi[None])), "pre-activation above its upper bound")
    # Stage inputs: box and l2 radius.
    h = np.asarray(h)
    ilo, ihi = np.asarray(layer.input_lower), np.asarray(layer.input_upper)
    htol = 1e-6 * (1 + np.abs(h))
    assert np.all(h >= ilo[None] - htol) and np.all(h <= ihi[None] + htol), l
    hc = np.asarray(layer.input_center)
    dist = np.sqrt(np.sum(np.square(h - hc[None]).reshape(h.shape[:2] + (-1,)), -1))
    r = np.asarray(layer.radius_in)
    assert np.all(dist <= r[None] * (1 + 1e-5) + 1e-6), (l, float(np.max(dist - r)))
    if l == len(layers) - 1:
      np.testing.assert_array_equal(np.asarray(layer.col_mask), 1.0)
      np.testing.assert_array_equal(np.asarray(layer.row_mask), 1.0)
      break
    # Constant outputs really are constant (exactly: clipping gives the
    # threshold itself, ReLU gives 0).
    out = np.asarray(post[l])
    col = np.asarray(layer.col_mask)
    assert set(np.unique(col)) <= {0.0, 1.0}
    const = col == 0
    spread = np.max(out, axis=0) - np.min(out, axis=0)
    # (pts[0] is the clean input, so the constant is the clean value.)
    assert np.all(spread[const] == 0), (l, "a neuron flagged constant varies")
    # Deleted rows feed only constant outputs.
    row = np.asarray(layer.row_mask)
    if case.kind == "clipped_maxmin":
      c = row.shape[-1] // 2
      pair_const = (spread[..., :c] == 0) & (spread[..., c:] == 0)
      pair_const = np.concatenate([pair_const, pair_const], -1)
      assert np.all(pair_const[row == 0])
      # A row is kept when either output of the pair varies.
      assert np.all(row >= col)
    else:
      np.testing.assert_array_equal(row, col)
    n_const += int(const.sum())
    n_var += int((~const).sum())
  return n_const, n_var


@pytest.mark.parametrize("eps", [0.08, 0.3])
def test_sound_boxes_and_masks_contain_sampled_truth(case, eps):
  lb = lipjax.local_lipschitz_bound(case.model, case.variables, case.x, eps)
  n_const, n_var = _check_bounds(case, lb, eps, case.points(eps))
  # Non-trivial: both kinds of neurons occur.
  assert n_const > 0 and n_var > 0, (n_const, n_var)


def test_estimate_mode_masks_are_sound(case):
  # Estimate mode (training) uses global norms for the radii, the masks of
  # intermediate="global" (test_lipschitz checks they are the same); they
  # must be sound even though the bound itself is only an estimate.
  eps = 0.3
  lb = lipjax.local_lipschitz_bound(case.model, case.variables, case.x, eps,
                                    mode="estimate", iterations=2)
  n_const, n_var = _check_bounds(case, lb, eps, case.points(eps))
  assert n_const > 0 and n_var > 0


def test_centres_equal_clean_forward_pass(case):
  lb = lipjax.local_lipschitz_bound(case.model, case.variables, case.x, 0.1)
  pre = U.pre_activations(case.model, case.variables, case.x)
  for layer, z in zip(lb.layers, pre):
    np.testing.assert_allclose(np.asarray(layer.center), np.asarray(z),
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(layer.lower) <= np.asarray(layer.center))
    assert np.all(np.asarray(layer.center) <= np.asarray(layer.upper))
  np.testing.assert_allclose(np.asarray(lb.logits),
                             np.asarray(case.model.apply(case.variables, case.x)),
                             rtol=1e-5, atol=1e-6)
  assert len(lb.masks) == len(lb.layers) - 1


def test_boxes_shrink_to_the_point_at_eps_zero(case):
  lb = lipjax.local_lipschitz_bound(case.model, case.variables, case.x, 0.0)
  for layer in lb.layers:
    c = np.asarray(layer.center)
    width = np.asarray(layer.upper) - np.asarray(layer.lower)
    assert np.all(width >= 0)
    assert np.all(width <= 1e-4 * (1 + np.abs(c)))
  np.testing.assert_array_equal(np.asarray(lb.layers[0].radius_in), 0.0)


def test_boxes_are_monotone_in_eps(case):
  small = lipjax.local_lipschitz_bound(case.model, case.variables, case.x, 0.05)
  big = lipjax.local_lipschitz_bound(case.model, case.variables, case.x, 0.25)
  for a, b in zip(small.layers, big.layers):
    assert np.all(np.asarray(b.lower) <= np.asarray(a.lower) + 1e-6)
    assert np.all(np.asarray(b.upper) >= np.asarray(a.upper) - 1e-6)
    # A neuron constant on the big ball is constant on the small one.
    assert np.all(np.asarray(a.col_mask) <= np.asarray(b.col_mask))


def test_per_example_eps():
  # Each example gets its own radius: the same boxes as one call per example.
  model = U.conv_model("clipped_relu")
  v = U.init_random(model, jax.random.PRNGKey(3))
  x = jax.random.uniform(jax.random.PRNGKey(4), (B, 6, 6, 2))
  eps = jnp.array([0.0, 0.1, 0.4])
  together = lipjax.local_lipschitz_bound(model, v, x, eps)
  for b in range(B):
    alone = lipjax.local_lipschitz_bound(model, v, x, jnp.full((B,), eps[b]))
    for lt, la in zip(together.layers, alone.layers):
      np.testing.assert_allclose(np.asarray(lt.lower[b]), np.asarray(la.lower[b]),
                                 rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(np.asarray(lt.upper[b]), np.asarray(la.upper[b]),
                                 rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(together.bound[b]), float(alone.bound[b]),
                               rtol=1e-5)
