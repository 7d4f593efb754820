"""Runs the tests marked ``default_xla`` at XLA's default optimisation level.

The rest of the suite compiles at level 0 (see ``tests/conftest.py``), whose
code rounds differently; the float32-edge regressions must hold for the
forward pass users run, so they run here in a subprocess at the default level.
A session that selects this file starts that subprocess when it begins
(``tests/conftest.py``); the test then only waits for its result.
"""

import os
import subprocess

import pytest

import conftest


@pytest.mark.skipif(conftest.xla_at_default_level(),
                    reason="this process already runs them at the default level")
def test_default_xla_tests_pass_at_the_default_level():
  prefix = os.environ.get(conftest.DEFAULT_XLA_RUN_ENV)
  if prefix:
    returncode, output = conftest.wait_for_default_xla_run(prefix, timeout=1800)
  else:
    proc = subprocess.run(conftest.default_xla_command(), cwd=conftest.ROOT,
                          env=conftest.default_xla_env(), text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=1800)
    returncode, output = proc.returncode, proc.stdout
  assert returncode == 0, output[-6000:]
  tail = output.strip().splitlines()[-1]
  assert " passed" in tail and "failed" not in tail and "error" not in tail, tail
