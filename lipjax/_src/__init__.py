"""lipjax's private implementation.

Nothing here is public API: the public faces are :mod:`lipjax`,
:mod:`lipjax.bounds`, :mod:`lipjax.nn`, :mod:`lipjax.models`,
:mod:`lipjax.training` and :mod:`lipjax.evaluation`, which import from here.
Names and modules in this package may change without notice.
"""
