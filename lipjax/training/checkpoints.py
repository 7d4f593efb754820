"""Checkpoints of a training run: Orbax CheckpointManager plus the workdir layout.

Layout of a training ``workdir``::

  workdir/config.json        every config field (written when the run starts)
  workdir/metrics.jsonl      one JSON object per line: step, epoch, split, metrics
  workdir/checkpoints/<step>/{state,position[,metrics]}   Orbax checkpoints

Each checkpoint holds the whole ``TrainState`` (step, params, optimiser state,
PRNG key, power state) and the input pipeline's position: the epoch and the
index of the next batch to read. Because :func:`lipjax.data.batches` is a pure
function of ``(seed, epoch)``, restarting with the same workdir continues the
run exactly as if it had not stopped.

Retention: the last ``max_to_keep`` checkpoints are kept, and besides them the
one with the best validation metric (``metrics[best_metric]``, computed on a
split held out from the training set, never the test set).

A checkpoint that cannot be read (a truncated or deleted file, a directory
half-written when the process was killed) is skipped with a warning and the
newest readable one before it is used instead. Orbax writes each step into a
temporary directory and renames it when complete, so a killed save leaves only
a temporary directory, which is ignored and removed. A complete checkpoint
whose state does not match the template (other pytree structure, shapes or
dtypes, e.g. the workdir of another config) is never skipped or deleted:
:meth:`TrainCheckpointer.restore_latest` raises :class:`CheckpointMismatchError`.

Example::

  ckpt = checkpoints.TrainCheckpointer(workdir, max_to_keep=3)
  restored = ckpt.restore_latest(state)         # None for a fresh workdir
  if restored is not None:
    state, position = restored                  # position.epoch, position.batch_index
  ...
  ckpt.save(state, epoch=e + 1, batch_index=0, metrics={"val_certified": 0.71})
  ckpt.close()

  variables, step = checkpoints.restore_variables(workdir, which="best")
"""

from __future__ import annotations

import hashlib
import json
import logging as std_logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple, Union

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
DEFAULT_BEST_METRIC = "val_certified_accuracy"

_STATE, _POSITION = "state", "position"


class CheckpointError(RuntimeError):
  """A workdir, its config or its checkpoints are missing or unreadable."""


class CheckpointMismatchError(CheckpointError):
  """A complete checkpoint holds a state of another structure, shape or dtype.

  Raised instead of skipping the checkpoint: it is readable, but belongs to a
  different run (another model or config) than the template describes.
  """


class CheckpointWarning(UserWarning):
  """A checkpoint was unreadable and has been skipped."""


class Position(NamedTuple):
  """Where the input pipeline continues: epoch and index of the next batch."""

  epoch: int
  batch_index: int


_QUIET = ("did not provide metrics", "read_only=True, setting save_interval_steps",
          "Given directory is read only")


class _NoMetricsFilter(std_logging.Filter):
  """Drops Orbax's expected warnings: saves without validation metrics, read-only use."""

  def filter(self, record):
    message = record.getMessage()
    return not any(q in message for q in _QUIET)


logging.get_absl_logger().addFilter(_NoMetricsFilter())


def _workdir(workdir: Union[str, os.PathLike], *, must_exist: bool = True) -> Path:
  if workdir is None or str(workdir) == "":
    raise CheckpointError("workdir must be a directory path, got an empty value")
  path = Path(workdir).expanduser().absolute()
  if must_exist and not path.is_dir():
    raise CheckpointError(f"workdir {str(path)!r} does not exist or is not a directory")
  return path


def to_jsonable(value):
  """``value`` with tuples as lists, numpy scalars and arrays as Python numbers and
  lists, and dict keys as strings: what ``json.dumps`` writes."""
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)) or isinstance(value, jax.Array):
    arr = np.asarray(value)
    return arr.item() if arr.ndim == 0 else arr.tolist()
  return value


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _atomic_write(path: Path, text: str) -> None:
  """Writes ``path`` through a temporary file and a rename.

  The file gets the permissions of any other new file (``0666`` less the
  umask, e.g. ``0644``), not ``mkstemp``'s ``0600``, so that collaborators
  can read a shared run.
  """
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def save_config(workdir, config: Mapping[str, Any]) -> Path:
  """Writes ``workdir/config.json`` (atomically), creating ``workdir``.

  Args:
    workdir: the run's directory.
    config: a mapping of JSON-serialisable values (tuples become lists).

  Returns:
    The path written.
  """
  path = _workdir(workdir, must_exist=False)
  path.mkdir(parents=True, exist_ok=True)
  out = path / CONFIG_FILE
  _atomic_write(out, json.dumps(to_jsonable(dict(config)), indent=2, sort_keys=True) + "\n")
  return out


