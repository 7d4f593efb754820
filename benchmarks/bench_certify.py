r"""Times sound certification (``lipjax.certify``) on MNIST test images.

Run::

  python benchmarks/bench_certify.py --model=4c3f --num=10000 --batch=256

Prints images/s and the total time for the local (sound) and global bounds,
plus the fraction certified, for a randomly initialised model (the workload
does not depend on training: the Lanczos step count is fixed).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import lipjax
from lipjax import data


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="4c3f")
  p.add_argument("--num", type=int, default=10000)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--eps", type=float, default=1.58)
  p.add_argument("--lanczos_steps", type=int, default=100)
  a = p.parse_args()
  ds = data.load("mnist", f"test[:{a.num}]")
  model = lipjax.models.get(a.model)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  x, y = jnp.asarray(ds.images), jnp.asarray(ds.labels)
  print(f"| bound | images | seconds (incl. compile) | images/s | certified |")
  print("|---|---|---|---|---|")
  for bound in ("global", "local"):
    kw = {"lanczos_steps": a.lanczos_steps} if bound == "local" else {}
    t = time.perf_counter()
    cert = lipjax.certify(model, variables, x, y, a.eps, bound=bound,
                          batch_size=a.batch, **kw)
    jax.block_until_ready(cert.certified)
    sec = time.perf_counter() - t
    print(f"| {bound} | {len(y)} | {sec:.1f} | {len(y) / sec:.1f} | "
          f"{float(jnp.mean(cert.certified)):.3f} |", flush=True)


if __name__ == "__main__":
  main()
