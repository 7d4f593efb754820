r"""Evaluates a trained run: clean, PGD and certified accuracy, radii, tightness, plots.

Run::

  python -m experiments.certify --workdir=runs/mnist_4c3f
  python -m experiments.certify --workdir=runs/demo --eps=0.5,1.0,1.58 --num_examples=1000 \
      --cross_check

Reads ``workdir/config.json`` and a checkpoint (``--checkpoint=best|latest|STEP``),
evaluates ``--split`` of the config's data set and writes to ``--output_dir``
(default ``workdir/eval``): ``report.md`` (the paper's Table 1 layout, radii,
tightness, guarantees), ``report.json`` (every number, also per example) and
PNG plots. The exit code is 0 on success, 1 for bad input (one line on
stderr) and 2 when ``--cross_check`` finds a certified point that PGD breaks.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments.cli import (InputError, build_model, check_variables,  # noqa: F401
                             parse_checkpoint)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "training run directory (config.json, checkpoints/)")
flags.DEFINE_string("checkpoint", "best", "best | latest | a step number")
flags.DEFINE_string("split", None, "data split (default: the config's test_split, else 'test')")
flags.DEFINE_integer("num_examples", 0, "> 0: evaluate only the first N examples of the split")
flags.DEFINE_string("eps", None, "comma-separated l2 radii (default: the config's eps_test)")
flags.DEFINE_integer("pgd_steps", 100, "PGD steps per restart")
flags.DEFINE_integer("pgd_restarts", 1, "PGD random restarts")
flags.DEFINE_float("pgd_step_size", None, "PGD l2 step length (default eps / 4)")
flags.DEFINE_enum("pgd_loss", "margin", ["margin", "ce"], "PGD objective")
flags.DEFINE_integer("pgd_examples", 0, "> 0: PGD (and --cross_check) on the first N examples "
                     "only; clean and certified accuracy still cover all of them")
flags.DEFINE_bool("pgd_skip_certified", False,
                  "PGD skips points certified at that eps (they count as robust); "
                  "--cross_check attacks them separately")
flags.DEFINE_integer("batch_size", 256, "examples per compiled call")
flags.DEFINE_list("bounds", ["local", "global"], "bounds to certify with: local, global")
flags.DEFINE_bool("cross_check", False,
                  "attack every certified point again with PGD; exit 2 on any violation")
flags.DEFINE_integer("cross_check_examples", 0,
                     "> 0: the cross-check covers the certified points among the first N "
                     "examples (default: the PGD examples)")
flags.DEFINE_integer("tightness_examples", 1000, "examples in the tightness report (0: off)")
flags.DEFINE_integer("tightness_steps", 10, "gradient-ascent steps of the Jacobian search")
flags.DEFINE_float("failure_probability", 1e-9,
                   "per-example failure probability of the Lanczos (local) bounds")
flags.DEFINE_integer("lanczos_steps", 100,
                     "Lanczos steps per convolution of the local bound (more: tighter)")
flags.DEFINE_string("output_dir", None, "output directory (default workdir/eval)")
flags.DEFINE_string("data_dir", None, "data directory (default: the config's data_dir)")
flags.DEFINE_integer("seed", 0, "PRNG seed of the attacks and Lanczos start vectors")
flags.DEFINE_bool("progress", True, "tqdm progress bars")


def parse_eps(text):
  """Parses ``"0.5,1.58"`` into a sorted list of positive radii."""
  if text is None or not str(text).strip():
    raise InputError("--eps is empty: give one or more radii, e.g. --eps=0.5,1.58")
  try:
    values = [float(t) for t in str(text).split(",") if t.strip()]
  except ValueError:
    raise InputError(f"--eps must be comma-separated numbers, got {text!r}") from None
  if not values:
    raise InputError("--eps is empty: give one or more radii, e.g. --eps=0.5,1.58")
  bad = [v for v in values if not np.isfinite(v) or v <= 0]
  if bad:
    raise InputError(f"--eps values must be finite and > 0, got {bad[0]:g}")
  return sorted(set(values))


def run(argv_flags) -> int:
  """Runs the evaluation; returns the exit code."""
  # pylint: disable=import-outside-toplevel
  from lipjax import data
  from lipjax.evaluation import EvalOptions, evaluate, plots, report
  from lipjax.training import checkpoints

  f = argv_flags
  if not f.workdir:
    raise InputError("--workdir is required")
  if not os.path.isdir(f.workdir):
    raise InputError(f"workdir {f.workdir!r} does not exist or is not a directory")
  which = parse_checkpoint(f.checkpoint)
  if f.num_examples < 0:
    raise InputError(f"--num_examples must be >= 0, got {f.num_examples}")
  if f.batch_size < 1:
    raise InputError(f"--batch_size must be >= 1, got {f.batch_size}")
  if f.pgd_steps < 0 or f.pgd_restarts < 1:
    raise InputError("--pgd_steps must be >= 0 and --pgd_restarts >= 1")
  if f.pgd_examples < 0:
    raise InputError(f"--pgd_examples must be >= 0, got {f.pgd_examples}")
  if f.cross_check_examples < 0:
    raise InputError(f"--cross_check_examples must be >= 0, got {f.cross_check_examples}")
  if f.pgd_step_size is not None and not f.pgd_step_size > 0:
    raise InputError(f"--pgd_step_size must be > 0, got {f.pgd_step_size}")
  bounds = tuple(b.strip() for b in f.bounds if b.strip())
  if not bounds or any(b not in ("local", "global") for b in bounds):
    raise InputError(f"--bounds must be a subset of local,global, got {','.join(f.bounds)}")
  if f.lanczos_steps < 2:
    raise InputError(f"--lanczos_steps must be >= 2, got {f.lanczos_steps}")
  if not 0 < f.failure_probability < 1:
    raise InputError(f"--failure_probability must be in (0, 1), got {f.failure_probability}")
  if f.data_dir and not os.path.isdir(os.path.expanduser(f.data_dir)):
    raise InputError(f"--data_dir {f.data_dir!r} does not exist or is not a directory "
                     "(leave it out to use the run's data_dir or the installed sources)")

  config = checkpoints.load_config(f.workdir)
  if f.eps is None:
    if "eps_test" not in config:
      raise InputError("config.json has no eps_test; pass --eps")
    eps_test = config["eps_test"]
    if isinstance(eps_test, (list, tuple)):
      eps_test = ",".join(str(e) for e in eps_test)
    eps = parse_eps(str(eps_test))
  else:
    eps = parse_eps(f.eps)
  model = build_model(config)
  variables, step = checkpoints.restore_variables(f.workdir, which=which)
  check_variables(model, variables, data.info(config["dataset"]).image_shape)
  variables = jax.tree_util.tree_map(jnp.asarray, variables)

  split = f.split or config.get("test_split") or "test"
  if f.num_examples:
    if "[" in split:
      raise InputError("--num_examples cannot be combined with a sliced --split")
    split = f"{split}[:{f.num_examples}]"
  data_dir = f.data_dir or config.get("data_dir") or None
  ds = data.load(config["dataset"], split, data_dir=data_dir)
  if ds.num_classes != int(config["num_classes"]):
    raise InputError(f"data set {config['dataset']} has {ds.num_classes} classes, the "
                     f"config says {config['num_classes']}")

  out_dir = f.output_dir or os.path.join(f.workdir, "eval")
  options = EvalOptions(
      bounds=bounds, pgd_steps=f.pgd_steps, pgd_restarts=f.pgd_restarts,
      pgd_step_size=f.pgd_step_size, pgd_loss=f.pgd_loss, pgd_examples=f.pgd_examples,
      batch_size=f.batch_size,
      tightness_examples=f.tightness_examples, tightness_steps=f.tightness_steps,
      cross_check=f.cross_check,
      pgd_skip_certified=f.pgd_skip_certified,
      cross_check_examples=f.cross_check_examples,
      certify_options={"failure_probability": f.failure_probability,
                       "lanczos_steps": f.lanczos_steps},
      seed=f.seed, progress=f.progress)
  t0 = time.time()
  results = evaluate(model, variables, ds.images, ds.labels, eps, options)
  # A model named by import path defines its own activations (the config's
  # ``activation`` describes zoo models only).
  act = "" if ":" in str(config["model"]) else f" ({config['activation']})"
  title = f"{config['dataset']} {config['model']}{act}, checkpoint step {step}"
  run_info = {"workdir": os.path.abspath(f.workdir), "checkpoint_step": step,
              "checkpoint": str(which), "split": split, "config": config,
              "wall_s": time.time() - t0, "device": str(jax.devices()[0].platform)}
  paths = report.write(results, out_dir, title=title, extra=run_info)
  metrics_path = os.path.join(f.workdir, "metrics.jsonl")
  paths.update(plots.write_all(results, out_dir, metrics_path=metrics_path, title=title))

  print(report.to_markdown(results, title))
  print("wrote " + ", ".join(paths.values()))
  if results["violations"]:
    first = results["violations"][0]
    print(f"SOUNDNESS VIOLATION: {len(results['violations'])} certified point(s) broken by "
          f"PGD (first: example {first['index']}, eps {first['eps']:g}, {first['bound']} "
          f"bound, perturbation norm {first['perturbation_norm']:.6g})", file=sys.stderr)
    return 2
  return 0


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)   # Orbax logs routine INFO and WARNING lines
  return run(FLAGS)


if __name__ == "__main__":
  app.run(cli.main_wrapper("certify", main), flags_parser=cli.flags_parser("certify"))
