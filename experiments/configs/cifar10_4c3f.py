r"""CIFAR-10 4C3F clipped ReLU (theta 1.0), BCP loss, local bound.

Run::

  python -m experiments.train --config=experiments/configs/cifar10_4c3f.py --workdir=runs/c10_4c3f

800 epochs at batch 256 with 2 Lanczos steps of the training estimator per step (the paper: 2 power
iterations), 20 clean warm-up epochs,
eps ramped to 0.1551 over 400 epochs, random crop + flip.
Expected (Local-Lip paper, Table 1): about 70.1% clean and 53.5% certified accuracy
at eps = 36/255.
"""

from experiments.configs import base


def get_config():
  c = base.cifar10_config("4c3f")
  c.init = 1.0
  return c
