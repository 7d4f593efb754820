"""Training pieces against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lipjax import nn as lnn
from lipjax import training


def _model():
  return lnn.Sequential((lnn.Dense(6), lnn.ClippedReLU(theta_init=0.05), lnn.Dense(3)),
                        input_shape=(4,))


def test_project_thresholds_keeps_theta_nonnegative_and_leaves_others():
  m = _model()
  v = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
  opt = optax.chain(optax.sgd(10.0), training.project_thresholds())
  params = v["params"]
  state = opt.init(params)
  # Gradient that pushes theta strongly negative and the kernel anywhere.
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = opt.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert float(jnp.min(new["layers_1"]["theta"])) == 0.0
  np.testing.assert_allclose(new["layers_0"]["kernel"], params["layers_0"]["kernel"] - 10.0,
                             rtol=1e-6)


def test_gloro_loss_matches_manual_formula():
  logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]])
  deltas = jnp.array([[0.0, 1.0, 2.5], [0.7, 0.0, 0.4]])
  y = jnp.array([0, 1])
  got = training.gloro_loss(logits, deltas, y)
  manual = []
  for b in range(2):
    z = np.asarray(logits[b], np.float64)
    d = np.asarray(deltas[b], np.float64)
    bot = max(z[i] + d[i] for i in range(3) if i != int(y[b]))
    aug = np.append(z, bot)
    manual.append(np.log(np.sum(np.exp(aug))) - aug[int(y[b])])
  np.testing.assert_allclose(got, np.mean(manual), rtol=1e-5)


def test_bcp_loss_interpolates_clean_and_robust():
  logits = jnp.array([[1.0, 0.0, -0.5]])
  deltas = jnp.array([[0.0, 0.8, 0.3]])
  y = jnp.array([0])
  ce = lambda z: float(optax.softmax_cross_entropy_with_integer_labels(z, y)[0])
  np.testing.assert_allclose(training.bcp_loss(logits, deltas, y, 1.0), ce(logits), rtol=1e-6)
  np.testing.assert_allclose(training.bcp_loss(logits, deltas, y, 0.0), ce(logits + deltas),
                             rtol=1e-6)


def test_worst_case_deltas_global_matches_explicit_product():
  m = _model()
  v = m.init(jax.random.PRNGKey(1), jnp.zeros((1, 4)))
  x = jax.random.uniform(jax.random.PRNGKey(2), (5, 4))
  y = jnp.array([0, 1, 2, 0, 1])
  _, deltas, _ = training.worst_case_deltas(m, v, x, y, 0.3, bound="global", iterations=200)
  w1 = np.asarray(v["params"]["layers_0"]["kernel"], np.float64)
  w2 = np.asarray(v["params"]["layers_2"]["kernel"], np.float64).T   # (C, h)
  s1 = np.linalg.svd(w1, compute_uv=False)[0]
  for b in range(5):
    for i in range(3):
      want = 0.3 * s1 * np.linalg.norm(w2[i] - w2[int(y[b])])
      np.testing.assert_allclose(deltas[b, i], want, rtol=1e-3, atol=1e-7)


def test_local_deltas_never_exceed_global_deltas_by_much():
  # The estimate-mode local Delta uses masked norms, which are <= the global ones.
  m = _model()
  v = m.init(jax.random.PRNGKey(3), jnp.zeros((1, 4)))
  x = jax.random.uniform(jax.random.PRNGKey(4), (8, 4))
  y = jnp.arange(8) % 3
  # Layers of at most 8 units: 16 Lanczos steps converge (the default estimator).
  _, dl, _ = training.worst_case_deltas(m, v, x, y, 0.2, bound="local", iterations=16)
  _, dg, _ = training.worst_case_deltas(m, v, x, y, 0.2, bound="global", iterations=16)
  assert bool(jnp.all(dl <= dg * (1 + 1e-3) + 1e-6))


def _data(n=64, seed=6):
  x = jax.random.uniform(jax.random.PRNGKey(seed), (n, 4))
  return x, (x[:, 0] > 0.5).astype(jnp.int32)


def test_train_step_lowers_the_loss_and_keeps_theta_nonnegative():
  m = _model()
  v = m.init(jax.random.PRNGKey(5), jnp.zeros((1, 4)))
  opt = optax.chain(optax.adam(3e-2), training.project_thresholds())
  step = training.make_train_step(m, opt, loss="gloro", bound="local", iterations=3,
                                  eps_schedule=0.05)
  state = training.create_train_state(v["params"], opt, rng=0)
  x, y = _data()
  losses = []
  for _ in range(40):
    state, metrics = step(state, x, y)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  assert float(jnp.min(state.params["layers_1"]["theta"])) >= 0.0


def test_weakly_typed_parameters_do_not_make_the_step_compile_twice():
  # Thresholds set with jnp.full are weakly typed; the step's outputs are
  # not. The state must hold strong copies, or the second step recompiles.
  m = _model()
  v = m.init(jax.random.PRNGKey(5), jnp.zeros((1, 4)))
  params = dict(v["params"], layers_1={"theta": jnp.full((6,), 0.3)})
  assert params["layers_1"]["theta"].weak_type
  opt = optax.adam(1e-2)
  power = training.init_power_state(m, {"params": params}, (4,), jax.random.PRNGKey(4))
  state = training.create_train_state(params, opt, rng=0, power=power)
  assert not any(a.weak_type for a in jax.tree_util.tree_leaves(state))
  step = training.make_train_step(m, opt, loss="gloro", bound="local", iterations=1,
                                  eps_schedule=0.05)
  x, y = _data()
  for _ in range(3):
    state, _ = step(state, x, y)
  assert step._cache_size() == 1   # pylint: disable=protected-access


def test_step_follows_schedules_and_resumes_exactly():
  m = _model()
  v = m.init(jax.random.PRNGKey(7), jnp.zeros((1, 4)))
  opt = optax.adam(1e-2)
  eps = training.eps_schedule(0.2, 2, warmup_epochs=1, rampup_epochs=2)
  kappa = training.kappa_schedule(2, warmup_epochs=1, rampup_epochs=2)
  step = training.make_train_step(m, opt, loss="bcp", bound="local", iterations=2,
                                  eps_schedule=eps, kappa_schedule=kappa)
  power = training.init_power_state(m, v, (4,), jax.random.PRNGKey(4))
  state = training.create_train_state(v["params"], opt, rng=jax.random.PRNGKey(3),
                                      power=power)
  x, y = _data(16)
  # The step warm-starts from state.power and keeps the updated vectors.
  params0 = jax.device_get(state.params)
  _, _, aux = training.worst_case_deltas(m, {"params": params0}, x, y, 0.0, bound="local",
                                         iterations=2, power=power)
  want_eps = [0.0, 0.0, 0.05, 0.1, 0.15, 0.2]     # hand: 2 clean steps, then (s-1)/4 * 0.2
  want_kappa = [1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
  rngs = [np.asarray(state.rng)]
  saved = None
  for i in range(6):
    state, metrics = step(state, x, y)
    assert set(metrics) == {"loss", "accuracy", "eps", "kappa", "vra_estimate"}
    np.testing.assert_allclose(float(metrics["eps"]), want_eps[i], rtol=1e-6)
    np.testing.assert_allclose(float(metrics["kappa"]), want_kappa[i], rtol=1e-6)
    rngs.append(np.asarray(state.rng))
    if i == 0:
      jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                                     atol=1e-6),
                             state.power, aux["power"])
    if i == 2:
      saved = jax.device_get(state)          # host copy, e.g. what a checkpoint holds
  assert int(state.step) == 6
  # rng: split once per step, keeping the first half.
  np.testing.assert_array_equal(rngs[1], np.asarray(jax.random.split(rngs[0])[0]))
  assert len({r.tobytes() for r in rngs}) == len(rngs)
  # Resume from the host copy of step 3: continues bit for bit.
  resumed = jax.tree_util.tree_map(jnp.asarray, saved)
  for i in range(3, 6):
    resumed, metrics = step(resumed, x, y)
    np.testing.assert_allclose(float(metrics["eps"]), want_eps[i], rtol=1e-6)
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.params, state.params)
  np.testing.assert_array_equal(resumed.rng, state.rng)
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed.power, state.power)


def test_step_keeps_theta_nonnegative_even_if_the_optimizer_does_not():
  m = _model()
  v = m.init(jax.random.PRNGKey(8), jnp.zeros((1, 4)))
  opt = optax.sgd(200.0)                       # no projection in the chain
  eps = training.eps_schedule(0.3, 10, warmup_epochs=1, rampup_epochs=1)  # clean warm-up
  step = training.make_train_step(m, opt, loss="gloro", bound="local", iterations=2,
                                  eps_schedule=eps)
  state = training.create_train_state(v["params"], opt, rng=1)
  x, y = _data(32)
  for _ in range(3):
    state, metrics = step(state, x, y)
    assert float(metrics["eps"]) == 0.0
    theta = np.asarray(state.params["layers_1"]["theta"])
    assert theta.min() >= 0.0
  assert theta.min() == 0.0                    # some threshold was pushed below 0


def test_step_and_helpers_reject_bad_input():
  m = _model()
  v = m.init(jax.random.PRNGKey(9), jnp.zeros((1, 4)))
  opt = optax.adam(1e-3)
  with pytest.raises(ValueError, match="loss"):
    training.make_train_step(m, opt, loss="hinge", eps_schedule=0.1)
  with pytest.raises(ValueError, match="eps_schedule"):
    training.make_train_step(m, opt, loss="gloro")
  with pytest.raises(ValueError, match="kappa_schedule"):
    training.make_train_step(m, opt, loss="bcp", eps_schedule=0.1)
  step = training.make_train_step(m, opt, loss="ce")
  state = training.create_train_state(v["params"], opt, rng=0)
  x, y = _data(8)
  with pytest.raises(ValueError, match="labels"):
    step(state, x, y[:5])
  with pytest.raises(ValueError, match="not divisible by 2 devices"):
    training.shard_batch(np.zeros((7, 4)), 2)
  np.testing.assert_array_equal(training.shard_batch(np.arange(6), 3),
                                np.arange(6).reshape(3, 2))
  p_step = training.make_parallel_train_step(m, opt, loss="ce")
  with pytest.raises(ValueError, match="local devices"):
    p_step(training.replicate(state), x.reshape(8, 1, 4), y.reshape(8, 1))
