r"""CIFAR-10 4C3F clipped ReLU (theta 1.0), BCP loss, local bound.

Run::

  python -m experiments.train --config=experiments/configs/cifar10_4c3f.py --workdir=runs/c10_4c3f

800 epochs at batch 256 with 2 power iterations per step, 20 clean warm-up epochs,
eps ramped to 0.1551 over 400 epochs, random crop + flip.
Expected (Local-Lip paper, Table 1): about 70.1% clean and 53.5% certified accuracy
at eps = 36/255.
"""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.model = "4c3f"
  c.dataset = "cifar10"
  c.augment = True
  c.loss = "bcp"
  c.iterations = 2
  c.init = 1.0
  c.eps_train = 0.1551
  c.eps_test = 36 / 255
  c.epochs = 800
  c.warmup_epochs = 20.0
  c.rampup_epochs = 400.0
  c.lr = 1e-3
  c.end_lr = 1e-6
  return c
