"""Test-session settings.

Most of the suite's time is XLA compiling many small programs, not running
them, so the tests run with XLA's CPU backend optimisation level 0 (about
half the compile time). Code generated at level 0 rounds differently from the
default (no fused multiply-adds), so tests marked ``default_xla`` (the
float32-edge regressions of ``tests/test_rounding.py``, about the float32
forward pass users run, and ``tests/test_evaluation.py``, which mostly runs
compiled code) are skipped here and run in a subprocess at the default level
by ``tests/test_default_xla.py``. Set
``LIPJAX_TEST_XLA_DEFAULT=1`` to run everything at the default level.

The test process itself runs without JAX's persistent compilation cache
(writing an executable to it crashed the process once in a full run), and
the commands the tests launch too unless ``LIPJAX_COMPILATION_CACHE`` names
a folder (the launcher tests give their runs a shared one of their own), so
nothing is written to the user's cache folder.
"""

import os

import pytest

from experiments import cli

OPT_FLAG = "--xla_backend_optimization_level"



def xla_at_default_level() -> bool:
  """Whether this process compiles at XLA's default optimisation level."""
  return OPT_FLAG not in os.environ.get("XLA_FLAGS", "")


if os.environ.get("LIPJAX_TEST_XLA_DEFAULT") != "1" and xla_at_default_level():
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {OPT_FLAG}=0").strip()


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


#: Test files, longest first (a full run's durations on a 2-core CPU). The
#: parallel workers take whole files in collection order, so starting the
#: long ones first keeps one long file from running alone at the end.
LONGEST_FIRST = ("test_default_xla", "test_train_launcher", "test_nnx", "test_blocks",
                 "test_residual", "test_docs", "test_certify", "test_evaluation",
                 "test_parallel", "test_pairwise", "test_notebook", "test_training")


def _file_rank(item) -> int:
  module = getattr(item, "module", None)
  name = module.__name__.rpartition(".")[2] if module is not None else ""
  return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
  items.sort(key=_file_rank)   # stable: each file's own order is kept
  if xla_at_default_level():
    return
  skip = pytest.mark.skip(reason="run at the default XLA level by tests/test_default_xla.py")
  for item in items:
    if item.get_closest_marker("default_xla") is not None:
      item.add_marker(skip)

