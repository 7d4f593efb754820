"""Lipschitz bounds (public face of :mod:`lipjax._src.lipschitz`).

The same functions as :mod:`lipjax.bounds`, under the module name they had
before the bounds moved behind :mod:`lipjax._src`; ``ball_bounds`` gives the
boxes of a ball from global norms (the slopes of the per-class-pair bound).
"""

from lipjax._src.lipschitz import (Guarantee, LocalBound, PowerState, ball_bounds,
                                   bound_guarantee, global_lipschitz_bound,
                                   global_top_vectors, layer_global_norms,
                                   local_lipschitz_bound)

__all__ = ["Guarantee", "LocalBound", "PowerState", "ball_bounds", "bound_guarantee",
           "global_lipschitz_bound", "global_top_vectors", "layer_global_norms",
           "local_lipschitz_bound"]
