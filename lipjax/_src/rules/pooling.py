"""Average pooling (``lipjax.nn.AvgPool``) as a linear map with exact rules.

Each output channel averages the same channel only, so the map is block
diagonal with one identical block per channel: a single-channel VALID
convolution with the constant kernel ``1 / window^2``. Its weights are
nonnegative (``|W| = W``). A traced ``flax.linen.avg_pool`` is read as a
``reduce_window_sum`` and a division (the generic traced rules).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lipjax import nn as lnn
from lipjax._src import norms
from lipjax._src.rules import registry
from lipjax._src.rules.base import LinearRule

__all__ = ["AvgPool"]


@dataclasses.dataclass(frozen=True)
class AvgPool(LinearRule):
  """VALID ``window x window`` average pooling with ``stride``, NHWC, no parameters."""

  window: int = 2
  stride: int = 2
  deterministic_global = True

  def forward(self, params, h):
    del params
    s = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, self.window, self.window, 1),
                              (1, self.stride, self.stride, 1), "VALID")
    return s / (self.window * self.window)

  def abs_forward(self, params, h):
    return self.forward(params, h)

  def row_norms(self, params, in_shape):
    out_shape = jax.eval_shape(
        lambda x: self.forward(params, x),
        jax.ShapeDtypeStruct((1,) + tuple(in_shape), jnp.float32)).shape[1:]
    return jnp.full(out_shape, 1.0 / self.window, jnp.float32)

  def global_norm(self, params, in_shape):
    """Exact norm of the circulant operator that contains the pooling (see
    :func:`lipjax._src.norms.conv_global_norm`); the same for every channel."""
    del params
    k = jnp.full((self.window, self.window, 1, 1), 1.0 / (self.window * self.window),
                 jnp.float32)
    return norms.conv_global_norm(k, in_shape[:2], stride=self.stride, padding=0)

  def fan_in(self, params, in_shape):
    del params, in_shape
    return self.window * self.window


registry.register_module(lnn.AvgPool, lambda m: AvgPool(window=m.window, stride=m.stride))
