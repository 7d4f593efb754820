"""Clamps: ReLU, clipped ReLU, any ``min(max(z, lo), hi)``, and the identity.

Each is elementwise, nondecreasing and 1-Lipschitz, evaluated exactly in
float32 (``max`` / ``min``): boxes map through it, an output is constant
exactly where its interval has zero width, and a float32 error passes
through entry by entry.

Traced form: a chain of elementwise ``max`` / ``min`` with static operands
(``relu``, ``jnp.clip(z, 0, theta)``, ``jnp.minimum(jnp.maximum(z, 0),
theta)``, ``lax.clamp``, constant or learnable bounds) folds into one clamp;
``lo = 0`` with no upper bound is a ReLU, ``lo = 0`` with an upper bound a
clipped ReLU (its upper bound, when it is a parameter, a threshold the
training step keeps ``>= 0``), anything else a :class:`Clamp`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import nn as lnn
from lipjax._src import patterns
from lipjax._src.rules import registry
from lipjax._src.rules.base import ElementwiseActivation

__all__ = ["Clamp", "ClippedReLU", "Identity", "ReLU"]


def _softplus(t):
  return lambda u: t * jax.nn.softplus(u / t)


@dataclasses.dataclass(frozen=True)
class ReLU(ElementwiseActivation):
  """``max(z, 0)``; no parameters."""

  exact = True

  def forward(self, params, z):
    return jax.nn.relu(z)

  def interval(self, params, lb, ub):
    return jax.nn.relu(lb), jax.nn.relu(ub)

  def active(self, params, lb, ub):
    return lb >= 0

  def smooth(self, params, z, temperature):
    return _softplus(temperature)(z)


@dataclasses.dataclass(frozen=True)
class ClippedReLU(ElementwiseActivation):
  """``min(max(z, 0), theta)``; ``params = {"theta": per-neuron thresholds}``.

  Constant on a box where ``ub <= 0``, ``lb >= theta`` or ``theta <= 0``.
  """

  exact = True

  def forward(self, params, z):
    return jnp.minimum(jax.nn.relu(z), params["theta"])

  def interval(self, params, lb, ub):
    return self.forward(params, lb), self.forward(params, ub)

  def active(self, params, lb, ub):
    return (lb >= 0) & (ub <= params["theta"])

  def smooth(self, params, z, temperature):
    sp = _softplus(temperature)
    return sp(z) - sp(z - params["theta"])

  def sparsity(self, params, lower, upper, theta_weight):
    return jnp.mean(jax.nn.relu(upper)) + theta_weight * jnp.mean(
        jax.nn.relu(params["theta"] - lower))


@dataclasses.dataclass(frozen=True)
class Clamp(ElementwiseActivation):
  """``min(max(z, lower), upper)``; ``params = {"lower", "upper"}`` per neuron
  (``-inf`` / ``+inf`` for a missing side)."""

  exact = True

  def forward(self, params, z):
    return jnp.minimum(jnp.maximum(z, params["lower"]), params["upper"])

  def interval(self, params, lb, ub):
    return self.forward(params, lb), self.forward(params, ub)

  def active(self, params, lb, ub):
    return (lb >= params["lower"]) & (ub <= params["upper"])


@dataclasses.dataclass(frozen=True)
class Identity(ElementwiseActivation):
  """No activation (between two linear maps, before a block's join): every unit varies."""

  exact = True
  linear = True

  def forward(self, params, z):
    return z

  def interval(self, params, lb, ub):
    return lb, ub

  def active(self, params, lb, ub):
    return jnp.ones_like(lb, dtype=bool)


registry.register_module(lnn.ReLU, lambda m: ReLU())
registry.register_module(lnn.ClippedReLU, lambda m: ClippedReLU())
registry.register_module(lnn.Identity, lambda m: Identity())


def clamp_kind(steps, ctx) -> str:
  """``"relu"``, ``"clipped_relu"`` or ``"clamp"``, decided on concrete values only."""
  # lo depends on the max steps only; hi on every step.
  lo = patterns.concrete_fold([s for s in steps if s[0] == "max"], ctx)
  hi = patterns.concrete_fold(steps, ctx)
  if lo is not None and patterns.all_values(lo[0], lambda v: v == 0):
    if hi is not None and patterns.all_values(hi[1], np.isposinf):
      return "relu"
    return "clipped_relu"
  return "clamp"


def clamp_match(ch: patterns.Chain, ctx) -> patterns.ActivationMatch:
  """The activation of a clamp chain."""
  kind = clamp_kind(ch.steps, ctx)
  steps = ch.steps

  def build(get, in_shape):
    if kind == "relu":
      return ReLU(), {}
    lo, hi = patterns.fold_steps(steps, get, jnp)
    if kind == "clipped_relu":
      return ClippedReLU(), {"theta": patterns.shaped(hi, in_shape)}
    return Clamp(), {"lower": patterns.shaped(lo, in_shape),
                     "upper": patterns.shaped(hi, in_shape)}

  thresholds = (patterns.step_statics([s for s in steps if s[0] == "min"])
                if kind == "clipped_relu" else ())
  return patterns.ActivationMatch(ch.input, ch.output, ch.nodes, ch.where, build,
                                  statics=patterns.step_statics(steps),
                                  thresholds=thresholds, kind=kind)


def _clamp_pattern(ctx):
  return [clamp_match(ch, ctx) for ch in ctx.chains()]


registry.register_activation_pattern("clamp", _clamp_pattern, priority=50)
registry.register_activation_primitive("max")
registry.register_activation_primitive("min")
registry.register_activation_primitive(
    "clamp", lambda eqn, acts: None if list(acts) == [1] else
    "lax.clamp with bounds computed from the input")
