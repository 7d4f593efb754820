"""Training configs, one per training run of the paper, plus the CPU demo.

Each module has ``get_config() -> ml_collections.ConfigDict``; pass its path to
``python -m experiments.train --config=experiments/configs/NAME.py`` (or just
``--config=NAME`` / ``--config NAME``) and override any field with
``--config.FIELD=VALUE``.
"""

import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def resolve_config_arg(argv):
  """Maps ``--config=NAME`` / ``--config NAME`` to ``experiments/configs/NAME.py``.

  Also checks that the config file loads and that every ``--config.FIELD``
  names a field; raises :class:`experiments.cli.InputError` (one line)
  otherwise. See :func:`experiments.cli.resolve_config_args`.
  """
  from experiments import cli   # pylint: disable=import-outside-toplevel
  # Every element is an argument (a program name passes through unchanged).
  return cli.resolve_config_args([""] + list(argv), required=False)[1:]
