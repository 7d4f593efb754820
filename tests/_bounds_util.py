"""Shared helpers for the bound tests: tiny models, random parameters, ball
sampling and projected-gradient searches inside an l2 ball.

Everything here is independent of :mod:`lipjax.bounds`: forward passes use the
models' own Flax ``apply`` (with ``capture_intermediates``), never the bound
code's stage maps.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from lipjax import nn as lnn

ACTIVATIONS = ("relu", "clipped_relu", "clipped_maxmin")


def activation(kind: str):
  if kind == "relu":
    return lnn.ReLU()
  if kind == "clipped_relu":
    return lnn.ClippedReLU(theta_init=0.5)
  if kind == "clipped_maxmin":
    return lnn.ClippedMaxMin(upper_init=0.3)
  raise ValueError(kind)


def conv_model(kind: str, input_shape=(6, 6, 2), classes: int = 3):
  """conv3(s1,p1) -> act -> conv4(s2,p1) -> act -> flatten -> fc8 -> act -> fc."""
  return lnn.Sequential(
      (lnn.Conv(4, kernel_size=3, stride=1, padding=1), activation(kind),
       lnn.Conv(4, kernel_size=4, stride=2, padding=1), activation(kind),
       lnn.Flatten(), lnn.Dense(8), activation(kind), lnn.Dense(classes)),
      input_shape=tuple(input_shape))


def mlp_model(kind: str, features: int = 5, widths=(10, 8), classes: int = 3):
  layers = []
  for w in widths:
    layers += [lnn.Dense(w), activation(kind)]
  layers.append(lnn.Dense(classes))
  return lnn.Sequential(tuple(layers), input_shape=(features,))


def randomize(variables, key, bias_scale=0.3):
  """Non-trivial parameters: random biases and per-neuron thresholds.

  Kernels keep their (random) initial values; biases become N(0, bias_scale^2);
  clipped-ReLU thresholds are uniform in [0.05, 1.2] per neuron; clipped
  MaxMin bounds are ``M ~ U[0.05, 0.6]``, ``m ~ -U[0.05, 0.6]`` per position.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  out = []
  for i, (path, a) in enumerate(leaves):
    k = jax.random.fold_in(key, i)
    name = path[-1].key
    if name == "bias":
      a = bias_scale * jax.random.normal(k, a.shape)
    elif name == "theta":
      a = jax.random.uniform(k, a.shape, minval=0.05, maxval=1.2)
    elif name == "upper":
      a = jax.random.uniform(k, a.shape, minval=0.05, maxval=0.6)
    elif name == "lower":
      a = -jax.random.uniform(k, a.shape, minval=0.05, maxval=0.6)
    out.append(a)
  return jax.tree_util.tree_unflatten(treedef, out)


def init_random(model, key):
  k1, k2 = jax.random.split(key)
  v = model.init(k1, jnp.zeros((1,) + tuple(model.input_shape)))
  return randomize(v, k2)


def set_param(variables, layer, name, index, value):
  params = dict(variables["params"])
  entry = dict(params[layer])
  entry[name] = jnp.asarray(entry[name]).at[index].set(value)
  params[layer] = entry
  return {**variables, "params": params}


# ---------------------------------------------------------------------------
# Forward pass with every intermediate (Flax's own capture, no lipjax.bounds)
# ---------------------------------------------------------------------------


def linear_indices(model):
  return [i for i, l in enumerate(model.layers) if isinstance(l, lnn.LinearLayer)]


def activation_indices(model):
  return [i for i, l in enumerate(model.layers) if isinstance(l, lnn.Activation)]


def intermediates(model, variables, x):
  """Dict layer index -> output of that layer (Flax ``capture_intermediates``)."""
  _, state = model.apply(variables, x, capture_intermediates=True,
                         mutable=["intermediates"])
  inter = state["intermediates"]
  return {i: inter[f"layers_{i}"]["__call__"][0] for i in range(len(model.layers))}


def pre_activations(model, variables, x):
  """Per linear layer, its output (the pre-activation), in order."""
  inter = intermediates(model, variables, x)
  return [inter[i] for i in linear_indices(model)]


def post_activations(model, variables, x):
  """Per hidden linear layer, the output of the activation after it."""
  inter = intermediates(model, variables, x)
  return [inter[i] for i in activation_indices(model)]


def stage_inputs(model, variables, x):
  """Per linear layer, the input of its stage (before any reshape folded in)."""
  inter = intermediates(model, variables, x)
  out = []
  for i in linear_indices(model):
    j = i - 1
    while j >= 0 and isinstance(model.layers[j], lnn.Reshape):
      j -= 1
    out.append(x if j < 0 else inter[j])
  return out


# ---------------------------------------------------------------------------
# The l2 ball
# ---------------------------------------------------------------------------


def _bnorm(a):
  return jnp.sqrt(jnp.sum(jnp.square(a), axis=tuple(range(1, a.ndim))))


def _bc(s, like):
  return s.reshape(s.shape + (1,) * (like.ndim - s.ndim))


