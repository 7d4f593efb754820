"""Certified-training losses (SPEC section 7), pure functions of arrays.

:func:`worst_case_deltas` gives, per example and class, how much the gap
``z_y - z_i`` can shrink inside the ball according to the local (or global)
Lipschitz bound; the losses below consume it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from lipjax.bounds import lipschitz, network, power
from lipjax.bounds.certify import pair_terms

Array = jax.Array


def worst_case_deltas(model, variables, x, y, eps, *, bound: str = "local",
                      iterations: int = 5, state=None, key=None,
                      grad: str = "constant") -> Tuple[Array, Array, Optional[lipschitz.LocalBound]]:
  """Differentiable ``Delta_iy = eps * prod_{l<L} s_l * ||D (w_i - w_y)||``.

  Args:
    model, variables, x, y, eps: as in :func:`lipjax.certify`.
    bound: ``"local"`` (estimate-mode local norms, sound masks) or
      ``"global"`` (power-method global norms: the GloRo baseline).
    iterations, state, key, grad: estimate-mode power-method options.

  Returns:
    ``(logits (B, C), deltas (B, C), local_bound_or_None)``; ``deltas[b, y_b] = 0``.
  """
  x = jnp.asarray(x, jnp.float32)
  b = x.shape[0]
  eps = jnp.broadcast_to(jnp.asarray(eps, jnp.float32), (b,))
  stages = network.trace(model, variables, tuple(x.shape[1:]))
  last = stages[-1]
  mat = last.layer.explicit_matrix(last.params)
  if mat is None:
    raise ValueError("training losses need a dense last layer")
  if bound == "local":
    lb = lipschitz.local_lipschitz_bound(model, variables, x, eps, mode="estimate",
                                         iterations=iterations, state=state, key=key,
                                         grad=grad)
    logits = lb.logits
    inner = jnp.prod(jnp.stack(lb.layer_norms[:-1]), axis=0)
    col = last._pre(lb.layers[-2].col_mask).reshape(b, -1)  # pylint: disable=protected-access
  elif bound == "global":
    lb = None
    logits = model.apply(variables, x)
    gn = global_norm_estimates(stages, key, iterations=max(iterations, 10))
    inner = jnp.full((b,), jnp.prod(jnp.stack(gn[:-1])))
    col = jnp.ones((b, mat.shape[1]))
  else:
    raise ValueError(f"bound must be 'local' or 'global', got {bound!r}")
  diff = pair_terms(mat, col, y)
  # sqrt with a safe gradient at 0 (the y-th row is exactly zero).
  sq = jnp.sum(jnp.square(diff), axis=-1)
  pn = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  deltas = (eps * inner)[:, None] * pn
  return logits, deltas, lb


def global_norm_estimates(stages, key=None, iterations: int = 10):
  """Differentiable power-method estimates of every ``||W_l||`` (GloRo-style).

  Estimates from below, for training only; certification uses the exact
  bounds of :func:`lipjax.global_lipschitz_bound`.
  """
  key = jax.random.PRNGKey(0) if key is None else key
  out = []
  for st, k in zip(stages, jax.random.split(key, len(stages))):
    u0 = jax.random.normal(k, (1,) + st.in_shape, jnp.float32)
    sigma, _ = power.power_iteration(st.linear, u0, iterations)
    out.append(sigma[0])
  return out


def gloro_loss(logits: Array, deltas: Array, y: Array) -> Array:
  """GloRo loss: cross-entropy over ``[z_1..z_C, z_bot]`` (mean over the batch).

  ``z_bot = max_{i != y} (z_i + Delta_iy)``.
  """
  c = logits.shape[-1]
  other = jax.nn.one_hot(y, c) == 0
  z_bot = jnp.max(jnp.where(other, logits + deltas, -jnp.inf), axis=-1)
  aug = jnp.concatenate([logits, z_bot[:, None]], axis=-1)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(aug, y))


def bcp_loss(logits: Array, deltas: Array, y: Array, kappa) -> Array:
  """``kappa * CE(z, y) + (1 - kappa) * CE(z + Delta_{.y}, y)`` (batch mean)."""
  clean = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  robust = optax.softmax_cross_entropy_with_integer_labels(logits + deltas, y)
  return jnp.mean(kappa * clean + (1.0 - kappa) * robust)


def sparsity_loss(model, variables, local_bound: lipschitz.LocalBound,
                  theta_weight: float = 0.1) -> Array:
  """Pushes neurons towards constant status (SPEC section 7).

  Clipped ReLU: ``mean(relu(ub)) + theta_weight * mean(relu(theta - lb))``;
  clipped MaxMin: ``mean(relu(M - lb_max)) + mean(relu(ub_min - m))``; summed
  over hidden layers. Other activations contribute 0.
  """
  from lipjax import nn as lnn
  stages = network.trace(model, variables, tuple(local_bound.layers[0].input_center.shape[1:]))
  total = jnp.zeros(())
  for st, lb in zip(stages[:-1], local_bound.layers[:-1]):
    act, p = st.activation, st.act_params
    if isinstance(act, lnn.ClippedReLU):
      total += jnp.mean(jax.nn.relu(lb.upper)) + theta_weight * jnp.mean(
          jax.nn.relu(p["theta"] - lb.lower))
    elif isinstance(act, lnn.ClippedMaxMin):
      c = lb.lower.shape[-1] // 2
      lo_max = jnp.maximum(lb.lower[..., :c], lb.lower[..., c:])
      up_min = jnp.minimum(lb.upper[..., :c], lb.upper[..., c:])
      total += jnp.mean(jax.nn.relu(p["upper"] - lo_max)) + jnp.mean(
          jax.nn.relu(up_min - p["lower"]))
  return total
