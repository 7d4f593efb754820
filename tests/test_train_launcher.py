"""Tests of the training launcher: configs, workdir files, best-on-val, kill and resume."""

import glob
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest

from experiments import train, train_lib
from lipjax import data
from lipjax.training import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "experiments", "configs")
RUN_CONFIGS = ["demo", "mnist_4c3f", "cifar10_4c3f", "cifar10_6c2f", "cifar10_6c2f_maxmin",
               "tinyimagenet_8c2f"]

# A tiny run of the demo config: 8 steps per epoch, 4 epochs, checkpoints every 3 steps.
TINY = ["--config.train_examples=512", "--config.batch_size=64", "--config.epochs=4",
        "--config.val_examples=256", "--config.num_test=128", "--config.certify_bound=global",
        "--config.checkpoint_every_steps=3", "--config.keep_checkpoints=2",
        "--config.log_every_steps=4", "--config.progress=False", "--config.bound=global"]
TOTAL_STEPS = 32


def _parse(args):
  fv = flags.FlagValues()
  argv = ["prog"] + train.resolve_config_arg(args)
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  return holder.value


def _mnist_available():
  try:
    data.load("mnist", "test[:1]")
    return True
  except data.DataError:
    return False


needs_mnist = pytest.mark.skipif(not _mnist_available(), reason="MNIST not installed")


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_every_config_loads_validates_and_documents_its_run(name):
  config = _parse([f"--config={name}"])
  train_lib.check_config(config.to_dict())
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert "python -m experiments.train" in module.__doc__
  assert "Expected" in module.__doc__


def test_command_line_overrides_every_kind_of_field():
  config = _parse(["--config=experiments/configs/mnist_4c3f.py", "--config.epochs=3",
                   "--config.bound=global", "--config.eps_train=0.25",
                   "--config.augment=True", "--config.data_dir=/data"])
  assert (config.epochs, config.bound, config.eps_train, config.augment, config.data_dir) == (
      3, "global", 0.25, True, "/data")
  assert config.model == "4c3f" and config.loss == "gloro"   # untouched fields
  with pytest.raises(flags.IllegalFlagValueError):
    _parse(["--config=demo", "--config.epochs=three"])
  with pytest.raises((flags.Error, KeyError, AttributeError)):
    _parse(["--config=demo", "--config.no_such_field=1"])
  with pytest.raises(SystemExit, match="unknown config"):
    _parse(["--config=no_such_config"])


def test_bad_config_values_are_rejected():
  config = _parse(["--config=demo", "--config.loss=hinge"]).to_dict()
  with pytest.raises(ValueError, match="config.loss"):
    train_lib.check_config(config)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  config = _parse(["--config=demo"] + TINY)
  result = train_lib.train_and_evaluate(config, workdir)
  return workdir, result


@needs_mnist
def test_run_writes_config_metrics_and_chooses_best_on_val(uninterrupted):
  workdir, result = uninterrupted
  assert result["step"] == TOTAL_STEPS
  cfg = checkpoints.load_config(workdir)
  for key in ("model", "activation", "num_classes", "dataset", "eps_train", "eps_test", "loss",
              "bound", "batch_size", "seed"):
    assert key in cfg
  assert cfg["batch_size"] == 64 and cfg["epochs"] == 4 and cfg["model"] == "2c2f"
  records = checkpoints.read_metrics(workdir)
  for r in records:
    assert {"step", "epoch", "split"} <= set(r)
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == list(range(4, TOTAL_STEPS + 1, 4))
  val = [r for r in records if r["split"] == "val"]
  assert [r["step"] for r in val] == [8, 16, 24, 32]   # end of every epoch
  # Best: highest validation certified accuracy, the newest among ties.
  best = max(val, key=lambda r: (r["val_certified_accuracy"], r["step"]))
  _, best_step = checkpoints.restore_variables(workdir, "best")
  assert best_step == best["step"]
  test = [r for r in records if r["split"] == "test"]
  assert len(test) == 1 and test[0]["checkpoint_step"] == best_step
  assert test[0]["test_certified_accuracy"] == result["test_certified_accuracy"]
  assert 0 <= result["test_certified_accuracy"] <= result["test_clean_accuracy"] <= 1
  # The newest checkpoints plus the best are kept.
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(
      os.path.join(workdir, checkpoints.CHECKPOINT_DIR, "*")) if os.path.basename(p).isdigit())
  assert steps[-2:] == [30, 32] and best_step in steps and len(steps) <= 3


def _launch(workdir):
  cmd = [sys.executable, "-m", "experiments.train", "--config=demo",
         f"--workdir={workdir}"] + TINY
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _steps(workdir):
  return sorted(int(os.path.basename(p)) for p in glob.glob(
      os.path.join(workdir, checkpoints.CHECKPOINT_DIR, "*")) if os.path.basename(p).isdigit())


@needs_mnist
def test_sigkill_then_resume_matches_uninterrupted_run(uninterrupted, tmp_path):
  reference, _ = uninterrupted
  workdir = str(tmp_path / "killed")
  proc = _launch(workdir)
  deadline = time.time() + 120
  while not _steps(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  out, _ = proc.communicate()
  killed_at = _steps(workdir)
  assert killed_at, f"no checkpoint was written before the kill:\n{out[-2000:]}"
  assert killed_at[-1] < TOTAL_STEPS, "the run finished before it could be killed"

  proc = _launch(workdir)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert f"resuming {workdir} from step {killed_at[-1]}" in out

  got, step = checkpoints.restore_variables(workdir, TOTAL_STEPS)
  want, _ = checkpoints.restore_variables(reference, TOTAL_STEPS)
  assert step == TOTAL_STEPS
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)
  # The resumed run's log has every step once.
  train_steps = [r["step"] for r in checkpoints.read_metrics(workdir) if r["split"] == "train"]
  assert train_steps == list(range(4, TOTAL_STEPS + 1, 4))
