"""Test-session settings.

Most of the suite's time is XLA compiling many small programs, not running
them, so the tests run with XLA's CPU backend optimisation level 0 (about
half the compile time) and the other settings of ``FAST_COMPILE_FLAGS``.
Code generated at level 0 rounds differently from the default (no fused
multiply-adds), so tests marked ``default_xla`` (the
float32-edge regressions of ``tests/test_rounding.py``, about the float32
forward pass users run, and ``tests/test_evaluation.py``, which mostly runs
compiled code) are skipped here and run in a subprocess at the default level
by ``tests/test_default_xla.py``. Set
``LIPJAX_TEST_XLA_DEFAULT=1`` to run everything at the default level.

That subprocess takes about five minutes, so a session whose selection
includes ``tests/test_default_xla.py`` starts it at once, beside the other
tests, and the test only collects its result (it sorts last, so it seldom
waits); a session that would skip the test never starts it.

The test process itself runs without JAX's persistent compilation cache
(writing an executable to it crashed the process once in a full run), and
the commands the tests launch too unless ``LIPJAX_COMPILATION_CACHE`` names
a folder (the launcher tests give their runs a shared one of their own), so
nothing is written to the user's cache folder.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from experiments import cli

OPT_FLAG = "--xla_backend_optimization_level"
#: Compile-time settings of the test process (none changes what an operation
#: computes beyond the level-0 rounding noted above): optimisation level 0,
#: XLA's older elemental emitters (about a third less compile time for the
#: library's certificate programs than the fusion emitters), and one compute
#: thread per process, since the parallel workers already fill the cores.
FAST_COMPILE_FLAGS = (f"{OPT_FLAG}=0", "--xla_cpu_use_fusion_emitters=false",
                      "--xla_cpu_multi_thread_eigen=false")
_FAST_FLAG_NAMES = {f.split("=", 1)[0] for f in FAST_COMPILE_FLAGS}
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)
#: Set by the session that started the default-level run early: the prefix of
#: its ``.log`` (pytest's output) and ``.rc`` (exit status, written last).
DEFAULT_XLA_RUN_ENV = "LIPJAX_TEST_DEFAULT_XLA_RUN"

def xla_at_default_level() -> bool:
  """Whether this process compiles at XLA's default optimisation level."""
  return OPT_FLAG not in os.environ.get("XLA_FLAGS", "")


if os.environ.get("LIPJAX_TEST_XLA_DEFAULT") != "1" and xla_at_default_level():
  os.environ["XLA_FLAGS"] = " ".join(
      (os.environ.get("XLA_FLAGS", ""),) + FAST_COMPILE_FLAGS).strip()


os.environ.setdefault(cli.COMPILATION_CACHE_ENV, "")   # "": the commands' cache off


@pytest.fixture(scope="module", autouse=True)
def _fresh_compiled_programs():
  """Drops JAX's compiled programs after each test module: a full run
  otherwise keeps thousands of executables in one process, and XLA's
  compiler crashed in the last tenth of such runs."""
  yield
  import jax   # pylint: disable=import-outside-toplevel
  jax.clear_caches()


@pytest.fixture(autouse=True)
def _no_persistent_cache_in_this_process():
  """Whatever a test turns on (the commands' switch, tested in-process), the
  test process goes on without the persistent compilation cache."""
  yield
  import jax   # pylint: disable=import-outside-toplevel
  from jax.experimental.compilation_cache import compilation_cache   # pylint: disable=import-outside-toplevel
  if jax.config.jax_compilation_cache_dir is not None:
    jax.config.update("jax_compilation_cache_dir", None)
  compilation_cache.reset_cache()


def pytest_configure(config):
  config.addinivalue_line("markers", "default_xla: runs at XLA's default optimisation level")
  # pytest-xdist's file scheduling otherwise hands out the files with the
  # most tests first, not the collection order below (LONGEST_FIRST), and a
  # long file of few tests (the notebook, the multi-process runs) then starts
  # last and runs alone.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def default_xla_command() -> list:
  """The pytest command that runs the ``default_xla`` tests."""
  return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
          "-m", "default_xla", TESTS_DIR]


