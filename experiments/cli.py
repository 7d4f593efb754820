"""Command-line plumbing of ``experiments.train``, ``.demo`` and ``.certify``.

Every bad input (a flag, a config file or field, a workdir, a data directory)
ends the program with exit code 1 and one line on stderr, ``PROG: error:
MESSAGE``, before any data is loaded or any file is written; never a
traceback. The pieces:

* :class:`InputError`: raised for bad user input anywhere in ``experiments``
  (a ``ValueError``, so library callers can catch it as one).
* :func:`resolve_config_args`: maps ``--config=NAME`` and ``--config NAME``
  (absl's space-separated form) to the config file, checks that the file
  loads and that every ``--config.FIELD`` override names a field (with a
  "did you mean" for a misspelt one).
* :func:`flags_parser`: the ``flags_parser`` of ``absl.app.run``: parses the
  flags and turns any parse error into one line.
* :func:`main_wrapper`: runs a main function, reporting
  :class:`InputError`, ``lipjax.data.DataError`` and
  ``lipjax.training.checkpoints.CheckpointError`` as one line, with JAX's
  persistent compilation cache on (:func:`enable_compilation_cache`).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Callable, List, Optional, Sequence

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_HELP = ("-h", "-?", "--help", "-help", "--helpshort", "--helpfull", "--helpxml")


class InputError(ValueError):
  """Bad user input, reported as one line without a traceback."""


def one_line(message) -> str:
  """``message`` (text or an exception) as a single line."""
  text = str(message).strip() or type(message).__name__
  parts = [p.strip() for p in text.splitlines() if p.strip()]
  return "; ".join(parts)


def fail(prog: str, message) -> None:
  """Prints ``PROG: error: MESSAGE`` (one line) to stderr and exits with code 1."""
  print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(1)


def config_names() -> List[str]:
  """Names of the run configs in ``experiments/configs`` (``base`` excluded)."""
  return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                if f.endswith(".py") and not f.startswith("_") and f != "base.py")


def config_path(value: str) -> str:
  """The file a ``--config`` value names: a path, or a bare name in ``experiments/configs``.

  Raises:
    InputError: if there is no such file.
  """
  name = value
  if os.sep not in name and "/" not in name and not name.endswith(".py"):
    path = os.path.join(CONFIG_DIR, name + ".py")
    if not os.path.isfile(path):
      raise InputError(f"unknown config {name!r}; available: {', '.join(config_names())} "
                       "(or a path to a config file)")
    return path
  path = os.path.expanduser(name)
  if not os.path.isfile(path):
    hint = f"; available names: {', '.join(config_names())}"
    if os.path.isdir(path):
      raise InputError(f"config {value!r} is a directory, not a config file{hint}")
    raise InputError(f"config file {value!r} not found{hint}")
  return path


def load_config_file(path: str, arg: Optional[str] = None):
  """Imports a config file and returns its ``get_config([arg])`` (one-line errors)."""
  try:
    spec = importlib.util.spec_from_file_location("_lipjax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise InputError(f"config file {path!r} has no get_config()")
    return module.get_config(arg) if arg else module.get_config()
  except InputError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f"cannot load config file {path!r}: {type(e).__name__}: "
                     f"{one_line(e)}") from None


def _field_names(config) -> List[str]:
  return list(config.keys()) if hasattr(config, "keys") else []


def check_field(config, dotted: str, flag: str) -> None:
  """Raises InputError unless ``dotted`` (e.g. ``epochs``) is a field of ``config``."""
  node, done = config, []
  for part in dotted.split("."):
    names = _field_names(node)
    if part not in names:
      where = f"config.{'.'.join(done)}" if done else "the config"
      close = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
      hint = f"; did you mean {'.'.join(done + [close[0]])!r}?" if close else \
          f"; fields: {', '.join(sorted(names))}"
      raise InputError(f"{flag}: {where} has no field {part!r}{hint}")
    node, done = node[part], done + [part]


def resolve_config_args(argv: Sequence[str], *, required: bool = True,
                        default: Optional[str] = None) -> List[str]:
  """Normalises and checks the ``--config`` arguments of a command line.

  ``--config NAME`` and ``--config=NAME`` (also with one dash) become
  ``--config=experiments/configs/NAME.py``; a path stays a path. The config
  file is loaded once here, and every ``--config.FIELD[=VALUE]`` must name
  one of its fields.

  Args:
    argv: the command line, program name first.
    required: whether ``--config`` must be given.
    default: the config file used when ``--config`` is absent (added to the
      command line).

  Returns:
    The normalised command line.

  Raises:
    InputError: no, an unknown or a broken config file, or an override of a
      field the config does not have.
  """
  argv = list(argv)
  out, overrides, config_value = argv[:1], [], None
  i = 1
  while i < len(argv):
    arg = argv[i]
    if arg == "--":
      out += argv[i:]
      break
    bare = arg.lstrip("-")
    dashes = len(arg) - len(bare)
    if dashes in (1, 2) and (bare == "config" or bare.startswith("config=")):
      if bare == "config":
        if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
          raise InputError("--config needs a value: a file in experiments/configs/ or its "
                           f"name ({', '.join(config_names())})")
        value, i = argv[i + 1], i + 1
      else:
        value = bare[len("config="):]
      if not value:
        raise InputError("--config is empty: give a config file or one of "
                         f"{', '.join(config_names())}")
      name, sep, rest = value.partition(":")
      config_value = (config_path(name), rest if sep else None)
      out.append("--config=" + config_value[0] + (":" + rest if sep else ""))
    elif dashes in (1, 2) and bare.startswith("config."):
      field = bare[len("config."):].partition("=")[0]
      overrides.append((field, arg))
      out.append(arg)
    else:
      out.append(arg)
    i += 1
  if config_value is None:
    if default is None:
      if required:
        raise InputError("--config is required: a file in experiments/configs/ or its name "
                         f"({', '.join(config_names())}), e.g. --config=demo")
      return out
    config_value = (default, None)
    out.insert(1, "--config=" + default)
  config = load_config_file(*config_value)
  for field, flag in overrides:
    check_field(config, field, flag)
  return out


def flags_parser(prog: str, *, config_holders: Sequence = (), required_config: bool = True,
                 default_config: Optional[str] = None) -> Callable[[List[str]], List[str]]:
  """A ``flags_parser`` for ``absl.app.run`` that reports every error in one line.

  Args:
    prog: program name of the error line.
    config_holders: ``config_flags.DEFINE_config_file`` results; their value
      is built inside the parser, so that a bad override value fails here.
    required_config: whether ``--config`` must be given (when there are
      config holders).
    default_config: config file used when ``--config`` is absent.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel

  def parse(argv):
    try:
      if config_holders and not any(a.split("=")[0] in _HELP for a in argv[1:]):
        argv = resolve_config_args(argv, required=required_config, default=default_config)
      rest = flags.FLAGS(argv)
      for holder in config_holders:
        holder.value   # pylint: disable=pointless-statement
      return rest
    except flags.Error as e:
      fail(prog, e)
    except Exception as e:  # pylint: disable=broad-except
      fail(prog, e if isinstance(e, InputError) else f"{type(e).__name__}: {one_line(e)}")
    return None
  return parse


