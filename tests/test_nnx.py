"""Flax NNX modules wherever a linen module goes, against independent truth.

Truth: the same network in ``lipjax.nn`` with the same weights (bounds,
certificates and training steps must agree), the NNX modules' own forward
passes (float64 SVDs of ``jax.jacfwd`` Jacobians at the centre, at sampled
points and at points found by gradient ascent of the difference quotient,
and an L2 PGD attack on every certified point).
"""

import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lipjax
import lipjax.training
from lipjax.training import sharded

import _bounds_util as U
from test_flax_models import (CLASSES, SHAPE, _clusters, _jacobian_norms, _pgd,
                              _quotient_ascent)

B = 3
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# NNX modules the way users write them
# ---------------------------------------------------------------------------


class Clip(nnx.Module):
  """``jnp.clip(z, 0, theta)`` with a learnable per-neuron threshold."""

  def __init__(self, shape, init=0.5):
    self.theta = nnx.Param(jnp.full(shape, init, jnp.float32))

  def __call__(self, z):
    return jnp.clip(z, 0.0, self.theta[...])


class MaxMin(nnx.Module):
  """Clipped MaxMin over the channel halves with learnable bounds."""

  def __init__(self, half):
    self.upper = nnx.Param(jnp.full(half, 0.3, jnp.float32))
    self.lower = nnx.Param(jnp.full(half, -0.3, jnp.float32))

  def __call__(self, z):
    a, b = jnp.split(z, 2, axis=-1)
    return jnp.concatenate([jnp.minimum(jnp.maximum(a, b), self.upper[...]),
                            jnp.maximum(jnp.minimum(a, b), self.lower[...])], axis=-1)


class ConvNet(nnx.Module):
  """``U.conv_model(kind)`` written in NNX: conv3 -> act -> conv4/2 -> act ->
  flatten -> dense 8 -> act -> dense."""

  def __init__(self, kind, rngs, classes=CLASSES):
    act = (lambda s: Clip(s)) if kind == "clipped_relu" else (
        lambda s: MaxMin(s[:-1] + (s[-1] // 2,)))
    self.conv0 = nnx.Conv(SHAPE[-1], 4, (3, 3), padding=1, rngs=rngs)
    self.act1 = act((6, 6, 4))
    self.conv2 = nnx.Conv(4, 4, (4, 4), strides=2, padding=1, rngs=rngs)
    self.act3 = act((3, 3, 4))
    self.dense5 = nnx.Linear(36, 8, rngs=rngs)
    self.act6 = act((8,))
    self.dense7 = nnx.Linear(8, classes, rngs=rngs)

  def __call__(self, x):
    h = self.act3(self.conv2(self.act1(self.conv0(x))))
    h = h.reshape(h.shape[0], -1)
    return self.dense7(self.act6(self.dense5(h)))


def _load(model, kind, v):
  """Copies the weights of ``U.conv_model(kind)``'s variables ``v`` into ``model``."""
  p = v["params"]
  for name, i in (("conv0", 0), ("conv2", 2), ("dense5", 5), ("dense7", 7)):
    getattr(model, name).kernel[...] = p[f"layers_{i}"]["kernel"]
    getattr(model, name).bias[...] = p[f"layers_{i}"]["bias"]
  for name, i in (("act1", 1), ("act3", 3), ("act6", 6)):
    act = getattr(model, name)
    if kind == "clipped_relu":
      act.theta[...] = p[f"layers_{i}"]["theta"]
    else:
      act.upper[...] = p[f"layers_{i}"]["upper"]
      act.lower[...] = p[f"layers_{i}"]["lower"]
  return model


def _pair(kind):
  ref = U.conv_model(kind, input_shape=SHAPE, classes=CLASSES)
  v = U.init_random(ref, jax.random.PRNGKey(3))
  model = _load(ConvNet(kind, nnx.Rngs(0)), kind, v)
  x = jax.random.uniform(jax.random.PRNGKey(4), (B,) + SHAPE)
  np.testing.assert_allclose(model(x), ref.apply(v, x), rtol=1e-6, atol=1e-6)
  return model, ref, v, x


class ResNet(nnx.Module):
  """Stem, a ResNet basic block with inference BatchNorm, a clipped block, a head."""

  def __init__(self, rngs, classes=CLASSES):
    self.stem = nnx.Conv(SHAPE[-1], 4, (3, 3), strides=2, padding=1, rngs=rngs)
    self.conv1 = nnx.Conv(4, 4, (3, 3), padding="SAME", rngs=rngs)
    self.bn1 = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
    self.conv2 = nnx.Conv(4, 4, (3, 3), padding="SAME", rngs=rngs)
    self.bn2 = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
    self.conv3 = nnx.Conv(4, 4, (3, 3), padding=1, rngs=rngs)
    self.clip = Clip((3, 3, 4), 0.7)
    self.head = nnx.Linear(36, classes, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.stem(x))
    f = nnx.relu(self.bn1(self.conv1(h)))
    h = nnx.relu(h + self.bn2(self.conv2(f)))
    h = h + self.clip(self.conv3(h))
    return self.head(h.reshape(h.shape[0], -1))


def _randomised(model, seed):
  """``model`` with random values in every variable (batch statistics included)."""
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)

  def fill(path, a):
    name = str(path[-2].key if hasattr(path[-2], "key") else path[-2])
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return a
    if name == "kernel":
      v = rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))
    elif name in ("bias", "mean"):
      v = 0.3 * rng.normal(size=a.shape)
    elif name == "var":
      v = rng.uniform(1.0, 2.0, size=a.shape)
    elif name == "scale":
      v = rng.uniform(0.5, 1.0, size=a.shape)
    elif name == "theta":
      v = rng.uniform(0.1, 1.0, size=a.shape)
    else:
      raise ValueError(name)
    return jnp.asarray(v, a.dtype)

  state = jax.tree_util.tree_map_with_path(fill, state)
  return nnx.merge(graphdef, state)