def default_xla_env() -> dict:
  """This process's environment without ``FAST_COMPILE_FLAGS``: XLA compiles
  as it does for users (default optimisation level, fusion emitters, threads)."""
  env = dict(os.environ, LIPJAX_TEST_XLA_DEFAULT="1")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if f.split("=", 1)[0] not in _FAST_FLAG_NAMES)
  env.pop(DEFAULT_XLA_RUN_ENV, None)
  return env


def _selects_default_xla_test(config) -> bool:
  """Whether this session's arguments, unfiltered, include that test."""
  if config.option.keyword or config.option.markexpr or config.option.collectonly:
    return False
  target = os.path.join(TESTS_DIR, "test_default_xla.py")
  for arg in config.args:
    path = os.path.abspath(str(arg).split("::", 1)[0])
    if path == target or (os.path.isdir(path) and target.startswith(path + os.sep)):
      return True
  return False


_early_run = {}


def pytest_sessionstart(session):
  """Starts the default-level run beside the suite (controller process only)."""
  config = session.config
  if (hasattr(config, "workerinput") or xla_at_default_level()
      or os.environ.get(DEFAULT_XLA_RUN_ENV) or not _selects_default_xla_test(config)):
    return
  prefix = tempfile.mkdtemp(prefix="lipjax-default-xla-") + os.sep + "run"
  script = '"$0" "$@" > "$LIPJAX_RUN.log" 2>&1; echo $? > "$LIPJAX_RUN.rc.tmp"; ' \
           'mv "$LIPJAX_RUN.rc.tmp" "$LIPJAX_RUN.rc"'
  env = dict(default_xla_env(), LIPJAX_RUN=prefix)
  _early_run["proc"] = subprocess.Popen(["sh", "-c", script, *default_xla_command()],
                                        cwd=ROOT, env=env, start_new_session=True)
  _early_run["prefix"] = prefix
  os.environ[DEFAULT_XLA_RUN_ENV] = prefix   # the workers, started next, inherit it


def pytest_sessionfinish(session):
  proc = _early_run.pop("proc", None)
  if proc is not None and proc.poll() is None:   # interrupted, or the test deselected
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()
  prefix = _early_run.pop("prefix", None)
  if prefix is not None:
    os.environ.pop(DEFAULT_XLA_RUN_ENV, None)
    shutil.rmtree(os.path.dirname(prefix), ignore_errors=True)


def wait_for_default_xla_run(prefix: str, timeout: float) -> tuple:
  """(exit status, output) of the run started by ``pytest_sessionstart``."""
  deadline = time.monotonic() + timeout
  while not os.path.exists(prefix + ".rc"):
    if time.monotonic() > deadline:
      raise TimeoutError(f"the default-level run ({prefix}.log) took over {timeout:.0f} s")
    time.sleep(2.0)
  with open(prefix + ".rc", encoding="utf-8") as f:
    rc = int(f.read().strip())
  with open(prefix + ".log", encoding="utf-8") as f:
    return rc, f.read()


#: Test files, longest first (a full run's seconds per file on a 2-core CPU:
#: 614, 321, 239, 237, 227, 220, 212, 189, 169, 158, 129, then 84 and less).
#: The parallel workers take whole files in collection order, so starting
#: the long ones first keeps one long file from running alone at the end.
#: ``test_default_xla`` sorts last: its run started with the session.
LONGEST_FIRST = ("test_certify", "test_train_launcher", "test_blocks", "test_norms",
                 "test_residual", "test_lipschitz", "test_nnx", "test_pairwise",
                 "test_docs", "test_box_clip", "test_parallel", "test_flax_models",
                 "test_composition", "test_notebook", "test_intervals", "test_training",
                 "test_losses", "test_diagnostics")


def _file_rank(item) -> int:
  module = getattr(item, "module", None)
  name = module.__name__.rpartition(".")[2] if module is not None else ""
  if name == "test_default_xla":
    return len(LONGEST_FIRST) + 1
  return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
  items.sort(key=_file_rank)   # stable: each file's own order is kept
  if xla_at_default_level():
    return
  skip = pytest.mark.skip(reason="run at the default XLA level by tests/test_default_xla.py")
  for item in items:
    if item.get_closest_marker("default_xla") is not None:
      item.add_marker(skip)

