"""Defaults shared by every training config (see the field comments)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config; the run configs override some fields."""
  c = ml_collections.ConfigDict()
  # Model.
  c.model = "4c3f"                  # 2c2f | 4c3f | 6c2f | 8c2f | liresnet | "pkg.module:Class"
  c.model_options = ml_collections.ConfigDict()   # keyword options of the model
  c.activation = "clipped_relu"     # relu | clipped_relu | clipped_maxmin
  c.init = -1.0                     # initial clipping threshold; < 0: the zoo default
  c.num_classes = 10
  # Data: the validation split is held out from the training set; never the test set.
  c.dataset = "mnist"
  c.train_split = "train"
  c.val_examples = 5000             # held out from train_split by a fixed permutation
  c.train_examples = 0              # > 0: train on only this many of the rest
  c.test_split = "test"
  c.data_dir = ""                   # "" : $LIPJAX_DATA_DIR, then the packaged sources
  c.augment = False                 # random crop (pad 4) + horizontal flip
  # Objective.
  c.loss = "gloro"                  # gloro | bcp | ce
  c.bound = "local"                 # local | global (the GloRo baseline)
  c.iterations = 3                  # per-example steps of the training estimator per step
  c.grad = "constant"               # constant | through
  # The training estimator of the local bound (lipjax.training.losses.worst_case_deltas):
  c.estimator = "lanczos"           # lanczos | power (the paper's): per-layer method
  c.intermediate = "auto"           # auto | global | local: norms of the intermediate ball
                                    # radii (auto: global for power, local for lanczos)
  c.pair_bounds = False             # local bound: also the per-class-pair bound in the loss
  c.box_clip = False                # the last layer's box-clipped translation (BCP) in the loss
  c.radius_grad = False             # gradients through the intermediate ball radii' norms
  c.sparsity_weight = 0.0
  c.eps_train = 1.75
  c.eps_test = 1.58
  # Schedules (per step; epochs may be fractional).
  c.epochs = 300
  c.max_steps = 0                   # > 0: stop after this many steps
  c.warmup_epochs = 0.0             # clean training (eps = 0, kappa = 1)
  c.rampup_epochs = 150.0           # eps 0 -> eps_train, kappa 1 -> 0
  c.lr = 1e-3
  c.end_lr = 5e-6                   # held to epoch epochs / 2 + 25, then geometric decay
  c.lr_hold_epochs = -1             # >= 0: hold lr to this epoch instead (short schedules)
  c.batch_size = 256                # global batch, over all processes and devices
  # How the step spreads over the devices (both compute the single-device step on
  # the global batch and write the same checkpoints, so a run resumes on either):
  # "jit" compiles it once with jax.jit over a mesh of all devices (batch split,
  # state replicated); "pmap" maps it over each process's devices. jit is the
  # default: benchmarks/bench_parallel.py measured it as fast as pmap on 2 forced
  # CPU devices (jit / pmap 0.83-1.05, within the shared machine's noise) and
  # faster on one device (1.11-1.31, pmap's per-device mapping costs there), and
  # it is the path JAX recommends (pmap is in maintenance mode).
  c.parallel = "jit"                # jit | pmap
  c.seed = 0
  # Checkpoints and evaluation.
  c.checkpoint_every_steps = 1000   # besides the end of every epoch; 0: epochs only
  c.keep_checkpoints = 3            # the newest k are kept, plus the best on validation
  c.val_every_epochs = 1
  c.val_bound = "train"             # train (the bound the run trains with) | local | global:
                                    # the sound bound of val_certified_accuracy (both logged)
  c.diag_examples = 512             # validation examples of the bound diagnostics (0: off)
  c.best_metric = "val_certified_accuracy"
  c.best_mode = "max"
  c.certify_bound = "local"         # sound bound of the final test certification
  c.certify_checkpoint = "best"     # best | latest
  c.certify_batch_size = 256
  c.num_test = 0                    # > 0: certify only the first num_test test images
  c.log_every_steps = 50
  c.progress = True                 # tqdm progress bar
  return c


def cifar10_config(model: str) -> ml_collections.ConfigDict:
  """The paper's CIFAR-10 recipe: BCP, 2 estimator steps (the paper: power iterations;
  here Lanczos, the default estimator), 800 epochs, crop + flip."""
  c = get_config()
  c.model = model
  c.dataset = "cifar10"
  c.augment = True
  c.loss = "bcp"
  c.iterations = 2
  c.eps_train = 0.1551
  c.eps_test = 36 / 255
  c.epochs = 800
  c.warmup_epochs = 20.0
  c.rampup_epochs = 400.0
  c.lr = 1e-3
  c.end_lr = 1e-6
  return c
