"""Data-parallel steps (pmap and sharded jit): 2 forced CPU devices, and 2
processes, vs one device.

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


def _two_processes(tmp_path, mode):
  """Runs the worker's ``mode`` in 2 processes; returns their two records."""
  address = f"127.0.0.1:{_free_port()}"
  paths = [str(tmp_path / f"process{i}.npz") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, WORKER, mode, address, "2", str(i), p],
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
  return [np.load(p) for p in paths]


def test_two_processes_train_together_like_one(tmp_path, reference):
  got = _two_processes(tmp_path, "process")
  for g in got:
    assert int(g["devices"]) == 2 and int(g["local_devices"]) == 1
  for name in got[0].files:
    if name == "same_layout":
      continue
    np.testing.assert_array_equal(got[0][name], got[1][name], err_msg=name)
  _compare(got[0], reference)


def _part(record, prefix):
  return {k[len(prefix):]: record[k] for k in record.files if k.startswith(prefix)}


def test_sharded_step_matches_one_device_and_pmap_and_resumes_across_them(tmp_path,
                                                                          reference):
  path = str(tmp_path / "sharded.npz")
  proc = subprocess.run([sys.executable, WORKER, "sharded", path, str(tmp_path / "ckpt")],
                        cwd=ROOT, env=_env("--xla_force_host_platform_device_count=2"),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=600)
  _check(proc, proc.stdout)
  got = np.load(path)
  assert int(got["local_devices"]) == 2
  # Compiled once: its output state goes back in with the layout it came in with.
  assert int(got["jit_compiles"]) == 1
  # Losses, metrics, parameters and power vectors of each run equal the
  # single-device run: jit and pmap alone, and 2 steps of one + a checkpoint +
  # 1 step of the other (the optimiser state, key and step resume exactly).
  for run in ("jit", "pmap", "pmap_to_jit", "jit_to_pmap"):
    record = _part(got, run + "/")
    assert int(record["step"]) == W.STEPS, run
    assert {k for k in record if k.startswith("power/")} == {
        k for k in reference[0] if k.startswith("power/")}
    _compare(record, reference)
  jit, pmap = _part(got, "jit/"), _part(got, "pmap/")
  assert set(jit) == set(pmap)
  for name in jit:
    np.testing.assert_allclose(jit[name], pmap[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # The run trained: a step that did nothing could not match.
  assert any(np.max(np.abs(jit[k] - v)) > 1e-3
             for k, v in W._flat("param/", W.problem()[1]).items())
  assert np.all(np.diff(jit["metric/loss"]) != 0)
  assert str(got["odd_batch_error"]) == (
      f"batch of {W.BATCH - 1} examples is not divisible by the 2 device(s) of mesh axis "
      "'data' in this process")


def test_two_processes_train_together_with_the_sharded_step(tmp_path, reference):
  got = _two_processes(tmp_path, "process-sharded")
  for g in got:
    assert int(g["devices"]) == 2 and int(g["local_devices"]) == 1
    assert int(g["mesh_devices"]) == 2   # one mesh over both processes
  for name in got[0].files:
    np.testing.assert_array_equal(got[0][name], got[1][name], err_msg=name)
  _compare(got[0], reference)


def test_sharded_helpers_on_one_device_and_bad_input():
  import jax
  from lipjax import training
  model, params, opt, kwargs, x, y = W.problem()
  mesh = training.data_mesh()
  assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
  batch = training.shard_batch_on_mesh(x, mesh)
  assert batch.shape == x.shape and batch.sharding.spec == jax.sharding.PartitionSpec("data")
  np.testing.assert_array_equal(np.asarray(batch), x)
  assert training.shard_batch_on_mesh(batch, mesh) is batch
  state = training.replicate_on_mesh(W._state(params, opt), mesh)
  assert state.step.sharding.spec == jax.sharding.PartitionSpec()
  kernel = state.params["layers_0"]["kernel"]
  assert training.replicate_on_mesh(state, mesh).params["layers_0"]["kernel"] is kernel
  back = training.fetch_replicated(state)
  assert isinstance(back.params["layers_0"]["kernel"], np.ndarray)
  np.testing.assert_array_equal(back.params["layers_0"]["kernel"],
                                params["layers_0"]["kernel"])
  with pytest.raises(ValueError, match="mesh has no axis 'data' \\(its axes: 'batch'\\)"):
    training.make_sharded_train_step(model, opt, mesh=training.data_mesh(axis_name="batch"),
                                     **kwargs)
  step = training.make_sharded_train_step(model, opt, **kwargs)
  with pytest.raises(ValueError, match=r"expected images \(B, ...\) and labels \(B,\)"):
    step(state, x, y[:-1])
  with pytest.raises(ValueError, match="a batch must have a leading batch axis"):
    training.shard_batch_on_mesh(np.float32(1.0), mesh)
