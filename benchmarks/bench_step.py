r"""Times certified training steps against a plain cross-entropy step.

Run::

  python benchmarks/bench_step.py --models=4c3f,6c2f --batch=256 --repeats=5
  python benchmarks/bench_step.py --models=4c3f,flax-4c3f --no_tightness
  python benchmarks/bench_step.py --models=liresnet     # LiResNet-style zoo model (defaults)
  python benchmarks/bench_step.py --models=4c3f --iterations=3,5 --grads=constant \
      --estimators=power,lanczos --no_tightness        # the training estimators
  python benchmarks/bench_step.py --models=4c3f --iterations=3 --grads=constant \
      --estimators=lanczos --variants=sparsity,box_clip,radius_grad --no_tightness

A ``flax-`` prefix times the same architecture written in plain Flax
(``flax.linen.Conv`` / ``Dense`` and ``jnp.clip`` with a learnable threshold),
which lipjax reads by tracing it; an ``nnx-`` prefix the same in Flax NNX
(``nnx.Conv`` / ``nnx.Linear`` and ``jnp.clip``)::

  python benchmarks/bench_step.py --models=4c3f,nnx-4c3f --no_tightness

Prints, per model, the median time of: a plain forward+backward step (the
baseline), a global-bound GloRo step, and local-bound GloRo steps at 1, 2 and 5
power iterations with the final vectors constant or back-propagated through,
each with its ratio to the baseline measured in the same process; the peak
resident memory; and how close 1, 2, 5 warm-started iterations come to the
converged (500-iteration) local norms.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

from flax import nnx
import flax.linen as fnn
import jax
import jax.numpy as jnp
import optax

import lipjax
from lipjax import models, training

SHAPES = {"4c3f": (28, 28, 1), "6c2f": (32, 32, 3), "2c2f": (28, 28, 1),
          "liresnet": (32, 32, 3)}


class _Clip(fnn.Module):
  """``jnp.clip(z, 0, theta)`` with a learnable per-neuron ``theta``."""

  @fnn.compact
  def __call__(self, z):
    theta = self.param("theta", fnn.initializers.constant(1.0), z.shape[1:])
    return jnp.clip(z, 0.0, theta)


class FlaxZoo(fnn.Module):
  """A zoo architecture written in plain Flax."""

  arch: str
  num_classes: int = 10

  @fnn.compact
  def __call__(self, x):
    spec = models.architecture(self.arch)
    for f, k, s, p in spec["convs"]:
      x = _Clip()(fnn.Conv(f, (k, k), strides=s, padding=p)(x))
    x = x.reshape((x.shape[0], -1))
    for w in spec["dense"]:
      x = _Clip()(fnn.Dense(w)(x))
    return fnn.Dense(self.num_classes)(x)


class _NnxClip(nnx.Module):
  """``jnp.clip(z, 0, theta)`` with a learnable per-neuron ``theta``."""

  def __init__(self, shape):
    self.theta = nnx.Param(jnp.ones(shape, jnp.float32))

  def __call__(self, z):
    return jnp.clip(z, 0.0, self.theta[...])


class NnxZoo(nnx.Module):
  """A zoo architecture written in Flax NNX."""

  def __init__(self, arch, rngs, num_classes=10):
    spec = models.architecture(arch)
    h, w, c = spec["input_shape"]
    self.convs, self.clips = nnx.List(), nnx.List()
    for f, k, s, p in spec["convs"]:
      self.convs.append(nnx.Conv(c, f, (k, k), strides=s, padding=p, rngs=rngs))
      h, w, c = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1, f
      self.clips.append(_NnxClip((h, w, c)))
    n = h * w * c
    self.dense, self.dense_clips = nnx.List(), nnx.List()
    for width in spec["dense"]:
      self.dense.append(nnx.Linear(n, width, rngs=rngs))
      self.dense_clips.append(_NnxClip((width,)))
      n = width
    self.head = nnx.Linear(n, num_classes, rngs=rngs)

  def __call__(self, x):
    for conv, clip in zip(self.convs, self.clips):
      x = clip(conv(x))
    x = x.reshape((x.shape[0], -1))
    for dense, clip in zip(self.dense, self.dense_clips):
      x = clip(dense(x))
    return self.head(x)


def _model(name):
  if name.startswith("flax-"):
    return FlaxZoo(name[len("flax-"):]), SHAPES[name[len("flax-"):]]
  if name.startswith("nnx-"):
    arch = name[len("nnx-"):]
    return models.from_nnx(NnxZoo(arch, nnx.Rngs(0))), SHAPES[arch]
  shape = SHAPES[name]
  return lipjax.models.get(name, input_shape=shape), shape


def _time(fn, repeats):
  fn()   # compile
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return statistics.median(out)


#: Training options of the local Lanczos step that ``--variants`` times:
#: label -> (step keyword arguments, extra estimator options).
VARIANTS = {
    "sparsity": ({"sparsity_weight": 0.01}, {}),
    "box_clip": ({}, {"box_clip": True}),
    "radius_grad": ({}, {"radius_grad": True}),
}


def bench_model(name, batch, repeats, iterations, timing=True, grads=("constant", "through"),
                tightness=True, estimators=("power",), pairs=False, variants=()):
  model, shape = _model(name)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
  x = jax.random.uniform(jax.random.PRNGKey(1), (batch,) + shape)
  y = jnp.arange(batch) % 10
  eps = 1.58 if shape[0] == 28 else 0.1551
  opt = optax.chain(optax.adam(1e-3), training.project_thresholds())
  rows = []

  def run(label, **kw):
    step = training.make_train_step(model, opt, eps_schedule=eps, kappa_schedule=0.0, **kw)
    # The running global power vectors a training run carries (as the launcher does).
    power = None if kw.get("loss") == "ce" else training.init_power_state(
        model, variables, shape, jax.random.PRNGKey(2))
    holder = [training.create_train_state(variables["params"], opt, rng=0, power=power)]

    def once():
      holder[0], m = step(holder[0], x, y)
      jax.block_until_ready(m)

    rows.append((label, _time(once, repeats)))
    print(f"  {label}: {rows[-1][1]:.3f} s", flush=True)

  if timing:
    run("plain cross-entropy", loss="ce")
    run("global bound (GloRo)", loss="gloro", bound="global")
    if "lanczos" in estimators:
      run("global bound (GloRo), Lanczos", loss="gloro", bound="global",
          bound_options={"estimator": "lanczos"})
    for est in estimators:
      for k in iterations:
        for grad in grads:
          if est == "lanczos" and grad != "constant":
            continue   # the Lanczos estimator differentiates the final application only
          label = (f"local, {k} iter, grad {grad}" if est == "power"
                   else f"local, Lanczos {k} steps")
          run(label, loss="gloro", bound="local", iterations=k, grad=grad,
              bound_options={"estimator": est})
          if pairs and est == "lanczos":
            run(label + ", pair bounds", loss="gloro", bound="local", iterations=k,
                grad=grad, bound_options={"estimator": est, "pair": True})
          for variant in variants if est == "lanczos" else ():
            step_kw, options = VARIANTS[variant]
            run(f"{label}, {variant}", loss="gloro", bound="local", iterations=k, grad=grad,
                bound_options={"estimator": est, **options}, **step_kw)
    base = rows[0][1]
    print(f"\n### {name}, batch {batch}, {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), "
          f"{platform.processor() or platform.machine()}")
    print("| step | median s | × plain |\n|---|---|---|")
    for label, sec in rows:
      print(f"| {label} | {sec:.3f} | {sec / base:.2f} |")

  if not tightness:
    return
  # Tightness of warm-started estimates vs converged norms: 100 Lanczos steps
  # on the same masks give (converged) Ritz values.
  conv = lipjax.local_lipschitz_bound(model, variables, x, eps, mode="sound",
                                      intermediate="global", dense="lanczos",
                                      lanczos_steps=100)
  print("\n| iterations | median estimate / converged | min |\n|---|---|---|")
  state = None
  for k in (1, 2, 5):
    # warm start: previous call's vectors (one step of "training" later).
    first = lipjax.local_lipschitz_bound(model, variables, x, eps, mode="estimate",
                                         iterations=k, key=jax.random.PRNGKey(3))
    state = first.state
    warm = lipjax.local_lipschitz_bound(model, variables, x, eps, mode="estimate",
                                        iterations=k, state=state)
    r = warm.bound / conv.estimate
    print(f"| {k} (warm) | {float(jnp.median(r)):.4f} | {float(jnp.min(r)):.4f} |")
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
  print(f"\npeak resident memory so far: {rss:.2f} GiB\n", flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="4c3f,6c2f")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--iterations", default="1,2,5")
  p.add_argument("--no_timing", action="store_true", help="tightness table only")
  p.add_argument("--grads", default="constant,through", help="gradient options to time")
  p.add_argument("--no_tightness", action="store_true", help="timing table only")
  p.add_argument("--pair_bounds", action="store_true",
                 help="also time the local step with the per-class-pair bound in the loss")
  p.add_argument("--estimators", default="power",
                 help="training estimators to time: power, lanczos (comma-separated)")
  p.add_argument("--variants", default="",
                 help="also time the local Lanczos step with these training options: "
                      + ", ".join(VARIANTS) + " (comma-separated; sparsity at weight 0.01)")
  a = p.parse_args()
  variants = [v for v in a.variants.split(",") if v]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    p.error(f"unknown --variants {unknown}; choose from {sorted(VARIANTS)}")
  for name in a.models.split(","):
    bench_model(name, a.batch, a.repeats, [int(k) for k in a.iterations.split(",")],
                timing=not a.no_timing, grads=a.grads.split(","),
                tightness=not a.no_tightness, estimators=a.estimators.split(","),
                pairs=a.pair_bounds, variants=variants)


if __name__ == "__main__":
  main()
