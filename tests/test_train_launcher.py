"""Tests of the training launcher: configs, workdir files, best-on-val, kill and resume."""

import glob
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import optax
import pytest

from experiments import train_lib
from experiments.configs import resolve_config_arg
from lipjax import data
from lipjax.training import checkpoints
from lipjax.training import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "experiments", "configs")
RUN_CONFIGS = ["demo", "mnist_4c3f", "cifar10_4c3f", "cifar10_6c2f", "cifar10_6c2f_maxmin",
               "tinyimagenet_8c2f"]

# A tiny run of the demo config on the local bound (so the checkpoints hold
# running power vectors): 128 training images in 4 batches of 32, 3 epochs,
# checkpoints every 3 steps, from a small copy of MNIST (see `tiny_mnist`).
TINY = ["--config.batch_size=32", "--config.epochs=3", "--config.val_examples=64",
        "--config.certify_bound=global", "--config.checkpoint_every_steps=3",
        "--config.keep_checkpoints=2", "--config.log_every_steps=2", "--config.progress=False",
        "--config.bound=local"]
TOTAL_STEPS = 12


def _parse(args):
  fv = flags.FlagValues()
  argv = ["prog"] + resolve_config_arg(args)
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


# The local bound with "gloro" runs end to end in the kill-and-resume test below.
@pytest.mark.parametrize("loss,bound", [("gloro", "global"), ("bcp", "global"),
                                        ("ce", "local")])
def test_initial_state_has_the_structure_of_every_later_state(loss, bound):
  # The step-0 state is the template a resumed run restores into, so it must
  # have the structure, shapes and dtypes that the step returns and saves.
  cfg = _parse(["--config=demo", f"--config.loss={loss}", f"--config.bound={bound}"]).to_dict()
  image_shape = (28, 28, 1)
  model = train_lib.build_model(cfg, image_shape)
  eps, kappa, lr = train_lib.make_schedules(cfg, steps_per_epoch=10)
  optimizer = optax.chain(optax.adam(lr), step_lib.project_thresholds())

  def init(key):   # abstract evaluation only: shapes and dtypes, nothing compiled
    k0, k1, k2 = jax.random.split(key, 3)
    variables = model.init(k0, np.zeros((1,) + image_shape, np.float32))
    return train_lib.initial_state(cfg, model, variables, image_shape, optimizer,
                                   power_key=k1, step_key=k2)

  state = jax.eval_shape(init, jax.random.PRNGKey(0))
  assert (state.power is None) == (loss == "ce")
  step = step_lib.make_train_step(model, optimizer, loss=loss, bound=bound, eps_schedule=eps,
                                  kappa_schedule=kappa)
  after, _ = jax.eval_shape(step, state, jax.ShapeDtypeStruct((4,) + image_shape, np.float32),
                            jax.ShapeDtypeStruct((4,), np.int32))
  spec = lambda tree: jax.tree_util.tree_map(lambda x: (x.shape, np.dtype(x.dtype)), tree)
  assert jax.tree_util.tree_structure(after) == jax.tree_util.tree_structure(state)
  assert spec(after) == spec(state)


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
  """A data_dir with 192 MNIST training images (128 train + 64 held out) and 64 test."""
  root = tmp_path_factory.mktemp("mnist")
  for split, stem, n in (("train", "train", 192), ("test", "t10k", 64)):
    ds = data.load("mnist", f"{split}[:{n}]")
    images = np.rint(np.asarray(ds.images)[..., 0] * 255).astype(np.uint8)
    with open(root / f"{stem}-images-idx3-ubyte", "wb") as f:
      f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
    with open(root / f"{stem}-labels-idx1-ubyte", "wb") as f:
      f.write(struct.pack(">II", 0x801, n) + np.asarray(ds.labels, np.uint8).tobytes())
  return str(root)


@pytest.fixture(scope="module")
def launch_env(tmp_path_factory):
  """Environment of the launched runs: one persistent compilation cache for all.

  The first run compiles the step and the certification; the later ones load
  the executables (same programs), so each costs little more than its steps.
  """
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _launch(workdir, data_dir, env):
  cmd = [sys.executable, "-m", "experiments.train", "--config=demo",
         f"--workdir={workdir}", f"--config.data_dir={data_dir}"] + TINY
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_mnist, launch_env):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  proc = _launch(workdir, tiny_mnist, launch_env)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  return workdir, out


def _steps(workdir):
  return sorted(int(os.path.basename(p)) for p in glob.glob(
      os.path.join(workdir, checkpoints.CHECKPOINT_DIR, "*")) if os.path.basename(p).isdigit())


