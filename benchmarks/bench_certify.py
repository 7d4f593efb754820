r"""Times sound certification (``lipjax.certify``) on MNIST test images.

Run::

  python benchmarks/bench_certify.py --model=4c3f --num=1024 --compare_num=512
  python benchmarks/bench_certify.py --model=liresnet --num=256 --compare_num=128
  python benchmarks/bench_certify.py --workdir=runs/m4 --num=10000 --compare_num=1024

Certifies the first ``--num`` test images at ``--eps`` with the exact global
bound and with the sound local bound (the default ``certify``, which triages
first), and the first ``--compare_num`` of them also with ``triage=False``
(the sound local bound on every image: the baseline the triage is measured
against, in the same process). Prints seconds (including compilation),
images/s, the certified fraction, the fraction of images that reached the
sound local bound, and the speed-up of the triage. ``--workdir`` certifies a
trained run's best checkpoint (``experiments.train``); without it, a randomly
initialised model.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import lipjax
from lipjax import data


def _load(args):
  if not args.workdir:
    model = lipjax.models.get(args.model, input_shape=(28, 28, 1))   # e.g. 4c3f, liresnet
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
    return model, variables, f"{args.model}, random init"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments import train_lib   # pylint: disable=import-outside-toplevel
  from lipjax.training import checkpoints   # pylint: disable=import-outside-toplevel
  cfg = checkpoints.load_config(args.workdir)
  model = train_lib.build_model(cfg, (28, 28, 1))
  variables, step = checkpoints.restore_variables(args.workdir, "best")
  return model, variables, f"{cfg['model']} trained {step} steps ({args.workdir})"


def _run(model, variables, x, y, eps, **kw):
  t = time.perf_counter()
  cert = lipjax.certify(model, variables, x, y, eps, **kw)
  jax.block_until_ready(cert.certified)
  return cert, time.perf_counter() - t


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="4c3f")
  p.add_argument("--workdir", default="", help="a training run to certify (best checkpoint)")
  p.add_argument("--num", type=int, default=10000)
  p.add_argument("--compare_num", type=int, default=512,
                 help="images also certified with triage=False (0: skip)")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--eps", type=float, default=1.58)
  p.add_argument("--lanczos_steps", type=int, default=100)
  a = p.parse_args()
  model, variables, what = _load(a)
  ds = data.load("mnist", f"test[:{a.num}]")
  x, y = jnp.asarray(ds.images), jnp.asarray(ds.labels)
  print(f"{what}; eps {a.eps}; batch {a.batch}; {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}", flush=True)
  rows = []
  glob, sec = _run(model, variables, x, y, a.eps, bound="global", batch_size=a.batch)
  rows.append(("global (exact)", len(y), sec, glob))
  loc, sec = _run(model, variables, x, y, a.eps, batch_size=a.batch,
                  lanczos_steps=a.lanczos_steps)
  rows.append(("local, triage (default)", len(y), sec, loc))
  if a.compare_num:
    m = min(a.compare_num, len(y))
    full, sec_full = _run(model, variables, x[:m], y[:m], a.eps, batch_size=a.batch,
                          lanczos_steps=a.lanczos_steps, triage=False)
    tri, sec_tri = _run(model, variables, x[:m], y[:m], a.eps, batch_size=a.batch,
                        lanczos_steps=a.lanczos_steps)
    rows.append(("local, no triage", m, sec_full, full))
    rows.append(("local, triage (same images)", m, sec_tri, tri))
    same = bool(np.array_equal(np.asarray(full.certified), np.asarray(tri.certified)))
  print("\n| bound | images | seconds (incl. compile) | images/s | certified | "
        "reached sound local bound |")
  print("|---|---|---|---|---|---|")
  for label, n, sec, c in rows:
    print(f"| {label} | {n} | {sec:.1f} | {n / sec:.1f} | "
          f"{100 * float(jnp.mean(c.certified)):.1f}% | {100 * float(jnp.mean(c.local)):.1f}% |")
  if a.compare_num:
    print(f"\ntriage speed-up on the first {m} images: {sec_full / sec_tri:.2f}x; "
          f"same certified set as without triage: {same}")
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
  print(f"peak resident memory: {rss:.2f} GiB", flush=True)


if __name__ == "__main__":
  main()
