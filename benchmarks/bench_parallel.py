r"""Data-parallel training throughput: pmap vs sharded jit, 1 vs 2 (forced) CPU devices.

Run::

  python benchmarks/bench_parallel.py --batch=256 --rounds=5 --steps=2

One Python process per device count ``D`` is started with
``XLA_FLAGS=--xla_force_host_platform_device_count=D``; each times, on the
4C3F MNIST shapes at a fixed global batch, the local-bound GloRo step (5 and 2
power iterations, constant final vectors) and the plain cross-entropy step,
on each path: ``single``, the jitted single-device step
(``make_train_step``, ``D = 1`` only: the reference of the speed-ups);
``pmap``, the pmapped step (``make_parallel_train_step``, ``B / D`` examples
per device); ``jit``, the step compiled with ``jax.jit`` over a mesh of the
``D`` devices (``make_sharded_train_step``, the batch split along its
``data`` axis). The processes take turns (round by round, row by row, path by
path, never two at once), so slow drifts of a shared machine's load hit every
cell alike. Prints the median time per step over all rounds as examples/s,
the speed-up over the single-device step, the ratio jit / pmap of the
throughputs on the same devices (> 1: jit is faster), how many cores each
process kept busy (CPU time / wall time: one device may already use every
core through XLA's intra-op threads, which caps the speed-up), and the load
average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = (("local bound, 5 iter, grad constant", dict(loss="gloro", bound="local", iterations=5)),
        ("local bound, 2 iter, grad constant", dict(loss="gloro", bound="local", iterations=2)),
        ("plain cross-entropy", dict(loss="ce")))
PATHS = ("single", "pmap", "jit")


def _worker(model_name, batch):
  """Serves ``ROW PATH STEPS`` requests on stdin with one JSON line of step times."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import lipjax
  from lipjax import training

  shape = (28, 28, 1)
  model = lipjax.models.get(model_name, input_shape=shape)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))["params"]
  rs = np.random.RandomState(1)
  x = rs.uniform(size=(batch,) + shape).astype(np.float32)
  y = (np.arange(batch) % 10).astype(np.int32)
  opt = optax.chain(optax.adam(1e-3), training.project_thresholds())
  n = jax.local_device_count()
  mesh = training.data_mesh()
  batches = {"single": (jnp.asarray(x), jnp.asarray(y)),
             "pmap": (_put(training.shard_batch(x)), _put(training.shard_batch(y))),
             "jit": (training.shard_batch_on_mesh(x, mesh),
                     training.shard_batch_on_mesh(y, mesh))}
  runners = {}

  def runner(row, path):
    if (row, path) not in runners:
      kw = dict(ROWS[row][1], grad="constant", eps_schedule=1.58, kappa_schedule=0.0)
      power = None
      if kw["loss"] != "ce":
        power = training.init_power_state(model, {"params": params}, shape,
                                          jax.random.PRNGKey(2))
      state = training.create_train_state(params, opt, rng=0, power=power)
      if path == "single":
        step = training.make_train_step(model, opt, **kw)
      elif path == "pmap":
        step = training.make_parallel_train_step(model, opt, **kw)
        state = training.replicate(state)
      else:
        step = training.make_sharded_train_step(model, opt, mesh=mesh, **kw)
        state = training.replicate_on_mesh(state, mesh)
      xs, ys = batches[path]
      holder = [state]

      def once():
        holder[0], m = step(holder[0], xs, ys)
        jax.block_until_ready(m)

      once()                                          # compile
      runners[row, path] = once
    return runners[row, path]

  print(json.dumps({"ready": n}), flush=True)
  for line in sys.stdin:
    row, path, steps = line.split()
    once = runner(int(row), path)
    steps = int(steps)
    times, cpu = [], []
    for _ in range(steps):
      t, c = time.perf_counter(), time.process_time()
      once()
      times.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
    print(json.dumps({"times": times, "cpu": cpu}), flush=True)


def _put(array):
  """Places a (D, ...) host array on the local devices, one slice each (pmap layout)."""
  import jax
  import numpy as np
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("d",))
  return jax.device_put(array, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))


