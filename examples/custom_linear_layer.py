r"""Adding a new linear layer to lipjax: average pooling from its forward map only.

Run::

  python -m examples.custom_linear_layer

A linear layer joins lipjax's bounds by subclassing :class:`lipjax.nn.LinearLayer`
and implementing ``linear(params, h)``, the map without bias on a batch
``(B, *in_shape)``. Nothing else is needed: the adjoint used by the power
method and Lanczos comes from ``jax.linear_transpose``, interval propagation
uses the sound rule ``|W| w <= ||W||_2 ||w||_2``, and the global norm is the
exact SVD of the explicit Jacobian (for layers up to 2^24 entries; larger ones
use Lanczos with a stated failure probability).

The script checks the bound against ``numpy.linalg.svd`` of the explicit
pooling matrix built independently with numpy, trains a small network that
uses the new layer, certifies it, and attacks every certified point with PGD.
"""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lipjax
from lipjax import nn as lnn


class MeanPool(lnn.LinearLayer):
  """Average pooling over ``window x window`` patches (NHWC, no padding).

  Only the forward map is written; lipjax derives every other rule.
  """

  window: int = 2

  def __call__(self, h):                      # Flax forward pass
    return self.linear({}, h)

  def linear(self, params, h):                # the protocol: W h, batched
    del params
    b, height, width, c = h.shape
    w = self.window
    h = h[:, :height // w * w, :width // w * w, :]
    h = h.reshape(b, height // w, w, width // w, w, c)
    return h.mean(axis=(2, 4))


def pooling_matrix(height: int, width: int, channels: int, window: int) -> np.ndarray:
  """The explicit ``(out, in)`` matrix of :class:`MeanPool`, built with numpy only."""
  oh, ow = height // window, width // window
  mat = np.zeros((oh * ow * channels, height * width * channels))
  for i in range(oh):
    for j in range(ow):
      for c in range(channels):
        row = (i * ow + j) * channels + c
        for di in range(window):
          for dj in range(window):
            col = ((i * window + di) * width + (j * window + dj)) * channels + c
            mat[row, col] = 1.0 / window ** 2
  return mat


def make_model(num_classes: int = 3) -> lnn.Sequential:
  """Conv -> clipped ReLU -> MeanPool -> Dense -> ReLU -> Dense on 8x8x1 images."""
  return lnn.Sequential((
      lnn.Conv(4, kernel_size=3, stride=1, padding=1), lnn.ClippedReLU(theta_init=1.0),
      MeanPool(window=2),
      lnn.Flatten(), lnn.Dense(16), lnn.ReLU(),
      lnn.Dense(num_classes)), input_shape=(8, 8, 1))


def toy_data(n: int, seed: int = 0):
  """8x8 images whose class (0, 1, 2) is the bright third of the image."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  x = 0.1 * rng.random((n, 8, 8, 1))
  for k in range(3):
    x[y == k, :, 1 + 2 * k:3 + 2 * k, 0] += 0.8
  return jnp.asarray(np.clip(x, 0, 1), jnp.float32), jnp.asarray(y, jnp.int32)


def train(model, x, y, steps: int = 300, seed: int = 0):
  """Plain cross-entropy training with Adam (the bound needs nothing special)."""
  variables = model.init(jax.random.PRNGKey(seed), x[:1])
  opt = optax.adam(1e-2)
  params, opt_state = variables["params"], opt.init(variables["params"])

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    g = jax.grad(loss)(params)
    upd, opt_state = opt.update(g, opt_state)
    return optax.apply_updates(params, upd), opt_state

  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return {"params": params}


def pgd_l2(model, variables, x, y, eps, steps: int = 50, restarts: int = 2, seed: int = 0):
  """l2 PGD on the margin ``max_{i != y} z_i - z_y``; returns adversarial inputs.

  Stays inside ``B(x, eps)`` (inputs are not clipped to [0, 1], which only
  makes the attack stronger than the threat model).
  """
  c = model.apply(variables, x[:1]).shape[-1]

  def margin(xa):
    z = model.apply(variables, xa)
    zy = jnp.take_along_axis(z, y[:, None], 1)[:, 0]
    other = jnp.where(jax.nn.one_hot(y, c) > 0, -jnp.inf, z)
    return jnp.max(other, -1) - zy

  grad = jax.jit(jax.grad(lambda xa: jnp.sum(margin(xa))))

  def project(d):
    n = jnp.sqrt(jnp.sum(d * d, axis=(1, 2, 3), keepdims=True))
    return d * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))

  best, best_m = x, margin(x)
  for r in range(restarts):
    d = project(eps * jax.random.normal(jax.random.PRNGKey(seed + r), x.shape))
    for _ in range(steps):
      g = grad(x + d)
      gn = jnp.sqrt(jnp.sum(g * g, axis=(1, 2, 3), keepdims=True))
      d = project(d + 0.25 * eps * g / jnp.maximum(gn, 1e-12))
    m = margin(x + d)
    better = m > best_m
    best = jnp.where(better[:, None, None, None], x + d, best)
    best_m = jnp.maximum(m, best_m)
  return best


def main():
  model = make_model()
  # 1. The layer's norm (stage 1 of the network) against numpy's SVD of the
  #    explicit matrix.
  x, y = toy_data(300)
  variables = train(model, x, y)
  _, per_layer = lipjax.global_lipschitz_bound(model, variables, per_layer=True)
  ref = np.linalg.svd(pooling_matrix(8, 8, 4, 2), compute_uv=False)[0]
  print(f"MeanPool norm: lipjax {float(per_layer[1]):.6f}, numpy SVD {ref:.6f}")

  # 2. Certify, then attack every point.
  eps = 0.3
  cert = lipjax.certify(model, variables, x, y, eps)
  adv = pgd_l2(model, variables, x, y, eps)
  flipped = np.asarray(jnp.argmax(model.apply(variables, adv), -1) != y)
  certified = np.asarray(cert.certified)
  print(f"clean accuracy {np.mean(np.asarray(cert.predicted) == np.asarray(y)):.3f}, "
        f"certified at eps={eps}: {certified.mean():.3f}, PGD success {flipped.mean():.3f}, "
        f"certified but broken by PGD: {int(np.sum(certified & flipped))}")


if __name__ == "__main__":
  main()
