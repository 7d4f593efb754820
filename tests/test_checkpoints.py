"""Tests of lipjax.training.checkpoints: round trip, retention, corruption, errors."""

import glob
import json
import os
import shutil
import stat
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lipjax.training import checkpoints as ckpt


class _State(NamedTuple):   # the TrainState fields of the training step
  step: Any
  params: Any
  opt_state: Any
  rng: Any
  power: Any


def _state(step: int, offset: float = 0.0) -> _State:
  rng = np.random.default_rng(step)
  params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) + offset,
                        "bias": jnp.full((4,), float(step), jnp.float32)},
            "ClippedReLU_1": {"theta": jnp.ones((4,), jnp.float32)}}
  opt = optax.chain(optax.adam(1e-3), optax.identity())
  opt_state = opt.init(params)
  # A non-trivial optimiser state: one update.
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  _, opt_state = opt.update(grads, opt_state, params)
  power = ({"u": jnp.asarray(rng.normal(size=(1, 3)), jnp.float32)},)
  return _State(jnp.asarray(step, jnp.int32), params, opt_state,
                jax.random.fold_in(jax.random.PRNGKey(0), step), power)


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).dtype == np.asarray(y).dtype


def _save_steps(workdir, steps_and_metrics, max_to_keep=2):
  with ckpt.TrainCheckpointer(workdir, max_to_keep=max_to_keep) as c:
    for step, metric in steps_and_metrics:
      metrics = None if metric is None else {ckpt.DEFAULT_BEST_METRIC: metric}
      assert c.save(_state(step), epoch=step, batch_index=step % 3, metrics=metrics)
    return c.all_steps(), c.best_step()


def test_round_trip_restores_full_state_and_position(tmp_path):
  _save_steps(tmp_path, [(4, None), (7, 0.5)])
  template = _state(0)
  with ckpt.TrainCheckpointer(tmp_path) as c:
    state, position = c.restore_latest(template)
  _assert_trees_equal(state, _state(7))
  assert isinstance(state.opt_state[0][0], optax.ScaleByAdamState)
  assert position == ckpt.Position(epoch=7, batch_index=1)


def test_fresh_workdir_has_nothing_to_restore(tmp_path):
  with ckpt.TrainCheckpointer(tmp_path / "new") as c:
    assert c.restore_latest(_state(0)) is None


def test_keeps_last_k_and_best_on_validation_metric(tmp_path):
  steps, best = _save_steps(tmp_path, [(1, 0.5), (2, None), (3, 0.9), (4, 0.1),
                                       (5, None), (6, 0.2)], max_to_keep=2)
  assert steps == [3, 5, 6]   # the two newest, plus the best by validation metric
  assert best == 3
  variables, step = ckpt.restore_variables(tmp_path, "best")
  assert step == 3
  np.testing.assert_array_equal(variables["params"]["Dense_0"]["bias"], np.full(4, 3.0))
  assert ckpt.restore_variables(tmp_path, "latest")[1] == 6
  assert ckpt.restore_variables(tmp_path, 5)[1] == 5


def test_best_mode_min_from_config(tmp_path):
  ckpt.save_config(tmp_path, {"best_metric": "val_loss", "best_mode": "min"})
  with ckpt.TrainCheckpointer(tmp_path, max_to_keep=1, best_metric="val_loss",
                              best_mode="min") as c:
    for step, loss in [(1, 0.7), (2, 0.3), (3, 0.9)]:
      c.save(_state(step), epoch=step, batch_index=0, metrics={"val_loss": loss})
    assert c.all_steps() == [2, 3]
  assert ckpt.restore_variables(tmp_path, "best")[1] == 2


def test_without_validation_metrics_best_is_latest(tmp_path):
  _save_steps(tmp_path, [(1, None), (2, None)])
  assert ckpt.restore_variables(tmp_path, "best")[1] == 2


