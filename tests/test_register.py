"""User rules: a registered linear map and a registered activation, against independent truth.

Truth: float64 SVDs of ``jax.jacfwd`` Jacobians at sampled points of the ball,
the explicit matrix of the registered map, and a float64 forward pass.
"""

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lipjax
from lipjax._src import trace as trace_lib
from lipjax._src.rules import registered

import _bounds_util as U

SHAPE = (6,)


def _mix(h, w):
  """A linear map with a parameter: a cyclic shift scaled per feature."""
  return jnp.roll(h, 1, axis=-1) * w - 0.5 * h


mix = lipjax.bounds.register_linear(_mix, name="test_mix")
softsign = lipjax.bounds.register_activation(lambda z: z / (1.0 + jnp.abs(z)),
                                             name="test_softsign")
hard_tanh = lipjax.bounds.register_activation(lambda z: jnp.clip(z, -1.0, 1.0),
                                              name="test_hard_tanh", flat_below=-1.0,
                                              flat_above=1.0, ulps=0.0)


class Net(fnn.Module):

  @fnn.compact
  def __call__(self, x):
    h = fnn.Dense(8)(x)
    w = self.param("w", fnn.initializers.constant(0.7), (8,))
    h = softsign(mix(h, w))
    h = hard_tanh(fnn.Dense(8)(h))
    return fnn.Dense(3)(h)


def _setup():
  model = Net()
  x = jax.random.normal(jax.random.PRNGKey(0), (4,) + SHAPE)
  v = model.init(jax.random.PRNGKey(1), x)
  return model, v, x


def test_registered_rules_become_stages_and_the_map_is_exact():
  model, v, _ = _setup()
  stages = trace_lib.trace(model, v, SHAPE)
  assert [type(st.activation).__name__ for st in stages] == [
      "RegisteredActivation", "RegisteredActivation", "NoneType"]
  # The first stage is Dense then the registered map: its matrix is exact.
  p = v["params"]
  k = np.asarray(p["Dense_0"]["kernel"], np.float64)
  shift = np.roll(np.eye(8), 1, axis=1) * np.asarray(p["w"], np.float64)[None]
  want = k @ (shift - 0.5 * np.eye(8))
  mat = np.asarray(stages[0].layer.explicit_matrix(stages[0].params), np.float64)
  np.testing.assert_allclose(mat.T, want, rtol=1e-5, atol=1e-6)
  assert stages[1].act_params == {} and stages[1].activation.flat_below == -1.0


def test_bound_covers_exact_jacobians_and_rounding():
  model, v, x = _setup()
  eps = 0.3
  res = lipjax.local_lipschitz_bound(model, v, x, eps)
  bound = np.asarray(res.bound, np.float64)
  glob = float(lipjax.global_lipschitz_bound(model, v, input_shape=SHAPE))
  assert np.all(np.isfinite(bound)) and np.all(bound <= glob * (1 + 1e-5))
  pts = U.sample_ball(jax.random.PRNGKey(2), x, jnp.full((4,), eps), 16, uniform_radius=True)
  f = lambda p: model.apply(v, p[None])[0]
  jac = np.asarray(jax.vmap(jax.vmap(jax.jacfwd(f)))(pts), np.float64)
  norms = np.linalg.svd(jac, compute_uv=False)[..., 0]
  assert np.all(norms.max(axis=0) <= bound * (1 + 1e-5))
  assert np.max(norms.max(axis=0) / bound) > 0.05
  z32 = np.asarray(jax.vmap(lambda p: model.apply(v, p))(pts))
  with jax.enable_x64(True):
    v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), v)
    z64 = np.asarray(jax.vmap(lambda p: model.apply(v64, p))(
        jnp.asarray(np.asarray(pts), jnp.float64)))
  assert np.all(np.abs(z32 - z64) <= np.asarray(res.layers[-1].error)[None])


def test_flat_regions_give_zero_masks():
  model, v, x = _setup()
  p = dict(v["params"])
  p["Dense_1"] = {"kernel": p["Dense_1"]["kernel"] * 0.0, "bias": jnp.full((8,), 5.0)}
  res = lipjax.local_lipschitz_bound(model, {"params": p}, x, 0.1)
  np.testing.assert_allclose(np.asarray(res.bound), 0.0, atol=1e-7)


def test_bad_registrations_raise_one_line():
  square = lipjax.bounds.register_linear(lambda h: h * h, name="test_square")

  class Bad(fnn.Module):
    @fnn.compact
    def __call__(self, x):
      return fnn.Dense(3)(square(fnn.Dense(4)(x)))

  v = Bad().init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
  with pytest.raises(lipjax.UnsupportedModelError) as e:
    lipjax.local_lipschitz_bound(Bad(), v, jnp.zeros((2,) + SHAPE), 0.1)
  assert "\n" not in str(e.value) and "'test_square', which is not linear" in str(e.value)
  with pytest.raises(ValueError, match="identifier"):
    lipjax.bounds.register_linear(lambda h: h, name="not a name")
  with pytest.raises(ValueError, match="already registered"):
    lipjax.bounds.register_linear(lambda h: 2 * h, name="test_mix")
  with pytest.raises(ValueError, match="flat_below"):
    lipjax.bounds.register_activation(jnp.tanh, name="t", flat_below=1.0, flat_above=0.0)
  assert registered.register_linear is lipjax.bounds.register_linear is lipjax.register_linear
