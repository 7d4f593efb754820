"""The model zoo: 4C3F, 6C2F and 8C2F of the paper, and a LiResNet-style network.

Example::

  model = lipjax.models.get("4c3f", num_classes=10, activation="clipped_relu")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  logits = model.apply(variables, images)          # (B, 10)

  model = lipjax.models.get("liresnet", num_classes=10, activation="clipped_maxmin",
                            blocks=6, width=32)
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import flax.linen as fnn

from lipjax import nn as lnn
from lipjax._src import frontends

__all__ = ["ACTIVATIONS", "LiResNet", "NAMES", "architecture", "from_nnx", "get"]

ACTIVATIONS = ("relu", "clipped_relu", "clipped_maxmin")

# (features, kernel, stride, padding) per conv; then dense widths (last excluded).
_ARCHS = {
    # A small network for CPU demos and tests (not in the paper).
    "2c2f": dict(convs=[(16, 4, 2, 1), (32, 4, 2, 1)], dense=[100],
                 input_shape=(28, 28, 1)),
    "4c3f": dict(convs=[(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)],
                 dense=[512, 512], input_shape=(28, 28, 1)),
    "6c2f": dict(convs=[(32, 3, 1, 1), (32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1),
                        (64, 3, 1, 1), (64, 4, 2, 1)],
                 dense=[512], input_shape=(32, 32, 3)),
    "8c2f": dict(convs=[(64, 3, 1, 1), (64, 3, 1, 1), (64, 4, 2, 0), (128, 3, 1, 1),
                        (128, 3, 1, 1), (128, 4, 2, 0), (256, 3, 1, 1), (256, 4, 2, 0)],
                 dense=[256], input_shape=(64, 64, 3)),
}

NAMES = tuple(_ARCHS) + ("liresnet",)


class LiResNet(fnn.Module):
  """A LiResNet-style network (Hu et al., 2023): linear residual conv blocks.

  ``stem conv -> act -> blocks x [act(h + conv(h))] -> strided conv -> act
  -> flatten -> dense neck -> act -> dense head``. Each block's convolution
  is 3x3, stride 1, ``width`` channels and 'SAME' padding, so ``h + conv(h)``
  is a single convolution ``I + W`` (1 added at the centre tap): the bounds
  compute its norm jointly (never ``1 + ||W||``). The downsampling conv is
  4x4, stride 2, padding 1, with ``2 * width`` channels.

  Written in plain Flax with lipjax activations; the bounds read it through
  the graph tracer (:mod:`lipjax._src.trace`).

  Attributes:
    num_classes: width of the head.
    activation: ``"relu"``, ``"clipped_relu"`` or ``"clipped_maxmin"``.
    width: channels of the stem and the blocks.
    blocks: number of linear residual blocks (``>= 0``).
    neck: width of the dense neck.
    threshold: initial clipping threshold of every activation (theta, or ``M``).
    block_scale: standard deviation scale of the block kernels at
      initialisation (small: each block starts close to the identity).
    input_shape: shape of one example.
  """

  num_classes: int = 10
  activation: str = "clipped_relu"
  width: int = 32
  blocks: int = 4
  neck: int = 256
  threshold: float = 1.0
  block_scale: float = 0.1
  input_shape: Tuple[int, ...] = (32, 32, 3)

  @fnn.compact
  def __call__(self, x):
    act = lambda: _activation(self.activation, self.threshold)
    h = fnn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), name="stem")(x)
    h = act()(h)
    kinit = fnn.initializers.variance_scaling(self.block_scale ** 2, "fan_in", "normal")
    for i in range(self.blocks):
      conv = fnn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), kernel_init=kinit,
                      name=f"block_{i}")
      h = act()(h + conv(h))
    h = fnn.Conv(2 * self.width, (4, 4), strides=2, padding=((1, 1), (1, 1)),
                 name="down")(h)
    h = act()(h)
    h = h.reshape((h.shape[0], -1))
    h = act()(fnn.Dense(self.neck, name="neck")(h))
    return fnn.Dense(self.num_classes, name="head")(h)


def architecture(name: str) -> dict:
  """The layer widths of a zoo network: ``{"convs": [(features, kernel, stride,
  padding), ...], "dense": [widths, last excluded], "input_shape": (H, W, C)}``
  (a copy; ``name`` one of the Sequential zoo models, not ``"liresnet"``)."""
  key = name.lower()
  if key not in _ARCHS:
    raise ValueError(f"unknown architecture {name!r}; available: {tuple(_ARCHS)}")
  arch = _ARCHS[key]
  return {"convs": list(arch["convs"]), "dense": list(arch["dense"]),
          "input_shape": tuple(arch["input_shape"])}


def from_nnx(module):
  """A ``flax.nnx.Module`` as a linen-style model with ``init`` and ``apply``.

  The bounds, certificates and training steps take NNX modules directly;
  this adapter is for code written around ``model.init(rng, x)`` and
  ``model.apply(variables, x)`` (the training launcher, the evaluation
  runner). ``init`` returns the module's own variables as
  ``{"params": {...}, "batch_stats": {...}}`` (nested dicts of arrays keyed by
  attribute path; ``rng`` and ``x`` are not used, an NNX module being
  initialised when it is built), and ``apply(variables, x)`` calls the module
  with those values, taking any entry ``variables`` lack (and RNG state)
  from the module as it is now.

  Args:
    module: a ``flax.nnx.Module`` mapping ``(B, *input_shape)`` to logits.

  Returns:
    The adapter (hashable; equal for modules of the same structure and the
    same non-parameter state).
  """
  if not frontends.is_nnx_module(module):
    raise TypeError(f"from_nnx needs a flax.nnx.Module, got {type(module).__name__}")
  return frontends.as_model(module)


def _liresnet(num_classes, activation, init, input_shape, options) -> LiResNet:
  allowed = ("width", "blocks", "neck", "block_scale")
  bad = sorted(set(options) - set(allowed))
  if bad:
    raise ValueError(f"unknown option(s) {bad} for liresnet; available: {allowed}")
  for k in ("width", "neck"):
    if k in options and int(options[k]) < 1:
      raise ValueError(f"liresnet {k} must be >= 1, got {options[k]}")
  if "blocks" in options and int(options["blocks"]) < 0:
    raise ValueError(f"liresnet blocks must be >= 0, got {options['blocks']}")
  if activation == "clipped_maxmin" and int(options.get("width", 32)) % 2:
    raise ValueError("liresnet with clipped_maxmin needs an even width")
  if init is not None and not isinstance(init, (int, float)):
    raise ValueError("liresnet takes one init value for every activation")
  default = 0.3 if activation == "clipped_maxmin" else 1.0
  cast = {k: (float(v) if k == "block_scale" else int(v)) for k, v in options.items()}
  return LiResNet(num_classes=int(num_classes), activation=activation,
                  threshold=float(default if init is None else init),
                  input_shape=tuple(input_shape or (32, 32, 3)), **cast)


def _activation(kind: str, init: float):
  if kind == "relu":
    return lnn.ReLU()
  if kind == "clipped_relu":
    return lnn.ClippedReLU(theta_init=init)
  if kind == "clipped_maxmin":
    return lnn.ClippedMaxMin(upper_init=init)
  raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


def get(name: str,
        num_classes: int = 10,
        activation: str = "clipped_relu",
        *,
        init: Union[float, Sequence[float], None] = None,
        input_shape: Optional[Tuple[int, ...]] = None, **options):
  """Builds a zoo model.

  Args:
    name: ``"4c3f"``, ``"6c2f"`` or ``"8c2f"`` (case-insensitive), the
      small CPU demo network ``"2c2f"``, or ``"liresnet"`` (:class:`LiResNet`;
      ``options`` may set ``width``, ``blocks``, ``neck``, ``block_scale``).
    num_classes: width of the last layer.
    activation: ``"relu"``, ``"clipped_relu"`` or ``"clipped_maxmin"``.
    init: initial clipping threshold (theta for clipped ReLU, ``M = -m`` for
      clipped MaxMin), one float for every hidden layer or one per hidden
      layer. Defaults: 1.0 for clipped ReLU; for clipped MaxMin the paper's
      0.1 ... 0.3 ramp over conv layers and 1.2 for dense layers.
    input_shape: shape of one example; defaults to MNIST 28x28x1 for 4C3F,
      CIFAR-10 32x32x3 for 6C2F and TinyImageNet 64x64x3 for 8C2F (MNIST for
      2C2F).

  Returns:
    A :class:`lipjax.nn.Sequential` (a :class:`LiResNet` for ``"liresnet"``)
    whose ``apply`` returns ``(B, num_classes)``.
  """
  key = name.lower()
  if key not in NAMES:
    raise ValueError(f"unknown model {name!r}; available: {NAMES}")
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  if key == "liresnet":
    return _liresnet(num_classes, activation, init, input_shape, options)
  if options:
    raise ValueError(f"model {key} takes no options {sorted(options)}")
  arch = _ARCHS[key]
  n_hidden = len(arch["convs"]) + len(arch["dense"])
  if init is None:
    if activation == "clipped_maxmin":
      n_conv = len(arch["convs"])
      ramp = [0.1 + 0.2 * i / max(n_conv - 1, 1) for i in range(n_conv)]
      inits = ramp + [1.2] * len(arch["dense"])
    else:
      inits = [1.0] * n_hidden
  elif isinstance(init, (int, float)):
    inits = [float(init)] * n_hidden
  else:
    inits = [float(v) for v in init]
    if len(inits) != n_hidden:
      raise ValueError(f"init needs {n_hidden} values for {key}, got {len(inits)}")

  layers = []
  i = 0
  for features, k, s, p in arch["convs"]:
    layers += [lnn.Conv(features, kernel_size=k, stride=s, padding=p),
               _activation(activation, inits[i])]
    i += 1
  layers.append(lnn.Flatten())
  for width in arch["dense"]:
    layers += [lnn.Dense(width), _activation(activation, inits[i])]
    i += 1
  layers.append(lnn.Dense(num_classes))
  return lnn.Sequential(tuple(layers),
                        input_shape=tuple(input_shape or arch["input_shape"]))
