"""Runs the data-parallel training step in a separate process (for test_parallel).

Usage::

  python tests/_parallel_worker.py devices OUT.npz
      # the pmapped step over all local devices (start with
      # XLA_FLAGS=--xla_force_host_platform_device_count=2)
  python tests/_parallel_worker.py process ADDRESS NUM_PROCESSES INDEX OUT.npz
      # one of NUM_PROCESSES processes training together after
      # jax.distributed.initialize; each feeds its own slice of the batch

Writes the final parameters (``param/<path>``), power vectors
(``power/<path>``) and per-step metrics
(``metric/<name>``, shape (steps,)) to OUT.npz. :func:`problem` and
:func:`single_device_run` define the run shared with the tests.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

STEPS = 3
BATCH = 16


def problem():
  """Model, initial params, optimiser, step kwargs and the global batch."""
  from lipjax import nn as lnn
  from lipjax import training
  model = lnn.Sequential((lnn.Dense(8), lnn.ClippedReLU(theta_init=0.05), lnn.Dense(3)),
                         input_shape=(5,))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"]
  rs = np.random.RandomState(0)
  x = rs.uniform(size=(BATCH, 5)).astype(np.float32)
  y = (x[:, 0] * 3).astype(np.int32)
  opt = optax.adam(5e-2)
  kwargs = dict(loss="gloro", bound="local", iterations=2,
                eps_schedule=training.eps_schedule(0.3, 2, warmup_epochs=0, rampup_epochs=1))
  return model, params, opt, kwargs, x, y


def _state(params, opt):
  from lipjax import training
  model = problem()[0]
  power = training.init_power_state(model, {"params": params}, (5,), jax.random.PRNGKey(1))
  return training.create_train_state(params, opt, rng=42, power=power)


def _flat(prefix, tree):
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
  return out


def single_device_run():
  """The reference: the jitted single-device step on the whole batch."""
  from lipjax import training
  model, params, opt, kwargs, x, y = problem()
  step = training.make_train_step(model, opt, **kwargs)
  state = _state(params, opt)
  metrics = []
  for _ in range(STEPS):
    state, m = step(state, x, y)
    metrics.append(jax.device_get(m))
  out = _flat("param/", state.params)
  out.update(_flat("power/", state.power))
  return out, {k: np.array([m[k] for m in metrics])
                                         for k in metrics[0]}


def parallel_run(x, y):
  """The pmapped step; ``x``, ``y`` are this process's part of the batch."""
  from lipjax import training
  model, params, opt, kwargs, _, _ = problem()
  p_step = training.make_parallel_train_step(model, opt, **kwargs)
  state = training.replicate(_state(params, opt))
  xs, ys = training.shard_batch(x), training.shard_batch(y)
  layout = jax.tree_util.tree_leaves(state)[0].sharding
  metrics = []
  for _ in range(STEPS):
    state, m = p_step(state, xs, ys)
    metrics.append(jax.device_get(training.unreplicate(m)))
  same_layout = jax.tree_util.tree_leaves(state)[0].sharding == layout
  state = training.unreplicate(state)
  assert int(state.step) == STEPS
  out = _flat("param/", state.params)
  out.update(_flat("power/", state.power))
  out.update({f"metric/{k}": np.array([m[k] for m in metrics]) for k in metrics[0]})
  out["local_devices"] = np.array(jax.local_device_count())
  out["same_layout"] = np.array(same_layout)   # replicate() matches the step's outputs
  out["devices"] = np.array(jax.device_count())
  return out


def main(argv):
  mode = argv[1]
  if mode == "devices":
    _, _, _, _, x, y = problem()
    np.savez(argv[2], **parallel_run(x, y))
  elif mode == "process":
    address, n, i, path = argv[2], int(argv[3]), int(argv[4]), argv[5]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, n, i)
    _, _, _, _, x, y = problem()
    part = BATCH // n
    out = parallel_run(x[i * part:(i + 1) * part], y[i * part:(i + 1) * part])
    np.savez(path, **out)
    jax.distributed.shutdown()
  else:
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
  main(sys.argv)
