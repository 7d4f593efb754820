"""Tests of the training launcher: configs, workdir files, best-on-val, kill and resume."""

import glob
import hashlib
import importlib.util
import os
import shutil
import signal
import stat
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

from experiments import cli
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
# The runs compared with the uninterrupted one validate only when they stop,
# without the bound diagnostics (together half of a tiny run's time):
# validation changes nothing the comparisons read.
LIGHT_VALIDATION = ["--config.diag_examples=0", "--config.val_every_epochs=3"]


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
  with pytest.raises(cli.InputError, match="no field 'no_such_field'"):
    _parse(["--config=demo", "--config.no_such_field=1"])
  with pytest.raises(cli.InputError, match="did you mean 'epochs'"):
    _parse(["--config=demo", "--config.epoch=2"])
  with pytest.raises(cli.InputError, match="unknown config 'no_such_config'.*demo"):
    _parse(["--config=no_such_config"])
  with pytest.raises(cli.InputError, match="not found.*mnist_4c3f"):
    _parse(["--config=experiments/configs/nope.py"])
  # absl's space-separated form works like --config=NAME.
  config = _parse(["--config", "demo", "--config.epochs", "2", "--config.augment"])
  assert (config.model, config.epochs, config.augment) == ("2c2f", 2, True)
  assert _parse(["--config", "mnist_4c3f_cpu"]).lr_hold_epochs == 6


@pytest.mark.parametrize("field,value,match", [
    ("loss", "hinge", "config.loss"), ("model", "5c5f", "config.model"),
    ("dataset", "imagenet", "config.dataset"), ("eps_test", -0.5, "eps_test.*> 0"),
    ("eps_test", 0.0, "eps_test"), ("eps_train", float("nan"), "eps_train"),
    ("batch_size", 0, "batch_size"), ("certify_batch_size", 0, "certify_batch_size"),
    ("parallel", "vmap", "config.parallel must be one of pmap, jit; got 'vmap'"),
    ("estimator", "svd", "config.estimator must be one of power, lanczos; got 'svd'"),
    ("intermediate", "both", "config.intermediate must be one of auto, global, local"),
    ("val_bound", "best", "config.val_bound must be one of train, local, global"),
    ("diag_examples", -1, "diag_examples must be a finite number >= 0")])
def test_bad_config_values_are_rejected(field, value, match):
  config = _parse(["--config=demo"]).to_dict()
  config[field] = value
  with pytest.raises(cli.InputError, match=match):
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