class NnxNet(nnx.Module):
  """A small MNIST model for the launcher's import-path option."""

  def __init__(self, num_classes=10, width=4, *, rngs):
    self.conv = nnx.Conv(1, width, (4, 4), strides=2, padding=1, rngs=rngs)
    self.clip = Clip((14, 14, width), 1.0)
    self.head = nnx.Linear(14 * 14 * width, num_classes, rngs=rngs)

  def __call__(self, x):
    h = self.clip(self.conv(x))
    return self.head(h.reshape(h.shape[0], -1))


# ---------------------------------------------------------------------------
# The same bounds as the linen form
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clipped_relu", "clipped_maxmin"])
def test_nnx_and_linen_forms_give_the_same_bounds(kind):
  model, ref, v, x = _pair(kind)
  eps = 0.3
  want = lipjax.local_lipschitz_bound(ref, v, x, eps)
  for variables in (None, nnx.state(model), nnx.state(model, nnx.Param),
                    lipjax.models.from_nnx(model).init()):
    got = lipjax.local_lipschitz_bound(model, variables, x, eps)
    np.testing.assert_array_equal(np.asarray(got.bound), np.asarray(want.bound))
    for a, b in zip(got.layer_norms, want.layer_norms):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(
      np.asarray(lipjax.global_lipschitz_bound(model, None, input_shape=SHAPE)),
      np.asarray(lipjax.global_lipschitz_bound(ref, v)))
  y = jnp.argmax(ref.apply(v, x), -1)
  # The certificate's passes: the default triage (global, lower and sound
  # passes) on the MaxMin model, the sound certificate alone on the other.
  for kw in ({},) if kind == "clipped_maxmin" else ({"triage": False},):
    ca = lipjax.certify(model, None, x, y, 0.05, **kw)
    cb = lipjax.certify(ref, v, x, y, 0.05, **kw)
    np.testing.assert_array_equal(np.asarray(ca.certified), np.asarray(cb.certified))
    np.testing.assert_allclose(np.asarray(ca.margin), np.asarray(cb.margin), rtol=1e-6,
                               atol=1e-7)
  ga = lipjax.bound_guarantee(model, None, input_shape=SHAPE)
  gb = lipjax.bound_guarantee(ref, v)
  assert ga.failure_probability == gb.failure_probability
  assert [rule for _, rule in ga.layers] == [rule for _, rule in gb.layers]


