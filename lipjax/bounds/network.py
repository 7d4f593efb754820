"""Reads a model into a list of bound stages.

A *stage* is one linear layer (with any reshapes before it folded into its
map) followed by its activation (``None`` for the last layer). A
:class:`lipjax.nn.Sequential` is read layer by layer (consecutive linear
layers get an :class:`lipjax.nn.Identity` activation between them); any other
Flax module or function ``fn(variables, x)`` (and a ``Sequential`` holding
:class:`lipjax.nn.Residual` blocks) is traced to a jaxpr by
:mod:`lipjax.bounds.graph`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from lipjax import nn as lnn
from lipjax._src import errors

Array = jax.Array

SUPPORTED = ("lipjax.nn.Dense", "lipjax.nn.Conv", "lipjax.nn.AvgPool",
             "any lipjax.nn.LinearLayer subclass", "lipjax.nn.ReLU",
             "lipjax.nn.ClippedReLU", "lipjax.nn.ClippedMaxMin",
             "any lipjax.nn.Activation subclass", "lipjax.nn.Flatten",
             "lipjax.nn.Residual")


UnsupportedModelError = errors.UnsupportedModelError


@dataclasses.dataclass(frozen=True)
class BlockEnd:
  """Closes a residual block ``y = post(h + f(h))`` after the stage holding it.

  The branch ``f`` is the chain of stages ``start .. end`` (``end`` is the
  stage this is attached to; its own activation, :class:`lipjax.nn.Identity`
  for a branch that ends with a linear map, is the branch's last one), ``h``
  the input of stage ``start``. ``activation`` (or None) is applied to the
  sum. The Jacobian of the block is ``A (I + J_f)`` with ``||A|| <= 1``, so
  ``1 + (product of the branch's masked local norms)`` bounds its norm on
  the ball (:func:`chain_product`).
  """

  start: int
  activation: Optional[lnn.Activation] = None
  act_params: Any = None


@dataclasses.dataclass(frozen=True)
class Stage:
  """One linear layer and the activation after it.

  ``block`` is set on the last stage of a residual branch (see
  :class:`BlockEnd`); the stage's output then feeds the residual sum.
  """

  index: int
  name: str
  layer: lnn.LinearLayer
  params: Any
  reshapes: Tuple[lnn.Reshape, ...]
  in_shape: Tuple[int, ...]     # shape the map accepts (before reshapes)
  out_shape: Tuple[int, ...]
  activation: Optional[lnn.Activation]
  act_params: Any
  dtype: Any = jnp.float32      # working precision (see :func:`working_dtype`)
  block: Optional[BlockEnd] = None

  def layer_input(self, h: Array) -> Array:
    """The layer's own input from the stage's: ``h`` through the stage's reshapes
    (``(B, *in_shape)`` to ``(B, *layer_in_shape)``)."""
    for r in self.reshapes:
      h = r.reshape(h)
    return h

  @property
  def layer_in_shape(self) -> Tuple[int, ...]:
    x = jax.ShapeDtypeStruct((1,) + self.in_shape, self.dtype)
    return jax.eval_shape(self.layer_input, x).shape[1:]

  def linear(self, h: Array) -> Array:
    """``W h`` (no bias) for ``h`` of shape ``(B, *in_shape)``."""
    return self.layer.linear(self.params, self.layer_input(h))

  def linear_for_adjoint(self, h: Array) -> Array:
    """The same map as :meth:`linear`, in the layer's transpose-friendly form."""
    return self.layer.linear_for_adjoint(self.params, self.layer_input(h))

  def adjoint(self, z: Array) -> Array:
    """``W^T z`` for ``z`` of shape ``(B, *out_shape)``; returns ``(B, *in_shape)``.

    The layer's explicit :meth:`~lipjax.nn.LinearLayer.adjoint` when it has
    one, else ``jax.linear_transpose`` of :meth:`linear_for_adjoint`.
    """
    spec = jax.ShapeDtypeStruct((z.shape[0],) + tuple(self.in_shape), z.dtype)
    h = self.layer.adjoint(self.params, z, self.layer_in_shape)
    if h is None:
      return jax.linear_transpose(self.linear_for_adjoint, spec)(z)[0]
    if not self.reshapes:
      return h
    return jax.linear_transpose(self.layer_input, spec)(h)[0]

  def affine(self, h: Array) -> Array:
    """``W h + b``; a traced layer replays the user's own primitives instead."""
    replay = getattr(self.layer, "affine_replay", None)
    if replay is not None:
      return replay(self.params, self.layer_input(h))
    z = self.linear(h)
    b = self.layer.bias(self.params)
    return z if b is None else z + b

  def abs_linear(self, h: Array) -> Optional[Array]:
    return self.layer.abs_linear(self.params, self.layer_input(h))


def chain_product(stages: Sequence[Stage], norms: Sequence[Any]):
  """The network's Lipschitz bound from one bound per stage.

  The product of ``norms`` (scalars or ``(B,)`` arrays, one per stage of
  ``stages``, which may be a prefix of a network's stages), where the stages
  ``start .. end`` of each residual block (:class:`BlockEnd`) contribute
  ``1 + prod(norms[start..end])`` (times ``1 + 2u``, the rounding of the
  float32 sum) instead of their product: ``||A (I + J_f)|| <= 1 + ||J_f||``.
  """
  norms = list(norms)
  if len(norms) != len(stages):
    raise ValueError(f"got {len(norms)} norms for {len(stages)} stages")
  ends = {st.block.start: i for i, st in enumerate(stages) if st.block is not None}
  total = None
  l = 0
  while l < len(norms):
    if l in ends:
      branch = norms[l]
      for k in range(l + 1, ends[l] + 1):
        branch = branch * norms[k]
      factor = (1.0 + branch) * (1.0 + 2.0 ** -23)
      l = ends[l] + 1
    else:
      factor = norms[l]
      l += 1
    total = factor if total is None else total * factor
  return 1.0 if total is None else total


def working_dtype(variables=None, x_dtype=None) -> jnp.dtype:
  """The floating-point precision the bounds compute in.

  float64 when the inputs or any floating-point parameter are float64 (which
  needs ``jax.enable_x64``; otherwise arrays are float32 anyway), else
  float32 (bfloat16/float16 parameters and inputs are computed in float32).
  Every bound, box and margin of one call is computed in this dtype, and its
  rounding is that of this dtype (unit roundoff ``jnp.finfo(dtype).eps / 2``).
  """
  dtypes = [jnp.dtype(jnp.float32)]
  if x_dtype is not None:
    dtypes.append(jnp.dtype(x_dtype))
  for leaf in jax.tree_util.tree_leaves(variables if variables is not None else {}):
    dt = getattr(leaf, "dtype", None)
    if dt is not None:
      dtypes.append(jnp.dtype(dt))
  wide = any(jnp.issubdtype(d, jnp.floating) and jax.dtypes.canonicalize_dtype(d) ==
             jnp.dtype(jnp.float64) for d in dtypes)
  return jnp.dtype(jnp.float64 if wide else jnp.float32)


def cast_floating(tree, dtype):
  """``tree`` with every floating-point leaf cast to ``dtype`` (others unchanged)."""
  def cast(a):
    dt = getattr(a, "dtype", None)
    if dt is not None and jnp.issubdtype(dt, jnp.floating) and jnp.dtype(dt) != dtype:
      return jnp.asarray(a, dtype)
    return a
  return jax.tree_util.tree_map(cast, tree)


def _config(layer) -> str:
  """``field=value`` for a module's scalar attributes (for error messages)."""
  items = []
  for f in dataclasses.fields(layer):
    val = getattr(layer, f.name, None)
    if f.name not in ("parent", "name") and isinstance(val, (bool, int, float, str)):
      items.append(f"{f.name}={val}")
  return ", ".join(items)


def _check_not_empty(layer, name, layer_in, out) -> None:
  """A one-line error for a layer whose input or output has no element."""
  if math.prod(layer_in) and math.prod(out):
    return
  check = getattr(layer, "check_shape", None)
  if check is not None and len(layer_in) == 3:
    check(layer_in, label=name)   # raises the layer's own message
  raise ValueError(
      f"{name}: input shape {tuple(layer_in)} gives output shape {tuple(out)}, which is "
      f"empty ({_config(layer)})")


def _params_of(variables, i):
  params = variables.get("params", {}) if hasattr(variables, "get") else {}
  return params.get(f"layers_{i}", {})


def _short_name(layer) -> str:
  """``package.subpackage.Name`` of a layer's class (``flax.linen.Dense``)."""
  return ".".join(type(layer).__module__.split(".")[:2] + [type(layer).__name__])


def _describe(layer) -> str:
  return f"{type(layer).__module__}.{type(layer).__name__}"


def trace(model, variables, in_shape: Tuple[int, ...], dtype=None) -> List[Stage]:
  """Splits ``model`` into stages.

  Args:
    model: a :class:`lipjax.nn.Sequential`, any other Flax module, or a
      function ``fn(variables, x) -> logits`` (see :func:`lipjax.bounds.graph.trace`).
    variables: its Flax variables (``{"params": ...}``).
    in_shape: shape of one input example.
    dtype: working precision; the stages' parameters are cast to it
      (default: :func:`working_dtype` of ``variables``).

  Raises:
    UnsupportedModelError: for any layer outside the protocol, a model that
      does not end with a linear layer, or an activation before the first
      linear layer.
    ValueError: for a layer whose output is empty (e.g. a kernel larger than
      the padded input), naming the layer and the shapes.
  """
  if not isinstance(model, lnn.Sequential) or any(
      isinstance(layer, lnn.Residual) for layer in model.layers):
    # Residual blocks are read from the traced graph, like any Flax module.
    from lipjax.bounds import graph   # pylint: disable=import-outside-toplevel
    return graph.trace(model, variables, in_shape)
  if not isinstance(variables, dict) and not hasattr(variables, "get"):
    raise TypeError("variables must be the dict returned by model.init")
  dtype = working_dtype(variables) if dtype is None else jnp.dtype(dtype)
  layers = list(model.layers)
  if not layers:
    raise UnsupportedModelError("the model has no layers")
  stages: List[Stage] = []
  pending_reshapes: List[lnn.Reshape] = []
  current = None   # dict of the open linear stage
  shape = tuple(in_shape)

  def close(activation, act_params):
    nonlocal current
    stages.append(Stage(activation=activation, act_params=cast_floating(act_params, dtype),
                        dtype=dtype, **current))
    current = None

  for i, layer in enumerate(layers):
    if isinstance(layer, lnn.LinearLayer):
      if current is not None:
        close(lnn.Identity(), {})
      params = cast_floating(_params_of(variables, i), dtype)
      stage_in = shape
      probe = Stage(len(stages), f"layers_{i} ({type(layer).__name__})", layer, params,
                    tuple(pending_reshapes), stage_in, (), None, None, dtype)
      if math.prod(stage_in) and getattr(layer, "check_shape", None) is not None \
          and len(probe.layer_in_shape) == 3:
        layer.check_shape(probe.layer_in_shape, label=probe.name)   # one line if empty
      try:
        out = jax.eval_shape(probe.linear,
                             jax.ShapeDtypeStruct((1,) + stage_in, dtype))
      except KeyError as e:
        top = variables.get("params", {}) if hasattr(variables, "get") else {}
        raise UnsupportedModelError(
            f"variables['params'] has no parameter {e} for layers_{i} "
            f"({type(layer).__name__}); its top-level keys are {sorted(top)}. For a "
            "lipjax model held as a submodule named NAME, pass "
            "{'params': variables['params'][NAME]}") from None
      shape = tuple(out.shape[1:])
      _check_not_empty(layer, probe.name, probe.layer_in_shape, shape)
      current = dict(index=len(stages), name=probe.name, layer=layer, params=params,
                     reshapes=tuple(pending_reshapes), in_shape=stage_in,
                     out_shape=shape)
      pending_reshapes = []
    elif isinstance(layer, lnn.Activation):
      if current is None:
        raise UnsupportedModelError(
            f"layers_{i} ({type(layer).__name__}) is an activation that does not "
            "follow a linear layer; lipjax bounds need linear -> activation chains")
      close(layer, _params_of(variables, i))
    elif isinstance(layer, lnn.Reshape):
      if current is not None:
        close(lnn.Identity(), {})
      pending_reshapes.append(layer)
    else:
      raise errors.model_error(
          f"layers_{i} ({_short_name(layer)}) has no sound rule; supported: lipjax.nn.Dense, "
          "lipjax.nn.Conv, lipjax.nn.ClippedReLU etc., subclasses of lipjax.nn.LinearLayer "
          "or lipjax.nn.Activation")
  if current is None or pending_reshapes:
    raise UnsupportedModelError(
        "the model must end with a linear layer (the logits); found "
        f"{_describe(layers[-1])} last")
  close(None, None)
  if len(shape) != 1:
    raise UnsupportedModelError(
        f"the last layer must output (B, num_classes), got per-example shape {shape}")
  return stages
