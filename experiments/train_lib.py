"""Certified training loop: data, schedules, checkpoints, evaluation.

``train_and_evaluate(config, workdir)`` trains a zoo model with the certified
training step on all devices (``config.parallel``: ``jax.pmap`` over each
process's devices, or ``jax.jit`` over a mesh of all of them), checkpoints to
``workdir`` (resuming from it when it already holds checkpoints), selects the
best checkpoint on a validation split held out from the training set, and
finally certifies the test split with a sound bound. See ``experiments/configs/base.py`` for the
config fields and :mod:`lipjax.training.checkpoints` for the workdir layout.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import os
from pathlib import Path
import time
from typing import Any, Dict, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lipjax
from experiments.cli import InputError
from lipjax import data
from lipjax.evaluation import diagnostics
from lipjax.training import checkpoints
from lipjax.training import losses as losses_lib
from lipjax.training import schedules
from lipjax.training import sharded
from lipjax.training import step as step_lib

_HOLDOUT_SEED = 20211102   # fixes which training images form the validation split


def _as_dict(config) -> Dict[str, Any]:
  if hasattr(config, "to_dict"):
    return config.to_dict()
  return dict(config)


def check_config(cfg: Mapping[str, Any]) -> None:
  """Raises :class:`~experiments.cli.InputError` (one line) for an inconsistent config.

  Checks names (model, activation, data set, losses, bounds) and ranges; reads
  no file.
  """
  choices = {"loss": ("gloro", "bcp", "ce"), "bound": ("local", "global"),
             "val_bound": ("train", "local", "global"), "certify_bound": ("local", "global"),
             "estimator": ("power", "lanczos"), "intermediate": ("auto", "global", "local"),
             "certify_checkpoint": ("best", "latest"), "best_mode": ("max", "min"),
             "grad": ("constant", "through"),
             "activation": tuple(lipjax.models.ACTIVATIONS),
             "dataset": tuple(sorted(data.DATASETS))}
  for key, allowed in choices.items():
    if cfg[key] not in allowed:
      raise InputError(f"config.{key} must be one of {', '.join(allowed)}; got {cfg[key]!r}")
  if _parallel(cfg) not in PARALLEL_PATHS:
    raise InputError(f"config.parallel must be one of {', '.join(PARALLEL_PATHS)}; got "
                     f"{_parallel(cfg)!r}")
  try:
    losses_lib.check_bound_options(bound_options(cfg), grad=cfg["grad"])
  except ValueError as e:
    raise InputError(f"config: {e}") from None
  model = cfg["model"]
  if not isinstance(model, str) or (":" not in model and model not in lipjax.models.NAMES):
    raise InputError(f"config.model must be one of {', '.join(lipjax.models.NAMES)} or an "
                     f"import path 'package.module:ModelClass'; got {model!r}")
  if ":" in model:
    model_from_path(model)   # one line if it does not import
  options = cfg.get("model_options", {}) or {}
  if not hasattr(options, "items"):
    raise InputError(f"config.model_options must be a dict, got {options!r}")
  for key in ("batch_size", "epochs", "keep_checkpoints", "val_every_epochs",
              "log_every_steps", "certify_batch_size", "iterations"):
    if not _finite(cfg[key]) or int(cfg[key]) < 1:
      raise InputError(f"config.{key} must be >= 1, got {cfg[key]!r}")
  if int(cfg["num_classes"]) < 2:
    raise InputError(f"config.num_classes must be >= 2, got {cfg['num_classes']!r}")
  for key in ("eps_train", "lr", "end_lr", "warmup_epochs", "rampup_epochs",
              "val_examples", "train_examples", "max_steps", "checkpoint_every_steps",
              "num_test", "sparsity_weight", "diag_examples"):
    if not _finite(cfg[key]) or not float(cfg[key]) >= 0:
      raise InputError(f"config.{key} must be a finite number >= 0, got {cfg[key]!r}")
  if not _finite(cfg["eps_test"]) or not float(cfg["eps_test"]) > 0:
    raise InputError(f"config.eps_test must be a finite radius > 0, got {cfg['eps_test']!r}")


def bound_options(cfg: Mapping[str, Any]) -> Dict[str, Any]:
  """The training-estimator options of a config (``bound_options`` of the step)."""
  inter = cfg.get("intermediate", "auto")
  return {"estimator": cfg.get("estimator", "power"),
          "intermediate": None if inter == "auto" else inter,
          "pair": bool(cfg.get("pair_bounds", False)),
          "box_clip": bool(cfg.get("box_clip", False)),
          "radius_grad": bool(cfg.get("radius_grad", False))}


def validation_bound(cfg: Mapping[str, Any]) -> str:
  """The sound bound of ``val_certified_accuracy``: ``val_bound``, where
  ``"train"`` means the bound the run trains with."""
  vb = cfg.get("val_bound", "train")
  return cfg["bound"] if vb == "train" else vb


def _finite(value) -> bool:
  try:
    return math.isfinite(float(value))
  except (TypeError, ValueError):
    return False


# ----------------------------------------------------------------------------
# The workdir: a new run, or the same run again
# ----------------------------------------------------------------------------

# Fields that may differ when an existing run is started again: they change
# neither the trained weights nor the metrics already logged. max_steps only
# says where training stops (the schedules do not depend on it), so raising
# it continues the same run.
# parallel picks how the same step is spread over the devices (pmap or jit),
# not what it computes, so a run started on one path resumes on the other.
RESUMABLE_CHANGES = ("progress", "certify_batch_size", "data_dir", "max_steps", "parallel")
# What runs started before a field existed did: an absent field is equal to this
# value, not to today's default (a run never resumes with another estimator).
LEGACY_DEFAULTS = {"estimator": "power", "intermediate": "auto", "val_bound": "global",
                   "diag_examples": 0, "parallel": "pmap", "pair_bounds": False,
                   "box_clip": False, "radius_grad": False}
# Fields config.json holds besides the config, computed from the data.
DERIVED_FIELDS = ("steps_per_epoch", "total_steps", "train_examples_used", "image_shape")


def _norm(value):
  """A JSON round trip, so that saved and new values compare alike (tuples = lists)."""
  return json.loads(json.dumps(checkpoints.to_jsonable(value)))


def _show(value) -> str:
  return repr(value) if isinstance(value, str) else json.dumps(_norm(value))


def config_differences(saved: Mapping[str, Any], cfg: Mapping[str, Any]):
  """``[(field, saved value, new value)]`` of the fields where a resumed run would differ.

  A field of ``cfg`` that ``saved`` lacks (the run was started before the
  field existed) counts as equal when it has the value such runs used
  (:data:`LEGACY_DEFAULTS`, else the default of
  ``experiments/configs/base.py``); that value is shown as ``"(absent)"``.
  Fields of :data:`RESUMABLE_CHANGES`, the derived fields and fields that
  only ``saved`` has are not compared.
  """
  from experiments.configs import base   # pylint: disable=import-outside-toplevel
  defaults = dict(base.get_config().to_dict(), **LEGACY_DEFAULTS)
  diffs = []
  for key in sorted(cfg):
    if key in RESUMABLE_CHANGES or key in DERIVED_FIELDS:
      continue
    new = _norm(cfg[key])
    if key in saved:
      if _norm(saved[key]) != new:
        diffs.append((key, saved[key], cfg[key]))
    elif not (key in defaults and _norm(defaults[key]) == new):
      diffs.append((key, "(absent)", cfg[key]))
  return diffs


def _refuse(workdir, what: str, diffs) -> InputError:
  shown = "; ".join(f"{k}: {v if v == '(absent)' else _show(v)} in the run, {_show(n)} now"
                    for k, v, n in diffs)
  return InputError(
      f"workdir {str(workdir)!r} holds a run with {what} ({shown}); nothing was changed. "
      f"To resume that run, start it with its own config (see its config.json: drop the "
      f"overrides); to start a new run, pass a new --workdir")


def check_workdir(cfg: Mapping[str, Any], workdir) -> Optional[Dict[str, Any]]:
  """Checks that ``workdir`` can hold this run, before anything is read or written.

  A new (absent or empty) workdir must be creatable. An existing run (its
  ``config.json``) is resumed only with the same config: any field other than
  :data:`RESUMABLE_CHANGES` that differs is refused, so that a resumed run
  never mixes two configs in one history.

  Returns:
    The run's saved config, or None for a new run.

  Raises:
    InputError: workdir is a file, cannot be created or written, or holds a
      run of another config (one line naming the differing fields).
    CheckpointError: its config.json is unreadable.
  """
  if workdir is None or str(workdir).strip() == "":
    raise InputError("--workdir is empty: give the run's directory")
  path = Path(workdir).expanduser()
  if path.exists() and not path.is_dir():
    raise InputError(f"--workdir {str(workdir)!r} is a file, not a directory")
  if not path.exists():
    parent = path.absolute().parent
    while not parent.exists():
      parent = parent.parent
    if not parent.is_dir():
      raise InputError(f"cannot create --workdir {str(workdir)!r}: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
      raise InputError(f"cannot create --workdir {str(workdir)!r}: {str(parent)!r} is not "
                       "writable")
    return None
  if not os.access(path, os.W_OK | os.X_OK):
    raise InputError(f"--workdir {str(workdir)!r} is not writable")
  if not (path / checkpoints.CONFIG_FILE).exists():
    return None
  saved = checkpoints.load_config(path)
  diffs = config_differences(saved, cfg)
  if diffs:
    raise _refuse(workdir, "another config", diffs)
  return saved


def check_derived(saved: Mapping[str, Any], derived: Mapping[str, Any], workdir) -> None:
  """Raises InputError if the data of a resumed run differ from the run's own."""
  diffs = [(k, saved[k], v) for k, v in derived.items()
           if k in saved and k != "total_steps" and _norm(saved[k]) != _norm(v)]
  if diffs:
    raise _refuse(workdir, "other training data", diffs)


