r"""Prints what a run's training loss sees against the sound local bound.

Run::

  python -m experiments.diagnose --workdir=runs/m4cpu_local --checkpoint=latest
  python -m experiments.diagnose --workdir=runs/m4cpu_local --estimator=lanczos --eps=1.58

Reads ``workdir/config.json`` and a checkpoint (its parameters and the
training state's running power vectors) and runs
:func:`lipjax.evaluation.diagnostics.bound_diagnostics` on the first
``--num_examples`` images of the run's validation split (held out from the
training set, as the launcher does) at the training eps: per layer and for
the network, the training estimate against the sound local bound (median and
10% quantile of the ratio), units kept by the training and the sound masks,
units dead on every example, and the clipping thresholds. The estimator
options default to the run's own; ``--estimator``, ``--intermediate`` and
``--iterations`` try others on the same checkpoint. Writes nothing. Bad
input: exit code 1 and one line on stderr.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from experiments import cli
from experiments.cli import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "training run directory (config.json, checkpoints/)")
flags.DEFINE_string("checkpoint", "latest", "best | latest | a step number")
flags.DEFINE_integer("num_examples", 512, "validation images to compare on")
flags.DEFINE_float("eps", None, "radius (default: the run's eps_train)")
flags.DEFINE_enum("estimator", None, ["power", "lanczos"], "default: the run's")
flags.DEFINE_enum("intermediate", None, ["global", "local"], "default: the run's")
flags.DEFINE_integer("iterations", None, "per-layer steps (default: the run's)")
flags.DEFINE_string("data_dir", None, "data directory (default: the config's data_dir)")


def run(f) -> str:
  """Runs the diagnostics; returns the printed table."""
  # pylint: disable=import-outside-toplevel
  from experiments import train_lib
  from experiments.cli import build_model, check_variables, parse_checkpoint
  from lipjax import data
  from lipjax.evaluation import diagnostics
  from lipjax.training import checkpoints

  if not f.workdir:
    raise InputError("--workdir is required")
  if not os.path.isdir(f.workdir):
    raise InputError(f"workdir {f.workdir!r} does not exist or is not a directory")
  which = parse_checkpoint(f.checkpoint)
  if f.num_examples < 1:
    raise InputError(f"--num_examples must be >= 1, got {f.num_examples}")
  if f.eps is not None and not f.eps > 0:
    raise InputError(f"--eps must be > 0, got {f.eps}")
  if f.iterations is not None and f.iterations < 1:
    raise InputError(f"--iterations must be >= 1, got {f.iterations}")
  if f.data_dir and not os.path.isdir(os.path.expanduser(f.data_dir)):
    raise InputError(f"--data_dir {f.data_dir!r} does not exist or is not a directory")
  config = checkpoints.load_config(f.workdir)
  for field in ("bound", "iterations", "eps_train", "val_examples", "dataset"):
    if field not in config:
      raise InputError(f"config.json has no field {field!r}")
  if config.get("loss") == "ce":
    raise InputError("the run trains with plain cross-entropy: its loss sees no bound")
  if int(config["val_examples"]) < 1:
    raise InputError("the run holds out no validation split (config.val_examples = 0)")
  model = build_model(config)
  variables, power, step = checkpoints.restore_training_view(f.workdir, which)
  check_variables(model, variables, data.info(config["dataset"]).image_shape)
  cfg = dict(config, test_split="", num_test=0)
  if f.data_dir:
    cfg["data_dir"] = f.data_dir
  _, val, _ = train_lib.load_data(cfg)
  n = min(int(f.num_examples), len(val))
  options = train_lib.bound_options(config)
  if f.estimator:
    options["estimator"] = f.estimator
  if f.intermediate:
    options["intermediate"] = f.intermediate
  iterations = int(f.iterations or config["iterations"])
  eps = float(f.eps if f.eps is not None else config["eps_train"])
  diag = diagnostics.bound_diagnostics(model, variables, val.images[:n], val.labels[:n], eps,
                                       bound=config["bound"], iterations=iterations,
                                       power=power, estimator=options)
  head = (f"{f.workdir}, checkpoint step {step}: {config['bound']}-bound training "
          f"(estimator {options['estimator']}, {iterations} steps, intermediate "
          f"{options['intermediate'] or 'auto'}), {n} validation images, "
          f"{diag['seconds']:.1f} s")
  return head + "\n\n" + diagnostics.format_diagnostics(diag, eps)


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)
  print(run(FLAGS))
  return 0


if __name__ == "__main__":
  app.run(cli.main_wrapper("diagnose", main), flags_parser=cli.flags_parser("diagnose"))