def known_errors():
  """The exception types reported as one line by :func:`main_wrapper`."""
  # pylint: disable=import-outside-toplevel
  from lipjax.data import DataError
  from lipjax.training.checkpoints import CheckpointError
  return (InputError, DataError, CheckpointError)


COMPILATION_CACHE_ENV = "LIPJAX_COMPILATION_CACHE"


def enable_compilation_cache() -> Optional[str]:
  """Turns on JAX's persistent compilation cache; returns its folder or None.

  A second run of a command (another evaluation of the same model, a resumed
  training run) then loads the compiled programs instead of compiling them
  again (tens of seconds per program on a CPU). The folder is
  ``$JAX_COMPILATION_CACHE_DIR`` when JAX was given one, else
  ``$LIPJAX_COMPILATION_CACHE``, else ``~/.cache/lipjax/xla``;
  ``LIPJAX_COMPILATION_CACHE=`` (empty) turns it off. Programs that call
  back into Python (the exact dense-layer norms) are compiled every time.
  """
  import jax   # pylint: disable=import-outside-toplevel
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  folder = os.environ.get(COMPILATION_CACHE_ENV)
  if folder is None:
    folder = os.path.join(os.path.expanduser("~"), ".cache", "lipjax", "xla")
  if not folder:
    return None
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError:
    return None   # a read-only home: run without the cache
  jax.config.update("jax_compilation_cache_dir", folder)
  return folder


