"""Per-example helpers for batched arrays whose leading axis is the example."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["expand", "l2_norm"]


def expand(s: Array, like: Array) -> Array:
  """``s`` of shape ``(B,)`` (or ``(B, *k)``) with trailing unit axes to broadcast against ``like``.

  The result has ``like.ndim`` dimensions when ``s`` is ``(B,)``.
  """
  s = jnp.asarray(s)
  return s.reshape(s.shape + (1,) * (like.ndim - 1))


def l2_norm(x: Array) -> Array:
  """``(B,)`` l2 norm of each example of ``x`` (``(B, ...)``) over all its other axes."""
  return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1))