def test_nnx_bounds_under_jit_vmap_and_grad():
  model, ref, v, x = _pair("clipped_relu")
  state = nnx.state(model)

  def local(s, xb):
    return lipjax.local_lipschitz_bound(model, s, xb, 0.2).bound

  eager = np.asarray(local(state, x))
  np.testing.assert_allclose(np.asarray(jax.jit(local)(state, x)), eager, rtol=1e-6)
  # vmap over two parameter sets (the second: every weight halved).
  half = jax.tree_util.tree_map(lambda a: 0.5 * a, state)
  stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), state, half)
  both = np.asarray(jax.jit(jax.vmap(local, in_axes=(0, None)))(stacked, x))
  np.testing.assert_allclose(both[0], eager, rtol=1e-5)
  np.testing.assert_allclose(both[1], np.asarray(local(half, x)), rtol=1e-5)
  # grad of the global bound (and of the training estimate) w.r.t. the NNX state
  # is the linen form's gradient of the same weights.
  g_nnx = jax.grad(lambda s: lipjax.global_lipschitz_bound(model, s, input_shape=SHAPE))(
      state)
  g_lin = jax.grad(lambda w: lipjax.global_lipschitz_bound(ref, w))(v)
  np.testing.assert_allclose(np.asarray(g_nnx["conv2"]["kernel"][...]),
                             np.asarray(g_lin["params"]["layers_2"]["kernel"]), rtol=1e-5,
                             atol=1e-7)
  est = lambda s: jnp.sum(lipjax.local_lipschitz_bound(model, s, x, 0.2, mode="estimate").bound)
  est_lin = lambda w: jnp.sum(lipjax.local_lipschitz_bound(ref, w, x, 0.2,
                                                           mode="estimate").bound)
  np.testing.assert_allclose(np.asarray(jax.grad(est)(state)["dense5"]["kernel"][...]),
                             np.asarray(jax.grad(est_lin)(v)["params"]["layers_5"]["kernel"]),
                             rtol=1e-4, atol=1e-6)


def test_nnx_resnet_with_batchnorm_is_bounded_soundly():
  model = _randomised(ResNet(nnx.Rngs(1)), 7)
  apply = lambda s, xb: nnx.merge(nnx.graphdef(model), s)(xb)
  state = nnx.state(model)
  x = jax.random.uniform(jax.random.PRNGKey(8), (B,) + SHAPE)
  eps = 0.3
  res = lipjax.local_lipschitz_bound(model, None, x, eps)
  bound = np.asarray(res.bound, np.float64)
  assert np.all(np.isfinite(bound)) and np.all(bound > 0)
  glob = float(lipjax.global_lipschitz_bound(model, None, input_shape=SHAPE))
  assert np.all(bound <= glob * (1 + 1e-5))
  low = np.asarray(lipjax.local_lipschitz_bound(model, None, x, eps, mode="lower").bound)
  assert np.all(low <= bound * (1 + 1e-5))
  quot, best = _quotient_ascent(apply, state, x, eps, jax.random.PRNGKey(10), steps=25,
                                restarts=2)
  assert np.all(np.asarray(quot) <= bound[None] * (1 + 1e-4))
  pts = [x, U.sample_ball(jax.random.PRNGKey(9), x, eps, 6, uniform_radius=True), best]
  pts = jnp.concatenate([p.reshape((-1,) + SHAPE) for p in pts])
  worst = _jacobian_norms(apply, state, pts).reshape(-1, B).max(axis=0)
  assert np.all(worst <= bound * (1 + 1e-5)), (worst, bound)
  assert np.max(worst / bound) >= 0.05, (worst, bound)
  # Certified points survive PGD.
  xs, _ = _clusters(jax.random.PRNGKey(13), 24)
  ys = jnp.argmax(model(xs), -1)
  small = 0.02
  cert = np.asarray(lipjax.certify(model, None, xs, ys, small, triage=False).certified)
  assert cert.any()
  worst = np.asarray(_pgd(apply, state, xs, ys, small, jax.random.PRNGKey(14)))
  assert not np.any(cert & (worst > 0)), "a certified point was flipped"


