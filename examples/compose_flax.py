r"""Using lipjax's local Lipschitz bound inside your own Flax model and training loop.

Run::

  python -m examples.compose_flax

``UserNet`` is an ordinary Flax module (not defined by lipjax) that holds a
lipjax feature extractor (a :class:`lipjax.nn.Sequential`) as a submodule
named ``features`` and puts its own head on top. The bound is computed on the
submodule alone, from its slice of the variables::

  sub = {"params": variables["params"]["features"]}
  lipjax.local_lipschitz_bound(net.features, sub, x, eps, mode="estimate").bound

and a penalty on it joins the user's own loss, trained with a plain Optax
loop. The script prints the *sound* local bound of the extractor before and
after training: the penalty drives it down while the classifier still fits.
"""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lipjax
import lipjax.training
from lipjax import nn as lnn


def feature_extractor(features: int = 8) -> lnn.Sequential:
  """A lipjax Sequential mapping ``(B, 10)`` inputs to ``(B, features)``."""
  return lnn.Sequential((lnn.Dense(32), lnn.ClippedReLU(theta_init=1.0),
                         lnn.Dense(32), lnn.ReLU(), lnn.Dense(features)),
                        input_shape=(10,))


class UserNet(fnn.Module):
  """The user's model: a lipjax extractor, then the user's own layers."""

  features: lnn.Sequential
  num_classes: int = 4

  @fnn.compact
  def __call__(self, x, *, train: bool = False):
    h = self.features(x)                           # lipjax submodule "features"
    h = fnn.LayerNorm()(h)                         # anything Flax can do
    h = fnn.Dropout(0.1, deterministic=not train)(h)
    return fnn.Dense(self.num_classes)(h)


def feature_bound(net: UserNet, params, x, eps, **options):
  """The extractor's local Lipschitz bound, ``(B,)``, from the user's params."""
  sub = {"params": params["features"]}
  return lipjax.local_lipschitz_bound(net.features, sub, x, eps, **options).bound


def toy_data(n: int = 512, seed: int = 0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(4, 10)) * 1.5
  y = rng.integers(0, 4, n)
  x = centres[y] + 0.5 * rng.normal(size=(n, 10))
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


def train(net: UserNet, x, y, *, steps: int = 60, eps: float = 0.1,
          weight: float = 0.1, seed: int = 0):
  """The user's Optax loop: cross-entropy + ``weight * mean(local bound)``.

  Returns ``(params, history)`` with per-step ``(loss, mean estimated bound)``.
  """
  key = jax.random.PRNGKey(seed)
  params = net.init(key, x[:1])["params"]
  opt = optax.chain(optax.adam(3e-3), lipjax.training.project_thresholds())
  opt_state = opt.init(params)

  def loss_fn(params, xb, yb, rng):
    logits = net.apply({"params": params}, xb, train=True, rngs={"dropout": rng})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    bound = feature_bound(net, params, xb, eps, mode="estimate", iterations=3)
    return ce + weight * jnp.mean(bound), jnp.mean(bound)

  @jax.jit
  def step(params, opt_state, xb, yb, rng):
    (loss, bound), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, xb, yb, rng)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, bound

  history = []
  for i in range(steps):
    idx = np.random.default_rng(i).choice(len(x), 128, replace=False)
    params, opt_state, loss, bound = step(params, opt_state, x[idx], y[idx],
                                          jax.random.fold_in(key, i))
    history.append((float(loss), float(bound)))
  return params, history


def main():
  net = UserNet(feature_extractor())
  x, y = toy_data()
  init = net.init(jax.random.PRNGKey(0), x[:1])["params"]
  before = feature_bound(net, init, x[:64], 0.1)            # sound (the default)
  params, history = train(net, x, y)
  after = feature_bound(net, params, x[:64], 0.1)
  acc = jnp.mean(jnp.argmax(net.apply({"params": params}, x), -1) == y)
  print(f"loss {history[0][0]:.3f} -> {history[-1][0]:.3f}; training accuracy {acc:.3f}")
  print(f"sound local bound of the extractor (median over 64 points): "
        f"{float(jnp.median(before)):.3f} -> {float(jnp.median(after)):.3f}")


if __name__ == "__main__":
  main()
