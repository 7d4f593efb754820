"""Your own ``lipjax.nn`` layers: the layer protocol as rules.

A subclass of :class:`lipjax.nn.LinearLayer` (implementing ``linear`` and
``bias``, optionally the tighter ``abs_linear``, ``row_norms``,
``global_norm``, ``explicit_matrix``, ``fan_in``, ``adjoint``,
``linear_for_adjoint``) or of :class:`lipjax.nn.Activation` (``activate``,
``interval``, ``varying``, optionally ``evaluation_error``) in a
``lipjax.nn.Sequential`` gets one of these rules, which asks the module.
lipjax's own layers have rules of their own (registered for their classes,
which come first in the lookup).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lipjax import nn as lnn
from lipjax._src.rules import registry
from lipjax._src.rules.base import ActivationRule, LinearRule

__all__ = ["ModuleActivation", "ModuleLinear"]


@dataclasses.dataclass(frozen=True, eq=False)
class ModuleLinear(LinearRule):
  """The rules a :class:`lipjax.nn.LinearLayer` subclass states itself."""

  module: Any = None

  @property
  def deterministic_global(self):   # pylint: disable=invalid-overridden-method
    return type(self.module).global_norm is not lnn.LinearLayer.global_norm

  def forward(self, params, h):
    return self.module.linear(params, h)

  def bias(self, params):
    return self.module.bias(params)

  def forward_for_adjoint(self, params, h):
    return self.module.linear_for_adjoint(params, h)

  def adjoint(self, params, z, in_shape):
    return self.module.adjoint(params, z, in_shape)

  def abs_forward(self, params, h):
    return self.module.abs_linear(params, h)

  def row_norms(self, params, in_shape):
    return self.module.row_norms(params, in_shape)

  def global_norm(self, params, in_shape):
    return self.module.global_norm(params, in_shape)

  def explicit_matrix(self, params):
    return self.module.explicit_matrix(params)

  def fan_in(self, params, in_shape):
    return self.module.fan_in(params, in_shape)


@dataclasses.dataclass(frozen=True, eq=False)
class ModuleActivation(ActivationRule):
  """The rules a :class:`lipjax.nn.Activation` subclass states itself (errors
  propagate by the l2 rule: nothing is known of its structure)."""

  module: Any = None

  def forward(self, params, z):
    return self.module.activate(params, z)

  def interval(self, params, lb, ub):
    return self.module.interval(params, lb, ub)

  def mask(self, params, lb, ub):
    return self.module.varying(params, lb, ub)

  def evaluation_error(self, params, lo, hi):
    own = getattr(self.module, "evaluation_error", None)
    return None if own is None else own(params, lo, hi)


registry.register_module(lnn.LinearLayer, lambda m: ModuleLinear(module=m))
registry.register_module(lnn.Activation, lambda m: ModuleActivation(module=m))
