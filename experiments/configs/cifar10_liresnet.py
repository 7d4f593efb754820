r"""CIFAR-10 LiResNet-style network (linear residual conv blocks), clipped MaxMin, BCP loss, local bound.

Run::

  python -m experiments.train --config=experiments/configs/cifar10_liresnet.py --workdir=runs/c10_liresnet

Conv stem (64 channels), 6 blocks ``act(h + conv(h))`` (each ``I + W`` bounded as one
convolution), a 4x4 stride-2 conv, a 512-wide dense neck and a linear head
(``lipjax.models.get("liresnet")``; change ``--config.model_options.blocks`` /
``.width`` / ``.neck``, or ``--config.activation=clipped_relu``). The paper's CIFAR-10
recipe of ``cifar10_6c2f.py``: 800 epochs at batch 256, 2 Lanczos steps (the paper: power iterations), 20 warm-up
epochs, eps ramped to 0.1551 over 400 epochs, crop + flip. Results of this recipe are
not measured yet.
"""

import ml_collections

from experiments.configs import base


def get_config():
  c = base.cifar10_config("liresnet")
  c.model_options = ml_collections.ConfigDict({"width": 64, "blocks": 6, "neck": 512})
  c.activation = "clipped_maxmin"
  c.init = 0.3
  return c