def _saved_state(workdir, step):
  """The whole saved TrainState (as Orbax stores it: dicts and lists) of ``step``."""
  with checkpoints.TrainCheckpointer(workdir) as c:
    state, _ = checkpoints._restore(c.manager, step, None)  # pylint: disable=protected-access
  return state


@needs_mnist
def test_run_writes_config_metrics_and_chooses_best_on_val(uninterrupted):
  workdir, out = uninterrupted
  cfg = checkpoints.load_config(workdir)
  for key in ("model", "activation", "num_classes", "dataset", "eps_train", "eps_test", "loss",
              "bound", "batch_size", "seed"):
    assert key in cfg
  assert (cfg["batch_size"], cfg["epochs"], cfg["model"], cfg["bound"]) == (32, 3, "2c2f",
                                                                             "local")
  assert (cfg["train_examples_used"], cfg["total_steps"]) == (128, TOTAL_STEPS)
  records = checkpoints.read_metrics(workdir)
  for r in records:
    assert {"step", "epoch", "split"} <= set(r)
  train_steps = [r["step"] for r in records if r["split"] == "train"]
  assert train_steps == list(range(2, TOTAL_STEPS + 1, 2))
  val = [r for r in records if r["split"] == "val"]
  assert [r["step"] for r in val] == [4, 8, 12]   # end of every epoch
  # Best: highest validation certified accuracy, the newest among ties.
  best = max(val, key=lambda r: (r["val_certified_accuracy"], r["step"]))
  _, best_step = checkpoints.restore_variables(workdir, "best")
  assert best_step == best["step"]
  test = [r for r in records if r["split"] == "test"]
  assert len(test) == 1 and test[0]["checkpoint_step"] == best_step
  clean, certified = test[0]["test_clean_accuracy"], test[0]["test_certified_accuracy"]
  assert 0 <= certified <= clean <= 1
  assert f"(64 images), checkpoint step {best_step}: clean accuracy {100 * clean:.2f}%" in out
  # The newest checkpoints plus the best are kept (saved: 3, 4, 6, 8, 9, 12).
  steps = _steps(workdir)
  assert steps[-2:] == [9, 12] and best_step in steps and len(steps) <= 3
  # The local bound's running power vectors are part of every checkpoint.
  power = jax.tree_util.tree_leaves(_saved_state(workdir, TOTAL_STEPS)["power"])
  assert len(power) == 4 and all(np.all(np.isfinite(p)) for p in power)


def _tensorboard_scalars(directory):
  from tensorboardX.proto import event_pb2   # pylint: disable=import-outside-toplevel
  out = {}
  for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
    raw, i = open(path, "rb").read(), 0
    while i < len(raw):   # TFRecord: length, crc, Event proto, crc
      n = struct.unpack("<Q", raw[i:i + 8])[0]
      event = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


@needs_mnist
def test_run_writes_tensorboard_scalars(uninterrupted):
  workdir, _ = uninterrupted
  scalars = _tensorboard_scalars(os.path.join(workdir, "tensorboard"))
  records = checkpoints.read_metrics(workdir)
  train = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
  got = scalars["train/loss"]
  assert [s for s, _ in got] == [s for s, _ in train]
  np.testing.assert_allclose([v for _, v in got], [v for _, v in train], rtol=1e-6)
  val = [(r["step"], r["val_certified_accuracy"]) for r in records if r["split"] == "val"]
  assert [s for s, _ in scalars["val/val_certified_accuracy"]] == [s for s, _ in val]
  assert "test/test_certified_accuracy" in scalars and "train/eps" in scalars


@needs_mnist
def test_sigkill_then_resume_matches_uninterrupted_run(uninterrupted, tiny_mnist, launch_env,
                                                       tmp_path):
  reference, _ = uninterrupted
  workdir = str(tmp_path / "killed")
  proc = _launch(workdir, tiny_mnist, launch_env)
  deadline = time.time() + 300
  while not _steps(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  out, _ = proc.communicate()
  killed_at = _steps(workdir)
  assert killed_at, f"no checkpoint was written before the kill:\n{out[-2000:]}"
  assert killed_at[-1] < TOTAL_STEPS, "the run finished before it could be killed"

  proc = _launch(workdir, tiny_mnist, launch_env)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert f"resuming {workdir} from step {killed_at[-1]}" in out
  assert "unreadable" not in out

  # The whole state (parameters, optimiser state, PRNG key, power vectors) is
  # what the uninterrupted run reached.
  got, want = _saved_state(workdir, TOTAL_STEPS), _saved_state(reference, TOTAL_STEPS)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)
  # The resumed run's log has every step once.
  train_steps = [r["step"] for r in checkpoints.read_metrics(workdir) if r["split"] == "train"]
  assert train_steps == list(range(2, TOTAL_STEPS + 1, 2))
