"""lipjax: certified l2 robustness with local Lipschitz bounds, in JAX/Flax.

Public API::

  lipjax.local_lipschitz_bound(model, variables, x, eps, **options)
  lipjax.global_lipschitz_bound(model, variables, **options)
  lipjax.certify(model, variables, x, y, eps, **options)
  lipjax.bound_guarantee(model, variables, bound="local" | "global")
  lipjax.register_linear(fn), lipjax.register_activation(fn, ...)
  lipjax.models.get(name, num_classes=..., activation=...)
  lipjax.nn  -- the layers a bounded network is built from
"""

from lipjax import models, nn
from lipjax.bounds import (Certificate, Guarantee, LocalBound, PowerState,
                           UnsupportedModelError, bound_guarantee, certify,
                           global_lipschitz_bound, local_lipschitz_bound,
                           register_activation, register_linear)

__version__ = "0.1.0"

__all__ = [
    "Certificate", "Guarantee", "LocalBound", "PowerState", "UnsupportedModelError",
    "bound_guarantee", "certify", "global_lipschitz_bound", "local_lipschitz_bound",
    "models", "nn", "register_activation", "register_linear",
]
