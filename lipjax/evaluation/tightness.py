"""Empirical lower bounds of local Lipschitz constants (how tight a bound is).

For a network ``f`` and a point ``x'`` where ``f`` is differentiable,
``||J_f(x')||_2`` (the spectral norm of the logits' Jacobian) is a lower bound
of the Lipschitz constant of ``f`` on any open set containing ``x'``. The
Rayleigh quotient ``||J v|| / ||v||`` of any ``v`` is in turn a lower bound of
``||J||_2``. So the maximum over points found inside ``B(x, eps)`` of power
iteration estimates is a certified *lower* bound of the local Lipschitz
constant that :func:`lipjax.local_lipschitz_bound` bounds from above, and
``upper / lower >= 1`` measures how loose the upper bound can be at most.

The search for a point of large Jacobian norm is gradient ascent inside the
ball. The networks lipjax bounds are piecewise linear, so ``||J(x')||`` is
piecewise constant in ``x'`` and its gradient vanishes almost everywhere; the
ascent therefore follows the gradient of a *smoothed* network (softplus in
place of ReLU, the analogous smooth forms of clipped ReLU and MaxMin, with
temperature ``temperature``) while every reported value is the Jacobian norm
of the true network.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lipjax._src import frontends, interpret, per_example, power
from lipjax._src import trace as trace_lib
from lipjax.evaluation import pgd

Array = jax.Array


class JacobianSearch(NamedTuple):
  """Result of :func:`jacobian_norm_lower_bound` for ``B`` examples.

  Attributes:
    lower_bound: ``(B,)`` the largest Rayleigh quotient ``||J(x') v||`` found
      over the visited points ``x'`` (a lower bound of the local Lipschitz
      constant of the logits on ``B(x, eps)``).
    at_center: ``(B,)`` the power-iteration estimate of ``||J(x)||`` at the
      centre alone.
    point: ``(B, *input_shape)`` the point where ``lower_bound`` was found.
  """

  lower_bound: Array
  at_center: Array
  point: Array


def power_norm(f, x, v, iterations: int):
  """Power iteration on ``J^T J`` of a per-example map ``f`` at ``x``.

  Args:
    f: maps ``(B, *in)`` to ``(B, C)`` with every output row depending only
      on its own input row (so the batched Jacobian is block diagonal).
    x: ``(B, *in)`` points.
    v: ``(B, *in)`` start vectors.
    iterations: ``>= 0`` iterations of ``v <- J^T J v / ||J^T J v||``.

  Returns:
    ``(sigma, v)``: ``sigma`` ``(B,)`` the Rayleigh quotient ``||J v||`` of
    the final unit vector ``v`` (never above ``||J||_2``).
  """
  _, vjp = jax.vjp(f, x)
  jvp = lambda t: jax.jvp(f, (x,), (t,))[1]
  v = jax.lax.fori_loop(0, iterations, lambda _, u: power.normalise(vjp(jvp(u))[0]),
                        power.normalise(v))
  return per_example.l2_norm(jvp(v)), v


def smoothed_forward(model, variables, x, temperature: float):
  """The network with every activation replaced by its rule's smooth surrogate
  (:meth:`lipjax._src.rules.base.ActivationRule.smooth`)."""
  graph = trace_lib.trace(model, variables, tuple(x.shape[1:]))
  return interpret.smoothed_forward(graph, x, temperature)


def _search_core(model, variables, x, eps, key, *, steps, iterations, temperature,
                 step_scale):
  f = lambda xa: model.apply(variables, xa)
  fs = lambda xa: smoothed_forward(model, variables, xa, temperature)
  k0, k1 = jax.random.split(key)
  v0 = jax.random.normal(k0, x.shape, x.dtype)
  sigma0, v = power_norm(f, x, v0, iterations)
  best, best_x = sigma0, x

  def smooth_obj(xa, v):
    jv = jax.jvp(fs, (xa,), (v,))[1]
    return jnp.sum(jnp.square(jv))

  grad_fn = jax.grad(smooth_obj)
  # Start from a random point of the ball: the centre may sit on a flat piece
  # of the smoothed objective too.
  xa = pgd.random_start(k1, x, eps)
  alpha = eps * step_scale

  def ascent(_, carry):
    xa, v, best, best_x = carry
    sigma, v = power_norm(f, xa, v, iterations)
    better = sigma > best
    best = jnp.where(better, sigma, best)
    best_x = jnp.where(per_example.expand(better, xa), xa, best_x)
    g = grad_fn(xa, jax.lax.stop_gradient(v))
    xa = pgd.project(x, xa + per_example.expand(alpha, g) * power.normalise(g), eps)
    return xa, v, best, best_x

  xa, v, best, best_x = jax.lax.fori_loop(0, steps, ascent, (xa, v, best, best_x))
  sigma, _ = power_norm(f, xa, v, iterations)
  better = sigma > best
  best = jnp.where(better, sigma, best)
  best_x = jnp.where(per_example.expand(better, xa), xa, best_x)
  return JacobianSearch(lower_bound=best, at_center=sigma0, point=best_x)


@functools.lru_cache(maxsize=16)
def _compiled(model, steps, iterations, temperature, step_scale):
  return jax.jit(functools.partial(_search_core, model, steps=steps, iterations=iterations,
                                   temperature=temperature, step_scale=step_scale))


def jacobian_norm_lower_bound(model, variables, x, eps, *, steps: int = 10,
                              iterations: int = 5, temperature: float = 0.05,
                              step_scale: float = 0.25,
                              key: Optional[Array] = None) -> JacobianSearch:
  """Lower bound of the local Lipschitz constant of the logits on ``B(x, eps)``.

  Args:
    model: a :class:`lipjax.nn.Sequential`, a Flax module or a function
      ``fn(variables, x)`` (see :func:`lipjax.local_lipschitz_bound`).
    variables: its variables.
    x: ``(B, *input_shape)`` points.
    eps: scalar or ``(B,)`` radii ``>= 0``.
    steps: gradient-ascent steps inside the ball.
    iterations: power iterations (jvp/vjp pairs) per visited point.
    temperature: softplus temperature of the smoothed network (only steers
      the search; it never enters the reported values).
    step_scale: ascent step length as a fraction of ``eps``.
    key: PRNG key (start vectors, random start).

  Returns:
    A :class:`JacobianSearch` with ``(B,)`` lower bounds.
  """
  if steps < 0 or iterations < 1:
    raise ValueError(f"need steps >= 0 and iterations >= 1, got {steps}, {iterations}")
  model, variables = frontends.resolve(model, variables)
  x = jnp.asarray(x, jnp.float32)
  e_host = np.asarray(eps, np.float64)
  if not np.all(np.isfinite(e_host)) or np.any(e_host < 0):
    raise ValueError("eps must be finite and >= 0")
  eps = jnp.broadcast_to(jnp.asarray(eps, jnp.float32), (x.shape[0],))
  key = jax.random.PRNGKey(0) if key is None else key
  model = frontends.keyed(model, variables, x.shape[1:])   # caches by traced structure
  return _compiled(model, int(steps), int(iterations), float(temperature),
                   float(step_scale))(variables, x, eps, key)


def quantiles(values, qs=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)) -> dict:
  """``{"q00": ..., "q50": ..., "mean": ..., "count": ...}`` over finite values."""
  v = np.asarray(values, np.float64).ravel()
  v = v[np.isfinite(v)]
  out = {"count": int(v.size)}
  for q in qs:
    out[f"q{int(round(100 * q)):02d}"] = float(np.quantile(v, q)) if v.size else None
  out["mean"] = float(np.mean(v)) if v.size else None
  return out
