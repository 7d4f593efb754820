r"""Trains and certifies a model from a config file.

Usage::

  python -m experiments.train --config=experiments/configs/mnist_4c3f.py --workdir=runs/m4
  python -m experiments.train --config demo --workdir=/tmp/demo --config.epochs=2

``--config`` takes a file in ``experiments/configs/`` or its bare name; every
field can be overridden with ``--config.FIELD=VALUE``. Running again with the
same ``--workdir`` and the same config resumes from its newest readable
checkpoint; a different config for an existing run is refused (see
:func:`experiments.train_lib.check_workdir`). Writes ``workdir/config.json``,
``workdir/metrics.jsonl``, ``workdir/checkpoints/`` and ``workdir/tensorboard/``.

Bad input (an unknown config or field, an invalid value, a workdir that is a
file or holds another run, a data directory without the data) ends the
program with exit code 1 and one line on stderr, before data is loaded and
before anything is written.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file or name",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "directory for config, metrics and checkpoints")


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not FLAGS.workdir:
    raise cli.InputError("--workdir is required: the run's directory (new, or an existing "
                         "run to resume)")
  from experiments import train_lib   # after flag parsing: jax reads its flags at import
  # Checks the config, the workdir and the data directory before loading data.
  train_lib.train_and_evaluate(_CONFIG.value, FLAGS.workdir)


if __name__ == "__main__":
  app.run(cli.main_wrapper("train", main),
          flags_parser=cli.flags_parser("train", config_holders=[_CONFIG]))
