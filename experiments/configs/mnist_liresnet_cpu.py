r"""MNIST LiResNet-style network on the CPU budget of ``mnist_4c3f_cpu``.

The residual counterpart of ``mnist_4c3f_cpu``: the same loss, eps, power
iterations, batch, optimiser and 10-epoch schedule (eps ramped over 5 epochs,
lr held to epoch 6 then decayed to 5e-6), with the LiResNet-style zoo model of
``mnist_liresnet`` (conv stem, ``act(h + conv(h))`` blocks, strided conv,
dense neck, linear head) instead of 4C3F, at width 16 instead of 32 (4 blocks,
neck 256): at width 32 a local-bound step at batch 256 takes about 14 s on a
2-core CPU, at width 16 about 5 s, near the 4C3F step (about 3 s).

Run the local-bound model and its global-bound baseline (same seed)::

  python -m experiments.train --config=mnist_liresnet_cpu --config.bound=local --workdir=runs/mliresnet_local
  python -m experiments.train --config=mnist_liresnet_cpu --config.bound=global --workdir=runs/mliresnet_global

then evaluate each on the 10,000 test images::

  python -m experiments.certify --workdir=runs/mliresnet_local --checkpoint=latest --eps=0.5,1.0,1.58 --pgd_restarts=3 --pgd_examples=1000 --pgd_skip_certified --cross_check

Measured on a 2-core CPU (step 2,140 for both), clean / PGD (first 1,000) /
certified with the sound local bound at eps 1.58: local-bound run 90.1 / 51.9
/ 6.8 %, global-bound run 89.2 / 49.4 / 10.3 % (at eps 0.5: 62.3 against
62.1 % certified). Training took 8,865 s (local) and 3,655 s (global) without
validation. Details in docs/guides/reproducing.md ("The residual model at the
same budget").
"""

from experiments.configs import mnist_4c3f_cpu, mnist_liresnet


def get_config():
  c = mnist_4c3f_cpu.get_config()
  r = mnist_liresnet.get_config()
  c.model = r.model
  c.model_options = r.model_options
  c.model_options.width = 16
  return c