def test_unsupported_nnx_operation_is_one_short_line():
  class Bad(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(int(np.prod(SHAPE)), 6, rngs=rngs)
      self.head = nnx.Linear(6, CLASSES, rngs=rngs)

    def __call__(self, x):
      return self.head(jnp.tanh(self.dense(x.reshape(x.shape[0], -1))))

  model = Bad(nnx.Rngs(0))
  x = jnp.ones((2,) + SHAPE)
  for call in (lambda: lipjax.local_lipschitz_bound(model, None, x, 0.1),
               lambda: lipjax.global_lipschitz_bound(model, None, input_shape=SHAPE),
               lambda: lipjax.certify(model, None, x, jnp.zeros(2, jnp.int32), 0.1)):
    with pytest.raises(lipjax.UnsupportedModelError) as err:
      call()
    msg = str(err.value)
    assert "\n" not in msg and len(msg) <= 215, msg
    assert "'tanh'" in msg and "test_nnx.py:" in msg and "README" in msg, msg
    assert "Param" not in msg and "Linear(" not in msg, msg   # never the module's repr
  with pytest.raises(TypeError) as err:
    lipjax.local_lipschitz_bound(lipjax.models.get("2c2f"), None, x, 0.1)
  assert "\n" not in str(err.value) and "variables" in str(err.value)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def test_nnx_training_steps_match_the_linen_form_and_keep_thresholds_feasible():
  model, ref, v, _ = _pair("clipped_relu")
  # Thresholds that start infeasible are projected back to >= 0.
  model.act6.theta[...] = model.act6.theta[...].at[:3].set(-0.5)
  v = U.set_param(v, "layers_6", "theta", slice(0, 3), -0.5)
  x, y = _clusters(jax.random.PRNGKey(16), 32)
  opt = optax.adam(1e-2)
  kw = dict(loss="gloro", bound="local", iterations=2, eps_schedule=0.2)

  def run(m, params, variables, make, steps=3, put=lambda s: s):
    power = lipjax.training.init_power_state(m, variables, input_shape=SHAPE)
    state = put(lipjax.training.create_train_state(params, opt, rng=0, power=power))
    step = make(m, opt, **kw)
    losses = []
    for _ in range(steps):
      state, metrics = step(state, x, y)
      losses.append(float(metrics["loss"]))
    return state, losses

  params = nnx.state(model, nnx.Param)
  st_nnx, l_nnx = run(model, params, None, lipjax.training.make_train_step)
  st_lin, l_lin = run(ref, v["params"], v, lipjax.training.make_train_step)
  np.testing.assert_allclose(l_nnx, l_lin, rtol=1e-5)
  assert l_nnx[-1] < l_nnx[0]
  theta = np.asarray(st_nnx.params["act6"]["theta"][...])
  assert theta.min() >= 0.0
  np.testing.assert_allclose(theta, np.asarray(st_lin.params["layers_6"]["theta"]),
                             rtol=1e-5, atol=1e-6)
  # The data-parallel steps (one device here) train it too.
  mesh = sharded.data_mesh()
  st_sh, l_sh = run(model, params, None, lambda m, o, **k: sharded.make_sharded_train_step(
      m, o, mesh=mesh, **k), put=lambda s: sharded.replicate_on_mesh(s, mesh))
  np.testing.assert_allclose(l_sh, l_nnx, rtol=1e-5)
  # (make_parallel_train_step wraps the same make_update in pmap; it is not run
  # on an NNX module here, only on linen ones in tests/test_parallel.py.)
  # The trained parameters bound and certify the module as it is used.
  res = lipjax.local_lipschitz_bound(model, st_nnx.params, x[:4], 0.2)
  assert np.all(np.isfinite(np.asarray(res.bound)))


def test_launcher_trains_an_nnx_model_named_by_import_path(tmp_path):
  from experiments import train_lib
  from experiments.configs import base
  cfg = base.get_config().to_dict()
  cfg.update(model="test_nnx:NnxNet", num_classes=3, model_options={"width": 2})
  train_lib.check_config(cfg)
  model = train_lib.build_model(cfg, (28, 28, 1))
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  assert sorted(v) == ["params"] and v["params"]["conv"]["kernel"].shape == (4, 4, 1, 2)
  assert model.apply(v, jnp.zeros((2, 28, 28, 1))).shape == (2, 3)
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  _tiny_mnist(data_dir)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
  cmd = [sys.executable, "-m", "experiments.train", "--config=demo",
         f"--workdir={tmp_path / 'run'}", f"--config.data_dir={data_dir}",
         "--config.model=test_nnx:NnxNet", "--config.model_options={'width': 2}",
         "--config.batch_size=32", "--config.epochs=1", "--config.val_examples=32",
         "--config.certify_bound=global", "--config.val_bound=global",
         "--config.progress=False", "--config.bound=local", "--config.log_every_steps=1"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  from lipjax.training import checkpoints
  records = checkpoints.read_metrics(str(tmp_path / "run"))
  losses = [r["loss"] for r in records if r["split"] == "train"]
  assert len(losses) >= 2 and np.all(np.isfinite(losses))
  variables, _ = checkpoints.restore_variables(str(tmp_path / "run"), "latest")
  assert np.asarray(variables["params"]["clip"]["theta"]).min() >= 0.0


def _tiny_mnist(root, n_train=96, n_test=32):
  """A data_dir with a few MNIST images (IDX files), or a skip without MNIST."""
  import struct   # pylint: disable=import-outside-toplevel
  from lipjax import data   # pylint: disable=import-outside-toplevel
  try:
    sets = [("train", "train", n_train), ("test", "t10k", n_test)]
    for split, stem, n in sets:
      ds = data.load("mnist", f"{split}[:{n}]")
      images = np.rint(np.asarray(ds.images)[..., 0] * 255).astype(np.uint8)
      with open(root / f"{stem}-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
      with open(root / f"{stem}-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + np.asarray(ds.labels, np.uint8).tobytes())
  except data.DataError:
    pytest.skip("MNIST not installed")
