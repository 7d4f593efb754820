"""Data-parallel step: 2 forced CPU devices, and 2 processes, vs one device.

Both run in subprocesses (tests/_parallel_worker.py) so that this process
keeps its single default CPU device.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import _parallel_worker as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_parallel_worker.py")


def _env(xla_flags=None):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  return env


def _check(proc, out):
  if proc.returncode != 0:
    raise AssertionError(f"worker failed ({proc.returncode}):\n{out[-4000:]}")


@pytest.fixture(scope="module")
def reference():
  return W.single_device_run()


def _compare(got, reference):
  params, metrics = reference
  assert params
  for name, want in params.items():
    np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
  for name, want in metrics.items():
    np.testing.assert_allclose(got["metric/" + name], want, rtol=1e-5, atol=1e-6,
                               err_msg=name)


def test_pmapped_step_on_two_devices_matches_one_device(tmp_path, reference):
  path = str(tmp_path / "devices.npz")
  proc = subprocess.run([sys.executable, WORKER, "devices", path], cwd=ROOT,
                        env=_env("--xla_force_host_platform_device_count=2"),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=300)
  _check(proc, proc.stdout)
  got = np.load(path)
  assert int(got["local_devices"]) == 2
  assert bool(got["same_layout"])          # so the step compiles once, not twice
  _compare(got, reference)
  # The run moved the parameters: a mismatch could not pass for lack of training.
  assert any(np.max(np.abs(got[k] - v)) > 1e-3
             for k, v in W._flat("param/", W.problem()[1]).items())
  assert any(k.startswith("power/") for k in got.files)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_together_like_one(tmp_path, reference):
  address = f"127.0.0.1:{_free_port()}"
  paths = [str(tmp_path / f"process{i}.npz") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, WORKER, "process", address, "2", str(i), p],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i, p in enumerate(paths)]
  outs = []
  try:
    for proc in procs:
      outs.append(proc.communicate(timeout=300)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, out in zip(procs, outs):
    _check(proc, out)
  got = [np.load(p) for p in paths]
  for g in got:
    assert int(g["devices"]) == 2 and int(g["local_devices"]) == 1
  for name in got[0].files:
    if name == "same_layout":
      continue
    np.testing.assert_array_equal(got[0][name], got[1][name], err_msg=name)
  _compare(got[0], reference)