def project(xp, x, eps):
  """Projects ``xp`` (``(..., B, *shape)``) onto ``B(x_b, eps_b)``."""
  d = xp - x
  axes = tuple(range(d.ndim - (x.ndim - 1), d.ndim))
  n = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
  e = jnp.reshape(eps, (-1,) + (1,) * (x.ndim - 1))
  scale = jnp.minimum(1.0, e * (1.0 - 1e-6) / jnp.maximum(n, 1e-30))
  return x + d * scale


def sample_ball(key, x, eps, n, uniform_radius=False):
  """``(n, B, *shape)`` points uniform in ``B(x_b, eps_b)`` (direction times
  ``eps * U^(1/d)``), or with radius uniform in ``[0, eps]`` when
  ``uniform_radius`` (to reach the interior in high dimension)."""
  k1, k2 = jax.random.split(key)
  d = int(np.prod(x.shape[1:]))
  g = jax.random.normal(k1, (n,) + x.shape)
  axes = tuple(range(2, g.ndim))
  g = g / jnp.sqrt(jnp.sum(jnp.square(g), axis=axes, keepdims=True))
  u = jax.random.uniform(k2, (n, x.shape[0]))
  r = u if uniform_radius else u ** (1.0 / d)
  eps = jnp.broadcast_to(jnp.asarray(eps, jnp.float32), (x.shape[0],))
  r = (r * eps[None, :]).reshape((n, x.shape[0]) + (1,) * (x.ndim - 1))
  return x[None] + (1.0 - 1e-6) * r * g


def normalised(g, batch_dims):
  axes = tuple(range(batch_dims, g.ndim))
  n = jnp.sqrt(jnp.sum(jnp.square(g), axis=axes, keepdims=True))
  return g / jnp.maximum(n, 1e-30)


def pgd_maximise(objective, x, eps, x0, steps):
  """Projected normalised-gradient ascent of ``objective(xp) -> (B,)`` (summed
  over the batch: examples are independent) inside ``B(x, eps)``; returns the
  final point and the best point (per example)."""
  grad = jax.grad(lambda xp: jnp.sum(objective(xp)))

  def body(t, carry):
    xp, best, best_val = carry
    step = 0.25 * eps * (1.0 - t / steps) + 0.01 * eps
    g = grad(xp)
    xp = project(xp + _bc(step, xp) * normalised(g, 1), x, eps)
    val = objective(xp)
    better = val > best_val
    best = jnp.where(_bc(better, xp), xp, best)
    best_val = jnp.where(better, val, best_val)
    return xp, best, best_val

  x0 = project(x0, x, eps)
  init = (x0, x0, objective(x0))
  xp, best, _ = jax.lax.fori_loop(0, steps, body, init)
  return xp, best


def assert_rounding_bound_covers_float32(model, variables, x, eps, samples=6, key=4):
  """The last stage's rounding bound covers ``|float32 - float64|`` of the logits
  at sampled points of the ball, whose float64 logits lie in its boxes."""
  import lipjax   # pylint: disable=import-outside-toplevel
  b, shape = x.shape[0], tuple(x.shape[1:])
  res = lipjax.local_lipschitz_bound(model, variables, x, eps)
  err = np.asarray(res.layers[-1].error)
  assert np.all(np.isfinite(err)) and np.all(err > 0)
  pts = sample_ball(jax.random.PRNGKey(key), x, jnp.full((b,), eps), samples,
                    uniform_radius=True).reshape((-1,) + shape)
  z32 = np.asarray(model.apply(variables, pts)).reshape(samples, b, -1)
  with jax.enable_x64(True):
    v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), variables)
    z64 = np.asarray(model.apply(v64, jnp.asarray(np.asarray(pts), jnp.float64)))
  z64 = z64.reshape(samples, b, -1)
  assert np.all(np.abs(z32 - z64) <= err[None]), (np.abs(z32 - z64).max(), err.min())
  # The pre-activation boxes contain the exact logits.
  assert np.all(z64 >= np.asarray(res.layers[-1].lower)[None])
  assert np.all(z64 <= np.asarray(res.layers[-1].upper)[None])


def ordered_bounds(model, variables, x, eps, lower=True):
  """``(result, bound (B,) float64, global bound)`` of the sound local bound,
  after checking that it is finite and positive, at most the global bound,
  and (``lower``) at least ``mode="lower"``'s estimate."""
  import lipjax   # pylint: disable=import-outside-toplevel
  res = lipjax.local_lipschitz_bound(model, variables, x, eps)
  bound = np.asarray(res.bound, np.float64)
  assert np.all(np.isfinite(bound)) and np.all(bound > 0)
  glob = float(lipjax.global_lipschitz_bound(model, variables, input_shape=tuple(x.shape[1:])))
  assert np.all(bound <= glob * (1 + 1e-5))
  if lower:
    low = np.asarray(lipjax.local_lipschitz_bound(model, variables, x, eps, mode="lower").bound)
    assert np.all(low <= bound * (1 + 1e-5))
  return res, bound, glob
