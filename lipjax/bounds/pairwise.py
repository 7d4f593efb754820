"""Per-class-pair local Lipschitz bounds (public face of :mod:`lipjax._src.pairwise`).

``pair_bounds(stages, layers, layer_norms, labels, ...)`` bounds, for every
class ``i``, the local Lipschitz constant of the margin ``z_i - z_y`` from the
linearised midpoint network; :func:`lipjax.certify` uses it in the local
certificate (``pairwise=True``, the default).
"""

from lipjax._src.pairwise import midpoint_slopes, pair_bounds, supports

__all__ = ["midpoint_slopes", "pair_bounds", "supports"]
