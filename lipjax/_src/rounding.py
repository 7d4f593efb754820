"""Rigorous a-priori bounds on the rounding of a network's float32 forward pass.

Certificates are about the network *as it is evaluated*: ``model.apply`` in
float32 must predict the label at every point of the ball, and so must the
exact (real-arithmetic) network with the same float32 parameters. This module
bounds, for every point of the ball at once, how far the float32 forward pass
can be from the exact one.

Model of the arithmetic (what the bounds assume):

* every output of a linear layer is a sum of at most ``n`` products
  ``w_k h_k`` (``n`` from :meth:`lipjax.nn.LinearLayer.fan_in`, else the whole
  input size), accumulated in float32 in any order, with or without fused
  multiply-add, followed by at most one more scaling (a division) and the
  bias addition. The operands of the products may first be rounded to a
  narrower format with unit roundoff ``v`` (:func:`operand_roundoff`): this is
  what accelerators do for float32 matrix products and convolutions by
  default (bfloat16 passes on TPU, TensorFloat-32 on recent NVIDIA GPUs);
* activations and reshapes are evaluated exactly (true for the built-in
  activations: comparisons, ``max``, ``min``), except activations registered
  with :func:`lipjax.bounds.register_activation`, whose declared error
  (``ulps``) is added;
* a residual sum ``h + f(h)`` is one float32 addition (error ``u |h + f(h)|``).

Under this model, with ``u = 2^-24`` and ``gamma_m = m u / (1 - m u)``
(Higham, *Accuracy and Stability of Numerical Algorithms*, Lemma 3.1 and
Sec. 3.1), for any summation order:

  ``|fl(sum_k w_k h_k + b) - (sum_k w_k h_k + b)|
  <= ((1 + v)^2 (1 + gamma_{n+2}) - 1) (sum_k |w_k| |h_k| + |b|)``

plus an absolute term of a few ``2^-126`` per product for underflow (flush
to zero included). :func:`dot_coefficient` returns a coefficient ``c`` such
that ``c`` times the *float32-computed* sum of magnitudes is such a bound.
:func:`lipjax._src.interpret.propagate` applies it layer by layer over the
ball (``|h| <= max(|lb|, |ub|)`` from the boxes) and carries the error through
the network (1-Lipschitz activations, ``|W| e`` and ``||W|| ||e||``).
Convolution algorithms that are not sums of products (Winograd, FFT, which
some GPU libraries may select) are outside this model.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

#: Unit roundoff of float32 (round to nearest).
U = 2.0 ** -24
#: Added to magnitudes before ``|W| (.)``: ``c * |w| * FLOOR`` covers a product
#: whose operand below ``2^-126`` is flushed to zero (``c >= 2^-26`` always).
FLOOR = 2.0 ** -100
_TINY = 2.0 ** -124

# Operand unit roundoff of one float32 product, per matmul precision. Values
# are those of truncation (twice round-to-nearest), to be safe either way.
_BF16 = 2.0 ** -7          # one bfloat16 pass (8-bit significand)
_TF32 = 2.0 ** -10         # TensorFloat-32 (11-bit significand)
_BF16_X3 = 2.0 ** -14      # three bfloat16 passes (~16 bits)
_BF16_X6 = 2.0 ** -21      # six bfloat16 passes (TPU "highest")
_TF32_X3 = 2.0 ** -19

_BY_NAME = {
    "bfloat16": _BF16, "fastest": _BF16, "BF16_BF16_F32": _BF16,
    "tensorfloat32": _TF32, "high": _TF32, "TF32_TF32_F32": _TF32,
    "bfloat16_3x": _BF16_X3, "BF16_BF16_F32_X3": _BF16_X3,
    "BF16_BF16_F32_X6": _BF16_X6, "BF16_BF16_F32_X9": _BF16_X6,
    "TF32_TF32_F32_X3": _TF32_X3,
}
_FULL = ("float32", "highest", "F32_F32_F32", "F64_F64_F64")
_DEFAULT = (None, "default", "DEFAULT")


def operand_roundoff(backend: Optional[str] = None, precision=None) -> float:
  """Unit roundoff ``v`` of the operands of float32 matrix products and convolutions.

  Reads ``jax.config.jax_default_matmul_precision`` and ``jax.default_backend()``
  unless given (the certificate then covers ``model.apply`` run on the same
  kind of backend under the same precision setting):

  ====================================  =======  ===================  ========
  precision                             CPU      GPU                  TPU/other
  ====================================  =======  ===================  ========
  default (None)                        0        2^-10 (TF32)         2^-7 (bf16)
  'float32' / 'highest' / F32_F32_F32   0        0                    2^-21 (bf16 x6)
  'tensorfloat32' / 'high'              2^-10    2^-10                2^-10
  'bfloat16' / 'fastest'                2^-7     2^-7                 2^-7
  ====================================  =======  ===================  ========

  Explicitly reduced settings are honoured on the CPU too (to be safe), and
  the ``DotAlgorithmPreset`` names with float32 accumulation are accepted.

  Raises:
    ValueError: for a setting whose accumulation is not float32 (float16,
      bfloat16 or float8 formats), which the rounding model does not cover.
  """
  if precision is None:
    precision = jax.config.jax_default_matmul_precision
  if precision is not None and not isinstance(precision, str):
    precision = getattr(precision, "name", str(precision))   # a lax.Precision
  if isinstance(precision, str) and precision.lower() in (
      "default", "fastest", "high", "highest", "float32", "bfloat16", "bfloat16_3x",
      "tensorfloat32"):
    precision = precision.lower()
  backend = jax.default_backend() if backend is None else backend
  if precision in _DEFAULT:
    return {"cpu": 0.0, "gpu": _TF32, "cuda": _TF32, "rocm": _TF32}.get(backend, _BF16)
  if precision in _FULL:
    return 0.0 if backend in ("cpu", "gpu", "cuda", "rocm") else _BF16_X6
  if precision in _BY_NAME:
    return _BY_NAME[precision]
  raise ValueError(f"matmul precision {precision!r} is not covered by the certificates' "
                   "rounding model; use 'float32', 'tensorfloat32' or 'bfloat16'")


def gamma(m: int) -> float:
  """``gamma_m = m u / (1 - m u)`` for float32 (``inf`` when ``m u >= 1/2``)."""
  mu = m * U
  return math.inf if mu >= 0.5 else mu / (1.0 - mu)


def dot_coefficient(n: int, v: float) -> float:
  """``c`` with ``|fl(w . h + b) - (w . h + b)| <= c * fl(|w| . |h| + |b|)``.

  ``n`` counts the float32 operations each term goes through (products,
  additions, a final scaling); ``v`` is the operand unit roundoff. The
  right-hand side may itself be computed in float32 under the same model
  (it is then too small by at most the same relative error, which ``c``
  covers), and ``c * s`` may be rounded once more.
  """
  g = (1.0 + v) ** 2 * (1.0 + gamma(n)) - 1.0
  if not g < 0.5:
    return math.inf
  return g / ((1.0 - g) * (1.0 - U) ** 3) * (1.0 + 1e-6)


def upper_factor(n: int, v: float = 0.0) -> float:
  """``1 + k`` such that ``(1 + k) * fl(s) >= s`` for a float32 sum ``s`` of
  ``n`` nonnegative terms (products with operand roundoff ``v`` included)."""
  g = (1.0 + v) ** 2 * (1.0 + gamma(n + 2)) - 1.0
  if not g < 0.5:
    return math.inf
  return 1.0 / ((1.0 - g) * (1.0 - U) ** 2) * (1.0 + 1e-6)


def underflow_term(n: int, magnitude: Array) -> Array:
  """Absolute error allowance for ``n`` products that may underflow.

  A product (or a weight) below ``2^-126`` may be flushed to zero: each term
  then errs by at most ``2^-126 (1 + |h|)``.
  """
  return (n + 2) * _TINY * (1.0 + magnitude)


def down(t: Array) -> Array:
  """A float32 value ``<=`` the exact value that ``t`` is the rounding of.

  ``t`` is the result of one float32 operation (error at most ``u |t|`` or,
  near underflow, ``2^-126``); the result stays differentiable.
  """
  return t - (3.0 * U * jnp.abs(t) + _TINY)


def up(t: Array) -> Array:
  """A float32 value ``>=`` the exact value that ``t`` is the rounding of."""
  return t + (3.0 * U * jnp.abs(t) + _TINY)