def _launch(workdir, data_dir, env, extra=()):
  cmd = [sys.executable, "-m", "experiments.train", "--config=demo",
         f"--workdir={workdir}", f"--config.data_dir={data_dir}"] + TINY + list(extra)
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
  # --config.progress=False: a line every log_every_steps steps and per validation,
  # which says the bound it certifies with.
  for step in range(2, TOTAL_STEPS + 1, 2):
    assert f"step {step}/{TOTAL_STEPS} epoch {(step - 1) // 4}: loss " in out
  # Validation certifies with the bound the run trains with (config.val_bound
  # "train") and logs the other one too.
  assert out.count("val certified") == 3 and "(local bound, config.val_bound; " in out
  for r in val:
    assert r["bound"] == "local"
    assert r["val_certified_accuracy"] == r["val_certified_accuracy_local"]
    assert 0 <= r["val_certified_accuracy_global"] <= r["val_certified_accuracy_local"] + 1e-9
    assert f"global bound: {r['val_certified_accuracy_global']:.4f}" in out
  # Each validation records its cost against the training since the previous one.
  for r in val:
    assert 0 < r["val_seconds"] and 0 < r["train_seconds_since_val"]
    assert (f"; {r['val_seconds']:.1f} s, {r['train_seconds_since_val']:.0f} s of training "
            "since the last)") in out
  assert "validation (which picks the best checkpoint) certifies with the global bound" not in out
  # ... and the bound diagnostics: what the loss sees against the sound local bound.
  for r in val:
    assert 0.5 < r["diag_network_ratio_median"] <= 1.01
    assert r["diag_network_ratio_q10"] <= r["diag_network_ratio_median"]
    for l in range(2):   # the 2C2F's hidden conv layers and its dense layer
      assert 0 <= r[f"diag_layer{l}_kept_train"] <= 1
      assert 0 <= r[f"diag_layer{l}_dead"] <= r[f"diag_layer{l}_kept_sound"] + 1 - 1e-9
      assert 0 <= r[f"diag_layer{l}_theta_zero"] <= 1
    assert f"median {r['diag_network_ratio_median']:.3f}" in out
  # Every file of the run is readable by others (0666 less the umask).
  mask = os.umask(0)
  os.umask(mask)
  for name in (checkpoints.CONFIG_FILE, checkpoints.METRICS_FILE):
    assert stat.S_IMODE(os.stat(os.path.join(workdir, name)).st_mode) == 0o666 & ~mask, name


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
  proc = _launch(workdir, tiny_mnist, launch_env, LIGHT_VALIDATION)
  deadline = time.time() + 300
  while not _steps(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  out, _ = proc.communicate()
  killed_at = _steps(workdir)
  assert killed_at, f"no checkpoint was written before the kill:\n{out[-2000:]}"
  assert killed_at[-1] < TOTAL_STEPS, "the run finished before it could be killed"

  proc = _launch(workdir, tiny_mnist, launch_env, LIGHT_VALIDATION)
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


@needs_mnist
def test_a_run_switches_between_jit_and_pmap_and_matches_the_uninterrupted_run(
    uninterrupted, tiny_mnist, launch_env, tmp_path):
  # Steps 1-6 with pmap, 7-12 with the sharded jit step, which resumes the
  # checkpoint pmap wrote (the other direction, in process: test_parallel).
  reference, _ = uninterrupted
  workdir = str(tmp_path / "switched")
  for parallel, stop, start in (("pmap", 6, None), ("jit", 0, 6)):
    proc = _launch(workdir, tiny_mnist, launch_env, LIGHT_VALIDATION +
                   [f"--config.parallel={parallel}", f"--config.max_steps={stop}"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    if start is not None:
      assert f"resuming {workdir} from step {start} of " in out, out[-3000:]
    assert _steps(workdir)[-1] == (stop or TOTAL_STEPS)
  assert checkpoints.load_config(workdir)["parallel"] == "jit"
  # The whole state (parameters, optimiser state, PRNG key, power vectors) is
  # what the uninterrupted run reached, to float32 rounding (the two paths
  # compile the same update into different programs).
  got, want = _saved_state(workdir, TOTAL_STEPS), _saved_state(reference, TOTAL_STEPS)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert int(got["step"]) == TOTAL_STEPS
  # The uninterrupted run's losses, each step logged once.
  def losses(run):
    return {r["step"]: r["loss"] for r in checkpoints.read_metrics(run)
            if r["split"] == "train"}
  got_loss, want_loss = losses(workdir), losses(reference)
  assert sorted(got_loss) == list(range(2, TOTAL_STEPS + 1, 2))
  np.testing.assert_allclose([got_loss[k] for k in sorted(want_loss)],
                             [want_loss[k] for k in sorted(want_loss)], rtol=1e-4)


# ---------------------------------------------------------------------------
# Bad input: one line, exit code 1, the workdir exactly as it was.
# ---------------------------------------------------------------------------


def _snapshot(root):
  """``{relative path: (kind, sha256 or None, mtime_ns, mode)}`` of everything under root."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      st = os.stat(path)
      digest = None
      if name in filenames:
        with open(path, "rb") as f:
          digest = hashlib.sha256(f.read()).hexdigest()
      out[os.path.relpath(path, root)] = (name in filenames, digest, st.st_mtime_ns,
                                          st.st_mode)
  return out


def _run_all(commands, env):
  """Runs the commands concurrently; returns ``[(returncode, stdout, stderr)]``."""
  procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(env, **extra)) for cmd, extra in commands]
  outputs = [p.communicate(timeout=300) for p in procs]
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


@needs_mnist
def test_bad_commands_fail_in_one_line_and_change_nothing(uninterrupted, tiny_mnist,
                                                          launch_env, tmp_path):
  run = str(tmp_path / "run")
  shutil.copytree(uninterrupted[0], run)
  afile = tmp_path / "a_file"
  afile.write_text("not a directory")
  empty = tmp_path / "empty_data"
  empty.mkdir()
  demo_dir = tmp_path / "demo"
  os.makedirs(demo_dir / "local")
  cfg = checkpoints.load_config(run)
  checkpoints.save_config(demo_dir / "local", dict(cfg, certify_bound="local"))
  fresh = tmp_path / "fresh"
  train = [sys.executable, "-m", "experiments.train"]
  same = [f"--workdir={run}", f"--config.data_dir={tiny_mnist}"] + TINY
  cases = [   # (command, extra environment, expected part of the one line)
      (train + ["--config=experiments/configs/nope.py"] + same, {}, "config file "
       "'experiments/configs/nope.py' not found"),
      (train + ["--config", "nope"] + same, {}, "unknown config 'nope'; available: "),
      (train + ["--config=demo", "--config.epoch=2"] + same, {}, "did you mean 'epochs'?"),
      (train + ["--config=demo", "--config.eps_test=-0.5"] + same, {}, "config.eps_test"),
      (train + ["--config=demo", "--config.epochs=three"] + same, {}, "--config.epochs=three"),
      (train + ["--config=demo", f"--workdir={afile}"], {}, "is a file, not a directory"),
      (train + ["--config=demo"] + same + ["--config.lr=0.002", "--config.seed=1"], {},
       "(lr: 0.001 in the run, 0.002 now; seed: 0 in the run, 1 now)"),
      (train + ["--config=demo"] + same + [f"--config.data_dir={tmp_path / 'missing'}"], {},
       "does not exist"),
      (train + ["--config=demo", f"--workdir={fresh}"] + TINY, {"LIPJAX_DATA_DIR": str(empty)},
       f"$LIPJAX_DATA_DIR '{empty}' holds no usable mnist 'train' data; looked for: "),
      ([sys.executable, "-m", "experiments.demo", f"--workdir={demo_dir}",
        f"--config.data_dir={tiny_mnist}", "--config.lr=0.002"] + TINY, {},
       f"workdir '{demo_dir / 'local'}' holds a run with another config"),
  ]
  before = {p: _snapshot(p) for p in (run, tmp_path)}
  t0 = time.time()
  results = _run_all([(cmd, extra) for cmd, extra, _ in cases], launch_env)
  elapsed = time.time() - t0
  for (cmd, _, expected), (code, out, err) in zip(cases, results):
    lines = [l for l in (out + err).splitlines() if l.strip()]
    assert code == 1 and len(lines) == 1, (cmd[2:], code, out + err)
    prog = "demo" if "experiments.demo" in cmd else "train"
    assert lines[0].startswith(f"{prog}: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in err
  refusal = results[6][2]
  assert "lr: 0.001" in refusal
  assert "To resume that run" in refusal and "new --workdir" in refusal
  assert {p: _snapshot(p) for p in (run, tmp_path)} == before
  assert not fresh.exists() and not (demo_dir / "global").exists()
  assert elapsed < 120   # checked before data loads


@needs_mnist
def test_the_same_config_resumes_and_a_finished_run_only_certifies(uninterrupted, tiny_mnist,
                                                                     launch_env, tmp_path):
  run = str(tmp_path / "run")
  shutil.copytree(uninterrupted[0], run)
  config_before = _snapshot(run)["config.json"]
  # absl's space-separated --config, and a field that may change (progress).
  cmd = [sys.executable, "-m", "experiments.train", "--config", "demo", f"--workdir={run}",
         f"--config.data_dir={tiny_mnist}"] + TINY + ["--config.progress=True"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=launch_env,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"{run} is already trained to step {TOTAL_STEPS} (of {TOTAL_STEPS}); nothing to " \
      "train" in proc.stdout
  assert "resuming" not in proc.stdout
  test = [r for r in checkpoints.read_metrics(run) if r["split"] == "test"]
  assert len(test) == 1   # certified again, logged once
  # config.json: same config, so the file is left alone (progress may differ).
  after = _snapshot(run)["config.json"]
  assert after[:3] == config_before[:3] or checkpoints.load_config(run)["progress"] is True


def test_workdir_check_accepts_runs_of_older_code_and_refuses_changes(tmp_path):
  cfg = _parse(["--config=mnist_4c3f_cpu", "--config.bound=global",
                "--config.progress=False"]).to_dict()
  derived = {"image_shape": [28, 28, 1], "steps_per_epoch": 214, "total_steps": 2140,
             "train_examples_used": 55000}
  # A run started by the present code: every field plus the derived ones.
  checkpoints.save_config(tmp_path, dict(cfg, **derived))
  assert train_lib.check_workdir(cfg, str(tmp_path)) is not None
  # Fields that change neither weights nor logged metrics may differ.
  assert train_lib.check_workdir(dict(cfg, progress=True, max_steps=5000,
                                      certify_batch_size=64), str(tmp_path)) is not None
  for parallel in train_lib.PARALLEL_PATHS:   # how the step uses the devices
    assert train_lib.check_workdir(dict(cfg, parallel=parallel), str(tmp_path)) is not None
  for field, value in (("lr", 0.002), ("bound", "local"), ("lr_hold_epochs", -1),
                       ("model", "2c2f"),
                       ("log_every_steps", 10), ("eps_test", 1.0)):
    with pytest.raises(cli.InputError, match=f"{field}: "):
      train_lib.check_workdir(dict(cfg, **{field: value}), str(tmp_path))
  # A run started before a field existed: absent equals its default ...
  old = {k: v for k, v in dict(cfg, **derived).items() if k != "lr_hold_epochs"}
  old["a_field_removed_since"] = 1
  checkpoints.save_config(tmp_path, old)
  assert train_lib.check_workdir(dict(cfg, lr_hold_epochs=-1), str(tmp_path)) is not None
  # ... and anything else is a change.
  with pytest.raises(cli.InputError, match=r"lr_hold_epochs: \(absent\) in the run, 6 now"):
    train_lib.check_workdir(cfg, str(tmp_path))
  # A run of the code before the Lanczos estimator (no estimator field) trained
  # with the power method: resuming it with today's default is a change.
  old = {k: v for k, v in dict(cfg, **derived).items()
         if k not in ("estimator", "intermediate", "val_bound", "diag_examples", "pair_bounds")}
  checkpoints.save_config(tmp_path, old)
  with pytest.raises(cli.InputError, match=r"estimator: \(absent\) in the run, 'lanczos' now"):
    train_lib.check_workdir(cfg, str(tmp_path))
  assert train_lib.check_workdir(dict(cfg, estimator="power", val_bound="global",
                                      diag_examples=0), str(tmp_path)) is not None
  # Other training data (derived fields) are refused too.
  with pytest.raises(cli.InputError, match="train_examples_used: 55000 in the run, 128 now"):
    train_lib.check_derived(dict(cfg, **derived), dict(derived, train_examples_used=128),
                            str(tmp_path))


def test_demo_and_train_state_what_they_trained():
  # The demo's header, summary and footer come from these.
  cfg = _parse(["--config=demo", "--config.max_steps=40", "--config.num_test=300"]).to_dict()
  assert train_lib.length_text(cfg) == "at most 40 steps (max_steps; schedules of 1 epoch(s))"
  assert train_lib.length_text(dict(cfg, max_steps=0, epochs=2)) == "2 epoch(s)"
  assert train_lib.test_split(cfg) == "test[:300]"
  assert train_lib.test_split(dict(cfg, num_test=0)) == "test"
  assert train_lib.test_split(dict(cfg, test_split="test[:50]")) == "test[:50]"
  r = {"steps_trained": 0, "step": 40, "train_seconds": 0.02}
  assert train_lib.train_time_text(r) == "0s (trained before)"
  r = {"steps_trained": 10, "step": 40, "train_seconds": 12.4}
  assert train_lib.train_time_text(r) == "12s (last 10 of 40 steps)"
  r = {"steps_trained": 40, "step": 40, "train_seconds": 31.0}
  assert train_lib.train_time_text(r) == "31s"


def test_commands_turn_on_the_persistent_compilation_cache(monkeypatch, tmp_path):
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv(cli.COMPILATION_CACHE_ENV, "")            # turned off
    assert cli.enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir is None
    folder = tmp_path / "named"
    monkeypatch.setenv(cli.COMPILATION_CACHE_ENV, str(folder))  # a folder of the user's
    assert cli.enable_compilation_cache() == str(folder) and folder.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(folder)
    # JAX's own setting wins over ours.
    monkeypatch.setenv(cli.COMPILATION_CACHE_ENV, str(tmp_path / "other"))
    assert cli.enable_compilation_cache() == str(folder)
    # Default: under the home folder.
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.delenv(cli.COMPILATION_CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = os.path.join(str(tmp_path), ".cache", "lipjax", "xla")
    assert cli.enable_compilation_cache() == expected and os.path.isdir(expected)
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_diagnose_prints_what_the_loss_sees(uninterrupted, tiny_mnist, launch_env):
  workdir, _ = uninterrupted
  run = lambda *args: subprocess.run(   # noqa: E731
      [sys.executable, "-m", "experiments.diagnose", f"--workdir={workdir}", *args],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=launch_env)
  # The 64 validation images the run's own diagnostics saw: the same programs,
  # loaded from the runs' compilation cache.
  out = run("--num_examples=64", "--checkpoint=latest")
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"checkpoint step {TOTAL_STEPS}: local-bound training (estimator lanczos" in out.stdout
  assert "| network |" in out.stdout and "| 0 |" in out.stdout
  for args, match in ((["--num_examples=0"], "--num_examples must be >= 1"),
                      (["--checkpoint=7"], "no checkpoint at step 7"),
                      (["--eps=-1"], "--eps must be > 0")):
    bad = run(*args)
    assert bad.returncode == 1 and match in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
