"""Runs the data-parallel training step in a separate process (for test_parallel).

Usage::

  python tests/_parallel_worker.py devices OUT.npz
      # the pmapped step over all local devices (start with
      # XLA_FLAGS=--xla_force_host_platform_device_count=2)
  python tests/_parallel_worker.py process ADDRESS NUM_PROCESSES INDEX OUT.npz
      # one of NUM_PROCESSES processes training together after
      # jax.distributed.initialize; each feeds its own slice of the batch
  python tests/_parallel_worker.py sharded OUT.npz CHECKPOINT_DIR
      # the sharded-jit step and the pmapped step over all local devices, and
      # runs that switch between them through a checkpoint (prefixes jit/,
      # pmap/, pmap_to_jit/, jit_to_pmap/)
  python tests/_parallel_worker.py process-sharded ADDRESS NUM_PROCESSES INDEX OUT.npz
      # like process, with the sharded-jit step over every process's devices

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


def _result(state, metrics):
  """The flat record of a run: final params and power, metrics per step."""
  out = _flat("param/", state.params)
  out.update(_flat("power/", state.power))
  out.update({f"metric/{k}": np.array([m[k] for m in metrics]) for k in metrics[0]})
  out["step"] = np.asarray(state.step)
  return out


def _steps():
  """The pmapped and the sharded-jit step of :func:`problem`, built once."""
  from lipjax import training
  model, _, opt, kwargs, _, _ = problem()
  return (training.make_parallel_train_step(model, opt, **kwargs),
          training.make_sharded_train_step(model, opt, **kwargs))


def _run_pmap(p_step, state, x, y, steps, metrics):
  """``steps`` pmapped steps from a host (unreplicated) state; returns a host state."""
  from lipjax import training
  state = training.replicate(state)
  xs, ys = training.shard_batch(x), training.shard_batch(y)
  for _ in range(steps):
    state, m = p_step(state, xs, ys)
    metrics.append(jax.device_get(training.unreplicate(m)))
  return jax.device_get(training.unreplicate(state))


def _run_jit(s_step, state, x, y, steps, metrics):
  """``steps`` sharded-jit steps from a host state; returns a host state."""
  from lipjax import training
  state = training.replicate_on_mesh(state, s_step.mesh)
  for _ in range(steps):
    state, m = s_step(state, x, y)
    metrics.append(training.fetch_replicated(m))
  return training.fetch_replicated(state)


def _through_checkpoint(state, directory):
  """Saves ``state`` and restores it into a fresh template, as a resumed run does."""
  from lipjax.training import checkpoints
  _, params, opt, _, _, _ = problem()
  with checkpoints.TrainCheckpointer(directory) as ckpt:
    ckpt.save(state, epoch=0, batch_index=int(state.step))
  with checkpoints.TrainCheckpointer(directory) as ckpt:
    restored, position = ckpt.restore_latest(_state(params, opt))
  assert position.batch_index == int(state.step)
  return restored


def sharded_devices_run(directory):
  """The sharded-jit and pmapped steps on the local devices, and switches between them."""
  from lipjax import training
  _, params, opt, _, x, y = problem()
  p_step, s_step = _steps()
  out = {}
  for name, run in (("jit", _run_jit), ("pmap", _run_pmap)):
    metrics = []
    state = run(p_step if name == "pmap" else s_step, _state(params, opt), x, y, STEPS,
                metrics)
    out.update({f"{name}/{k}": v for k, v in _result(state, metrics).items()})
  # Two steps on one path, a checkpoint, the rest on the other path.
  for name, first, then in (("pmap_to_jit", (_run_pmap, p_step), (_run_jit, s_step)),
                            ("jit_to_pmap", (_run_jit, s_step), (_run_pmap, p_step))):
    metrics = []
    state = first[0](first[1], _state(params, opt), x, y, STEPS - 1, metrics)
    state = _through_checkpoint(state, f"{directory}/{name}")
    state = then[0](then[1], state, x, y, 1, metrics)
    out.update({f"{name}/{k}": v for k, v in _result(state, metrics).items()})
  out["jit_compiles"] = np.array(s_step.jitted._cache_size())  # pylint: disable=protected-access
  out["local_devices"] = np.array(jax.local_device_count())
  try:
    s_step(training.replicate_on_mesh(_state(params, opt), s_step.mesh), x[:BATCH - 1],
           y[:BATCH - 1])
    out["odd_batch_error"] = np.array("")
  except ValueError as e:
    out["odd_batch_error"] = np.array(str(e))
  return out


def sharded_process_run(x, y):
  """The sharded-jit step over all processes; ``x``, ``y`` are this process's part."""
  _, params, opt, _, _, _ = problem()
  _, s_step = _steps()
  metrics = []
  state = _run_jit(s_step, _state(params, opt), x, y, STEPS, metrics)
  out = _result(state, metrics)
  out["devices"] = np.array(jax.device_count())
  out["local_devices"] = np.array(jax.local_device_count())
  out["mesh_devices"] = np.array(s_step.mesh.size)
  return out


def main(argv):
  mode = argv[1]
  if mode == "devices":
    _, _, _, _, x, y = problem()
    np.savez(argv[2], **parallel_run(x, y))
  elif mode == "sharded":
    np.savez(argv[2], **sharded_devices_run(argv[3]))
  elif mode in ("process", "process-sharded"):
    address, n, i, path = argv[2], int(argv[3]), int(argv[4]), argv[5]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, n, i)
    _, _, _, _, x, y = problem()
    part = BATCH // n
    run = parallel_run if mode == "process" else sharded_process_run
    out = run(x[i * part:(i + 1) * part], y[i * part:(i + 1) * part])
    np.savez(path, **out)
    jax.distributed.shutdown()
  else:
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
  main(sys.argv)