def _load():
  return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="4c3f")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--rounds", type=int, default=5, help="turns per process and row")
  p.add_argument("--steps", type=int, default=2, help="timed steps per turn")
  p.add_argument("--devices", default="1,2")
  p.add_argument("--paths", default=",".join(PATHS),
                 help="comma-separated, of " + ", ".join(PATHS) + " (single: 1 device only)")
  p.add_argument("--rows", default=",".join(str(i) for i in range(len(ROWS))),
                 help="indices into the step kinds: " + "; ".join(
                     f"{i}: {label}" for i, (label, _) in enumerate(ROWS)))
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker:
    _worker(a.model, a.batch)
    return
  counts = [int(v) for v in a.devices.split(",")]
  paths = [v for v in a.paths.split(",") if v]
  rows = [int(v) for v in a.rows.split(",") if v]
  bad = [v for v in paths if v not in PATHS]
  if bad or not paths:
    raise SystemExit(f"--paths must name some of {', '.join(PATHS)}; got {a.paths!r}")
  if any(not 0 <= r < len(ROWS) for r in rows) or not rows:
    raise SystemExit(f"--rows must be indices 0..{len(ROWS) - 1}; got {a.rows!r}")
  cells = [(d, p) for d in counts for p in paths if p != "single" or d == 1]
  for d in counts:
    if a.batch % d:
      raise SystemExit(f"--batch {a.batch} is not divisible by {d} devices")
  workers = {}
  for d in counts:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    workers[d] = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", f"--model={a.model}",
         f"--batch={a.batch}"], env=env, cwd=ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
  try:
    for d, w in workers.items():
      assert json.loads(w.stdout.readline())["ready"] == d
    load_before = _load()
    times = {(d, p, r): [] for d, p in cells for r in rows}
    cores = {(d, p, r): [] for d, p in cells for r in rows}
    for rnd in range(a.rounds + 1):                  # round 0 compiles and warms up
      for r in rows:
        for d, path in cells:
          w = workers[d]
          w.stdin.write(f"{r} {path} {a.steps}\n")
          w.stdin.flush()
          reply = json.loads(w.stdout.readline())
          got = reply["times"]
          if rnd > 0:
            times[d, path, r] += got
            cores[d, path, r] += [c / t for c, t in zip(reply["cpu"], got)]
          print(f"  round {rnd} [{d} device(s), {path}] {ROWS[r][0]}: "
                + " ".join(f"{t:.2f}" for t in got) + " s", file=sys.stderr, flush=True)
  finally:
    for w in workers.values():
      w.stdin.close()
      w.wait(timeout=60)
  print(f"\n### {a.model}, global batch {a.batch}, CPU ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores); median of {a.rounds * a.steps} steps per cell, "
        f"interleaved")
  print(f"load average (1, 5, 15 min): {load_before} before timing, {_load()} after\n")
  print(_table(a.batch, counts, paths, rows, times, cores))
  print("\nex/s: global batch / median step time. × single: throughput over the "
        "single-device step (make_train_step on 1 device). jit / pmap: throughputs on the "
        "same devices. cores busy: process CPU time / wall time during the timed steps "
        "(median).")


def _table(batch, counts, paths, rows, times, cores):
  """The markdown table: one line per step kind and path."""
  def dev(d):
    return f"{d} device{'s' * (d > 1)}"

  def thr(d, p, r):
    return batch / statistics.median(times[d, p, r]) if (d, p, r) in times else None

  head = ["step", "path"] + [f"{dev(d)} ex/s" for d in counts]
  if "single" in paths and 1 in counts:
    head += [f"× single, {d} dev" for d in counts]
  if "pmap" in paths and "jit" in paths:
    head += [f"jit / pmap, {d} dev" for d in counts]
  head += [f"cores busy, {d} dev" for d in counts]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for r in rows:
    for p in paths:
      cells = [ROWS[r][0], p]
      cells += [f"{thr(d, p, r):.0f}" if thr(d, p, r) else "" for d in counts]
      if "single" in paths and 1 in counts:
        base = thr(1, "single", r)
        cells += [f"{thr(d, p, r) / base:.2f}" if thr(d, p, r) else "" for d in counts]
      if "pmap" in paths and "jit" in paths:
        cells += [f"{thr(d, 'jit', r) / thr(d, 'pmap', r):.2f}" if p == "jit" else ""
                  for d in counts]
      cells += [f"{statistics.median(cores[d, p, r]):.2f}" if (d, p, r) in cores else ""
                for d in counts]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
