"""The one error a model without a sound rule gets, in one short line."""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["MAX_MESSAGE", "SUPPORTED", "UnsupportedModelError", "unsupported", "shorten"]

#: What the tracer supports, in a few words (the README section lists it all).
SUPPORTED = "flax.linen.Dense/Conv, relu, clip, MaxMin, residuals"
#: Where to read more.
POINTER = "README: Supported models"
#: The longest message :func:`unsupported` writes (characters).
MAX_MESSAGE = 215


class UnsupportedModelError(TypeError):
  """The model contains something the bounds cannot handle."""


def shorten(text: str, limit: int) -> str:
  """``text`` cut to at most ``limit`` characters (an ellipsis marks a cut)."""
  text = " ".join(str(text).split())
  if len(text) <= limit:
    return text
  return text[:max(limit - 3, 0)].rstrip(" ,;") + "..."


def short_where(module: Optional[str] = None, calls: Optional[str] = None,
                source: Optional[str] = None) -> str:
  """``module <path>, <file>:<line>`` with the module path's last three parts,
  the file's base name and (when short) the enclosing calls."""
  parts = []
  if module:
    pieces = module.split("/")
    parts.append("module " + "/".join(pieces[-3:]))
  if calls and len(calls) <= 24:
    parts.append(f"inside {calls}")
  if source:
    path, _, line = source.rpartition(":")
    parts.append(f"{os.path.basename(path)}:{line}" if path else source)
  return ", ".join(parts) if parts else "an unnamed place"


def _fit_where(where: str, room: int) -> str:
  """``where`` (parts ``module <path>``, ``inside <calls>``, ``<file>:<line>``)
  within ``room`` characters: the calls go first, then the module path keeps
  its first and last parts; the source line stays."""
  parts = [p.strip() for p in where.split(", ")]
  if len(", ".join(parts)) > room:
    parts = [p for p in parts if not p.startswith("inside ")] or parts
  if len(", ".join(parts)) > room and parts[0].startswith("module "):
    other = sum(len(p) + 2 for p in parts[1:])
    keep = max(room - other - len("module "), 12)
    path = parts[0][len("module "):].split("/")
    text = "/".join(path)
    if len(text) > keep and len(path) > 2:
      text = f"{path[0]}/.../{path[-1]}"
    parts[0] = "module " + shorten(text, keep)
  return shorten(", ".join(parts), room)


def unsupported(what: str, where: str, supported: str = SUPPORTED) -> UnsupportedModelError:
  """The one-line error for ``what`` (the operation or pattern) at ``where``.

  The line names the operation, where it sits in the user's model (module
  path and source line, from :func:`short_where`), what is supported and
  the README section; it stays under :data:`MAX_MESSAGE` characters (the
  place, then the operation are shortened if needed) and never holds a
  module's repr.
  """
  tail = f": no sound rule; supported: {supported} ({POINTER})"
  room = MAX_MESSAGE - len(tail) - len(" at ")
  where = _fit_where(" ".join(str(where).split()), room - min(len(str(what)), 30))
  what = shorten(what, room - len(where))
  return UnsupportedModelError(f"{what} at {where}{tail}")


def model_error(text: str) -> UnsupportedModelError:
  """A one-line :class:`UnsupportedModelError` with ``text`` (shortened) and the pointer."""
  tail = f" ({POINTER})"
  return UnsupportedModelError(shorten(text, MAX_MESSAGE - len(tail)) + tail)
