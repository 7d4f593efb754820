"""The bound diagnostics (lipjax.evaluation.diagnostics) against their definitions.

Every number is recomputed here from the two bounds it compares (the
training estimate of ``worst_case_deltas`` and the sound
``local_lipschitz_bound``), and the Lanczos estimator's estimate is checked to
be honest: within a few percent below the sound bound, never above it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lipjax
from lipjax import training
from lipjax._src import trace as trace_lib
from lipjax.evaluation import diagnostics

import _bounds_util as U


@pytest.fixture(scope="module")
def case():
  model = U.conv_model("clipped_relu")
  variables = U.init_random(model, jax.random.PRNGKey(3))
  x = jax.random.uniform(jax.random.PRNGKey(4), (8,) + model.input_shape)
  y = jnp.arange(8) % 3
  return model, variables, x, y


def test_numbers_are_those_of_the_two_bounds(case):
  model, variables, x, y = case
  eps = 0.3
  power = training.init_power_state(model, variables, key=jax.random.PRNGKey(5))
  opts = {"estimator": "power"}
  diag = diagnostics.bound_diagnostics(model, variables, x, y, eps, iterations=2,
                                       power=power, estimator=opts)
  _, _, aux = training.worst_case_deltas(model, variables, x, y, eps, iterations=2,
                                         power=power, **opts)
  sound = lipjax.local_lipschitz_bound(model, variables, x, eps)
  stages = trace_lib.trace(model, variables, model.input_shape)
  est = np.prod([np.asarray(n) for n in aux["layer_norms"][:-1]], axis=0)
  snd = np.prod([np.asarray(n) for n in sound.layer_norms[:-1]], axis=0)
  np.testing.assert_allclose(diag["network_ratio_median"], np.median(est / snd), rtol=1e-5)
  np.testing.assert_allclose(diag["network_ratio_q10"], np.quantile(est / snd, 0.1), rtol=1e-5)
  for l, st in enumerate(stages[:-1]):
    r = np.asarray(aux["layer_norms"][l]) / np.asarray(sound.layer_norms[l])
    np.testing.assert_allclose(diag[f"layer{l}_ratio_median"], np.median(r), rtol=1e-5)
    col = np.asarray(sound.layers[l].col_mask).reshape(8, -1)
    assert diag[f"layer{l}_kept_sound"] == pytest.approx(col.mean())
    assert diag[f"layer{l}_kept_train"] == pytest.approx(
        np.asarray(aux["local_bound"].layers[l].col_mask).mean())
    assert diag[f"layer{l}_dead"] == pytest.approx(np.mean(col.max(axis=0) == 0))
    theta = np.asarray(st.act_params["theta"]).ravel()
    assert diag[f"layer{l}_theta_zero"] == pytest.approx(np.mean(theta <= 0))
    assert diag[f"layer{l}_theta_median"] == pytest.approx(np.median(theta))
  assert "| network |" in diagnostics.format_diagnostics(diag, eps)


def test_lanczos_estimate_is_honest(case):
  # A few training steps' worth of calls settle the running vectors; the
  # estimate then sits just below the sound bound (never above it).
  model, variables, x, y = case
  eps = 0.3
  power = training.init_power_state(model, variables, key=jax.random.PRNGKey(6))
  call = jax.jit(lambda p: training.worst_case_deltas(model, variables, x, y, eps, power=p,
                                                      estimator="lanczos")[2]["power"])
  for _ in range(3):
    power = call(power)
  diag = diagnostics.bound_diagnostics(model, variables, x, y, eps, power=power,
                                       estimator={"estimator": "lanczos"})
  assert 0.95 <= diag["network_ratio_q10"] <= diag["network_ratio_median"] <= 1.0 + 1e-4
  # The paper's estimator from the same state is the optimistic one.
  old = diagnostics.bound_diagnostics(model, variables, x, y, eps, power=power,
                                      estimator={"estimator": "power"}, iterations=1)
  assert old["network_ratio_median"] < diag["network_ratio_median"]
