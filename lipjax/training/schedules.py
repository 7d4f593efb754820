"""Training schedules as Optax schedules: ``step -> value``.

``step`` is the number of optimiser updates already done (0 for the first
batch), so a schedule evaluated at ``TrainState.step`` gives the value the
next update trains with. Every schedule accepts a Python int or an integer
array (also inside ``jit``) and returns a float32 scalar.

Warm-up and ramp-up are counted in epochs of ``steps_per_epoch`` updates:
``W = warmup_epochs * steps_per_epoch`` clean steps (``eps = 0``,
``kappa = 1``), then ``R = rampup_epochs * steps_per_epoch`` ramp steps where
update ``s`` (``W <= s < W + R``) uses the fraction ``(s - W + 1) / R``; the
last ramp step and every later one use exactly ``eps_train`` and
``kappa = 0``.
"""

from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp
import optax


def _check_counts(steps_per_epoch, warmup_epochs, rampup_epochs):
  if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
  if warmup_epochs < 0 or rampup_epochs < 0:
    raise ValueError(f"warm-up and ramp-up epochs must be >= 0, got {warmup_epochs!r} "
                     f"and {rampup_epochs!r}")


def _ramp_fraction(steps_per_epoch, warmup_epochs, rampup_epochs) -> optax.Schedule:
  """0 during warm-up, then ``(s - W + 1) / R`` clipped to [0, 1]."""
  _check_counts(steps_per_epoch, warmup_epochs, rampup_epochs)
  warm = int(round(warmup_epochs * steps_per_epoch))
  ramp = int(round(rampup_epochs * steps_per_epoch))

  def fraction(step):
    s = jnp.asarray(step, jnp.int32)
    if ramp == 0:
      return jnp.where(s >= warm, 1.0, 0.0).astype(jnp.float32)
    # Integer numerator and denominator: the ratio is exactly 1.0 at the end.
    done = jnp.clip(s - warm + 1, 0, ramp)
    return done.astype(jnp.float32) / jnp.float32(ramp)

  return fraction


def eps_schedule(eps_train: float, steps_per_epoch: int, warmup_epochs: float = 0,
                 rampup_epochs: float = 0) -> optax.Schedule:
  """Training radius: 0 for the warm-up, linear per step up to ``eps_train``.

  Args:
    eps_train: final training radius (>= 0).
    steps_per_epoch: optimiser updates per epoch (>= 1).
    warmup_epochs: clean epochs (``eps = 0``) before the ramp.
    rampup_epochs: epochs over which ``eps`` grows linearly; 0 jumps straight
      to ``eps_train`` after the warm-up.

  Returns:
    ``schedule(step) -> eps`` (float32 scalar); ``eps_train * (s - W + 1) / R``
    on ramp step ``s``, exactly ``eps_train`` from the last ramp step on.
  """
  if eps_train < 0:
    raise ValueError(f"eps_train must be >= 0, got {eps_train!r}")
  frac = _ramp_fraction(steps_per_epoch, warmup_epochs, rampup_epochs)
  eps_train = jnp.float32(eps_train)
  return lambda step: eps_train * frac(step)


def kappa_schedule(steps_per_epoch: int, warmup_epochs: float = 0,
                   rampup_epochs: float = 0) -> optax.Schedule:
  """BCP mixing weight: 1 during warm-up, ramped to 0 alongside ``eps``.

  Returns:
    ``schedule(step) -> kappa`` in [0, 1]: ``1 - f`` where ``f`` is the ramp
    fraction of :func:`eps_schedule` with the same arguments.
  """
  frac = _ramp_fraction(steps_per_epoch, warmup_epochs, rampup_epochs)
  return lambda step: jnp.clip(1.0 - frac(step), 0.0, 1.0)


def lr_schedule(lr: float, end_lr: float, epochs: int, steps_per_epoch: int,
                hold_epochs: Optional[int] = None) -> optax.Schedule:
  """Adam learning rate: held, then decayed geometrically per epoch.

  With ``e = step // steps_per_epoch`` (0-based epoch) and
  ``H = min(epochs // 2 + 25, epochs - 1)`` (or ``min(hold_epochs, epochs - 1)``
  when given): ``lr`` for ``e <= H``, then
  ``lr * (end_lr / lr) ** ((e - H) / (epochs - 1 - H))``, reaching ``end_lr``
  in the last epoch (``e = epochs - 1``) and staying there if training runs
  longer. Runs of at most 51 epochs end before the hold does, so keep ``lr``.

  Args:
    lr: initial learning rate (> 0).
    end_lr: learning rate of the last epoch (> 0).
    epochs: total number of epochs (>= 1).
    steps_per_epoch: optimiser updates per epoch (>= 1).
    hold_epochs: last epoch of the constant phase (``>= 0``); None: the
      paper's ``epochs // 2 + 25``. A compressed schedule keeps the paper's
      shape with ``round(epochs * 175 / 300)``.

  Returns:
    ``schedule(step) -> learning rate`` (float32 scalar).
  """
  if not lr > 0 or not end_lr > 0:
    raise ValueError(f"lr and end_lr must be > 0, got {lr!r} and {end_lr!r}")
  if int(epochs) != epochs or epochs < 1:
    raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
  _check_counts(steps_per_epoch, 0, 0)
  if hold_epochs is not None and (int(hold_epochs) != hold_epochs or hold_epochs < 0):
    raise ValueError(f"hold_epochs must be a non-negative integer, got {hold_epochs!r}")
  hold = min(epochs // 2 + 25 if hold_epochs is None else int(hold_epochs), epochs - 1)
  decay = epochs - 1 - hold
  log_ratio = math.log(end_lr / lr)

  def schedule(step):
    e = jnp.asarray(step, jnp.int32) // steps_per_epoch
    if decay == 0:
      return jnp.full((), lr, jnp.float32)
    t = jnp.clip(e - hold, 0, decay).astype(jnp.float32) / jnp.float32(decay)
    value = jnp.float32(lr) * jnp.exp(jnp.float32(log_ratio) * t)
    return jnp.where(e >= epochs - 1, jnp.float32(end_lr), value)

  return schedule

