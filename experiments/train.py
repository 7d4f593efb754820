r"""Trains and certifies a model from a config file.

Usage::

  python -m experiments.train --config=experiments/configs/mnist_4c3f.py --workdir=runs/m4
  python -m experiments.train --config=demo --workdir=/tmp/demo --config.epochs=2

``--config`` takes a file in ``experiments/configs/`` or its bare name; every
field can be overridden with ``--config.FIELD=VALUE``. Running again with the
same ``--workdir`` resumes from its newest readable checkpoint. Writes
``workdir/config.json``, ``workdir/metrics.jsonl`` and ``workdir/checkpoints/``.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.configs import resolve_config_arg

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file or name",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "directory for config, metrics and checkpoints")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from experiments import train_lib   # after flag parsing: jax reads its flags at import
  train_lib.train_and_evaluate(_CONFIG.value, FLAGS.workdir)


if __name__ == "__main__":
  sys.argv[:] = resolve_config_arg(sys.argv)
  app.run(main)