def _corrupt_truncate_data(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
           if os.path.isfile(f) and "commit_success" not in f]
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _corrupt_delete_manifest(step_dir):
  os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def _corrupt_delete_state(step_dir):
  shutil.rmtree(os.path.join(step_dir, "state"))


def _corrupt_checksum(step_dir):
  # Silent corruption that the storage layer cannot see: the digest disagrees.
  path = os.path.join(step_dir, "position", "metadata")
  with open(path) as f:
    pos = json.load(f)
  pos["params_sha256"] = "0" * 64
  with open(path, "w") as f:
    json.dump(pos, f)


# Orbax can leave an "event loop is closed" message behind after a failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [_corrupt_truncate_data, _corrupt_delete_manifest,
                                     _corrupt_delete_state, _corrupt_checksum])
def test_corrupt_newest_checkpoint_is_skipped_with_warning(tmp_path, corrupt):
  _save_steps(tmp_path, [(4, None), (7, None)])
  corrupt(str(tmp_path / ckpt.CHECKPOINT_DIR / "7"))
  with pytest.warns(ckpt.CheckpointWarning, match="unreadable checkpoint"):
    variables, step = ckpt.restore_variables(tmp_path, "latest")
  assert step == 4
  with pytest.warns(ckpt.CheckpointWarning, match="unreadable checkpoint"):
    c = ckpt.TrainCheckpointer(tmp_path)
    state, position = c.restore_latest(_state(0))
  _assert_trees_equal(state, _state(4))
  assert position == ckpt.Position(4, 1)
  # The unreadable step was removed, so the resumed run can write it again.
  assert c.all_steps() == [4]
  assert c.save(_state(7, offset=1.0), epoch=7, batch_index=0)
  c.close()
  with ckpt.TrainCheckpointer(tmp_path) as c:
    state, _ = c.restore_latest(_state(0))
  _assert_trees_equal(state, _state(7, offset=1.0))


def test_complete_checkpoint_of_another_structure_is_an_error_not_skipped(tmp_path):
  _save_steps(tmp_path, [(4, None), (7, None)])
  # The template lacks the power state that the saved states hold.
  template = _state(0)._replace(power=None)
  with ckpt.TrainCheckpointer(tmp_path) as c:
    with warnings.catch_warnings():
      warnings.simplefilter("error", ckpt.CheckpointWarning)
      with pytest.raises(ckpt.CheckpointMismatchError,
                         match=r"step 7 .*only in the checkpoint: power/0/u.*init_power_state"):
        c.restore_latest(template)
    assert c.all_steps() == [4, 7]   # nothing deleted
  # Other shapes (another model) are named as well.
  params = dict(template.params, Dense_0={"kernel": jnp.zeros((3, 5)), "bias": jnp.zeros(5)})
  with ckpt.TrainCheckpointer(tmp_path) as c:
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"params/Dense_0/bias \(4,\)"):
      c.restore_latest(_state(0)._replace(params=params))
    assert c.all_steps() == [4, 7]


def test_half_written_tmp_directory_is_ignored(tmp_path):
  _save_steps(tmp_path, [(4, None), (7, None)])
  root = tmp_path / ckpt.CHECKPOINT_DIR
  # What a process killed during a save leaves: an unfinished temporary directory.
  tmp = root / "9.orbax-checkpoint-tmp-1234567"
  shutil.copytree(root / "7", tmp)
  _corrupt_delete_manifest(str(tmp))
  assert ckpt.restore_variables(tmp_path, "latest")[1] == 7
  with ckpt.TrainCheckpointer(tmp_path) as c:
    state, _ = c.restore_latest(_state(0))
    assert int(state.step) == 7
  assert not tmp.exists()   # cleaned up when a writer opens the directory


def test_all_checkpoints_unreadable_gives_checkpoint_error(tmp_path):
  _save_steps(tmp_path, [(4, None)])
  _corrupt_delete_state(str(tmp_path / ckpt.CHECKPOINT_DIR / "4"))
  with pytest.raises(ckpt.CheckpointError, match="no readable checkpoint"):
    ckpt.restore_variables(tmp_path, "latest")


