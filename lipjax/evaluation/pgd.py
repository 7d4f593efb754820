"""L2 projected gradient descent (PGD) attacks in JAX.

The attack looks for ``x'`` in ``B(x, eps) ∩ [0, 1]^d`` that changes the
predicted class. Each restart draws a uniform random start in the l2 ball,
then takes ``steps`` steps along the l2-normalised gradient of the loss,
each followed by a projection onto the ball and a clip to ``[0, 1]``. The
clip never leaves the ball: with ``x`` in ``[0, 1]^d``, clipping ``x + δ``
moves every coordinate of ``δ`` towards 0. Over all iterates of all restarts
the attack keeps, per example, the point of smallest margin
``z_y - max_{i≠y} z_i``: an adversarial example wherever that margin is
negative.

A successful attack is a proof that the point is *not* robust; a failed one
proves nothing. PGD accuracy is therefore an upper bound on robust accuracy,
and a sound certificate can never exceed it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lipjax._src.per_example import expand, l2_norm

Array = jax.Array

LOSSES = ("margin", "ce")

# Projection radius factor: the iterates stay strictly inside the closed ball
# even after float32 rounding of the rescaling.
_INSIDE = 1.0 - 1e-6


class AttackResult(NamedTuple):
  """Result of :func:`pgd_attack` for ``B`` examples.

  Attributes:
    x_adv: ``(B, *input_shape)`` the iterate of smallest margin found.
    margin: ``(B,)`` ``z_y - max_{i != y} z_i`` at ``x_adv``.
    success: ``(B,)`` bool, ``x_adv`` is misclassified (margin <= 0 and the
      argmax differs from ``y``).
    predicted: ``(B,)`` int32 argmax of the logits at ``x_adv``.
  """

  x_adv: Array
  margin: Array
  success: Array
  predicted: Array


def margin(logits: Array, y: Array) -> Array:
  """``(B,)`` ``z_y - max_{i != y} z_i`` for ``(B, C)`` logits."""
  c = logits.shape[-1]
  own = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
  other = jnp.where(jax.nn.one_hot(y, c, dtype=bool), -jnp.inf, logits)
  return own - jnp.max(other, axis=1)


def project(x: Array, x_adv: Array, eps: Array) -> Array:
  """Projects ``x_adv`` onto ``B(x, eps)`` (l2, per example), then clips to ``[0, 1]``."""
  delta = x_adv - x
  n = l2_norm(delta)
  scale = jnp.minimum(1.0, eps * _INSIDE / jnp.maximum(n, 1e-12))
  return jnp.clip(x + delta * expand(scale, delta), 0.0, 1.0)


def random_start(key, x: Array, eps: Array, *, per_example: bool = False) -> Array:
  """A uniform random point of the l2 ball ``B(x, eps)``, clipped to ``[0, 1]``.

  Args:
    key: one PRNG key for the batch, or with ``per_example`` ``(B,)`` keys,
      one per example (each example's start then depends only on its own
      key, not on the batch).
    x: ``(B, *input_shape)`` centres.
    eps: ``(B,)`` or scalar radii.
    per_example: whether ``key`` holds one key per example.
  """
  d = int(np.prod(x.shape[1:]))
  if not per_example:
    kd, kr = jax.random.split(key)
    g = jax.random.normal(kd, x.shape, x.dtype)
    u = jax.random.uniform(kr, (x.shape[0],), x.dtype)
  else:
    def one(k):
      kd, kr = jax.random.split(k)
      return (jax.random.normal(kd, x.shape[1:], x.dtype),
              jax.random.uniform(kr, (), x.dtype))
    g, u = jax.vmap(one)(key)
  g = g / expand(jnp.maximum(l2_norm(g), 1e-12), g)
  r = eps * u ** (1.0 / d)
  return project(x, x + g * expand(r, g), eps)


def _objective(apply_fn, loss, xa, y):
  logits = apply_fn(xa)
  m = margin(logits, y)
  if loss == "margin":
    per = -m
  else:
    per = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(per), (m, jnp.argmax(logits, axis=-1).astype(jnp.int32))


def _attack_core(apply_fn, variables, x, y, eps, key, *, steps, restarts, loss,
                 step_scale, step_size, per_example):
  f = lambda xa: apply_fn(variables, xa)
  grad_fn = jax.value_and_grad(functools.partial(_objective, f, loss), has_aux=True)
  alpha = eps * step_scale if step_size is None else jnp.full_like(eps, step_size)

  def keep_best(best, xa, m, pred):
    bx, bm, bp = best
    better = m < bm
    return (jnp.where(expand(better, xa), xa, bx), jnp.where(better, m, bm),
            jnp.where(better, pred, bp))

  def one_step(_, carry):
    xa, best = carry
    (_, (m, pred)), g = grad_fn(xa, y)
    best = keep_best(best, xa, m, pred)
    gn = l2_norm(g)
    direction = g / expand(jnp.maximum(gn, 1e-12), g)
    xa = project(x, xa + expand(alpha, g) * direction, eps)
    return xa, best

  logits0 = f(x)
  best = (x, margin(logits0, y), jnp.argmax(logits0, -1).astype(jnp.int32))
  for r in range(restarts):
    if per_example:
      keys_r = jax.vmap(lambda k: jax.random.fold_in(k, r))(key)
    else:
      keys_r = jax.random.fold_in(key, r)
    xa = random_start(keys_r, x, eps, per_example=per_example)
    xa, best = jax.lax.fori_loop(0, steps, one_step, (xa, best))
    logits = f(xa)
    best = keep_best(best, xa, margin(logits, y), jnp.argmax(logits, -1).astype(jnp.int32))
  bx, bm, bp = best
  return AttackResult(x_adv=bx, margin=bm, success=(bp != y) & (bm <= 0), predicted=bp)


@functools.lru_cache(maxsize=32)
def _compiled(apply_fn, steps, restarts, loss, step_scale, step_size, per_example):
  return jax.jit(functools.partial(_attack_core, apply_fn, steps=steps, restarts=restarts,
                                   loss=loss, step_scale=step_scale, step_size=step_size,
                                   per_example=per_example))


def pgd_attack(apply_fn, variables, x, y, eps, *, steps: int = 100, restarts: int = 1,
               step_size: Optional[float] = None, step_scale: float = 0.25,
               loss: str = "margin", key: Optional[Array] = None,
               example_keys: Optional[Array] = None) -> AttackResult:
  """L2 PGD with random restarts on one batch (one compiled call).

  Args:
    apply_fn: ``apply_fn(variables, x) -> (B, C)`` logits, e.g. ``model.apply``
      (hashable; used as a compilation cache key).
    variables: the model's variables (passed as an argument, not closed over).
    x: ``(B, *input_shape)`` clean inputs in ``[0, 1]``.
    y: ``(B,)`` integer labels.
    eps: scalar or ``(B,)`` l2 radii ``>= 0``.
    steps: gradient steps per restart (``>= 0``).
    restarts: random starts (``>= 1``); the clean point is always evaluated too.
    step_size: absolute l2 step length; default ``step_scale * eps``.
    step_scale: step length as a fraction of ``eps`` when ``step_size`` is None
      (the paper's ε/4 by default).
    loss: ``"margin"`` (minimise ``z_y - max_{i≠y} z_i``) or ``"ce"``
      (maximise the cross-entropy).
    key: PRNG key of the random starts (default ``PRNGKey(0)``).
    example_keys: ``(B,)`` PRNG keys, one per example (typed keys or raw
      ``(B, 2)`` uint32), instead of ``key``: each example's random starts then
      depend only on its own key, so an attack gives the same result whatever
      batch the example is in.

  Returns:
    An :class:`AttackResult`; every ``x_adv`` lies in ``B(x, eps) ∩ [0, 1]^d``.
  """
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  if steps < 0 or restarts < 1:
    raise ValueError(f"need steps >= 0 and restarts >= 1, got {steps}, {restarts}")
  if step_size is not None and not step_size > 0:
    raise ValueError(f"step_size must be > 0, got {step_size}")
  x = jnp.asarray(x, jnp.float32)
  if x.ndim < 2 or x.shape[0] == 0:
    raise ValueError(f"x must have shape (batch, *input_shape), got {x.shape}")
  y = jnp.asarray(y, jnp.int32)
  if y.shape != (x.shape[0],):
    raise ValueError(f"y must have shape ({x.shape[0]},), got {y.shape}")
  e_host = np.asarray(eps, np.float64)
  if not np.all(np.isfinite(e_host)) or np.any(e_host < 0):
    raise ValueError("eps must be finite and >= 0")
  eps = jnp.broadcast_to(jnp.asarray(eps, jnp.float32), (x.shape[0],))
  per_example = example_keys is not None
  if per_example:
    if key is not None:
      raise ValueError("pass key or example_keys, not both")
    key = example_keys
    if jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    if key.shape[0] != x.shape[0] or key.ndim != 2:
      raise ValueError(f"example_keys must hold {x.shape[0]} keys, got shape {key.shape}")
  else:
    key = jax.random.PRNGKey(0) if key is None else key
  fn = _compiled(apply_fn, int(steps), int(restarts), loss, float(step_scale),
                 None if step_size is None else float(step_size), per_example)
  return fn(variables, x, y, eps, key)


def perturbation_norm(x, x_adv) -> np.ndarray:
  """``(B,)`` float64 l2 norms of ``x_adv - x`` (computed on the host)."""
  d = np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)
  return np.sqrt(np.sum(np.square(d.reshape(d.shape[0], -1)), axis=1))
