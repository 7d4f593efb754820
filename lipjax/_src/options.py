"""Option checks, run once at the public entry points (one line each)."""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["check_choice", "choices"]


def choices(allowed: Sequence[str]) -> str:
  """``'a', 'b' or 'c'``."""
  quoted = [repr(a) for a in allowed]
  return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
  """``value`` when it is one of ``allowed``; else a one-line ``ValueError``
  (``<name> must be 'a' or 'b', got ...``)."""
  if value not in tuple(allowed):
    raise ValueError(f"{name} must be {choices(allowed)}, got {value!r}")
  return value