def main_wrapper(prog: str, main: Callable[[List[str]], Optional[int]]):
  """``main`` for ``absl.app.run`` with one-line reports of bad input.

  Unexpected positional arguments are reported too. ``main`` may return an
  exit code.
  """

  def wrapped(argv):
    if len(argv) > 1:
      fail(prog, f"unexpected arguments {argv[1:]} (flags are --name=value)")
    enable_compilation_cache()
    try:
      code = main(argv)
    except known_errors() as e:
      fail(prog, e)
    sys.exit(code or 0)
  return wrapped


# ----------------------------------------------------------------------------
# A trained run: its checkpoint flag, model and variables
# ----------------------------------------------------------------------------


def parse_checkpoint(text):
  text = str(text).strip()
  if text in ("best", "latest"):
    return text
  try:
    step = int(text)
  except ValueError:
    raise InputError(f"--checkpoint must be best, latest or a step number, got {text!r}") \
        from None
  if step < 0:
    raise InputError(f"--checkpoint step must be >= 0, got {step}")
  return step


def build_model(config):
  """The zoo model a run's config describes (input shape from its data set)."""
  import lipjax   # pylint: disable=import-outside-toplevel
  from lipjax import data   # pylint: disable=import-outside-toplevel
  for field in ("model", "activation", "num_classes", "dataset"):
    if field not in config:
      raise InputError(f"config.json has no field {field!r}")
  from experiments import train_lib   # pylint: disable=import-outside-toplevel
  try:
    shape = data.info(config["dataset"]).image_shape
    cfg = {"init": -1.0, **config}
    if ":" not in str(config["model"]):
      return lipjax.models.get(config["model"], num_classes=int(config["num_classes"]),
                               activation=config["activation"], input_shape=shape,
                               **dict(config.get("model_options") or {}))
    return train_lib.build_model(cfg, shape)
  except (ValueError, KeyError) as e:
    raise InputError(f"config.json does not describe a model: {e}") from None


def check_variables(model, variables, shape=None):
  """Raises InputError unless ``variables`` fit ``model`` (structure and shapes).

  ``shape``: one example's shape, for a model without ``input_shape``.
  """
  import jax   # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp   # pylint: disable=import-outside-toplevel
  import numpy as np   # pylint: disable=import-outside-toplevel
  shape = tuple(getattr(model, "input_shape", None) or shape)
  want = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
  want_p = want["params"]
  have_p = variables.get("params", {})
  w_leaves = jax.tree_util.tree_leaves_with_path(want_p)
  h_leaves = dict((jax.tree_util.keystr(p), np.shape(v))
                  for p, v in jax.tree_util.tree_leaves_with_path(have_p))
  for path, leaf in w_leaves:
    k = jax.tree_util.keystr(path)
    if k not in h_leaves:
      raise InputError(f"checkpoint does not match the config's model: parameter {k} is "
                       "missing")
    if tuple(h_leaves[k]) != tuple(leaf.shape):
      raise InputError(f"checkpoint does not match the config's model: parameter {k} has "
                       f"shape {tuple(h_leaves[k])}, the model expects {tuple(leaf.shape)}")
  extra = set(h_leaves) - {jax.tree_util.keystr(p) for p, _ in w_leaves}
  if extra:
    raise InputError(f"checkpoint does not match the config's model: unexpected parameter "
                     f"{sorted(extra)[0]}")
