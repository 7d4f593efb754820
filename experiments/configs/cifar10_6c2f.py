r"""CIFAR-10 6C2F clipped ReLU (theta 2.0), BCP loss, local bound.

Run::

  python -m experiments.train --config=experiments/configs/cifar10_6c2f.py --workdir=runs/c10_6c2f

(``--config.loss=gloro`` for the GloRo variant.) 800 epochs at batch 256, 2 Lanczos
steps (the paper: power iterations), 20 warm-up epochs, eps ramped to 0.1551 over 400 epochs, crop + flip.
Expected (Local-Lip paper, Table 1): about 70.7% clean and 54.3% certified accuracy
at eps = 36/255 (GloRo loss: 76.4% / 51.3%).
"""

from experiments.configs import base


def get_config():
  c = base.cifar10_config("6c2f")
  c.init = 2.0
  return c