def check_data_dir(cfg: Mapping[str, Any]) -> None:
  """Raises InputError if a named data directory (config or environment) does not exist."""
  if cfg["data_dir"]:
    where, value = "--config.data_dir", cfg["data_dir"]
  elif os.environ.get(data.DATA_DIR_ENV):
    where, value = f"${data.DATA_DIR_ENV}", os.environ[data.DATA_DIR_ENV]
  else:
    return
  if not Path(value).expanduser().is_dir():
    raise InputError(f"{where}={value!r} does not exist or is not a directory (it should hold "
                     f"the {cfg['dataset']} files; leave it unset to use the installed "
                     "sources)")


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------

def load_data(cfg: Mapping[str, Any]):
  """Returns ``(train, val, test)`` Datasets; val is held out from train_split."""
  data_dir = cfg["data_dir"] or None
  full = data.load(cfg["dataset"], cfg["train_split"], data_dir=data_dir)
  n_val = int(cfg["val_examples"])
  if n_val >= len(full):
    raise InputError(f"config.val_examples ({n_val}) must be smaller than the training "
                     f"split ({len(full)} images)")
  order = np.random.default_rng(_HOLDOUT_SEED).permutation(len(full))
  val_idx, train_idx = np.sort(order[len(full) - n_val:]), np.sort(order[:len(full) - n_val])
  if int(cfg["train_examples"]):
    train_idx = train_idx[:int(cfg["train_examples"])]
  def make(idx, src=full):
    return data.Dataset(src.images[idx], src.labels[idx], src.num_classes, src.name)

  train, val = make(train_idx), (make(val_idx) if n_val else None)
  del full, make   # the subsets are copies: free the full split
  split = test_split(cfg)
  test = data.load(cfg["dataset"], split, data_dir=data_dir) if split else None
  return train, val, test