def test_errors_are_one_line_checkpoint_errors(tmp_path):
  cases = [
      lambda: ckpt.restore_variables(tmp_path / "missing"),
      lambda: ckpt.restore_variables(tmp_path),            # exists, no checkpoints
      lambda: ckpt.load_config(tmp_path / "missing"),
      lambda: ckpt.load_config(tmp_path),                  # no config.json
  ]
  for case in cases:
    with pytest.raises(ckpt.CheckpointError) as info:
      case()
    assert "\n" not in str(info.value)
  _save_steps(tmp_path, [(4, None)])
  with pytest.raises(ckpt.CheckpointError, match="no checkpoint at step 5"):
    ckpt.restore_variables(tmp_path, 5)
  with pytest.raises(ckpt.CheckpointError, match="which must be"):
    ckpt.restore_variables(tmp_path, "first")
  (tmp_path / ckpt.CONFIG_FILE).write_text("{not json")
  with pytest.raises(ckpt.CheckpointError, match="cannot read"):
    ckpt.load_config(tmp_path)


def test_config_and_metrics_files(tmp_path):
  ckpt.save_config(tmp_path / "run", {"model": "2c2f", "eps_train": np.float32(0.5),
                                      "shape": (28, 28, 1)})
  assert ckpt.load_config(tmp_path / "run") == {"model": "2c2f", "eps_train": 0.5,
                                                "shape": [28, 28, 1]}
  for step in (1, 2, 3):
    ckpt.append_metrics(tmp_path / "run", {"step": step, "epoch": 0, "split": "train",
                                           "loss": jnp.float32(step)})
  with open(tmp_path / "run" / ckpt.METRICS_FILE, "a") as f:
    f.write('{"step": 4, "spl')   # torn line of a killed process
  assert [r["step"] for r in ckpt.read_metrics(tmp_path / "run")] == [1, 2, 3]
  ckpt.truncate_metrics(tmp_path / "run", 2)
  assert ckpt.read_metrics(tmp_path / "run") == [
      {"step": 1, "epoch": 0, "split": "train", "loss": 1.0},
      {"step": 2, "epoch": 0, "split": "train", "loss": 2.0}]


def test_workdir_files_are_readable_by_others(tmp_path):
  # config.json (written through a temporary file) and a truncated
  # metrics.jsonl get the permissions of any other new file: 0666 less the
  # umask, not mkstemp's 0600, so collaborators can certify a shared run.
  old = os.umask(0o022)
  try:
    run = tmp_path / "run"
    ckpt.save_config(run, {"model": "2c2f"})
    ckpt.append_metrics(run, {"step": 1, "epoch": 0, "split": "train", "loss": 1.0})
    ckpt.append_metrics(run, {"step": 2, "epoch": 0, "split": "train", "loss": 1.0})
    ckpt.truncate_metrics(run, 1)
    plain = run / "plain.txt"
    plain.write_text("x")
    for name in (ckpt.CONFIG_FILE, ckpt.METRICS_FILE, "plain.txt"):
      assert stat.S_IMODE(os.stat(run / name).st_mode) == 0o644, name
    os.umask(0o077)
    ckpt.save_config(run, {"model": "4c3f"})
    assert stat.S_IMODE(os.stat(run / ckpt.CONFIG_FILE).st_mode) == 0o600
  finally:
    os.umask(old)


def test_resuming_drops_the_test_records_of_its_step(tmp_path):
  for rec in ({"step": 4, "split": "train"}, {"step": 4, "split": "val"},
              {"step": 4, "split": "test", "checkpoint_step": 4},
              {"step": 6, "split": "train"}):
    ckpt.append_metrics(tmp_path, dict(rec, epoch=0))
  ckpt.truncate_metrics(tmp_path, 4)
  assert [(r["step"], r["split"]) for r in ckpt.read_metrics(tmp_path)] == [(4, "train"),
                                                                            (4, "val")]