def load_config(workdir) -> Dict[str, Any]:
  """Reads ``workdir/config.json``.

  Returns:
    The config as a plain dict.

  Raises:
    CheckpointError: if the workdir or its config is missing or not valid JSON.
  """
  path = _workdir(workdir) / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f"no {CONFIG_FILE} in workdir {str(path.parent)!r}")
  try:
    config = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f"cannot read {str(path)!r}: {e}") from None
  if not isinstance(config, dict):
    raise CheckpointError(f"{str(path)!r} does not hold a JSON object")
  return config


def append_metrics(workdir, record: Mapping[str, Any]) -> None:
  """Appends one JSON line to ``workdir/metrics.jsonl``.

  ``record`` should hold ``"step"``, ``"epoch"`` and ``"split"`` besides the
  metric values; numpy and JAX scalars are converted to Python numbers.
  """
  path = _workdir(workdir, must_exist=False)
  path.mkdir(parents=True, exist_ok=True)
  with open(path / METRICS_FILE, "a") as f:
    f.write(json.dumps(to_jsonable(dict(record)), sort_keys=True) + "\n")


def read_metrics(workdir):
  """Returns the records of ``workdir/metrics.jsonl`` (a list of dicts).

  A torn last line (the process was killed while writing it) is ignored.
  """
  path = _workdir(workdir) / METRICS_FILE
  if not path.is_file():
    return []
  out = []
  for line in path.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:
      continue
  return out


def truncate_metrics(workdir, step: int) -> None:
  """Drops the records of ``metrics.jsonl`` logged after ``step``.

  Called when a run resumes from the checkpoint at ``step``, so that the
  steps it repeats are not logged twice. The test records of ``step`` itself
  go too: the resumed run certifies again when it ends.
  """
  path = _workdir(workdir) / METRICS_FILE
  if not path.is_file():
    return
  keep = [r for r in read_metrics(workdir)
          if int(r.get("step", 0)) < step
          or (int(r.get("step", 0)) == step and r.get("split") != "test")]
  _atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))


def _warn(msg: str) -> None:
  logging.warning("%s", msg)
  warnings.warn(msg, CheckpointWarning, stacklevel=3)


def _best_fn(best_metric: str, best_mode: str):
  """The score of a checkpoint's metrics (a broken evaluation is never the best)."""

  def best_fn(metrics):
    value = metrics.get(best_metric) if isinstance(metrics, Mapping) else None
    if value is None or not np.isfinite(value):
      return -np.inf if best_mode == "max" else np.inf
    return float(value)

  return best_fn


def _make_manager(directory: Path, *, max_to_keep: int, best_metric: str, best_mode: str,
                  read_only: bool) -> ocp.CheckpointManager:
  if best_mode not in ("max", "min"):
    raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
  if max_to_keep < 1:
    raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")

  best_fn = _best_fn(best_metric, best_mode)
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      best_fn=best_fn,
      best_mode=best_mode,
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(n=max_to_keep),
          policies.BestN(get_metric_fn=best_fn, reverse=(best_mode == "min"), n=1,
                         keep_checkpoints_without_metrics=False),
      ]),
      enable_async_checkpointing=False,
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
      create=not read_only,
  )
  return ocp.CheckpointManager(directory, options=options, item_names=(_STATE, _POSITION))