def test_split(cfg: Mapping[str, Any]) -> str:
  """The split the final test certifies: ``test_split``, cut to ``num_test`` images."""
  split = cfg["test_split"]
  if int(cfg["num_test"]) and split and "[" not in split:
    split = f"{split}[:{int(cfg['num_test'])}]"
  return split


def length_text(cfg: Mapping[str, Any]) -> str:
  """How long a run trains, in the config's terms (epochs, or max_steps when set)."""
  if int(cfg["max_steps"]):
    return (f"at most {int(cfg['max_steps'])} steps (max_steps; schedules of "
            f"{cfg['epochs']} epoch(s))")
  return f"{cfg['epochs']} epoch(s)"


def train_time_text(result: Mapping[str, Any]) -> str:
  """Training time of one ``train_and_evaluate`` call, saying so when it resumed a run."""
  done, step = int(result["steps_trained"]), int(result["step"])
  if done == 0:
    return "0s (trained before)"
  if done < step:
    return f"{result['train_seconds']:.0f}s (last {done} of {step} steps)"
  return f"{result['train_seconds']:.0f}s"


# ----------------------------------------------------------------------------
# Schedules and the data-parallel step
# ----------------------------------------------------------------------------

def make_schedules(cfg: Mapping[str, Any], steps_per_epoch: int):
  """Returns ``(eps_schedule, kappa_schedule, lr_schedule)``, each step -> value."""
  warm, ramp = float(cfg["warmup_epochs"]), float(cfg["rampup_epochs"])
  return (schedules.eps_schedule(float(cfg["eps_train"]), steps_per_epoch, warm, ramp),
          schedules.kappa_schedule(steps_per_epoch, warm, ramp),
          schedules.lr_schedule(float(cfg["lr"]), float(cfg["end_lr"]), int(cfg["epochs"]),
                                steps_per_epoch, hold_epochs=_lr_hold(cfg)))


