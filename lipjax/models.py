"""The model zoo of the paper: 4C3F, 6C2F and 8C2F.

Example::

  model = lipjax.models.get("4c3f", num_classes=10, activation="clipped_relu")
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  logits = model.apply(variables, images)          # (B, 10)
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

from lipjax import nn as lnn

__all__ = ["ACTIVATIONS", "NAMES", "get"]

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

NAMES = tuple(_ARCHS)


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
        input_shape: Optional[Tuple[int, ...]] = None) -> lnn.Sequential:
  """Builds a zoo model.

  Args:
    name: ``"4c3f"``, ``"6c2f"`` or ``"8c2f"`` (case-insensitive), or the
      small CPU demo network ``"2c2f"``.
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
    A :class:`lipjax.nn.Sequential` whose ``apply`` returns ``(B, num_classes)``.
  """
  key = name.lower()
  if key not in _ARCHS:
    raise ValueError(f"unknown model {name!r}; available: {NAMES}")
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
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
