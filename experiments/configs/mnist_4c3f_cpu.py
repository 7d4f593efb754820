r"""MNIST 4C3F clipped ReLU, GloRo loss: the paper's MNIST row on a CPU budget.

Everything of ``mnist_4c3f`` (model, clipped ReLU with theta 1.0, GloRo loss,
eps_train 1.75 / eps_test 1.58, 5 power iterations, batch 256, Adam 1e-3 to
5e-6) with the schedule compressed from 300 to 10 epochs of the same shape:
eps ramped over the first half (5 epochs), lr held to epoch 6 (the paper's
175 of 300, scaled) and then decayed geometrically to 5e-6 in the last epoch.

Run the local-bound model and its global-bound baseline (same seed)::

  python -m experiments.train --config=mnist_4c3f_cpu --config.bound=local --workdir=runs/m4cpu_local
  python -m experiments.train --config=mnist_4c3f_cpu --config.bound=global --workdir=runs/m4cpu_global

then evaluate each on the 10,000 test images::

  python -m experiments.certify --workdir=runs/m4cpu_local --eps=0.5,1.0,1.58 --cross_check

Measured on a 2-core CPU: global-bound run (best checkpoint = the last,
step 2,140) 89.30 % clean; certified at eps 1.58 on the 10,000 test images
36.92 % with the sound local bound, 36.86 % with the global bound; PGD
accuracy 48.8 % (first 1,000). The local-bound run takes about 100 min of
training on an idle machine (2.8 s per step). Details in the README section
"The paper's MNIST row on a CPU".
"""

from experiments.configs import mnist_4c3f


def get_config():
  c = mnist_4c3f.get_config()
  c.epochs = 10
  c.rampup_epochs = 5.0
  c.warmup_epochs = 0.0
  c.lr_hold_epochs = 6
  return c
