r"""MNIST 4C3F, GloRo loss: the short local-against-global protocol (a run in ~40 min).

Everything of ``mnist_4c3f_cpu`` (4C3F, clipped ReLU with theta 1.0, GloRo
loss, eps_train 1.75 / eps_test 1.58, batch 256, Adam 1e-3 to 5e-6, the
training estimator: 3 Lanczos steps per layer and example) on a 6-epoch
schedule: eps ramped over the first 2 epochs, 2 epochs at the full eps and
learning rate, then the learning rate decayed geometrically over the last 2.
Validation (5,000 images held out from the training set) every 2 epochs with
both sound bounds and the bound diagnostics on 256 of its images; the best
checkpoint is chosen with the bound the run trains with.

Both arms, same schedule and seeds, then the 10,000 test images certified
soundly at three radii::

  for seed in 1 2; do
    python -m experiments.train --config=mnist_4c3f_short --config.bound=local --config.seed=$seed --workdir=runs/m4s_local_s$seed
    python -m experiments.train --config=mnist_4c3f_short --config.bound=global --config.seed=$seed --workdir=runs/m4s_global_s$seed
  done
  for run in m4s_local_s1 m4s_local_s2 m4s_global_s1 m4s_global_s2; do
    python -m experiments.certify --workdir=runs/$run --eps=0.5,1.0,1.58 --bounds=local,global --pgd_examples=1000 --pgd_skip_certified --cross_check --tightness_examples=200
  done
  python -m experiments.compare --runs=local/s1=runs/m4s_local_s1,local/s2=runs/m4s_local_s2,global/s1=runs/m4s_global_s1,global/s2=runs/m4s_global_s2

The paper's sparsity loss on the local arm (seeds 1 and 2, mean: 90.29%
clean, 76.46 / 58.21 / 37.51% certified; docs/guides/reproducing.md)::

  for seed in 1 2; do
    python -m experiments.train --config=mnist_4c3f_short --config.bound=local --config.sparsity_weight=0.01 --config.seed=$seed --workdir=runs/m4s_local_sp01_s$seed
  done

On a 2-core CPU a local-bound run trains in about an hour and a
global-bound one in about 20 minutes (validation included). Expected (the
10,000 test images certified with the sound local bound at eps 0.5 / 1.0 /
1.58, mean over seeds 1 and 2): local-bound training 90.42% clean, 76.13 /
57.69 / 36.75% certified; global-bound training 90.23% clean, 76.23 / 57.91 /
37.11% (every run in docs/guides/reproducing.md).
"""

from experiments.configs import mnist_4c3f_cpu


def get_config():
  c = mnist_4c3f_cpu.get_config()
  c.epochs = 6
  c.rampup_epochs = 2.0
  c.warmup_epochs = 0.0
  c.lr_hold_epochs = 4
  c.val_every_epochs = 2
  c.diag_examples = 256
  return c
