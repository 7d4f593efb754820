r"""How tight are training-time local norms under each power-vector strategy?

Run::

  python benchmarks/bench_warm_start.py --model=4c3f --batch=128 --batches=6 --epochs=4

Trains the model (GloRo loss, local bound, lipjax's default step) on
``batches`` fixed MNIST batches for ``epochs`` passes, so every example is
seen again ``batches`` steps after its last visit, as in an epoch loop. At the
end it estimates the local bound of the first batch with ``k`` power
iterations (``k`` in ``--iterations``) under each start strategy:

* ``random``: fresh Gaussian vectors every step (no state at all);
* ``global`` (lipjax's default): the running global power vector of each layer
  (one ``(1, *in_shape)`` vector per layer, carried in the training state)
  times the example's column mask;
* ``per-example cache``: the example's own vectors from its previous visit
  (what the reference keeps on the host: one vector per layer per training
  example; here refreshed with ``k`` iterations after every training step).

Each estimate is divided by the converged value on the same masks (300
Lanczos steps, Ritz values). Prints the median and minimum ratio per strategy
(1.0 is tight; the estimates are from below), the state each strategy needs
for the 55,000 MNIST training examples, and the time per estimate.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lipjax
from lipjax import data, training
from lipjax._src import trace as trace_lib


def _estimate(model, variables, x, eps, k, state):
  res = lipjax.local_lipschitz_bound(model, variables, x, eps, mode="estimate",
                                     iterations=k, state=state, key=jax.random.PRNGKey(7))
  return res


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="4c3f")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--batches", type=int, default=6)
  p.add_argument("--epochs", type=int, default=4)
  p.add_argument("--eps", type=float, default=1.58)
  p.add_argument("--iterations", default="1,2,5")
  p.add_argument("--train_examples", type=int, default=55000,
                 help="dataset size for the state-size column")
  a = p.parse_args()
  ks = [int(k) for k in a.iterations.split(",")]
  ds = data.load("mnist", f"train[:{a.batch * a.batches}]")
  shape = ds.image_shape
  xs = jnp.asarray(ds.images).reshape((a.batches, a.batch) + shape)
  ys = jnp.asarray(ds.labels).reshape(a.batches, a.batch)
  model = lipjax.models.get(a.model, input_shape=shape)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
  opt = optax.chain(optax.adam(1e-3), training.project_thresholds())
  power = training.init_power_state(model, variables, shape, jax.random.PRNGKey(1))
  state = training.create_train_state(variables["params"], opt, rng=0, power=power)
  step = training.make_train_step(model, opt, loss="gloro", bound="local", iterations=max(ks),
                                  eps_schedule=a.eps, kappa_schedule=0.0)
  # Per-example caches, one per k, refreshed after each visit of a batch.
  cache = {k: [None] * a.batches for k in ks}
  t0 = time.perf_counter()
  for epoch in range(a.epochs):
    for i in range(a.batches):
      state, _ = step(state, xs[i], ys[i])
      v = {"params": state.params}
      for k in ks:
        cache[k][i] = _estimate(model, v, xs[i], a.eps, k, cache[k][i]).state
  train_s = time.perf_counter() - t0
  v = {"params": state.params}
  x0 = xs[0]
  conv = lipjax.local_lipschitz_bound(model, v, x0, a.eps, mode="sound",
                                      intermediate="global", dense="lanczos",
                                      lanczos_steps=300)
  stages = trace_lib.trace(model, v, shape)
  gvecs = state.power.vectors
  print(f"{a.model}, MNIST, batch {a.batch}, {a.batches} batches x {a.epochs} epochs "
        f"({a.batches * a.epochs} steps, {train_s:.0f}s); eps {a.eps}; "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}")
  per_example = sum(math.prod(st.in_shape) for st in stages) * 4 * a.train_examples
  global_bytes = sum(math.prod(st.in_shape) for st in stages) * 4
  print("\n| start strategy | iterations | median estimate / converged | min | "
        "state for the training set | s per estimate |")
  print("|---|---|---|---|---|---|")
  for k in ks:
    starts = {
        "random": None,
        "global (default)": lipjax.PowerState(tuple(
            jnp.broadcast_to(g, (a.batch,) + g.shape[1:]) for g in gvecs)),
        "per-example cache": cache[k][0],
    }
    sizes = {"random": "0", "global (default)": f"{global_bytes / 2**20:.2f} MiB",
             "per-example cache": f"{per_example / 2**30:.1f} GiB"}
    for name, st0 in starts.items():
      res = _estimate(model, v, x0, a.eps, k, st0)
      jax.block_until_ready(res.bound)
      times = []
      for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(_estimate(model, v, x0, a.eps, k, st0).bound)
        times.append(time.perf_counter() - t)
      r = np.asarray(res.bound) / np.asarray(conv.estimate)
      print(f"| {name} | {k} | {np.median(r):.3f} | {np.min(r):.3f} | {sizes[name]} | "
            f"{statistics.median(times):.2f} |", flush=True)


if __name__ == "__main__":
  main()
