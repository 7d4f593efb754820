r"""CIFAR-10 6C2F clipped MaxMin, BCP loss, local bound.

Run::

  python -m experiments.train --config=experiments/configs/cifar10_6c2f_maxmin.py --workdir=runs/c10_maxmin

Thresholds start at the zoo default (convs +-0.1 ... +-0.3, dense +-1.2); 800 epochs
at batch 256, 2 Lanczos steps (the paper: power iterations), 20 warm-up epochs, eps ramped to 0.1551 over 400
epochs, crop + flip.
Expected (Local-Lip paper, Table 1): about 77.4% clean and 60.7% certified accuracy
at eps = 36/255.
"""

from experiments.configs import base


def get_config():
  c = base.cifar10_config("6c2f")
  c.activation = "clipped_maxmin"
  c.init = -1.0                     # the zoo's per-layer MaxMin defaults
  return c
