r"""Data-parallel training throughput: 1 vs 2 (forced) CPU devices.

Run::

  python benchmarks/bench_parallel.py --batch=256 --rounds=5 --steps=2

One Python process per device count ``D`` is started with
``XLA_FLAGS=--xla_force_host_platform_device_count=D``; each times, on the
4C3F MNIST shapes at a fixed global batch, the local-bound GloRo step (5 and 2
power iterations, constant final vectors) and the plain cross-entropy step:
the jitted single-device step for ``D = 1``, the pmapped step
(``make_parallel_train_step``, ``B / D`` examples per device) otherwise.
The processes take turns (round by round, row by row, never two at once), so
slow drifts of a shared machine's load hit every column alike. Prints the
median time per step over all rounds as examples/s, the speed-up over one
device, how many cores each process kept busy (CPU time / wall time: one
device may already use every core through XLA's intra-op threads, which caps
the speed-up), and the load average before and after.
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


def _worker(model_name, batch):
  """Serves ``ROW STEPS`` requests on stdin with one JSON line of step times."""
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
  if n == 1:
    xs, ys = jnp.asarray(x), jnp.asarray(y)
  else:
    xs, ys = _put(training.shard_batch(x)), _put(training.shard_batch(y))
  runners = {}

  def runner(row):
    if row not in runners:
      kw = dict(ROWS[row][1], grad="constant", eps_schedule=1.58, kappa_schedule=0.0)
      power = None
      if kw["loss"] != "ce":
        power = training.init_power_state(model, {"params": params}, shape,
                                          jax.random.PRNGKey(2))
      state = training.create_train_state(params, opt, rng=0, power=power)
      if n == 1:
        step = training.make_train_step(model, opt, **kw)
      else:
        step = training.make_parallel_train_step(model, opt, **kw)
        state = training.replicate(state)
      holder = [state]

      def once():
        holder[0], m = step(holder[0], xs, ys)
        jax.block_until_ready(m)

      once()                                          # compile
      runners[row] = once
    return runners[row]

  print(json.dumps({"ready": n}), flush=True)
  for line in sys.stdin:
    row, steps = (int(v) for v in line.split())
    once = runner(row)
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
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker:
    _worker(a.model, a.batch)
    return
  counts = [int(v) for v in a.devices.split(",")]
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
    times = {(d, r): [] for d in counts for r in range(len(ROWS))}
    cores = {(d, r): [] for d in counts for r in range(len(ROWS))}
    for rnd in range(a.rounds + 1):                  # round 0 compiles and warms up
      for r in range(len(ROWS)):
        for d in counts:
          w = workers[d]
          w.stdin.write(f"{r} {a.steps}\n")
          w.stdin.flush()
          reply = json.loads(w.stdout.readline())
          got = reply["times"]
          if rnd > 0:
            times[d, r] += got
            cores[d, r] += [c / t for c, t in zip(reply["cpu"], got)]
          print(f"  round {rnd} [{d} device(s)] {ROWS[r][0]}: "
                + " ".join(f"{t:.2f}" for t in got) + " s", file=sys.stderr, flush=True)
  finally:
    for w in workers.values():
      w.stdin.close()
      w.wait(timeout=60)
  print(f"\n### {a.model}, global batch {a.batch}, CPU ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores); median of {a.rounds * a.steps} steps per cell, "
        f"interleaved")
  print(f"load average (1, 5, 15 min): {load_before} before timing, {_load()} after\n")
  head = " | ".join(f"{d} device{'s' * (d > 1)} ex/s" for d in counts)
  ups = " | ".join(f"× {d} dev" for d in counts[1:])
  busy = " | ".join(f"cores busy, {d} dev" for d in counts)
  print(f"| step | {head} | {ups} | {busy} |")
  print("|---" * (3 * len(counts)) + "|")
  for r, (label, _) in enumerate(ROWS):
    thr = [a.batch / statistics.median(times[d, r]) for d in counts]
    ratio = " | ".join(f"{t / thr[0]:.2f}" for t in thr[1:])
    use = " | ".join(f"{statistics.median(cores[d, r]):.2f}" for d in counts)
    print(f"| {label} | " + " | ".join(f"{t:.0f}" for t in thr) + f" | {ratio} | {use} |")
  print("\ncores busy: process CPU time / wall time during the timed steps (median).")


if __name__ == "__main__":
  main()
