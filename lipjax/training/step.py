"""A jitted certified-training step (single device) and its Optax pieces."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lipjax.training import losses

_THRESHOLDS = ("theta",)


def _is_threshold(path) -> bool:
  last = path[-1]
  return getattr(last, "key", None) in _THRESHOLDS


def project_thresholds() -> optax.GradientTransformation:
  """Optax transform keeping every clipped-ReLU ``theta >= 0`` after the step.

  Rewrites the update of each ``theta`` leaf so that ``params + update`` is
  the projection ``max(params + update, 0)``. Chain it last.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("project_thresholds needs params")

    def fix(path, u, p):
      return jnp.maximum(p + u, 0.0) - p if _is_threshold(path) else u

    return jax.tree_util.tree_map_with_path(fix, updates, params), state

  return optax.GradientTransformation(init, update)


class TrainState(NamedTuple):
  """Training state, a pytree: step count, parameters, optimiser state."""

  step: jax.Array
  params: Any
  opt_state: Any


def create_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  params = jax.tree_util.tree_map(jnp.array, params)   # own copy: steps donate it
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def make_train_step(model, optimizer: optax.GradientTransformation, *,
                    loss: str = "gloro", bound: str = "local", iterations: int = 5,
                    grad: str = "constant", sparsity_weight: float = 0.0):
  """Returns ``step(state, images, labels, eps, kappa, key) -> (state, metrics)``.

  ``optimizer`` should end with :func:`project_thresholds` for clipped models.
  Metrics: loss, clean accuracy, and the fraction of the batch whose
  estimated margin exceeds the estimated ``Delta`` ("vra", not a certificate).
  """
  if loss not in ("gloro", "bcp", "ce"):
    raise ValueError(f"loss must be 'gloro', 'bcp' or 'ce', got {loss!r}")

  def loss_fn(params, images, labels, eps, kappa, key):
    variables = {"params": params}
    if loss == "ce":
      logits = model.apply(variables, images)
      deltas, lb = jnp.zeros_like(logits), None
      value = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    else:
      logits, deltas, lb = losses.worst_case_deltas(
          model, variables, images, labels, eps, bound=bound, iterations=iterations,
          key=key, grad=grad)
      value = (losses.gloro_loss(logits, deltas, labels) if loss == "gloro"
               else losses.bcp_loss(logits, deltas, labels, kappa))
      if sparsity_weight and lb is not None:
        value = value + sparsity_weight * losses.sparsity_loss(model, variables, lb)
    pred = jnp.argmax(logits, -1)
    gap = jnp.take_along_axis(logits, labels[:, None], 1) - logits - deltas
    other = jax.nn.one_hot(labels, logits.shape[-1]) == 0
    robust = jnp.all(jnp.where(other, gap > 0, True), axis=-1) & (pred == labels)
    return value, {"loss": value, "accuracy": jnp.mean(pred == labels),
                   "vra_estimate": jnp.mean(robust)}

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state: TrainState, images, labels, eps, kappa, key):
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, images, labels,
                                                    eps, kappa, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), metrics

  return step