def _lr_hold(cfg: Mapping[str, Any]):
  hold = int(cfg.get("lr_hold_epochs", -1))
  return None if hold < 0 else hold


#: Values of ``config.parallel``: how the training step uses the devices.
PARALLEL_PATHS = ("pmap", "jit")


def _parallel(cfg: Mapping[str, Any]) -> str:
  """``cfg["parallel"]``; a config of older code without the field gets the default."""
  if "parallel" in cfg:
    return cfg["parallel"]
  from experiments.configs import base   # pylint: disable=import-outside-toplevel
  return base.get_config().parallel


class ParallelStep(NamedTuple):
  """The training step of one ``config.parallel`` path and its data layout.

  Attributes:
    step: ``step(state, images, labels) -> (state, metrics)`` on the laid out
      state and batch.
    place: host/single-device ``TrainState`` -> the step's state layout.
    host: the step's state -> one ``TrainState`` without a device axis (to
      checkpoint or evaluate).
    batch: this process's part of the batch ``(B, ...)`` -> the step's input.
    metrics: the step's metrics -> ``{name: float}`` on the host.
  """

  step: Any
  place: Any
  host: Any
  batch: Any
  metrics: Any


def make_parallel_step(cfg: Mapping[str, Any], model, optimizer, *, eps_schedule,
                       kappa_schedule) -> ParallelStep:
  """The certified training step of ``cfg`` on the path ``cfg["parallel"]``.

  ``"pmap"``: :func:`lipjax.training.step.make_parallel_train_step` over the
  local devices (state with a leading device axis, batch ``(D, B/D, ...)``).
  ``"jit"``: :func:`lipjax.training.sharded.make_sharded_train_step` over a
  mesh of every process's devices (replicated state, batch split along the
  mesh's ``data`` axis). Both compute the single-device step on the global
  batch and checkpoint the same state, so either resumes the other's run.
  """
  kwargs = dict(loss=cfg["loss"], bound=cfg["bound"], iterations=int(cfg["iterations"]),
                grad=cfg["grad"], sparsity_weight=float(cfg["sparsity_weight"]),
                eps_schedule=eps_schedule, kappa_schedule=kappa_schedule,
                bound_options=bound_options(cfg))
  path = _parallel(cfg)
  if path == "pmap":
    num_devices = jax.local_device_count()

    def first(metrics):   # the first replica's copy
      metrics = jax.device_get(metrics)
      return {k: float(np.asarray(v)[0]) for k, v in metrics.items()}

    return ParallelStep(step_lib.make_parallel_train_step(model, optimizer, **kwargs),
                        step_lib.replicate, step_lib.unreplicate,
                        lambda x: step_lib.shard_batch(x, num_devices), first)
  if path == "jit":
    step = sharded.make_sharded_train_step(model, optimizer, **kwargs)
    mesh = step.mesh
    return ParallelStep(
        step, lambda state: sharded.replicate_on_mesh(state, mesh), sharded.fetch_replicated,
        lambda x: sharded.shard_batch_on_mesh(x, mesh),
        lambda metrics: {k: float(v) for k, v in sharded.fetch_replicated(metrics).items()})
  raise InputError(f"config.parallel must be one of {', '.join(PARALLEL_PATHS)}; got {path!r}")


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------

def evaluate(model, variables, ds, eps: float, *, bound: str, batch_size: int) -> Dict[str, float]:
  """Clean and certified accuracy of ``variables`` on ``ds`` at radius ``eps``.

  Uses :func:`lipjax.certify` with the sound ``bound``; a point counts as
  certified only if it is correctly classified and certified.
  """
  x, y = jnp.asarray(ds.images), jnp.asarray(ds.labels)
  cert = lipjax.certify(model, variables, x, y, eps, bound=bound, batch_size=batch_size)
  pred = np.asarray(cert.predicted)
  certified = np.asarray(cert.certified) & (pred == np.asarray(ds.labels))
  return {"clean_accuracy": float(np.mean(pred == np.asarray(ds.labels))),
          "certified_accuracy": float(np.mean(certified)),
          "max_failure_probability": float(np.max(np.asarray(cert.failure_probability)))}


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------

