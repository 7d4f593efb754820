r"""TinyImageNet 8C2F clipped ReLU (theta 1.0), BCP + sparsity 0.01.

Run (TinyImageNet from local files, see ``lipjax.data.load``)::

  python -m experiments.train --config=experiments/configs/tinyimagenet_8c2f.py \
      --workdir=runs/tin_8c2f --config.data_dir=~/datasets

250 epochs at batch 256 with 1 Lanczos step of the training estimator per step (the paper: 1 power
iteration), eps ramped to 0.16 over 125
epochs, Adam 2.5e-4 -> 5e-7, crop + flip. 10,000 random training images are held
out for validation; the final test certification uses the labelled validation set.
Expected: above GloRo's 22.4% certified accuracy at eps = 36/255.
"""

from experiments.configs import base


def get_config():
  c = base.get_config()
  c.model = "8c2f"
  c.dataset = "tiny_imagenet"
  c.num_classes = 200
  c.val_examples = 10000
  c.augment = True
  c.loss = "bcp"
  c.iterations = 1
  c.init = 1.0
  c.sparsity_weight = 0.01
  c.eps_train = 0.16
  c.eps_test = 36 / 255
  c.epochs = 250
  c.warmup_epochs = 0.0
  c.rampup_epochs = 125.0
  c.lr = 2.5e-4
  c.end_lr = 5e-7
  return c
