"""Schedules against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lipjax import training


def _f(schedule, step):
  return float(schedule(step))


def test_eps_and_kappa_warmup_ramp_and_after():
  # 10 steps/epoch, 2 warm-up epochs (steps 0..19), 3 ramp epochs (steps 20..49).
  eps = training.eps_schedule(1.75, 10, warmup_epochs=2, rampup_epochs=3)
  kappa = training.kappa_schedule(10, warmup_epochs=2, rampup_epochs=3)
  assert _f(eps, 0) == 0.0 and _f(kappa, 0) == 1.0            # first step: clean
  assert _f(eps, 19) == 0.0 and _f(kappa, 19) == 1.0          # last warm-up step
  np.testing.assert_allclose(_f(eps, 20), 1.75 / 30, rtol=1e-6)   # first ramp step
  np.testing.assert_allclose(_f(kappa, 20), 29 / 30, rtol=1e-6)
  np.testing.assert_allclose(_f(eps, 34), 1.75 * 15 / 30, rtol=1e-6)  # mid ramp
  np.testing.assert_allclose(_f(kappa, 34), 0.5, rtol=1e-6)
  # Exactly at the end of the ramp (last step of epoch 5): exactly eps_train.
  assert _f(eps, 49) == float(np.float32(1.75)) and _f(kappa, 49) == 0.0
  for s in (50, 51, 10_000, 2_000_000):                         # after: held, clamped
    assert _f(eps, s) == float(np.float32(1.75)) and _f(kappa, s) == 0.0


def test_ramp_without_warmup_and_jump_without_ramp():
  eps = training.eps_schedule(0.1551, 4, warmup_epochs=0, rampup_epochs=2)
  np.testing.assert_allclose(_f(eps, 0), 0.1551 / 8, rtol=1e-6)
  assert _f(eps, 7) == float(np.float32(0.1551))
  jump = training.eps_schedule(0.5, 4, warmup_epochs=1, rampup_epochs=0)
  kjump = training.kappa_schedule(4, warmup_epochs=1, rampup_epochs=0)
  assert [_f(jump, s) for s in (0, 3, 4, 9)] == [0.0, 0.0, 0.5, 0.5]
  assert [_f(kjump, s) for s in (0, 3, 4, 9)] == [1.0, 1.0, 0.0, 0.0]


def test_kappa_stays_in_unit_interval_and_eps_is_monotone():
  eps = training.eps_schedule(2.0, 3, warmup_epochs=1, rampup_epochs=5)
  kappa = training.kappa_schedule(3, warmup_epochs=1, rampup_epochs=5)
  steps = jnp.arange(-3, 40)
  k = np.asarray(jax.vmap(kappa)(steps))
  e = np.asarray(jax.vmap(eps)(steps))
  assert k.min() == 0.0 and k.max() == 1.0
  assert np.all(np.diff(e) >= 0) and np.all(np.diff(k) <= 0)
  np.testing.assert_allclose(e / 2.0 + k, 1.0, rtol=1e-6)


def test_lr_held_then_geometric_to_end_lr():
  # 300 epochs of 10 steps: held through epoch 175 (= 300/2 + 25), then
  # lr * (end/lr) ** ((e - 175) / 124), reaching end_lr in epoch 299.
  lr = training.lr_schedule(1e-3, 5e-6, epochs=300, steps_per_epoch=10)
  assert _f(lr, 0) == float(np.float32(1e-3))
  assert _f(lr, 1759) == float(np.float32(1e-3))                # last step of epoch 175
  np.testing.assert_allclose(_f(lr, 1760), 1e-3 * (5e-3) ** (1 / 124), rtol=1e-5)
  np.testing.assert_allclose(_f(lr, 2375), 1e-3 * math.sqrt(5e-3), rtol=1e-5)  # epoch 237
  np.testing.assert_allclose(_f(lr, 2990), 5e-6, rtol=1e-6)    # first step of last epoch
  np.testing.assert_allclose(_f(lr, 2999), 5e-6, rtol=1e-6)    # last step
  np.testing.assert_allclose(_f(lr, 5000), 5e-6, rtol=1e-6)    # past the end: held


def test_lr_hold_is_clamped_to_the_run():
  short = training.lr_schedule(1e-3, 1e-6, epochs=40, steps_per_epoch=5)
  assert {_f(short, s) for s in (0, 100, 199)} == {float(np.float32(1e-3))}
  mid = training.lr_schedule(1e-3, 1e-6, epochs=60, steps_per_epoch=1)  # hold to epoch 55
  assert _f(mid, 55) == float(np.float32(1e-3))
  np.testing.assert_allclose(_f(mid, 57), 1e-3 * (1e-3) ** 0.5, rtol=1e-5)
  np.testing.assert_allclose(_f(mid, 59), 1e-6, rtol=1e-6)


def test_lr_schedule_drives_optax_by_update_count():
  sched = training.lr_schedule(0.5, 0.05, epochs=60, steps_per_epoch=1)  # hold to 55
  opt = optax.sgd(sched)
  params = jnp.ones(3)
  state = opt.init(params)
  grads = jnp.array([1.0, -2.0, 0.0])
  updates = []
  for _ in range(60):
    u, state = opt.update(grads, state, params)
    updates.append(np.asarray(u))
  np.testing.assert_allclose(updates[0], -0.5 * grads, rtol=1e-6)
  np.testing.assert_allclose(updates[57], -0.5 * 0.1 ** 0.5 * grads, rtol=1e-5)
  np.testing.assert_allclose(updates[59], -0.05 * grads, rtol=1e-6)


def test_schedules_jit_and_reject_bad_arguments():
  eps = jax.jit(training.eps_schedule(1.0, 2, 0, 1))
  assert float(eps(jnp.int32(0))) == 0.5
  with pytest.raises(ValueError, match="steps_per_epoch"):
    training.eps_schedule(1.0, 0, 0, 1)
  with pytest.raises(ValueError, match="eps_train"):
    training.eps_schedule(-1.0, 2, 0, 1)
  with pytest.raises(ValueError, match="epochs"):
    training.kappa_schedule(2, -1, 1)
  with pytest.raises(ValueError, match="lr"):
    training.lr_schedule(0.0, 1e-6, 10, 2)


def test_lr_hold_epochs_compresses_the_schedule():
  # hold to epoch 6 of 10, then geometric: epochs 7, 8, 9 at ratio^(1/3, 2/3, 1).
  lr = training.lr_schedule(1e-3, 5e-6, epochs=10, steps_per_epoch=4, hold_epochs=6)
  ratio = 5e-6 / 1e-3
  expected = [1e-3] * 7 + [1e-3 * ratio ** (1 / 3), 1e-3 * ratio ** (2 / 3), 5e-6]
  got = [float(lr(4 * e + 3)) for e in range(10)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  with pytest.raises(ValueError, match="hold_epochs"):
    training.lr_schedule(1e-3, 5e-6, epochs=10, steps_per_epoch=4, hold_epochs=-1)