def errors_line(e: Exception) -> str:
  """The first line of an exception's message (at most 120 characters)."""
  first = (str(e).strip().splitlines() or [""])[0]
  return first if len(first) <= 120 else first[:117] + "..."


def model_from_path(path: str):
  """The object an import path ``"package.module:Name"`` names.

  Raises:
    InputError: one line when the module does not import or lacks the name.
  """
  module_name, _, attr = path.partition(":")
  if not module_name or not attr:
    raise InputError(f"config.model={path!r}: an import path must read "
                     "'package.module:ModelClass'")
  try:
    obj = importlib.import_module(module_name)
  except Exception as e:   # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [""])[0]
    raise InputError(f"config.model={path!r}: cannot import {module_name!r} "
                     f"({type(e).__name__}: {first})") from None
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise InputError(f"config.model={path!r}: module {module_name!r} has no "
                       f"attribute {attr!r}")
    obj = getattr(obj, part)
  return obj


def build_model(cfg: Mapping[str, Any], image_shape):
  """The model a config names: a zoo name (:func:`lipjax.models.get`) or an
  import path ``"package.module:Name"``.

  An import path may name a ``flax.linen.Module`` class, built with
  ``config.model_options`` as keyword arguments plus ``num_classes`` and
  ``input_shape`` when the class has those fields, or a module instance,
  used as it is. It may also name a ``flax.nnx.Module`` class, built the same
  way (its ``__init__`` parameters) with ``rngs=nnx.Rngs(config.seed)``, or an
  NNX module instance; either comes back as the linen-style adapter of
  :func:`lipjax.models.from_nnx` (``init`` / ``apply``). Zoo models get
  ``config.model_options`` as options (e.g. ``width`` and ``blocks`` of
  ``"liresnet"``).
  """
  import flax.linen as fnn   # pylint: disable=import-outside-toplevel
  from flax import nnx   # pylint: disable=import-outside-toplevel
  options = dict(cfg.get("model_options", {}) or {})
  name = cfg["model"]
  if ":" in name:
    obj = model_from_path(name)
    if isinstance(obj, type) and issubclass(obj, fnn.Module):
      fields = {f.name for f in dataclasses.fields(obj)}
      kwargs = {}
      if "num_classes" in fields:
        kwargs["num_classes"] = int(cfg["num_classes"])
      if "input_shape" in fields:
        kwargs["input_shape"] = tuple(image_shape)
      kwargs.update(options)
      try:
        return obj(**kwargs)
      except TypeError as e:
        raise InputError(f"config.model={name!r}: {e}") from None
    if isinstance(obj, type) and issubclass(obj, nnx.Module):
      params = inspect.signature(obj.__init__).parameters
      kwargs = {}
      if "num_classes" in params:
        kwargs["num_classes"] = int(cfg["num_classes"])
      if "input_shape" in params:
        kwargs["input_shape"] = tuple(image_shape)
      kwargs.update(options)
      if "rngs" in params:
        kwargs["rngs"] = nnx.Rngs(int(cfg.get("seed", 0)))
      try:
        return lipjax.models.from_nnx(obj(**kwargs))
      except TypeError as e:
        raise InputError(f"config.model={name!r}: {errors_line(e)}") from None
    if isinstance(obj, nnx.Module):
      if options:
        raise InputError(f"config.model={name!r} names a module instance; "
                         "config.model_options must be empty")
      return lipjax.models.from_nnx(obj)
    if isinstance(obj, fnn.Module):
      if options:
        raise InputError(f"config.model={name!r} names a module instance; "
                         "config.model_options must be empty")
      return obj
    raise InputError(f"config.model={name!r} names a {type(obj).__name__}, not a "
                     "flax.linen.Module or flax.nnx.Module class or instance")
  init = float(cfg["init"])
  try:
    return lipjax.models.get(name, num_classes=int(cfg["num_classes"]),
                             activation=cfg["activation"], init=None if init < 0 else init,
                             input_shape=tuple(image_shape), **options)
  except ValueError as e:
    raise InputError(f"config.model={name!r}: {e}") from None