def _digest(tree) -> str:
  """SHA-256 over the leaves' dtypes, shapes and bytes (in tree order)."""
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(tree):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def _abstract(tree):
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class TrainCheckpointer:
  """Saves and restores training checkpoints under ``workdir/checkpoints``.

  Args:
    workdir: the run's directory (created if needed).
    max_to_keep: how many of the newest checkpoints to keep (>= 1); the best
      one by ``best_metric`` is kept besides them.
    best_metric: key of the validation metrics that ranks checkpoints.
    best_mode: ``"max"`` or ``"min"``.
  """

  def __init__(self, workdir, *, max_to_keep: int = 3,
               best_metric: str = DEFAULT_BEST_METRIC, best_mode: str = "max"):
    self.workdir = _workdir(workdir, must_exist=False)
    self.directory = self.workdir / CHECKPOINT_DIR
    self.directory.mkdir(parents=True, exist_ok=True)
    self.best_metric = best_metric
    self._manager = _make_manager(self.directory, max_to_keep=max_to_keep,
                                  best_metric=best_metric, best_mode=best_mode,
                                  read_only=False)
    # Orbax removes the temporary directories of killed saves in a background
    # thread and waits for it only in save(); wait now, so that the directory
    # holds only complete checkpoints from here on.
    wait_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
    if wait_cleanup is not None:
      wait_cleanup()

  @property
  def manager(self) -> ocp.CheckpointManager:
    """The underlying Orbax manager."""
    return self._manager

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    return _best_step(self._manager)

  def save(self, state, *, epoch: int, batch_index: int,
           metrics: Optional[Mapping[str, float]] = None) -> bool:
    """Saves ``state`` (a single-device TrainState) at step ``int(state.step)``.

    Args:
      state: the TrainState pytree, not replicated (unreplicate first).
      epoch, batch_index: the input position to continue from.
      metrics: validation metrics of this state; only checkpoints with
        metrics compete for "best".

    Returns:
      True if a checkpoint was written (False if this step already exists).
    """
    step = int(np.asarray(jax.device_get(state.step)))
    if step in self._manager.all_steps():
      return False
    host_state = jax.device_get(state)
    position = {"epoch": int(epoch), "batch_index": int(batch_index), "step": step,
                "params_sha256": _digest(_params_of(host_state))}
    metrics = None if metrics is None else to_jsonable(dict(metrics))
    self._manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(host_state),
            _POSITION: ocp.args.JsonSave(position),
        }),
        metrics=metrics, force=True)
    return True

  def restore_latest(self, template) -> Optional[Tuple[Any, Position]]:
    """Restores the newest readable checkpoint.

    Unreadable checkpoints newer than it are skipped with a warning and
    deleted, so that the resumed run can write those steps again.

    Args:
      template: a TrainState with the right structure, shapes and dtypes
        (e.g. the freshly initialised one, not replicated, with its power
        state if the training step keeps one).

    Returns:
      ``(state, Position)``, or None when there is no readable checkpoint.

    Raises:
      CheckpointMismatchError: the newest readable checkpoint holds a state
        that differs from ``template`` in structure, shape or dtype (nothing
        is deleted).
    """
    bad = []
    result = None
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        result = _restore(self._manager, step, template)
        break
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        _warn(f"skipping unreadable checkpoint {self.directory / str(step)}: "
              f"{type(e).__name__}: {_first_line(e)}")
        bad.append(step)
    for step in bad:
      try:
        self._manager.delete(step)
      except Exception as e:  # pylint: disable=broad-except
        _warn(f"could not delete unreadable checkpoint at step {step}: {_first_line(e)}")
    return result

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ""


