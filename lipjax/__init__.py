"""lipjax: certified l2 robustness with local Lipschitz bounds, in JAX/Flax.

Public API::

  lipjax.local_lipschitz_bound(model, variables, x, eps, **options)
  lipjax.global_lipschitz_bound(model, variables, **options)
  lipjax.certify(model, variables, x, y, eps, **options)
  lipjax.models.get(name, num_classes=..., activation=...)
  lipjax.nn  -- the layers a bounded network is built from
"""

from lipjax import models, nn
from lipjax.bounds import (Certificate, LocalBound, PowerState, UnsupportedModelError,
                           certify, global_lipschitz_bound, local_lipschitz_bound)

__version__ = "0.1.0"

__all__ = [
    "Certificate", "LocalBound", "PowerState", "UnsupportedModelError", "certify",
    "global_lipschitz_bound", "local_lipschitz_bound", "models", "nn",
]
