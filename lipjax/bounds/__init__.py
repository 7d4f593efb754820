"""Pure bound functions: Lipschitz bounds, certificates, and your own rules.

Every function takes a model (a :class:`lipjax.nn.Sequential`, any other
Flax linen or NNX module, or a function ``fn(variables, x)``), its variables
and arrays. The implementation lives in :mod:`lipjax._src` (private).

Public API::

  local_lipschitz_bound(model, variables, x, eps, **options) -> LocalBound
  global_lipschitz_bound(model, variables, **options)
  layer_global_norms(model, variables, **options)
  global_top_vectors(model, variables, **options) -> PowerState
  certify(model, variables, x, y, eps, **options) -> Certificate
  bound_guarantee(model, variables, bound="local" | "global") -> Guarantee
  register_linear(fn), register_activation(fn, ...)
  working_dtype(variables, x_dtype), operand_roundoff()
"""

from lipjax._src.certify import Certificate, certify
from lipjax._src.errors import UnsupportedModelError
from lipjax._src.interpret import LayerBounds
from lipjax._src.lipschitz import (Guarantee, LocalBound, PowerState, bound_guarantee,
                                   global_lipschitz_bound, global_top_vectors,
                                   layer_global_norms, local_lipschitz_bound)
from lipjax._src.rounding import operand_roundoff
from lipjax._src.rules.registered import register_activation, register_linear
from lipjax._src.trace import working_dtype

__all__ = [
    "Certificate",
    "Guarantee",
    "LayerBounds",
    "LocalBound",
    "PowerState",
    "UnsupportedModelError",
    "bound_guarantee",
    "certify",
    "global_lipschitz_bound",
    "global_top_vectors",
    "layer_global_norms",
    "local_lipschitz_bound",
    "operand_roundoff",
    "register_activation",
    "register_linear",
    "working_dtype",
]
