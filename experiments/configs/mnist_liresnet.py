r"""MNIST LiResNet-style network (linear residual conv blocks), clipped ReLU, GloRo loss, local bound.

Run::

  python -m experiments.train --config=experiments/configs/mnist_liresnet.py --workdir=runs/mnist_liresnet

Conv stem (32 channels), 4 blocks ``act(h + conv(h))``, a 4x4 stride-2 conv, a
256-wide dense neck and a linear head (``lipjax.models.get("liresnet")``; change
``--config.model_options.blocks`` / ``.width`` / ``.neck``). Same schedule as
``mnist_4c3f.py``: 300 epochs at batch 256, 3 Lanczos steps (the paper: 5 power iterations), eps ramped to 1.75
over 150 epochs. Results of this recipe are not measured yet.
"""

import ml_collections

from experiments.configs import mnist_4c3f


def get_config():
  c = mnist_4c3f.get_config()
  c.model = "liresnet"
  c.model_options = ml_collections.ConfigDict({"width": 32, "blocks": 4, "neck": 256})
  return c
