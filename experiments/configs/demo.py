r"""CPU demo: 2C2F clipped-ReLU on MNIST, 400 GloRo steps, local bound.

Run (trains 400 steps and certifies the full MNIST test set at eps = 0.5, about
a minute on a 2-core CPU; ``python -m experiments.demo`` runs it twice, once
per bound, in about 1.5 minutes: see "The demo" in docs/getting_started.md)::

  python -m experiments.train --config=experiments/configs/demo.py --workdir=/tmp/demo

Expected: clean accuracy about 89% and certified accuracy about 70% at
eps = 0.5 (the global-bound baseline: about 66%). ``python -m experiments.demo``
runs it with ``bound=local`` and ``bound=global`` side by side.
"""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.model = "2c2f"
  c.dataset = "mnist"
  c.train_examples = 51200          # 400 batches of 128; 5000 more are held out
  c.batch_size = 128
  c.epochs = 1
  c.rampup_epochs = 0.5             # eps reaches eps_train after 200 steps
  c.eps_train = 1.0
  c.eps_test = 0.5
  c.lr = 1e-3
  c.end_lr = 1e-3
  c.certify_batch_size = 500
  c.checkpoint_every_steps = 200
  c.diag_examples = 128
  return c