def _best_step(manager) -> Optional[int]:
  steps = set(manager.all_steps())
  with_metrics = [s for s in steps if manager.metrics(s) is not None]
  if not with_metrics:
    return None
  return manager.best_step()


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_specs(tree) -> Dict[str, Tuple[Tuple[int, ...], str]]:
  """``{"a/b/0": (shape, dtype)}`` over the array leaves (empty nodes have none).

  Named tuples, dataclasses, dicts and sequences give the same paths as in
  Orbax's metadata, which stores them as dicts and lists.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(_key_name(k) for k in path)
    out[name] = (tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype).name)
  return out


def _check_matches_template(manager, step: int, template) -> None:
  """Raises CheckpointMismatchError if the saved state cannot fill ``template``.

  Reading the saved tree metadata may fail for a damaged checkpoint; that
  error propagates (the caller treats it as unreadable).
  """
  item_dir = manager.directory / str(step) / _STATE   # an etils Path
  saved = _leaf_specs(ocp.StandardCheckpointHandler().metadata(item_dir))
  wanted = _leaf_specs(template)
  if saved == wanted:
    return
  problems = []
  extra = sorted(set(saved) - set(wanted))
  missing = sorted(set(wanted) - set(saved))
  if extra:
    problems.append(f"only in the checkpoint: {_short(extra)}")
  if missing:
    problems.append(f"only in the template: {_short(missing)}")
  differ = [f"{k} {saved[k][0]} {saved[k][1]} vs {wanted[k][0]} {wanted[k][1]}"
            for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
  if differ:
    problems.append(f"shape/dtype differ: {_short(differ)}")
  if all(k.split("/")[0] == "power" for k in set(saved) ^ set(wanted)):
    hint = ("the training step keeps running power vectors: create the template with "
            "power=losses.init_power_state(...)")
  else:
    hint = "is it the workdir of another config?"
  raise CheckpointMismatchError(
      f"checkpoint at step {step} in {str(item_dir.parent.parent)!r} does not match this "
      f"run's state ({'; '.join(problems)}); {hint}")


def _short(items, limit: int = 4) -> str:
  more = f", ... ({len(items)} in all)" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def _restore(manager, step: int, template):
  if template is not None:
    _check_matches_template(manager, step, template)
  args = {_POSITION: ocp.args.JsonRestore()}
  args[_STATE] = (ocp.args.StandardRestore(_abstract(template)) if template is not None
                  else ocp.args.StandardRestore())
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  state = restored[_STATE]
  pos = restored[_POSITION]
  if not isinstance(pos, Mapping) or int(pos.get("step", -1)) != step:
    raise CheckpointError(f"position record of step {step} is missing or inconsistent")
  if template is not None and int(np.asarray(state.step)) != step:
    raise CheckpointError(f"state of step {step} says step {int(np.asarray(state.step))}")
  if "params_sha256" in pos and _digest(_params_of(state)) != pos["params_sha256"]:
    raise CheckpointError(f"parameters of step {step} do not match their saved checksum")
  return state, Position(int(pos["epoch"]), int(pos["batch_index"]))


def _params_of(state) -> Any:
  if isinstance(state, Mapping):
    if "params" not in state:
      raise CheckpointError("checkpointed state has no 'params' entry")
    return state["params"]
  return state.params


def restore_variables(workdir, which: Union[str, int] = "best"):
  """Restores the model variables of a training run.

  Args:
    workdir: the run's directory.
    which: ``"best"`` (best validation metric; the newest checkpoint when no
      checkpoint has validation metrics), ``"latest"`` or a step number.
      For "best" and "latest", an unreadable checkpoint is skipped with a
      warning in favour of the next candidate (next best, resp. next newest).

  Returns:
    ``(variables, step)``: ``variables = {"params": params}`` (numpy
    arrays, ready for ``model.apply``) and the checkpoint's step.

  Raises:
    CheckpointError: for a missing workdir, no checkpoints, an unknown step
      or no readable checkpoint (one-line message).
  """
  state, step = _restore_tree(workdir, which)
  params = jax.tree_util.tree_map(np.asarray, _params_of(state))
  return {"params": params}, step


def restore_training_view(workdir, which: Union[str, int] = "best"):
  """What a run's training step saw at a checkpoint: variables and power vectors.

  Like :func:`restore_variables`, plus the running power vectors of the
  training state (``TrainState.power``).

  Returns:
    ``(variables, power, step)``: ``power`` is a
    :class:`lipjax.PowerState` (host arrays), or None when the run kept none
    (the cross-entropy loss).
  """
  from lipjax.bounds import PowerState   # pylint: disable=import-outside-toplevel
  state, step = _restore_tree(workdir, which)
  params = jax.tree_util.tree_map(np.asarray, _params_of(state))
  raw = state.get("power") if isinstance(state, Mapping) else getattr(state, "power", None)
  power = None
  if raw is not None:
    vecs = raw.get("vectors") if isinstance(raw, Mapping) else getattr(raw, "vectors", None)
    if vecs is not None:
      power = PowerState(tuple(np.asarray(v) for v in vecs))
  return {"params": params}, power, step


def _restore_tree(workdir, which):
  """``(raw state tree, step)`` of the checkpoint ``which`` names (see restore_variables)."""
  path = _workdir(workdir)
  directory = path / CHECKPOINT_DIR
  if not directory.is_dir():
    raise CheckpointError(f"no checkpoints in workdir {str(path)!r}")
  manager = _make_manager(directory, max_to_keep=1, best_metric=_best_metric_of(path),
                          best_mode=_best_mode_of(path), read_only=True)
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise CheckpointError(f"no checkpoints in {str(directory)!r}")
    if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
      if int(which) not in steps:
        raise CheckpointError(f"no checkpoint at step {int(which)} in {str(directory)!r}; "
                              f"available steps: {steps}")
      candidates = [int(which)]
    elif which == "latest":
      candidates = steps[::-1]
    elif which == "best":
      scored = [s for s in steps if manager.metrics(s) is not None]
      if scored:
        key = _best_fn(_best_metric_of(path), _best_mode_of(path))
        sign = 1 if _best_mode_of(path) == "max" else -1
        # Best first; among equal scores the newest.
        candidates = sorted(scored, key=lambda s: (sign * key(manager.metrics(s)), s),
                            reverse=True)
        candidates += [s for s in steps[::-1] if s not in candidates]
      else:
        candidates = steps[::-1]
    else:
      raise CheckpointError(f"which must be 'best', 'latest' or a step number, got {which!r}")
    errors = []
    for step in candidates:
      try:
        state, _ = _restore(manager, step, None)
        _params_of(state)   # a checkpoint without parameters is unreadable
        return state, int(step)
      except CheckpointError as e:
        errors.append(f"step {step}: {e}")
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"step {step}: {type(e).__name__}: {_first_line(e)}")
      if len(candidates) > 1:
        _warn(f"skipping unreadable checkpoint {directory / str(step)}: {errors[-1]}")
    raise CheckpointError(f"no readable checkpoint in {str(directory)!r} ({errors[-1]})")
  finally:
    manager.close()


def _config_or_empty(path: Path) -> Dict[str, Any]:
  try:
    return load_config(path)
  except CheckpointError:
    return {}


def _best_metric_of(path: Path) -> str:
  return str(_config_or_empty(path).get("best_metric", DEFAULT_BEST_METRIC))


def _best_mode_of(path: Path) -> str:
  return str(_config_or_empty(path).get("best_mode", "max"))
