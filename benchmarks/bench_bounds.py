r"""Today's sound local bound against the per-class-pair bound, on trained checkpoints.

Run::

  python benchmarks/bench_bounds.py --workdir=runs/m4cpu_local --n=10000 --eps=0.5,1.0,1.58
  python benchmarks/bench_bounds.py --workdir=runs/m4cpu_global --n=1000 --tightness_n=200

For each ``--eps`` the checkpoint's test images are certified three times in
the same process: with the product of per-layer local norms alone
(``certify(..., pairwise=False, box_clip=False)``, the bound of the previous
release), with the per-class-pair bound of :mod:`lipjax.bounds.pairwise`
added (each pair's margin moves by at most ``eps`` times the smaller of the
two), and with the default certificate, which also bounds each margin's move
by the last layer's box-clipped translation. Printed per eps: certified
accuracy and the seconds of each call (both warm: the first call of each compiles and is
timed separately). On the first ``--tightness_n`` images, for the
runner-up class ``i`` of each correctly classified image (the pair the
certificate hinges on), the median and 10% quantile of

* bound / empirical lower bound, where the empirical lower bound is the
  largest ``||grad (z_i - z_y)||`` found at points of the ball (random points,
  and the end points of projected gradient ascent of the difference quotient
  of the margin over pairs of points),
* the product bound's pair constant ``prod_l s_l ||D (w_i - w_y)||`` against
  the same with the global norms (local / global).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lipjax  # noqa: E402  pylint: disable=wrong-import-position
from lipjax._src import lipschitz, margins, pairwise  # noqa: E402  pylint: disable=wrong-import-position
from lipjax._src import trace as trace_lib  # noqa: E402  pylint: disable=wrong-import-position
from lipjax._src.certify import abs_norm_bounds  # noqa: E402  pylint: disable=wrong-import-position

from bench_certify import _load, _machine  # noqa: E402  pylint: disable=wrong-import-position


#: The certificates compared: the previous release's product of per-layer
#: norms, with the per-class-pair bound, and the default (pairs and the last
#: layer's box-clipped translation).
VARIANTS = (("product", dict(pairwise=False, box_clip=False)),
            ("product + pairs", dict(box_clip=False)),
            ("default (pairs + box clip)", {}))


def _quantiles(a):
  a = np.asarray(a, np.float64)
  a = a[np.isfinite(a)]
  return (float(np.median(a)), float(np.quantile(a, 0.1))) if a.size else (np.nan, np.nan)


def _empirical_pair_lower(model, variables, x, eps, i, y, key, samples=16, steps=30):
  """``(B,)`` largest ``||grad (z_i - z_y)||`` found in the ball (a lower bound)."""
  def margin(p):
    z = model.apply(variables, p)
    return (jnp.take_along_axis(z, i[:, None], 1) - jnp.take_along_axis(z, y[:, None], 1))[:, 0]

  grad = jax.grad(lambda p: jnp.sum(margin(p)))

  def norm(g):
    return jnp.sqrt(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1))

  def project(p):
    d = p - x
    n = norm(d)
    s = jnp.minimum(1.0, eps * (1 - 1e-6) / jnp.maximum(n, 1e-30))
    return x + d * s.reshape((-1,) + (1,) * (x.ndim - 1))

  @jax.jit
  def run(key):
    best = norm(grad(x))
    k1, k2 = jax.random.split(key)
    for s in range(samples):   # random points of the ball
      d = jax.random.normal(jax.random.fold_in(k1, s), x.shape)
      r = jax.random.uniform(jax.random.fold_in(k2, s), (x.shape[0],)) * eps
      p = project(x + d * (r / jnp.maximum(norm(d), 1e-30)).reshape((-1,) + (1,) * (x.ndim - 1)))
      best = jnp.maximum(best, norm(grad(p)))
    # Ascent of the margin's difference quotient over pairs (a, b) of the ball.
    a = project(x + 0.5 * eps * jax.random.normal(k1, x.shape) / np.sqrt(x[0].size))
    b = project(a + 0.05 * eps * jax.random.normal(k2, x.shape) / np.sqrt(x[0].size))

    def quotient(a, b):
      return jnp.abs(margin(a) - margin(b)) / jnp.maximum(norm(a - b), 1e-12)

    qgrad = jax.grad(lambda a, b: jnp.sum(jnp.log(quotient(a, b) + 1e-30)), (0, 1))
    for t in range(steps):
      ga, gb = qgrad(a, b)
      step = 0.1 * eps * (1 - t / steps) + 0.002 * eps
      a = project(a + step * ga / jnp.maximum(norm(ga), 1e-30).reshape((-1,) + (1,) * (x.ndim - 1)))
      b = project(b + step * gb / jnp.maximum(norm(gb), 1e-30).reshape((-1,) + (1,) * (x.ndim - 1)))
      best = jnp.maximum(best, jnp.maximum(quotient(a, b), jnp.maximum(norm(grad(a)), norm(grad(b)))))
    return best

  return run(key)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--workdir", required=True, help="a training run (read only)")
  p.add_argument("--checkpoint", default="latest", choices=("best", "latest"))
  p.add_argument("--n", type=int, default=10000)
  p.add_argument("--eps", default="0.5,1.0,1.58")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--tightness_n", type=int, default=500)
  a = p.parse_args()
  model, variables, x, y, what = _load(a)
  eps_list = [float(e) for e in a.eps.split(",")]
  print(f"# bench_bounds: {what}", flush=True)
  print(f"# machine: {_machine()}", flush=True)
  rows = []
  for eps in eps_list:
    res = {}
    for label, kw in VARIANTS:
      lipjax.certify(model, variables, x[:a.batch], y[:a.batch], eps, batch_size=a.batch,
                     **kw)   # compile
      t = time.perf_counter()
      cert = jax.block_until_ready(lipjax.certify(model, variables, x, y, eps,
                                                  batch_size=a.batch, **kw))
      res[label] = (float(np.mean(np.asarray(cert.certified))), time.perf_counter() - t)
      print(f"# eps {eps}, {label}: certified {100 * res[label][0]:.2f}% in "
            f"{res[label][1]:.1f} s", flush=True)
    rows.append((eps, res))

  m = min(a.tightness_n, int(x.shape[0]))
  xs, ys = x[:m], y[:m]
  stages = trace_lib.trace(model, variables, tuple(x.shape[1:]))
  absn = abs_norm_bounds(stages)
  mat = stages[-1].layer.explicit_matrix(stages[-1].params)
  _, gn = lipjax.global_lipschitz_bound(model, variables, input_shape=x.shape[1:],
                                        per_layer=True)
  tight = []
  for eps in eps_list:
    ratio_old, ratio_new, loc_glob, new_old = [], [], [], []
    for s in range(0, m, a.batch):
      xb, yb = xs[s:s + a.batch], ys[s:s + a.batch]
      b = xb.shape[0]
      lb = lipjax.local_lipschitz_bound(model, variables, xb, eps)
      logits = lb.logits
      ok = np.asarray(jnp.argmax(logits, -1) == yb)
      runner = jnp.argmax(jnp.where(jax.nn.one_hot(yb, logits.shape[1]) > 0, -jnp.inf,
                                    logits), -1)
      inner = stages.product(list(lb.layer_norms[:-1]), logits=False)
      col = margins.last_layer_columns(stages, lb.layers, b)
      pn = margins.pair_norms(mat, col, yb)
      old = inner[:, None] * pn
      glob = stages.product(list(gn[:-1]), logits=False) * margins.pair_norms(
          mat, jnp.ones_like(col), yb)
      boxes, joins = lipschitz.ball_bounds(stages, xb, jnp.full((b,), eps), list(gn),
                                           with_joins=True)
      pair = pairwise.pair_bounds(stages, boxes, lb.layer_norms, yb, abs_norms=absn,
                                  norm_layers=lb.layers, global_norms=list(gn),
                                  joins=joins)
      new = old if pair is None else jnp.minimum(old, pair)
      pick = lambda t: np.asarray(jnp.take_along_axis(t, runner[:, None], 1)[:, 0])  # noqa: E731
      emp = np.asarray(_empirical_pair_lower(model, variables, xb, eps, runner, yb,
                                             jax.random.PRNGKey(s)))
      ratio_old += list((pick(old) / emp)[ok])
      ratio_new += list((pick(new) / emp)[ok])
      loc_glob += list((pick(new) / pick(glob))[ok])
      new_old += list((pick(new) / pick(old))[ok])
    tight.append((eps, _quantiles(ratio_old), _quantiles(ratio_new), _quantiles(loc_glob),
                  _quantiles(new_old)))
    print(f"# tightness at eps {eps} done", flush=True)

  print(f"\n### {what}\n")
  labels = [label for label, _ in VARIANTS]
  print("| eps | " + " | ".join(f"certified, {v}" for v in labels) + " | "
        + " | ".join(f"seconds, {v}" for v in labels) + " |")
  print("|---" * (1 + 2 * len(labels)) + "|")
  for eps, res in rows:
    print(f"| {eps:g} | " + " | ".join(f"{100 * res[v][0]:.2f}%" for v in labels) + " | "
          + " | ".join(f"{res[v][1]:.1f}" for v in labels) + " |")
  print(f"\nrunner-up pair of the first {m} images (correctly classified), median / q10:\n")
  print("| eps | product / empirical lower | new / empirical lower | new / global | "
        "new / product |")
  print("|---|---|---|---|---|")
  for eps, ro, rn, lg, no in tight:
    print(f"| {eps:g} | {ro[0]:.3f} / {ro[1]:.3f} | {rn[0]:.3f} / {rn[1]:.3f} | "
          f"{lg[0]:.3f} / {lg[1]:.3f} | {no[0]:.3f} / {no[1]:.3f} |")


if __name__ == "__main__":
  main()
