"""Runs the tests marked ``default_xla`` at XLA's default optimisation level.

The rest of the suite compiles at level 0 (see ``tests/conftest.py``), whose
code rounds differently; the float32-edge regressions must hold for the
forward pass users run, so they run here in a subprocess at the default level.
"""

import os
import subprocess
import sys

import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(conftest.xla_at_default_level(),
                    reason="this process already runs them at the default level")
def test_default_xla_tests_pass_at_the_default_level():
  env = dict(os.environ, LIPJAX_TEST_XLA_DEFAULT="1")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if not f.startswith(conftest.OPT_FLAG))
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-m", "default_xla", os.path.join(ROOT, "tests")],
                        cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, timeout=1800)
  assert proc.returncode == 0, proc.stdout[-6000:]
  tail = proc.stdout.strip().splitlines()[-1]
  assert " passed" in tail and "failed" not in tail and "error" not in tail, tail
