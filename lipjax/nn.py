"""Flax linen layers that describe a network lipjax can bound.

Every layer here is an ordinary Flax module (``model.apply(variables, x)`` gives
logits). The bound rules of lipjax's own layers live in
:mod:`lipjax._src.rules` (registered for these classes), so the modules stay
thin. For your own layers, the base classes define a small *layer protocol*
that the bounds read through :mod:`lipjax._src.rules.module`:

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

    Used by the bounds on float32 rounding (:mod:`lipjax._src.rounding`),
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
    s = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, self.window, self.window, 1),
                              (1, self.stride, self.stride, 1), "VALID")
    return s / (self.window * self.window)

  def check_shape(self, in_shape, label: Optional[str] = None) -> Tuple[int, int, int]:
    """Output shape for a ``(H, W, C)`` input; a one-line ``ValueError`` when empty.

    ``label`` names the layer in the message (default: its Flax name).
    """
    _positive(self, label, window=self.window, stride=self.stride)
    ho, wo = _check_window(self, label, in_shape, self.window, self.stride, 0, "window")
    return ho, wo, int(in_shape[-1])


class Flatten(Reshape):
  """Flattens ``(B, ...)`` to ``(B, prod(...))``."""

  def reshape(self, x):
    return x.reshape(x.shape[0], -1)


# --------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------


class ReLU(Activation):
  """``max(z, 0)``."""

  def __call__(self, z):
    return jax.nn.relu(z)


class ClippedReLU(Activation):
  """``min(max(z, 0), theta)`` with a learnable per-neuron ``theta``.

  ``theta`` has the shape of one example's activation (shared across the
  batch). Keep ``theta >= 0`` during training (the training steps do, see
  :func:`lipjax.training.project_thresholds`).

  Attributes:
    theta_init: initial threshold value.
  """

  theta_init: float = 1.0

  @nn.compact
  def __call__(self, z):
    theta = self.param("theta", nn.initializers.constant(self.theta_init), z.shape[1:])
    return jnp.minimum(jax.nn.relu(z), theta)


class ClippedMaxMin(Activation):
  """Clipped MaxMin over channel halves with learnable per-position bounds.

  Splits the last axis into halves ``a, b`` and returns
  ``concat(min(max(a, b), M), max(min(a, b), m))``. ``M`` and ``m`` have the
  shape of one half (per position).

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
    c = z.shape[-1] // 2
    a, b = z[..., :c], z[..., c:]
    return jnp.concatenate([jnp.minimum(jnp.maximum(a, b), upper),
                            jnp.maximum(jnp.minimum(a, b), lower)], axis=-1)


class Identity(Activation):
  """No activation (between consecutive linear layers)."""

  def __call__(self, z):
    return z


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
