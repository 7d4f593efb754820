"""Pure bound functions: intervals, masks, norms, Lipschitz bounds, certificates.

Nothing here knows about training; every function takes a model description
(a :class:`lipjax.nn.Sequential`, any other Flax module or a function
``fn(variables, x)``, read by :mod:`lipjax.bounds.graph`), its variables and
arrays.
"""

from lipjax.bounds.certify import Certificate, certify, certify_arrays
from lipjax.bounds.intervals import LayerBounds, propagate
from lipjax.bounds.lipschitz import (Guarantee, LocalBound, PowerState, bound_guarantee,
                                     global_lipschitz_bound, global_top_vectors,
                                     local_lipschitz_bound)
from lipjax.bounds.network import Stage, UnsupportedModelError, trace, working_dtype
from lipjax.bounds.norms import (ROUNDING_SLACK, conv_global_norm, dense_global_norm,
                                 masked_dense_norm)
from lipjax.bounds.rounding import operand_roundoff
from lipjax.bounds.power import lanczos_estimate, lanczos_norm_bound, power_iteration
from lipjax.bounds.graph import register_activation, register_linear
from lipjax.bounds.network import BlockEnd, chain_product

__all__ = [
    "BlockEnd",
    "Certificate",
    "Guarantee",
    "LayerBounds",
    "LocalBound",
    "PowerState",
    "ROUNDING_SLACK",
    "Stage",
    "UnsupportedModelError",
    "bound_guarantee",
    "certify",
    "certify_arrays",
    "chain_product",
    "conv_global_norm",
    "dense_global_norm",
    "global_lipschitz_bound",
    "global_top_vectors",
    "lanczos_estimate",
    "lanczos_norm_bound",
    "local_lipschitz_bound",
    "masked_dense_norm",
    "operand_roundoff",
    "power_iteration",
    "propagate",
    "register_activation",
    "register_linear",
    "trace",
    "working_dtype",
]
