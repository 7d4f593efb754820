"""Rules: one small object per operation, and the registries that find them.

Every module of this package is imported when the package is: a rule file
defines its rule classes and registers them (for ``lipjax.nn`` modules, for
the primitives and patterns the tracer meets, for blocks). Adding a built-in
activation, linear layer or block kind is adding one file here; see
CONTRIBUTING.md.
"""

import importlib
import pkgutil

from lipjax._src.rules import registry
from lipjax._src.rules.base import (ActivationRule, CombineRule, ElementwiseActivation,
                                    LinearRule, interval_masks)
from lipjax._src.rules.registry import module_rule

__all__ = ["ActivationRule", "CombineRule", "ElementwiseActivation", "LinearRule",
           "interval_masks", "module_rule", "registry"]

for _info in pkgutil.iter_modules(__path__):
  if _info.name not in ("base", "registry") and not _info.name.startswith("_"):
    importlib.import_module(f"{__name__}.{_info.name}")