def initial_state(cfg: Mapping[str, Any], model, variables, image_shape, optimizer, *,
                  power_key, step_key) -> step_lib.TrainState:
  """The step-0 :class:`~lipjax.training.step.TrainState` of a run.

  Both bounds keep running power vectors in the state (the certified step
  returns them whatever the bound; the "ce" loss keeps None), so this state
  already has the pytree structure, shapes and dtypes of every later one: it
  is the template a resumed run restores into, and the step compiles once.

  Args:
    cfg: the config (``loss`` is read).
    model, variables: the model and its initial ``{"params": ...}``.
    image_shape: ``(H, W, C)`` of one example.
    optimizer: the Optax transformation of the step.
    power_key, step_key: PRNG keys of the power vectors and of the step.
  """
  power = None
  if cfg["loss"] != "ce":
    power = losses_lib.init_power_state(model, variables, tuple(image_shape), power_key)
  return step_lib.create_train_state(variables["params"], optimizer, rng=step_key,
                                     power=power)


def _progress(total, initial, enabled):
  if not enabled or jax.process_index() != 0:
    return None
  try:
    from tqdm import tqdm
  except ImportError:
    return None
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


class _TensorBoard:
  """Scalars of every metrics record to ``workdir/tensorboard`` when tensorboardX is installed."""

  def __init__(self, workdir):
    self.writer = None
    try:
      from tensorboardX import SummaryWriter   # pylint: disable=import-outside-toplevel
    except ImportError:
      return
    self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, record):
    if self.writer is None:
      return
    split, step = record.get("split", "train"), int(record.get("step", 0))
    for k, v in record.items():
      if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
        self.writer.add_scalar(f"{split}/{k}", float(v), step)
    self.writer.flush()

  def close(self):
    if self.writer is not None:
      self.writer.close()


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains, checkpoints, validates and certifies; resumes from ``workdir``.

  Args:
    config: an ``ml_collections.ConfigDict`` (or mapping) with the fields of
      ``experiments/configs/base.py``.
    workdir: directory for config.json, metrics.jsonl, checkpoints/ and
      tensorboard/. If it already holds a run of this config, training
      continues from the newest readable checkpoint exactly where it stopped
      (or, when it is complete, only certifies again).

  Returns:
    A dict with the final step, ``total_steps``, ``steps_per_epoch``,
    ``steps_trained`` (by this call), the test split's clean and certified
    accuracy at ``eps_test`` (sound ``certify_bound``), the checkpoint step
    they were measured on and timings.

  Raises:
    InputError: a bad config, a workdir that holds a run of another config
      (see :func:`check_workdir`) or another unusable workdir, or a named
      data directory that does not exist; raised before data loads and
      before anything is written.
    lipjax.data.DataError: the data cannot be found or read (nothing is
      written either).
  """
  cfg = _as_dict(config)
  # Everything the user gave is checked before data loads and before any
  # file is written (a refused command leaves the workdir as it was).
  check_config(cfg)
  saved = check_workdir(cfg, workdir)
  check_data_dir(cfg)
  process_count, process_index = jax.process_count(), jax.process_index()
  num_devices = jax.local_device_count()
  if cfg["batch_size"] % process_count:
    raise InputError(f"config.batch_size ({cfg['batch_size']}) must be divisible by the "
                     f"number of processes ({process_count})")
  if (cfg["batch_size"] // process_count) % num_devices:
    raise InputError(f"the per-process batch ({cfg['batch_size'] // process_count}) must be "
                     f"divisible by the {num_devices} local devices")
  t_start = time.time()
  train_ds, val_ds, test_ds = load_data(cfg)
  steps_per_epoch = data.num_batches(train_ds, int(cfg["batch_size"]))
  if steps_per_epoch < 1:
    raise InputError(f"the training split ({len(train_ds)} images) is smaller than one "
                     f"batch ({cfg['batch_size']})")
  total_steps = int(math.ceil(float(cfg["epochs"]) * steps_per_epoch))
  if int(cfg["max_steps"]):
    total_steps = min(total_steps, int(cfg["max_steps"]))
  num_epochs = int(math.ceil(total_steps / steps_per_epoch))
  derived = {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
             "train_examples_used": len(train_ds), "image_shape": list(train_ds.image_shape)}
  if saved is not None:
    check_derived(saved, derived, workdir)

  model = build_model(cfg, train_ds.image_shape)
  key = jax.random.PRNGKey(int(cfg["seed"]))
  init_key, power_key, step_key = jax.random.split(key, 3)
  variables = model.init(init_key, jnp.zeros((1,) + train_ds.image_shape, jnp.float32))
  eps_schedule, kappa_schedule, lr_schedule = make_schedules(cfg, steps_per_epoch)
  # The step projects the clipped-ReLU thresholds itself; the identity keeps
  # the optimiser state's structure that earlier checkpoints were saved with.
  optimizer = optax.chain(optax.adam(lr_schedule), optax.identity())
  state = initial_state(cfg, model, variables, train_ds.image_shape, optimizer,
                        power_key=power_key, step_key=step_key)
  del variables

  ckpt = checkpoints.TrainCheckpointer(workdir, max_to_keep=int(cfg["keep_checkpoints"]),
                                       best_metric=cfg["best_metric"],
                                       best_mode=cfg["best_mode"])
  try:
    restored = ckpt.restore_latest(state)
  except BaseException:
    ckpt.close()
    raise
  full_config = dict(cfg, **derived)
  if process_index == 0 and (saved is None or _norm(saved) != _norm(full_config)):
    checkpoints.save_config(workdir, full_config)
  epoch, batch_index = 0, 0
  if restored is not None:
    state, position = restored
    epoch, batch_index = position
    done = int(state.step)
    if done >= total_steps:
      print(f"{workdir} is already trained to step {done} (of {total_steps}); nothing to "
            "train, certifying", flush=True)
    else:
      print(f"resuming {workdir} from step {done} of {total_steps} (epoch {epoch}, batch "
            f"{batch_index})", flush=True)
    if process_index == 0:
      checkpoints.truncate_metrics(workdir, done)
  if cfg["bound"] == "local" and validation_bound(cfg) == "global" and val_ds is not None:
    print("note: validation (which picks the best checkpoint) certifies with the global "
          "bound (config.val_bound=global: fast, deterministic, never more than the local "
          f"bound certifies); the final test uses the {cfg['certify_bound']} bound", flush=True)
  parallel = make_parallel_step(cfg, model, optimizer, eps_schedule=eps_schedule,
                                kappa_schedule=kappa_schedule)
  host_step = int(state.step)
  state = parallel.place(state)

  bar = _progress(total_steps, host_step, cfg["progress"] and host_step < total_steps)
  log_every = int(cfg["log_every_steps"])
  ckpt_every = int(cfg["checkpoint_every_steps"])
  t_train = time.time()
  train_time_steps = 0
  line_time, line_steps = time.time(), 0   # time and step count of the last progress line

  board = _TensorBoard(workdir) if process_index == 0 else None

  def say(line):
    """One line of progress (through the bar when there is one)."""
    if process_index != 0:
      return
    if bar is not None:
      bar.write(line)
    else:
      print(line, flush=True)

  def log(record):
    if process_index == 0:
      checkpoints.append_metrics(workdir, record)
      board.write(record)

  since_val = time.time()   # end of the previous validation (or the start)

  val_bound = validation_bound(cfg)
  n_diag = min(int(cfg.get("diag_examples", 0)), len(val_ds)) if val_ds is not None else 0

  def validate(epoch_done):
    nonlocal since_val
    t0 = time.time()
    host = parallel.host(state)
    variables = {"params": jax.device_get(host.params)}
    record = {}
    for vb in (val_bound,) + tuple(b for b in ("local", "global") if b != val_bound):
      m = evaluate(model, variables, val_ds, float(cfg["eps_test"]), bound=vb,
                   batch_size=int(cfg["certify_batch_size"]))
      record[f"val_certified_accuracy_{vb}"] = m["certified_accuracy"]
      if vb == val_bound:
        record["val_clean_accuracy"] = m["clean_accuracy"]
        record["val_certified_accuracy"] = m["certified_accuracy"]
    if n_diag and cfg["loss"] != "ce":
      diag = diagnostics.bound_diagnostics(
          model, variables, val_ds.images[:n_diag], val_ds.labels[:n_diag],
          float(cfg["eps_train"]), bound=cfg["bound"], iterations=int(cfg["iterations"]),
          power=jax.device_get(host.power), estimator=bound_options(cfg))
      record.update({f"diag_{k}": v for k, v in diag.items()})
    # Its cost against the training since the previous validation.
    record.update({"val_seconds": time.time() - t0, "train_seconds_since_val": t0 - since_val})
    since_val = time.time()
    log({"step": host_step, "epoch": epoch_done, "split": "val", "eps": float(cfg["eps_test"]),
         "bound": val_bound, **record})
    return record

  try:
    while host_step < total_steps and epoch < num_epochs:
      it = data.batches(train_ds, int(cfg["batch_size"]), seed=int(cfg["seed"]), epoch=epoch,
                        augment=bool(cfg["augment"]), process_index=process_index,
                        process_count=process_count)
      for _ in range(batch_index):          # fast-forward to the saved position
        next(it)
      for batch in it:
        images, labels = parallel.batch(batch["image"]), parallel.batch(batch["label"])
        state, metrics = parallel.step(state, images, labels)
        host_step += 1
        batch_index += 1
        train_time_steps += 1
        if host_step % log_every == 0 or host_step == total_steps:
          m = parallel.metrics(metrics)
          m["lr"] = float(lr_schedule(host_step - 1))
          log({"step": host_step, "epoch": epoch, "split": "train", **m})
          if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.3f}", eps=f"{m.get('eps', 0.0):.3f}",
                            acc=f"{m['accuracy']:.3f}", cert_est=f"{m['vra_estimate']:.3f}",
                            refresh=False)
          else:   # no bar: one line per log_every_steps steps, with the rate since the last
            now = time.time()
            rate = (now - line_time) / max(train_time_steps - line_steps, 1)
            line_time, line_steps = now, train_time_steps
            say(f"step {host_step}/{total_steps} epoch {epoch}: loss {m['loss']:.4f}, "
                f"accuracy {m['accuracy']:.4f}, eps {m.get('eps', 0.0):.4g}, certified "
                f"(estimate) {m.get('vra_estimate', float('nan')):.4f}, lr {m['lr']:.3g}, "
                f"{rate:.3g} s/step")
        if bar is not None:
          bar.update(1)
        end_of_epoch = batch_index == steps_per_epoch
        if host_step == total_steps or end_of_epoch:
          break
        if ckpt_every and host_step % ckpt_every == 0 and process_index == 0:
          ckpt.save(parallel.host(state), epoch=epoch, batch_index=batch_index)
      if batch_index == steps_per_epoch:
        epoch, batch_index = epoch + 1, 0
      finished = host_step >= total_steps
      val = None
      if val_ds is not None and (epoch % int(cfg["val_every_epochs"]) == 0 or finished):
        val = validate(epoch)
        line_time, line_steps = time.time(), train_time_steps   # the rate leaves validation out
        other = "global" if validation_bound(cfg) == "local" else "local"
        diag = ""
        if "diag_network_ratio_median" in val:
          diag = (f"; training bound / sound local bound at eps_train "
                  f"{float(cfg['eps_train']):.4g}: median "
                  f"{val['diag_network_ratio_median']:.3f}, q10 "
                  f"{val['diag_network_ratio_q10']:.3f}")
        say(f"step {host_step} epoch {epoch}: val clean {val['val_clean_accuracy']:.4f}, "
            f"val certified {val['val_certified_accuracy']:.4f} at eps="
            f"{float(cfg['eps_test']):.4g} ({validation_bound(cfg)} bound, config.val_bound; "
            f"{other} bound: {val[f'val_certified_accuracy_{other}']:.4f}{diag}; "
            f"{val['val_seconds']:.1f} s, {val['train_seconds_since_val']:.0f} s of training "
            "since the last)")
      if process_index == 0:
        ckpt.save(parallel.host(state), epoch=epoch, batch_index=batch_index,
                  metrics=val)
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
  train_seconds = time.time() - t_train

  result = {"step": host_step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
            "steps_trained": train_time_steps, "train_seconds": train_seconds,
            "seconds_per_step": train_seconds / max(train_time_steps, 1)}
  if test_ds is not None:
    variables, ckpt_step = checkpoints.restore_variables(workdir, cfg["certify_checkpoint"])
    t0 = time.time()
    m = evaluate(model, variables, test_ds, float(cfg["eps_test"]), bound=cfg["certify_bound"],
                 batch_size=int(cfg["certify_batch_size"]))
    result.update({"checkpoint_step": ckpt_step, "test_examples": len(test_ds),
                   "certify_seconds": time.time() - t0, **{f"test_{k}": v for k, v in m.items()}})
    log({"step": host_step, "epoch": epoch, "split": "test", "checkpoint_step": ckpt_step,
         "eps": float(cfg["eps_test"]), "bound": cfg["certify_bound"],
         **{f"test_{k}": v for k, v in m.items()}})
    print(f"{cfg['dataset']} {cfg['test_split']} ({len(test_ds)} images), checkpoint step "
          f"{ckpt_step}: clean accuracy {100 * m['clean_accuracy']:.2f}%, certified accuracy "
          f"{100 * m['certified_accuracy']:.2f}% at eps={float(cfg['eps_test']):.4g} "
          f"({cfg['certify_bound']} bound, sound)", flush=True)
  if board is not None:
    board.close()
  result["total_seconds"] = time.time() - t_start
  return result
