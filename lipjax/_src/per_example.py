"""Per-example helpers for batched arrays whose leading axis is the example."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["expand", "l2_norm", "safe_norm", "safe_sqrt"]


def expand(s: Array, like: Array) -> Array:
  """``s`` of shape ``(B,)`` (or ``(B, *k)``) with trailing unit axes to broadcast against ``like``.

  The result has ``like.ndim`` dimensions when ``s`` is ``(B,)``.
  """
  s = jnp.asarray(s)
  return s.reshape(s.shape + (1,) * (like.ndim - 1))


def safe_sqrt(sq: Array) -> Array:
  """``sqrt(sq)`` for ``sq >= 0`` with a finite (zero) gradient at 0, not NaN."""
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def safe_norm(x: Array) -> Array:
  """:func:`l2_norm` with a finite (zero) gradient at 0 (for differentiated norms)."""
  return safe_sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))))


def l2_norm(x: Array) -> Array:
  """``(B,)`` l2 norm of each example of ``x`` (``(B, ...)``) over all its other axes."""
  return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1))
