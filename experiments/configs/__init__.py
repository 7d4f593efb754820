"""Training configs, one per training run of the paper, plus the CPU demo.

Each module has ``get_config() -> ml_collections.ConfigDict``; pass its path to
``python -m experiments.train --config=experiments/configs/NAME.py`` (or just
``--config=NAME``) and override any field with ``--config.FIELD=VALUE``.
"""

import os
import sys

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


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
