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

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def resolve_config_arg(argv):
  """Maps ``--config=NAME`` (no path, no .py) to ``experiments/configs/NAME.py``."""
  out = []
  for arg in argv:
    if arg.startswith("--config=") and not arg.startswith("--config=."):
      value = arg[len("--config="):]
      name, _, rest = value.partition(":")
      if os.sep not in name and not name.endswith(".py"):
        path = os.path.join(CONFIG_DIR, name + ".py")
        if not os.path.isfile(path):
          names = sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                         if f.endswith(".py") and not f.startswith("_") and f != "base.py")
          sys.exit(f"unknown config {name!r}; available: {', '.join(names)}")
        arg = "--config=" + path + (":" + rest if rest else "")
    out.append(arg)
  return out


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
