"""Flax linen layers that describe a network lipjax can bound.

Every layer here is an ordinary Flax module (``model.apply(variables, x)`` gives
logits), and additionally implements a small *layer protocol* that the pure
bound functions in :mod:`lipjax.bounds` read. The protocol has three roles:

* :class:`LinearLayer` -- an affine map ``z = W h + b``. Subclasses implement
  :meth:`LinearLayer.linear` (the map without bias, batched over the leading
  axis) and :meth:`LinearLayer.bias`. Everything else has a sound default that
  only needs :meth:`linear`: the adjoint comes from ``jax.linear_transpose``,
  and tighter exact rules (absolute-value map, row norms, global norm) can be
  overridden when known.
* :class:`Activation` -- an elementwise (or pairwise, for MaxMin) 1-Lipschitz
  monotone nonlinearity with an interval rule and an activation-status rule.
* :class:`Reshape` -- a shape change (``Flatten``) that the bounds pass through.

:class:`Residual` wraps a chain of these into a residual block
``activation(h + f(h))``, and :class:`Sequential` chains layers and blocks.

All arrays are channels-last: images ``(B, H, W, C)``, features ``(B, F)``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Activation",
    "AvgPool",
    "ClippedMaxMin",
    "ClippedReLU",
    "Conv",
    "Dense",
    "Flatten",
    "Identity",
    "LinearLayer",
    "ReLU",
    "Reshape",
    "Residual",
    "Sequential",
    "conv_init",
]

Array = jax.Array
Params = Any


# --------------------------------------------------------------------------
# Protocol base classes
# --------------------------------------------------------------------------


class LinearLayer(nn.Module):
  """Base class of affine layers ``z = W h + b`` (the protocol's linear role).

  Subclasses must implement :meth:`linear` and :meth:`bias`; the other methods
  have sound generic defaults (returning ``None`` means "use the generic
  rule" in :mod:`lipjax.bounds`).
  """

  def linear(self, params: Params, h: Array) -> Array:
    """Applies ``W`` (no bias) to a batch ``h`` of shape ``(B, *in_shape)``."""
    raise NotImplementedError

  def bias(self, params: Params) -> Optional[Array]:
    """Returns ``b`` broadcastable to ``(*out_shape,)`` or ``None``."""
    return None

  def linear_for_adjoint(self, params: Params, h: Array) -> Array:
    """The same map as :meth:`linear`, written so its transpose is cheap.

    The bounds take the adjoint ``W^T`` from ``jax.linear_transpose`` of this
    function (default: :meth:`linear` itself). A layer may override it with
    another formulation of the *same* linear map whose transpose the backend
    runs faster (see :class:`Conv`).
    """
    return self.linear(params, h)

  def adjoint(self, params: Params, z: Array, in_shape: Tuple[int, ...]) -> Optional[Array]:
    """Applies ``W^T`` to ``z`` of shape ``(B, *out_shape)``, or returns ``None``.

    Optional: the bounds otherwise take the adjoint from
    ``jax.linear_transpose`` of :meth:`linear_for_adjoint`. A layer may give
    an explicit formulation that runs faster inside the Lanczos loop (see
    :class:`Conv`); it must be the exact transpose of :meth:`linear` on inputs
    of shape ``(B, *in_shape)``, since the bounds' guarantees rest on it.
    """
    del params, z, in_shape
    return None

  def abs_linear(self, params: Params, h: Array) -> Optional[Array]:
    """Applies ``|W|`` (elementwise absolute value) to ``h``, or ``None``.

    Used for interval propagation. ``None`` selects the generic (looser but
    sound) rule ``|W| w <= row_norms * ||w||_2``.
    """
    del params, h
    return None

  def row_norms(self, params: Params, in_shape: Tuple[int, ...]) -> Optional[Array]:
    """Upper bounds on the l2 norm of every row of ``W`` (shape ``out_shape``).

    ``None`` selects the generic rule (every row norm <= the global norm).
    """
    del params, in_shape
    return None

  def global_norm(self, params: Params, in_shape: Tuple[int, ...]) -> Optional[Array]:
    """A deterministic upper bound on ``||W||_2`` for inputs of ``in_shape``.

    ``None`` selects the generic rule (exact SVD of the explicit Jacobian for
    small layers, else Lanczos with a stated failure probability).
    """
    del params, in_shape
    return None

  def explicit_matrix(self, params: Params) -> Optional[Array]:
    """The explicit ``(out, in)`` matrix when it is cheap (dense layers)."""
    del params
    return None

  def fan_in(self, params: Params, in_shape: Tuple[int, ...]) -> Optional[int]:
    """Largest number of products summed into one output of :meth:`linear`.

    Used by the bounds on float32 rounding (:mod:`lipjax.bounds.rounding`),
    which assume every output is computed as a float32 sum of at most this
    many products (any order), possibly followed by one scaling and the bias
    addition. ``None`` (the default) means the whole input size, which is
    always sound for such a layer.
    """
    del params, in_shape
    return None


class Activation(nn.Module):
  """Base class of 1-Lipschitz, monotone activations (the protocol's role).

  Subclasses implement :meth:`activate`, :meth:`interval` and
  :meth:`varying`.
  """

  def activate(self, params: Params, z: Array) -> Array:
    """Applies the activation to a batch ``z`` of shape ``(B, *shape)``."""
    raise NotImplementedError

  def interval(self, params: Params, lb: Array, ub: Array) -> Tuple[Array, Array]:
    """Maps a box ``[lb, ub]`` of pre-activations to a box of outputs."""
    raise NotImplementedError

  def varying(self, params: Params, lb: Array, ub: Array) -> Tuple[Array, Array]:
    """Activation-status masks for a pre-activation box.

    Returns:
      ``(row_mask, col_mask)`` float arrays of 0/1. ``row_mask`` has the shape
      of the pre-activation and is 0 only where *no* output depends on that
      pre-activation anywhere in the box (sound to delete that row of the
      preceding linear layer). ``col_mask`` has the shape of the output and
      is 0 where the output is constant on the box (sound to delete that
      column of the next linear layer).
    """
    raise NotImplementedError


class Reshape(nn.Module):
  """Base class of pure shape changes the bounds pass through."""

  def reshape(self, x: Array) -> Array:
    raise NotImplementedError

  def __call__(self, x: Array) -> Array:
    return self.reshape(x)


# --------------------------------------------------------------------------
# Linear layers
# --------------------------------------------------------------------------


def _layer_label(module, label: Optional[str] = None) -> str:
  if label:
    return label
  name = getattr(module, "name", None)
  kind = type(module).__name__
  return f"{name} ({kind})" if name else kind


def _positive(module, label, **values) -> None:
  """Raises a one-line ``ValueError`` unless every value is a positive int."""
  for key, val in values.items():
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
      raise ValueError(f"{_layer_label(module, label)}: {key} must be a positive integer, "
                       f"got {val!r}")


def _check_window(module, label, in_shape, window: int, stride: int, padding: int,
                  what: str) -> Tuple[int, int]:
  """Output side lengths of a square window sliding over ``in_shape[:2]``.

  Raises a one-line ``ValueError`` naming the layer when the output is empty.
  """
  hh, ww = int(in_shape[0]), int(in_shape[1])
  ho = (hh + 2 * padding - window) // stride + 1
  wo = (ww + 2 * padding - window) // stride + 1
  if ho < 1 or wo < 1:
    raise ValueError(
        f"{_layer_label(module, label)}: input shape {tuple(int(d) for d in in_shape)} with "
        f"{what} {window}, stride {stride}, padding {padding} gives an empty output "
        f"({max(ho, 0)}x{max(wo, 0)}); the padded input ({hh + 2 * padding}x"
        f"{ww + 2 * padding}) must be at least {window}x{window}")
  return ho, wo


def _torch_like_uniform():
  """PyTorch's default linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Dense(LinearLayer):
  """Fully connected layer. Input ``(B, F_in)``, output ``(B, features)``.

  Attributes:
    features: number of outputs.
    use_bias: whether to add a bias.
    kernel_init: initialiser of the ``(F_in, features)`` kernel.
  """

  features: int
  use_bias: bool = True
  kernel_init: Callable = _torch_like_uniform()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, h: Array) -> Array:
    if h.ndim != 2:
      raise ValueError(
          f"Dense expects (batch, features) inputs, got shape {h.shape}; "
          "add lipjax.nn.Flatten() before it.")
    _positive(self, None, features=self.features)
    if h.shape[-1] == 0:
      raise ValueError(f"{_layer_label(self)}: the input has 0 features "
                       f"(shape {h.shape}); the layer before it outputs nothing")
    kernel = self.param("kernel", self.kernel_init, (h.shape[-1], self.features))
    z = h @ kernel
    if self.use_bias:
      z = z + self.param("bias", self.bias_init, (self.features,))
    return z

  def linear(self, params, h):
    return h @ params["kernel"]

  def bias(self, params):
    return params.get("bias") if self.use_bias else None

  def abs_linear(self, params, h):
    return h @ jnp.abs(params["kernel"])

  def row_norms(self, params, in_shape):
    del in_shape
    return jnp.sqrt(jnp.sum(jnp.square(params["kernel"]), axis=0))

  def global_norm(self, params, in_shape):
    del in_shape
    from lipjax.bounds import norms  # local import: nn must not need bounds.
    return norms.dense_global_norm(params["kernel"])

  def explicit_matrix(self, params):
    return params["kernel"].T

  def fan_in(self, params, in_shape):
    del in_shape
    return int(params["kernel"].shape[0])


def _flip_kernel(kernel: Array) -> Array:
  """HWIO kernel of the transposed correlation: flipped in space, I and O swapped."""
  return jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)


def conv_init(kernel_size: int, features: int) -> Callable:
  """The paper's conv init: ``N(0, 2 / (k^2 * C_out))``."""
  std = float(np.sqrt(2.0 / (kernel_size * kernel_size * features)))
  return nn.initializers.normal(stddev=std)


class Conv(LinearLayer):
  """2-D convolution, NHWC, square kernel, symmetric zero padding.

  Input ``(B, H, W, C_in)``; output ``(B, H', W', features)`` with
  ``H' = (H + 2 * padding - kernel_size) // stride + 1``.

  Attributes:
    features: output channels.
    kernel_size: side of the square kernel.
    stride: stride in both spatial directions.
    padding: zero padding on every side.
    use_bias: whether to add a per-channel bias.
  """

  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  use_bias: bool = True
  kernel_init: Optional[Callable] = None
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, h: Array) -> Array:
    if h.ndim != 4:
      raise ValueError(f"Conv expects (batch, H, W, C) inputs, got shape {h.shape}")
    self.check_shape(h.shape[1:])
    init = self.kernel_init or conv_init(self.kernel_size, self.features)
    k = self.kernel_size
    kernel = self.param("kernel", init, (k, k, h.shape[-1], self.features))
    z = self._conv(h, kernel)
    if self.use_bias:
      z = z + self.param("bias", self.bias_init, (self.features,))
    return z

  def check_shape(self, in_shape, label: Optional[str] = None) -> Tuple[int, int, int]:
    """Output shape for a ``(H, W, C)`` input; a one-line ``ValueError`` when empty.

    ``label`` names the layer in the message (default: its Flax name).
    """
    _positive(self, label, features=self.features, kernel_size=self.kernel_size,
              stride=self.stride)
    if isinstance(self.padding, bool) or not isinstance(self.padding, (int, np.integer)) \
        or self.padding < 0:
      raise ValueError(f"{_layer_label(self, label)}: padding must be a non-negative "
                       f"integer, got {self.padding!r}")
    if len(in_shape) != 3 or int(in_shape[-1]) < 1:
      raise ValueError(f"{_layer_label(self, label)}: expects (H, W, C) inputs with "
                       f"C >= 1, got per-example shape {tuple(in_shape)}")
    ho, wo = _check_window(self, label, in_shape, self.kernel_size, self.stride,
                           self.padding, "kernel")
    return ho, wo, self.features

  def _conv(self, h, kernel):
    p = self.padding
    return jax.lax.conv_general_dilated(
        h, kernel, window_strides=(self.stride, self.stride),
        padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def linear(self, params, h):
    return self._conv(h, params["kernel"])

  def linear_for_adjoint(self, params, h):
    """The strided convolution as a stride-1 one on its polyphase components.

    With stride ``s`` the padded input splits into ``s * s`` sub-grids
    (stacked as channels) and the kernel into matching ``ceil(k/s)``-sized
    pieces; a VALID stride-1 correlation of the two is the same map. Its
    transpose (from ``jax.linear_transpose``) is a stride-1 convolution, which
    XLA runs several times faster on CPU than the transpose of a strided one.
    """
    if self.stride == 1:
      return self.linear(params, h)
    return self._valid_conv(self._polyphase(h), self._polyphase_kernel(params["kernel"]))

  def adjoint(self, params, z, in_shape):
    """``W^T z`` as a plain NHWC/HWIO convolution with the flipped kernel.

    The transpose of a stride-1 correlation with padding ``p`` is the
    correlation of ``z`` with the spatially flipped kernel (input and output
    channels swapped) and padding ``k - 1 - p``; a strided one goes through
    its polyphase form (a stride-1 VALID correlation, whose transpose has
    padding ``ceil(k/s) - 1``) and the transpose of the polyphase split (a
    permutation and a crop of the padded input). Unlike the transposed
    convolution ``jax.linear_transpose`` emits, this is a forward convolution
    in XLA's canonical layout, which XLA:CPU runs as fast inside a loop (the
    Lanczos iteration) as outside.
    """
    kernel = params["kernel"]
    if self.stride == 1:
      pad = self.kernel_size - 1 - self.padding
      return self._valid_conv(z, _flip_kernel(kernel), pad=pad)
    kp = self._polyphase_kernel(kernel)
    x = self._valid_conv(z, _flip_kernel(kp), pad=kp.shape[0] - 1)
    spec = jax.ShapeDtypeStruct((z.shape[0],) + tuple(in_shape), z.dtype)
    return jax.linear_transpose(self._polyphase, spec)(x)[0]

  def _polyphase(self, h):
    """``(B, H, W, C)`` -> ``(B, lh / s, lw / s, s * s * C)``: the padded input's sub-grids."""
    s, p, k = self.stride, self.padding, self.kernel_size
    b, hh, ww, c = h.shape
    ka = -(-k // s)
    ho, wo = (hh + 2 * p - k) // s + 1, (ww + 2 * p - k) // s + 1
    lh, lw = s * (ho - 1 + ka), s * (wo - 1 + ka)
    hp = jnp.pad(h, ((0, 0), (p, p + max(lh - hh - 2 * p, 0)),
                     (p, p + max(lw - ww - 2 * p, 0)), (0, 0)))[:, :lh, :lw]
    x = hp.reshape(b, lh // s, s, lw // s, s, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, lh // s, lw // s, s * s * c)

  def _polyphase_kernel(self, kernel):
    """``(k, k, C, O)`` -> ``(ceil(k/s), ceil(k/s), s * s * C, O)`` matching :meth:`_polyphase`."""
    s = self.stride
    k, c, o = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    ka = -(-k // s)
    kp = jnp.pad(kernel, ((0, ka * s - k), (0, ka * s - k), (0, 0), (0, 0)))
    return kp.reshape(ka, s, ka, s, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(ka, ka, s * s * c, o)

  @staticmethod
  def _valid_conv(x, kernel, pad=0):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def bias(self, params):
    return params.get("bias") if self.use_bias else None

  def abs_linear(self, params, h):
    return self._conv(h, jnp.abs(params["kernel"]))

  def row_norms(self, params, in_shape):
    # The whole filter of output channel k bounds every row of channel k
    # (border rows see only part of it).
    out_shape = jax.eval_shape(
        lambda x: self._conv(x, params["kernel"]),
        jax.ShapeDtypeStruct((1,) + tuple(in_shape), params["kernel"].dtype)).shape[1:]
    norms = jnp.sqrt(jnp.sum(jnp.square(params["kernel"]), axis=(0, 1, 2)))
    return jnp.broadcast_to(norms, out_shape)

  def global_norm(self, params, in_shape):
    from lipjax.bounds import norms
    return norms.conv_global_norm(
        params["kernel"], in_shape[:2], stride=self.stride, padding=self.padding)

  def fan_in(self, params, in_shape):
    del in_shape
    k = params["kernel"].shape
    return int(k[0] * k[1] * k[2])


class AvgPool(LinearLayer):
  """Average pooling as a linear layer (no parameters), VALID windows.

  Input ``(B, H, W, C)``; output ``(B, H', W', C)`` with
  ``H' = (H - window) // stride + 1``. Each output channel averages the same
  channel only, so the map is block diagonal with one identical block per
  channel: a single-channel convolution with the constant kernel
  ``1 / window^2``. The protocol's exact rules follow from that (the weights
  are nonnegative, so ``|W| = W``).
  """

  window: int = 2
  stride: int = 2

  def __call__(self, h):
    if h.ndim != 4:
      raise ValueError(f"AvgPool expects (batch, H, W, C) inputs, got shape {h.shape}")
    self.check_shape(h.shape[1:])
    return self.linear({}, h)

  def check_shape(self, in_shape, label: Optional[str] = None) -> Tuple[int, int, int]:
    """Output shape for a ``(H, W, C)`` input; a one-line ``ValueError`` when empty.

    ``label`` names the layer in the message (default: its Flax name).
    """
    _positive(self, label, window=self.window, stride=self.stride)
    ho, wo = _check_window(self, label, in_shape, self.window, self.stride, 0, "window")
    return ho, wo, int(in_shape[-1])

  def linear(self, params, h):
    del params
    s = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, self.window, self.window, 1),
                              (1, self.stride, self.stride, 1), "VALID")
    return s / (self.window * self.window)

  def abs_linear(self, params, h):
    return self.linear(params, h)

  def row_norms(self, params, in_shape):
    out_shape = jax.eval_shape(
        lambda x: self.linear(params, x),
        jax.ShapeDtypeStruct((1,) + tuple(in_shape), jnp.float32)).shape[1:]
    return jnp.full(out_shape, 1.0 / self.window, jnp.float32)

  def global_norm(self, params, in_shape):
    """Exact norm of the circulant operator that contains the pooling.

    The per-channel map is a VALID (unpadded) strided convolution with the
    ``(window, window)`` kernel ``1 / window^2``;
    :func:`lipjax.bounds.norms.conv_global_norm` bounds it deterministically
    (polyphase split + FFT). Block diagonal over channels: the same norm.
    """
    del params
    from lipjax.bounds import norms
    k = jnp.full((self.window, self.window, 1, 1), 1.0 / (self.window * self.window),
                 jnp.float32)
    return norms.conv_global_norm(k, in_shape[:2], stride=self.stride, padding=0)

  def fan_in(self, params, in_shape):
    del params, in_shape
    return self.window * self.window


class Flatten(Reshape):
  """Flattens ``(B, ...)`` to ``(B, prod(...))``."""

  def reshape(self, x):
    return x.reshape(x.shape[0], -1)


# --------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------


def _as_float(mask, like=None):
  """0/1 mask in the working precision of ``like`` (float32 by default)."""
  dtype = like.dtype if like is not None and jnp.issubdtype(like.dtype, jnp.floating) \
      else jnp.float32
  return mask.astype(jnp.promote_types(dtype, jnp.float32))


def elementwise_masks(act: "Activation", params: Params, lb: Array,
                      ub: Array) -> Tuple[Array, Array]:
  """Exact status masks of an elementwise, monotone (nondecreasing) activation.

  On a box ``[lb, ub]`` such an activation ``s`` takes values between
  ``s(lb)`` and ``s(ub)``, so an entry is constant on the box exactly when
  ``s(lb) == s(ub)`` (its interval rule's output has zero width): a clipped
  ReLU with ``theta <= 0``, a clamp with ``upper <= lower`` and a degenerate
  box included. ``max``, ``min`` and clamping are exact in floating point,
  so the comparison is exact. NaN bounds count as varying.

  Returns:
    ``(row_mask, col_mask)``, equal 0/1 arrays of the shape of ``lb``.
  """
  lo, hi = act.interval(params, lb, ub)
  m = _as_float(~(hi <= lo), ub)
  return m, m


def pairwise_masks(act: "Activation", params: Params, lb: Array,
                   ub: Array) -> Tuple[Array, Array]:
  """Exact status masks of a MaxMin-style activation over the halves of the last axis.

  Each output is a monotone (nondecreasing in both arguments) function of
  one pair ``(a_k, b_k)``, so it is constant on the box exactly when the
  interval rule's bounds for it coincide. A pre-activation entry is deleted
  from the rows only when both outputs of its pair are constant (the outputs
  may come in either order; each pair's two outputs sit at ``k`` and
  ``k + C/2``). NaN bounds count as varying.

  Returns:
    ``(row_mask, col_mask)`` 0/1 arrays of the shape of ``lb``.
  """
  lo, hi = act.interval(params, lb, ub)
  col = ~(hi <= lo)
  c = col.shape[-1] // 2
  pair = col[..., :c] | col[..., c:]
  row = jnp.concatenate([pair, pair], axis=-1)
  return _as_float(row, ub), _as_float(col, ub)


class ReLU(Activation):
  """``max(z, 0)``; constant where the pre-activation box has ``ub <= 0``."""

  def __call__(self, z):
    return jax.nn.relu(z)

  def activate(self, params, z):
    return jax.nn.relu(z)

  def interval(self, params, lb, ub):
    return jax.nn.relu(lb), jax.nn.relu(ub)

  def varying(self, params, lb, ub):
    return elementwise_masks(self, params, lb, ub)


class ClippedReLU(Activation):
  """``min(max(z, 0), theta)`` with a learnable per-neuron ``theta``.

  ``theta`` has the shape of one example's activation (shared across the
  batch). Constant on a box where ``ub <= 0`` (always 0), ``lb >= theta``
  (always theta) or ``theta <= 0`` (always ``min(0, theta)``), and nowhere
  else (:func:`elementwise_masks`). Keep ``theta >= 0`` during training (see
  :func:`lipjax.training.project_thresholds`).

  Attributes:
    theta_init: initial threshold value.
  """

  theta_init: float = 1.0

  @nn.compact
  def __call__(self, z):
    theta = self.param("theta", nn.initializers.constant(self.theta_init), z.shape[1:])
    return self.activate({"theta": theta}, z)

  def activate(self, params, z):
    return jnp.minimum(jax.nn.relu(z), params["theta"])

  def interval(self, params, lb, ub):
    return self.activate(params, lb), self.activate(params, ub)

  def varying(self, params, lb, ub):
    return elementwise_masks(self, params, lb, ub)


class ClippedMaxMin(Activation):
  """Clipped MaxMin over channel halves with learnable per-position bounds.

  Splits the last axis into halves ``a, b`` and returns
  ``concat(min(max(a, b), M), max(min(a, b), m))``. ``M`` and ``m`` have the
  shape of one half (per position). A max-half output is constant on a box
  when its lower bound reaches ``M``; a min-half output when its upper bound
  is at most ``m``. Pre-activation pair ``(a_k, b_k)`` is deleted from the
  preceding layer's rows only when *both* of its outputs are constant.

  Attributes:
    upper_init: initial ``M`` (``m`` starts at ``-upper_init``).
  """

  upper_init: float = 1.0

  @nn.compact
  def __call__(self, z):
    if z.shape[-1] % 2:
      raise ValueError(f"ClippedMaxMin needs an even channel count, got {z.shape}")
    half = z.shape[1:-1] + (z.shape[-1] // 2,)
    upper = self.param("upper", nn.initializers.constant(self.upper_init), half)
    lower = self.param("lower", nn.initializers.constant(-self.upper_init), half)
    return self.activate({"upper": upper, "lower": lower}, z)

  @staticmethod
  def _split(z):
    c = z.shape[-1] // 2
    return z[..., :c], z[..., c:]

  def activate(self, params, z):
    a, b = self._split(z)
    hi = jnp.minimum(jnp.maximum(a, b), params["upper"])
    lo = jnp.maximum(jnp.minimum(a, b), params["lower"])
    return jnp.concatenate([hi, lo], axis=-1)

  def interval(self, params, lb, ub):
    la, lb_ = self._split(lb)
    ua, ub_ = self._split(ub)
    hi_l = jnp.minimum(jnp.maximum(la, lb_), params["upper"])
    hi_u = jnp.minimum(jnp.maximum(ua, ub_), params["upper"])
    lo_l = jnp.maximum(jnp.minimum(la, lb_), params["lower"])
    lo_u = jnp.maximum(jnp.minimum(ua, ub_), params["lower"])
    return (jnp.concatenate([hi_l, lo_l], axis=-1),
            jnp.concatenate([hi_u, lo_u], axis=-1))

  def varying(self, params, lb, ub):
    return pairwise_masks(self, params, lb, ub)


class Identity(Activation):
  """No activation; every neuron varies (used between consecutive linears)."""

  def __call__(self, z):
    return z

  def activate(self, params, z):
    return z

  def interval(self, params, lb, ub):
    return lb, ub

  def varying(self, params, lb, ub):
    return elementwise_masks(self, params, lb, ub)


# --------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------


class Residual(nn.Module):
  """A residual block ``y = activation(h + f(h))`` (ResNet style).

  ``f`` is the chain ``layers`` (linear layers, activations, reshapes; it must
  keep the shape of ``h``). Inside a :class:`Sequential`, ``h`` must be the
  model input or the output of an activation or of another block. The bounds
  treat the block as a whole: its Jacobian is ``A (I + J_f)`` with
  ``||A|| <= 1``, so it contributes ``1 + (product of the branch's masked
  norms)``; a branch that is one linear layer followed by the activation
  (``act(h + conv(h))``, LiResNet style) is merged into the single operator
  ``I + W`` and its norm computed jointly.

  Attributes:
    layers: the branch ``f``. Parameters of its layer ``j`` live under
      ``variables["params"][<block>]["layers_{j}"]``.
    activation: optional :class:`Activation` applied to the sum (its
      parameters under ``variables["params"][<block>]["activation"]``).
  """

  layers: Sequence[nn.Module]
  activation: Optional[nn.Module] = None

  def __call__(self, h: Array) -> Array:
    z = h
    for layer in self.layers:
      z = layer(z)
    if z.shape != h.shape:
      raise ValueError(f"{_layer_label(self)}: the branch maps shape {h.shape[1:]} to "
                       f"{z.shape[1:]}; a residual branch must keep the shape")
    y = h + z
    return y if self.activation is None else self.activation(y)


class Sequential(nn.Module):
  """A chain of protocol layers and residual blocks; ``apply`` gives logits.

  Attributes:
    layers: the layers (and :class:`Residual` blocks), applied in order.
      Parameters of layer ``i`` live under ``variables["params"][f"layers_{i}"]``.
    input_shape: optional ``(H, W, C)`` or ``(F,)`` of one example; used by
      the global bound (conv norms depend on the spatial size) and to check
      inputs.
  """

  layers: Sequence[nn.Module]
  input_shape: Optional[Tuple[int, ...]] = None

  def __call__(self, x: Array) -> Array:
    for layer in self.layers:
      x = layer(x)
    return x
