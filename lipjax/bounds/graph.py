"""Plain Flax modules and pure functions as bound stages, read from a jaxpr.

:func:`trace` turns any ``flax.linen`` module (``model.apply(variables, x)``)
or pure function ``fn(variables, x) -> logits`` into the list of
:class:`~lipjax.bounds.network.Stage` objects that the bound code consumes,
so every bound works on it unchanged.

How: the per-example function ``x -> apply(variables, x[None])[0]`` is traced
once per model and shapes with ``jax.make_jaxpr``, the variables being inputs
of the jaxpr. A walk over its equations (sub-jaxprs of ``jit``,
``custom_jvp`` and ``custom_vjp`` calls are inlined) sorts every value into

* *static* values, which depend on the variables and constants only
  (kernels, biases, thresholds and whatever the model computes from them), and
* *activation* values, which depend on the input.

Each primitive applied to an activation value goes through a small rule
(:data:`LINEAR_RULES` for the linear and affine ones, ``max`` / ``min`` /
``clamp`` for activations); any other primitive raises
:class:`~lipjax.bounds.errors.UnsupportedModelError` naming it, the module
path and the user's source line. The activation patterns recognised are

* chains of elementwise ``max`` / ``min`` with static operands (``relu``,
  ``jnp.clip(z, 0, theta)``, ``jnp.minimum(jnp.maximum(z, 0), theta)``,
  ``lax.clamp``): one monotone, 1-Lipschitz clamp ``min(max(z, lo), hi)``;
* MaxMin (GroupSort-2): ``max`` and ``min`` of the two halves of the last
  axis (``jnp.split`` or slicing), each optionally clamped, concatenated.

The values between two activations form one *segment*: an affine map of the
previous activation's output (several linear primitives, sums of two values
of the same segment, static additions). A segment becomes one stage whose
``linear`` replays the segment's primitives without the static additions, and
whose bias is the segment evaluated at zero. Segments of a single dense or
convolution primitive become :class:`lipjax.nn.Dense` / :class:`lipjax.nn.Conv`
(same exact rules, same speed as a ``lipjax.nn`` model); other convolutions,
also followed by per-channel scalings (inference BatchNorm), get the
circulant (FFT) global norm of the (scaled) kernel; a linear residual block
``h + conv(h)`` (LiResNet) is the single operator ``I + W``, a convolution
whose kernel has 1 added at the centre tap, with the circulant norm of that
kernel; segments with a small vector output get their explicit matrix; the
rest use the generic sound rules of :class:`lipjax.nn.LinearLayer` (adjoint
from ``jax.linear_transpose``, global norm from an explicit Jacobian or
Lanczos with its stated failure probability). The affine map of a traced
stage replays the model's own primitives in order (a dense or conv stage
adds its summed static additions after the primitive, the same arithmetic
for the usual single bias).

The network is a chain with residual blocks: every segment feeds one
activation, a residual sum or the logits. A *residual sum* is an addition of
two values of different segments, one of which (the skip ``h``) is the input
of its segment: the output of an activation, of another residual block, or
the model input. ``y = h + f(h)``, optionally followed by an activation
(``relu(h + f(h))``), where the branch ``f`` is a chain of stages ending
with a linear map or an activation, becomes a
:class:`~lipjax.bounds.network.BlockEnd` on the branch's last stage (the
block's bound is ``1 +`` the branch's, see
:func:`lipjax.bounds.network.chain_product`). Skips through a linear map
(projection shortcuts), nested blocks, and skip values used elsewhere are
rejected with a one-line error.

Users add rules with :func:`register_linear` (a linear map from its forward
function) and :func:`register_activation` (an elementwise monotone
activation): the returned wrapper is a named ``jax.jit`` call that the walk
keeps as one node instead of inlining it.

The traced function is the model applied to a batch of one; examples must
not interact (a primitive that mixes the batch axis is rejected).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from lipjax import nn as lnn
from lipjax._src import errors, frontends
from lipjax.bounds import network

Array = jax.Array

SUPPORTED = errors.SUPPORTED

_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "checkpoint", "remat", "remat2", "named_call")

#: Rules for linear and affine primitives on activation values: the role of
#: the primitive in the replay of a segment.
#:
#: * ``"struct"``: a 0/1 map (reshape, slicing, sums of entries, ...); the
#:   same in every replay.
#: * ``"coef"``: multiplies by its static operands (dense, convolution,
#:   scaling); the absolute-value replay uses ``|static|``.
#: * ``"div"``, ``"neg"``, ``"add"``, ``"sub"``, ``"pad"``, ``"concat"``:
#:   see :func:`_apply`.
LINEAR_RULES: Dict[str, str] = {
    "reshape": "struct", "transpose": "struct", "broadcast_in_dim": "struct",
    "squeeze": "struct", "slice": "struct", "rev": "struct", "split": "struct",
    "reduce_sum": "struct", "reduce_window_sum": "struct", "cumsum": "struct",
    "convert_element_type": "struct", "copy": "struct", "copy_p": "struct",
    "dot_general": "coef", "conv_general_dilated": "coef", "mul": "coef",
    "div": "div", "neg": "neg", "add": "add", "add_any": "add", "sub": "sub",
    "pad": "pad", "concatenate": "concat",
}
_ACTIVATION_PRIMS = ("max", "min", "clamp")


FunctionModel = frontends.FunctionModel
as_model = frontends.as_model


# ---------------------------------------------------------------------------
# Activations the patterns map to (besides lipjax.nn's own)
# ---------------------------------------------------------------------------


def _f32(mask):
  return mask.astype(jnp.float32)


class Clamp(lnn.Activation):
  """``min(max(z, lower), upper)`` elementwise, bounds per neuron.

  ``params = {"lower": ..., "upper": ...}`` of the activation's per-example
  shape (``-inf`` / ``+inf`` for a missing side). Monotone and 1-Lipschitz;
  constant exactly where the box has ``ub <= lower`` or ``lb >= upper``, or
  ``upper <= lower`` (:func:`lipjax.nn.elementwise_masks`).
  """

  def __call__(self, z):
    raise TypeError("Clamp describes a traced activation; it has no parameters of its own")

  def activate(self, params, z):
    return jnp.minimum(jnp.maximum(z, params["lower"]), params["upper"])

  def interval(self, params, lb, ub):
    return self.activate(params, lb), self.activate(params, ub)

  def varying(self, params, lb, ub):
    return lnn.elementwise_masks(self, params, lb, ub)


class PairMaxMin(lnn.Activation):
  """MaxMin (GroupSort-2) over the halves ``a, b`` of the last axis.

  Output ``concat(clamp(max(a, b)), clamp(min(a, b)))`` (``max_first``) or
  the reverse order, each part clamped to its own ``[lower, upper]``:
  ``params = {"max_lower", "max_upper", "min_lower", "min_upper"}`` of the
  shape of one half (``-inf`` / ``+inf`` for no clamp). An output is constant
  on a box when its clamp is; a pre-activation pair is deleted from the rows
  only when both of its outputs are constant.

  Attributes:
    max_first: whether the max part comes first in the output.
  """

  max_first: bool = True

  def __call__(self, z):
    raise TypeError("PairMaxMin describes a traced activation; it has no parameters "
                    "of its own")

  @staticmethod
  def _split(z):
    c = z.shape[-1] // 2
    return z[..., :c], z[..., c:]

  @staticmethod
  def _clamp(v, lo, hi):
    return jnp.minimum(jnp.maximum(v, lo), hi)

  def _join(self, hi, lo):
    return jnp.concatenate([hi, lo] if self.max_first else [lo, hi], axis=-1)

  def activate(self, params, z):
    a, b = self._split(z)
    hi = self._clamp(jnp.maximum(a, b), params["max_lower"], params["max_upper"])
    lo = self._clamp(jnp.minimum(a, b), params["min_lower"], params["min_upper"])
    return self._join(hi, lo)

  def interval(self, params, lb, ub):
    la, lb_ = self._split(lb)
    ua, ub_ = self._split(ub)
    p = params
    lower = self._join(self._clamp(jnp.maximum(la, lb_), p["max_lower"], p["max_upper"]),
                       self._clamp(jnp.minimum(la, lb_), p["min_lower"], p["min_upper"]))
    upper = self._join(self._clamp(jnp.maximum(ua, ub_), p["max_lower"], p["max_upper"]),
                       self._clamp(jnp.minimum(ua, ub_), p["min_lower"], p["min_upper"]))
    return lower, upper

  def varying(self, params, lb, ub):
    return lnn.pairwise_masks(self, params, lb, ub)


# ---------------------------------------------------------------------------
# The traced program
# ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Static:
  """A value computed from the variables and constants only.

  ``kind`` is ``"leaf"`` (variable leaf ``leaf``), ``"const"`` (``value``) or
  ``"call"`` (output ``index`` of ``prim.bind(*ins, **params)``). ``value``
  is the concrete value whenever it does not depend on the variables.
  """

  kind: str
  value: Any = None
  leaf: int = -1
  prim: Any = None
  params: Any = None
  ins: Tuple[int, ...] = ()
  index: int = 0
  call: int = -1
  shape: Tuple[int, ...] = ()


@dataclasses.dataclass(eq=False)
class _Node:
  """One primitive applied to at least one activation value.

  ``ins`` holds ``("a", aid)`` (activation value) or ``("s", sid)`` (static)
  references; ``outs`` the activation ids it defines.
  """

  prim: Any
  params: Dict[str, Any]
  ins: Tuple[Tuple[str, int], ...]
  outs: Tuple[int, ...]
  where: str
  rule: Any = None        # a registered rule (see :func:`register_linear`)

  @property
  def name(self) -> str:
    return self.prim.name

  @property
  def role(self) -> str:
    """The node's role in a segment replay (:data:`LINEAR_RULES`)."""
    if isinstance(self.rule, _LinearRule):
      return "opaque"
    return LINEAR_RULES[self.name]

  @property
  def act_mask(self) -> Tuple[bool, ...]:
    return tuple(k == "a" for k, _ in self.ins)

  def act_ins(self) -> List[int]:
    return [i for k, i in self.ins if k == "a"]

  def static_ins(self) -> List[int]:
    return [i for k, i in self.ins if k == "s"]


@dataclasses.dataclass(frozen=True, eq=False)
class _Program:
  """The primitives of one segment: input activation -> pre-activation."""

  nodes: Tuple[_Node, ...]
  input: int
  output: int
  in_shape: Tuple[int, ...]     # per example
  out_shape: Tuple[int, ...]

  @property
  def static_ids(self) -> Tuple[int, ...]:
    seen = []
    for n in self.nodes:
      for s in n.static_ins():
        if s not in seen:
          seen.append(s)
    return tuple(seen)


def _key(sid: int) -> str:
  return f"s{sid}"


def _bind(prim, args, params):
  out = prim.bind(*args, **prim.get_bind_params(params))
  return list(out) if prim.multiple_results else [out]


def _apply(node: _Node, args: List[Array], mode: str) -> List[Array]:
  """One node in the replay ``mode``.

  ``"affine"``: the primitive as traced. ``"linear"``: static *additions*
  dropped (the segment's map without its bias). ``"abs"``: additionally
  every static coefficient replaced by its absolute value and subtractions
  of two activation values by additions, so that for ``h >= 0`` the segment
  replay is ``>= |W| h`` elementwise (``|A B| <= |A| |B|``,
  ``|A - B| <= |A| + |B|``).
  """
  if mode == "affine":
    return _bind(node.prim, args, node.params)
  role = node.role
  if role == "opaque":
    if mode == "abs":
      raise ValueError("a registered linear map has no absolute-value replay")
    return _bind(node.prim, args, node.params)
  mask = node.act_mask
  if role == "add":
    acts = [a for a, m in zip(args, mask) if m]
    if len(acts) == 1:
      return [acts[0]]
  elif role == "sub":
    if mask == (True, False):
      return [args[0]]
    if mask == (False, True):
      return [args[1] if mode == "abs" else -args[1]]
    if mode == "abs":
      return [args[0] + args[1]]
  elif role == "pad":
    args = [args[0], jnp.zeros((), args[0].dtype)]
  elif role == "concat":
    args = [a if m else jnp.zeros_like(a) for a, m in zip(args, mask)]
  elif mode == "abs":
    if role == "neg":
      return [args[0]]
    if role == "coef":
      args = [a if m else jnp.abs(a) for a, m in zip(args, mask)]
    elif role == "div":
      args = [args[0], jnp.abs(args[1])]
  return _bind(node.prim, args, node.params)


def _run(prog: _Program, params, h: Array, mode: str) -> Array:
  """The segment on a batch of one, ``(1, *in_shape) -> (1, *out_shape)``."""
  env = {prog.input: h}
  for node in prog.nodes:
    args = [env[i] if k == "a" else params[_key(i)] for k, i in node.ins]
    for aid, out in zip(node.outs, _apply(node, args, mode)):
      env[aid] = out
  return env[prog.output]


def _replay(prog: _Program, params, h: Array, mode: str) -> Array:
  """The segment on a batch ``(B, *in_shape)``, example by example."""
  return jax.vmap(lambda e: _run(prog, params, e[None], mode)[0])(h)


def _bias(prog: _Program, params) -> Array:
  z = jnp.zeros((1,) + prog.in_shape, jnp.float32)
  return _replay(prog, params, z, "affine")[0]


def _bias_sum(terms, params, out_shape) -> Array:
  """The bias of a dense or conv segment from its additions (per-example shape)."""
  total = jnp.zeros((), jnp.float32)
  for sid, sign in terms:
    v = jnp.asarray(params[_key(sid)], jnp.float32)
    if v.ndim == len(out_shape) + 1:
      v = v[0]                      # drop the batch axis of the traced batch of one
    total = total + v if sign > 0 else total - v
  return total if total.ndim else jnp.broadcast_to(total, tuple(out_shape[-1:]))


# ---------------------------------------------------------------------------
# Linear layers built from segments
# ---------------------------------------------------------------------------


class TracedLinear(lnn.LinearLayer):
  """A segment of traced primitives as a linear layer of the protocol.

  ``params`` maps ``"s<id>"`` to the static values the segment uses.
  ``linear`` replays the primitives without static additions, ``bias`` is
  the segment at zero, ``abs_linear`` the absolute-value replay (exact for a
  single dense or convolution primitive, an elementwise upper bound of
  ``|W| h`` otherwise). The global norm uses the generic rules of
  :class:`lipjax.nn.LinearLayer`.
  """

  program: Any = None

  def __call__(self, h):
    raise TypeError("TracedLinear describes a traced segment; call the model instead")

  def linear(self, params, h):
    return _replay(self.program, params, h, "linear")

  def bias(self, params):
    return _bias(self.program, params)

  def affine_replay(self, params, h):
    """``W h + b`` as the model computes it (the same primitives, in order)."""
    return _replay(self.program, params, h, "affine")

  def abs_linear(self, params, h):
    if any(n.role == "opaque" for n in self.program.nodes):
      return None   # generic rule (row norms times the l2 norm)
    return _replay(self.program, params, h, "abs")


class TracedMatrix(TracedLinear):
  """A traced segment with a vector output and its explicit matrix.

  The ``(out, in)`` matrix comes from ``out`` applications of the segment's
  transpose; dense rules follow (exact row norms, ``|W|``, SVD).
  """

  def explicit_matrix(self, params):
    prog = self.program
    n_out = math.prod(prog.out_shape)
    f = lambda h: self.linear(params, h).reshape(h.shape[0], n_out)
    t = jax.linear_transpose(f, jax.ShapeDtypeStruct((n_out,) + prog.in_shape, jnp.float32))
    (rows,) = t(jnp.eye(n_out, dtype=jnp.float32))
    return rows.reshape(n_out, -1)

  def abs_linear(self, params, h):
    m = jnp.abs(self.explicit_matrix(params))
    return (h.reshape(h.shape[0], -1) @ m.T).reshape((h.shape[0],) + self.program.out_shape)

  def row_norms(self, params, in_shape):
    del in_shape
    m = self.explicit_matrix(params)
    return jnp.sqrt(jnp.sum(jnp.square(m), axis=1)).reshape(self.program.out_shape)

  def global_norm(self, params, in_shape):
    del in_shape
    from lipjax.bounds import norms
    return norms.top_singular_value(self.explicit_matrix(params)[None])


class TracedConv(TracedLinear):
  """A single 2-D convolution (any layout, stride, padding), static additions
  and per-output-channel scalings (inference BatchNorm).

  Global norm: the circulant (FFT) bound of :func:`lipjax.bounds.norms.conv_global_norm`
  on the zero-padded input (a zero padding is an isometric embedding, so any
  padding, symmetric or not, is covered). Row norms: the whole filter of each
  output channel.
  """

  kernel_id: int = -1
  rhs_spec: Tuple[int, ...] = ()
  out_channel_axis: int = -1
  padded: Tuple[int, int] = (0, 0)
  stride: int = 1
  scales: Tuple[Tuple[int, str], ...] = ()

  def _hwio(self, params):
    """The kernel (HWIO), each output channel times its static scalings."""
    o, i, h, w = self.rhs_spec
    k = jnp.transpose(params[_key(self.kernel_id)], (h, w, i, o))
    for sid, op in self.scales:
      s = jnp.asarray(params[_key(sid)], k.dtype)
      s = s.reshape(-1) if s.ndim else s
      k = k * s if op == "mul" else k / s
    return k

  def row_norms(self, params, in_shape):
    del in_shape
    k = self._hwio(params)
    per_channel = jnp.sqrt(jnp.sum(jnp.square(k), axis=(0, 1, 2)))
    out = self.program.out_shape
    shape = [1] * len(out)
    shape[self.out_channel_axis - 1] = out[self.out_channel_axis - 1]
    return jnp.broadcast_to(per_channel.reshape(shape), out)

  def global_norm(self, params, in_shape):
    del in_shape
    from lipjax.bounds import norms
    return norms.conv_global_norm(self._hwio(params), self.padded, stride=self.stride,
                                  padding=0)


class TracedResidualConv(TracedConv):
  """A linear residual block ``h + conv(h)`` (plus a bias) as one operator ``I + W``.

  With stride 1, equal input and output channels and the padding that keeps
  the centre tap aligned, ``I + W`` is itself a convolution: the kernel with
  1 added at the centre tap between matching channels. Its global norm is
  the circulant bound of that kernel (computed jointly, never
  ``1 + ||W||``); row norms and ``|I + W|`` come from it too. ``linear``
  still replays the traced primitives.
  """

  def _hwio(self, params):
    k = super()._hwio(params)
    kh, kw, c, _ = k.shape
    return k.at[kh // 2, kw // 2].add(jnp.eye(c, dtype=k.dtype))

  def abs_linear(self, params, h):
    o, i, hh, ww = self.rhs_spec
    k = jnp.transpose(jnp.abs(self._hwio(params)), tuple(np.argsort((hh, ww, i, o))))
    conv = self.program.nodes[0]
    return jax.vmap(lambda e: _bind(conv.prim, [e[None], k], conv.params)[0][0])(h)


class _ToShape(lnn.Reshape):
  """Reshapes ``(B, ...)`` to ``(B, *shape)`` (row-major, like ``jnp.reshape``)."""

  shape: Tuple[int, ...] = ()

  def reshape(self, x):
    return x.reshape((x.shape[0],) + tuple(self.shape))


# ---------------------------------------------------------------------------
# User rules: registered linear maps and activations
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LinearRule:
  name: str
  fn: Callable


@dataclasses.dataclass(frozen=True)
class _ActivationRule:
  name: str
  fn: Callable
  flat_below: float
  flat_above: float
  ulps: float


_REGISTRY: Dict[str, Any] = {}
_PREFIX = "lipjax_registered__"


def _tagged(fn: Callable, name: str, rule) -> Callable:
  """``fn`` as a ``jax.jit`` call whose name the tracer looks up."""
  tag = f"{_PREFIX}{name}"
  if tag in _REGISTRY and _REGISTRY[tag].fn is not fn:
    raise ValueError(f"a different function is already registered as {name!r}")
  _REGISTRY[tag] = rule

  def call(*args):
    return fn(*args)

  call.__name__ = call.__qualname__ = tag
  jitted = jax.jit(call)

  def wrapper(*args):
    return jitted(*args)

  wrapper.__name__ = getattr(fn, "__name__", name)
  wrapper.__doc__ = fn.__doc__
  wrapper.lipjax_rule = rule
  return wrapper


def _check_name(name) -> str:
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"a registered rule needs a Python identifier as its name, got {name!r}")
  return name


def register_linear(fn: Callable, name: Optional[str] = None) -> Callable:
  """Registers a linear map so that the bounds treat each call as one linear piece.

  ``fn(h, *params)`` must be linear in ``h`` (a batch ``(B, ...)``, examples
  independent) and compute each output as a sum of products of entries of
  ``h`` with values of ``params`` (no FFT or other algorithm outside the
  rounding model of :mod:`lipjax.bounds.rounding`). Only the forward map is
  needed: the adjoint comes from ``jax.linear_transpose`` (which also checks
  linearity when the model is traced), and the bounds use the generic sound
  rules (explicit Jacobian for small outputs, Lanczos with its failure
  probability otherwise; row norms from the global norm). Call the returned
  function in your model instead of ``fn``.

  Args:
    fn: the linear map.
    name: a unique identifier (default ``fn.__name__``).

  Returns:
    ``fn`` wrapped so that the tracer recognises it (same arguments and
    results).
  """
  if not callable(fn):
    raise TypeError(f"register_linear needs a function, got {type(fn).__name__}")
  name = _check_name(name or getattr(fn, "__name__", ""))
  return _tagged(fn, name, _LinearRule(name, fn))


def register_activation(fn: Callable, name: Optional[str] = None, *,
                        flat_below: float = -math.inf, flat_above: float = math.inf,
                        ulps: float = 4.0) -> Callable:
  """Registers an elementwise, nondecreasing, 1-Lipschitz activation ``fn(z)``.

  The bounds map boxes through it by monotonicity (``[fn(lb), fn(ub)]``),
  use slope in ``[0, 1]`` for the local norms (an output varies unless its
  box lies where ``fn`` is constant: ``ub <= flat_below`` or ``lb >=
  flat_above``), and widen every value by ``ulps`` units in the last place
  of float32 for the rounding of ``fn`` itself.

  These properties are the caller's guarantee (they are not checked):
  an activation that is not monotone, has a slope above 1, is not constant
  where declared, or is evaluated less accurately than ``ulps`` voids the
  bounds.

  Args:
    fn: the activation, applied elementwise to a float32 array.
    name: a unique identifier (default ``fn.__name__``).
    flat_below, flat_above: ``fn`` is constant on ``z <= flat_below`` and on
      ``z >= flat_above``.
    ulps: bound on the float32 evaluation error of ``fn``, in units of
      ``2^-24 |fn(z)|`` (plus the smallest normal number).

  Returns:
    ``fn`` wrapped so that the tracer recognises it.
  """
  if not callable(fn):
    raise TypeError(f"register_activation needs a function, got {type(fn).__name__}")
  name = _check_name(name or getattr(fn, "__name__", ""))
  if not (float(flat_below) <= float(flat_above)):
    raise ValueError(f"flat_below must be <= flat_above, got {flat_below} > {flat_above}")
  if not (0 <= float(ulps) < 2 ** 20):
    raise ValueError(f"ulps must be in [0, 2^20), got {ulps}")
  return _tagged(fn, name, _ActivationRule(name, fn, float(flat_below), float(flat_above),
                                           float(ulps)))


def _check_registered_linear(eqn, ins, rule: _LinearRule, where: str) -> None:
  """Raises one line unless the call is linear in its first argument."""
  sub = _sub_jaxpr(eqn)
  in_aval = eqn.invars[0].aval
  statics = [jnp.zeros(v.aval.shape, v.aval.dtype) for v in eqn.invars[1:]]
  try:
    f = lambda h: jcore.jaxpr_as_fun(jcore.ClosedJaxpr(sub[0], sub[1]))(h, *statics)[0]
    jax.eval_shape(lambda z: jax.linear_transpose(f, jax.ShapeDtypeStruct(
        in_aval.shape, in_aval.dtype))(z), jax.ShapeDtypeStruct(eqn.outvars[0].aval.shape,
                                                                 jnp.float32))
  except Exception:   # pylint: disable=broad-except
    raise _unsupported(f"the registered linear map {rule.name!r}, which is not linear in "
                       "its first argument (jax.linear_transpose fails)", where) from None


class RegisteredActivation(lnn.Activation):
  """An activation added by :func:`register_activation`.

  Boxes map by monotonicity, widened by the rounding allowance of ``fn``;
  an output is constant where its box lies in a declared flat region.
  """

  fn: Any = None
  flat_below: float = -math.inf
  flat_above: float = math.inf
  ulps: float = 4.0
  label: str = ""

  def __call__(self, z):
    raise TypeError("RegisteredActivation describes a traced activation; call the model")

  def activate(self, params, z):
    return self.fn(z)

  def evaluation_error(self, params, lo, hi):
    """Bound on ``|fl(fn(z)) - fn(z)|`` for ``z`` in ``[lo, hi]``."""
    mag = jnp.maximum(jnp.abs(self.fn(lo)), jnp.abs(self.fn(hi)))
    return (self.ulps + 2.0) * 2.0 ** -24 * mag + 2.0 ** -126

  def interval(self, params, lb, ub):
    err = self.evaluation_error(params, lb, ub)
    return self.fn(lb) - err, self.fn(ub) + err

  def varying(self, params, lb, ub):
    m = _f32(~((ub <= self.flat_below) | (lb >= self.flat_above)))   # NaN -> varying
    return m, m


# ---------------------------------------------------------------------------
# Locations for error messages
# ---------------------------------------------------------------------------


_SKIPPED_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                      for m in (jax, flax, np))
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _source_line(source_info) -> Optional[str]:
  """``file:line`` of the innermost frame outside JAX, Flax, numpy and lipjax
  (the user's own code), else the innermost frame outside JAX."""
  try:
    frames = list(source_info.traceback.frames)
  except Exception:   # pylint: disable=broad-except
    return None
  first = None
  for frame in frames:
    path = os.path.abspath(frame.file_name)
    if path.startswith(_SKIPPED_DIRS[0]) or "/jaxlib/" in path:
      continue
    loc = f"{frame.file_name}:{frame.line_num}"
    first = first or loc
    if not path.startswith(_SKIPPED_DIRS) and not path.startswith(_OWN_DIR):
      return loc
  return first


def _where(eqn, context: Tuple[str, ...]) -> str:
  """``module <Flax name stack>, inside <calls>, <file>:<line>`` of an equation
  (shortened: see :func:`lipjax._src.errors.short_where`).

  ``context`` holds, for each enclosing inlined call, ``"module <stack>"``
  (its name stack, relative to the enclosing call) and its name.
  """
  try:
    stack = str(eqn.source_info.name_stack)
  except Exception:   # pylint: disable=broad-except
    stack = ""
  outer = [c[len("module "):] for c in context if c.startswith("module ")]
  calls = [c for c in context if not c.startswith("module ")]
  path = "/".join(outer + ([stack] if stack else []))
  return errors.short_where(path or None, " > ".join(calls) or None,
                            _source_line(eqn.source_info))


def _unsupported(what: str, where: str) -> errors.UnsupportedModelError:
  return errors.unsupported(what, where)


# ---------------------------------------------------------------------------
# Walking the jaxpr
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _S:
  sid: int


@dataclasses.dataclass(frozen=True)
class _A:
  aid: int


class _Builder:
  """Sorts the values of a jaxpr into static ones and activation ones."""

  def __init__(self):
    self.statics: List[_Static] = []
    self.calls: List[Tuple[Any, Dict[str, Any], Tuple[int, ...]]] = []
    self.nodes: List[_Node] = []
    self.shapes: Dict[int, Tuple[int, ...]] = {}
    self.producer: Dict[int, int] = {}

  # -- values --------------------------------------------------------------
  def const(self, value) -> _S:
    value = np.asarray(value)
    self.statics.append(_Static("const", value=value, shape=value.shape))
    return _S(len(self.statics) - 1)

  def leaf(self, i: int, shape) -> _S:
    self.statics.append(_Static("leaf", leaf=i, shape=tuple(shape)))
    return _S(len(self.statics) - 1)

  def new_act(self, shape) -> _A:
    aid = len(self.shapes)
    self.shapes[aid] = tuple(int(s) for s in shape)
    return _A(aid)

  # -- the walk ------------------------------------------------------------
  def walk(self, jaxpr, consts: Sequence[Any], args: Sequence[Any],
           context: Tuple[str, ...]) -> List[Any]:
    env: Dict[Any, Any] = {}
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = self.const(c)
    for v, a in zip(jaxpr.invars, args):
      env[v] = a

    def read(atom):
      if isinstance(atom, jcore.Literal):
        return self.const(atom.val)
      return env[atom]

    for eqn in jaxpr.eqns:
      ins = [read(a) for a in eqn.invars]
      name = eqn.primitive.name
      if name in _CALLS:
        rule = _REGISTRY.get(str(eqn.params.get("name", "")))
        if rule is not None and any(isinstance(i, _A) for i in ins):
          outs = self.registered_eqn(eqn, ins, context, rule)
          for v, o in zip(eqn.outvars, outs):
            env[v] = o
          continue
        sub = _sub_jaxpr(eqn)
        if sub is not None:
          inner, inner_consts = sub
          stack = str(eqn.source_info.name_stack)
          label = eqn.params.get("name") or getattr(eqn.params.get("call_jaxpr"), "name", None)
          ctx = context + ((f"module {stack}",) if stack else ()) + \
              ((str(label),) if label else ())
          outs = self.walk(inner, inner_consts, ins, ctx)
          for v, o in zip(eqn.outvars, outs):
            env[v] = o
          continue
      if all(isinstance(i, _S) for i in ins):
        outs = self.static_eqn(eqn, ins)
      else:
        outs = self.act_eqn(eqn, ins, context)
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def static_eqn(self, eqn, ins: List[_S]) -> List[_S]:
    call = len(self.calls)
    sids = tuple(i.sid for i in ins)
    self.calls.append((eqn.primitive, dict(eqn.params), sids))
    values = None
    known = [self.statics[s].value for s in sids]
    if all(v is not None for v in known):
      try:
        with jax.ensure_compile_time_eval():
          values = [np.asarray(o) for o in _bind(eqn.primitive, list(known), eqn.params)]
      except Exception:   # pylint: disable=broad-except
        values = None   # evaluated with the variables instead
    outs = []
    for k in range(len(eqn.outvars)):
      self.statics.append(_Static("call", prim=eqn.primitive, params=eqn.params, ins=sids,
                                  index=k, call=call,
                                  value=None if values is None else values[k],
                                  shape=tuple(eqn.outvars[k].aval.shape)))
      outs.append(_S(len(self.statics) - 1))
    return outs

  def registered_eqn(self, eqn, ins: List[Any], context, rule) -> List[_A]:
    """A call of a registered linear map or activation: one node."""
    where = _where(eqn, context)
    acts = _acts(ins)
    what = "activation" if isinstance(rule, _ActivationRule) else "linear map"
    if acts != [0] or len(eqn.outvars) != 1:
      raise _unsupported(f"the registered {what} {rule.name!r} called with an input-"
                         "dependent value other than its first argument, or with several "
                         "outputs", where)
    out_aval = eqn.outvars[0].aval
    in_shape = tuple(eqn.invars[0].aval.shape)
    if out_aval.dtype != jnp.float32 or not out_aval.shape or out_aval.shape[0] != 1:
      raise _unsupported(f"the registered {what} {rule.name!r} (float32 output with the "
                         "batch axis first needed)", where)
    if isinstance(rule, _ActivationRule):
      if tuple(out_aval.shape) != in_shape or len(ins) != 1:
        raise _unsupported(f"the registered activation {rule.name!r} (elementwise: one "
                           "argument, output of the input's shape)", where)
    else:
      _check_registered_linear(eqn, ins, rule, where)
    out = self.new_act(out_aval.shape)
    refs = tuple(("a", i.aid) if isinstance(i, _A) else ("s", i.sid) for i in ins)
    self.nodes.append(_Node(eqn.primitive, dict(eqn.params), refs, (out.aid,), where,
                            rule=rule))
    self.producer[out.aid] = len(self.nodes) - 1
    return [out]

  def act_eqn(self, eqn, ins: List[Any], context) -> List[_A]:
    name = eqn.primitive.name
    where = _where(eqn, context)
    for v in eqn.outvars:
      dtype = getattr(v.aval, "dtype", None)
      if dtype != jnp.float32:
        raise _unsupported(f"a value of dtype {dtype} computed from the input by {name}",
                           where)
    if name in LINEAR_RULES:
      _check_linear(name, eqn, ins, where)
    elif name in _ACTIVATION_PRIMS:
      _check_activation(name, eqn, ins, where)
    else:
      raise _unsupported(f"the operation {name!r}", where)
    outs = []
    for v in eqn.outvars:
      shape = tuple(v.aval.shape)
      if not shape or shape[0] != 1:
        raise _unsupported(f"{name} (which moves or reduces the batch axis: output shape "
                           f"{shape} for a batch of one)", where)
      outs.append(self.new_act(shape))
    refs = tuple(("a", i.aid) if isinstance(i, _A) else ("s", i.sid) for i in ins)
    node = _Node(eqn.primitive, dict(eqn.params), refs, tuple(o.aid for o in outs), where)
    self.nodes.append(node)
    for o in outs:
      self.producer[o.aid] = len(self.nodes) - 1
    return outs


def _sub_jaxpr(eqn):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    j = eqn.params.get(key)
    if j is None:
      continue
    if isinstance(j, jcore.ClosedJaxpr):
      return j.jaxpr, j.consts
    if isinstance(j, jcore.Jaxpr):
      return j, ()
  return None


def _acts(ins) -> List[int]:
  return [k for k, i in enumerate(ins) if isinstance(i, _A)]


def _check_linear(name, eqn, ins, where):
  """Raises unless the primitive is linear in its activation operands and keeps
  the batch axis (axis 0) per example."""
  p = eqn.params
  acts = _acts(ins)
  bad = None
  if name == "dot_general":
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    if acts != [0]:
      bad = ("a product of two values computed from the input" if len(acts) == 2 else
             "dot_general with the input-dependent value as its right operand")
    elif lb or rb or 0 in lc:
      bad = "dot_general over the batch axis"
  elif name == "conv_general_dilated":
    dn = p["dimension_numbers"]
    if acts != [0]:
      bad = ("a convolution of two values computed from the input" if len(acts) == 2 else
             "a convolution whose kernel depends on the input")
    elif dn.lhs_spec[0] != 0 or dn.out_spec[0] != 0 or p["batch_group_count"] != 1:
      bad = "a convolution that does not keep the batch axis first"
  elif name == "mul":
    if len(acts) == 2:
      bad = "a multiplication of two values computed from the input"
  elif name == "div":
    if acts != [0]:
      bad = "a division by a value computed from the input"
  elif name == "pad":
    if acts != [0]:
      bad = "padding with a value computed from the input"
    elif tuple(p["padding_config"][0]) != (0, 0, 0):
      bad = "padding of the batch axis"
  elif name == "transpose":
    if p["permutation"][0] != 0:
      bad = "a transpose that moves the batch axis"
  elif name == "broadcast_in_dim":
    if not p["broadcast_dimensions"] or p["broadcast_dimensions"][0] != 0:
      bad = "a broadcast that moves the batch axis"
  elif name == "squeeze":
    if 0 in p["dimensions"]:
      bad = "squeezing the batch axis"
  elif name == "rev":
    if 0 in p["dimensions"]:
      bad = "reversing the batch axis"
  elif name in ("concatenate",):
    if p["dimension"] == 0:
      bad = "concatenation along the batch axis"
  elif name == "split":
    if p["axis"] == 0:
      bad = "splitting the batch axis"
  elif name == "reduce_sum":
    if 0 in p["axes"]:
      bad = "a sum over the batch axis"
  elif name == "cumsum":
    if p["axis"] == 0:
      bad = "a cumulative sum over the batch axis"
  elif name == "reduce_window_sum":
    if (p["window_dimensions"][0] != 1 or p["window_strides"][0] != 1
        or tuple(p["padding"][0]) != (0, 0) or p["base_dilation"][0] != 1):
      bad = "a window sum over the batch axis"
  elif name == "slice":
    if p["start_indices"][0] != 0 or p["limit_indices"][0] != 1:
      bad = "slicing the batch axis"
  if bad:
    raise _unsupported(bad, where)


def _check_activation(name, eqn, ins, where):
  acts = _acts(ins)
  if name == "clamp" and acts != [1]:
    raise _unsupported("lax.clamp with bounds computed from the input", where)


# ---------------------------------------------------------------------------
# From the node graph to a chain of stages
# ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Group:
  """An activation: its input (pre-activation) and output activation ids."""

  kind: str                       # "clamp", "maxmin", "identity" or "residual"
  input: int
  output: int
  nodes: List[int]
  where: str
  steps: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()            # clamp
  max_steps: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()        # maxmin parts
  min_steps: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()
  max_first: bool = True
  skip: int = -1                  # residual: the skip value (input is the branch value)
  rule: Any = None                # user: the registered activation


@dataclasses.dataclass(eq=False)
class _SegmentSpec:
  program: _Program
  layer: str                       # "dense", "conv", "traced_conv", "matrix", "generic"
  name: str
  info: Dict[str, Any]
  group: Optional[_Group]
  block_start: int = -1            # >= 0: this stage ends a residual block
  post: Optional[_Group] = None    # the activation after the residual sum
  post_kind: Optional[str] = None


@dataclasses.dataclass(eq=False)
class _Plan:
  statics: List[_Static]
  calls: List[Tuple[Any, Dict[str, Any], Tuple[int, ...]]]
  segments: List[_SegmentSpec]
  needed: Tuple[int, ...]          # static ids to evaluate, in order
  activations: List[Dict[str, Any]]   # per hidden segment: how to build its activation


def _is_clamp_node(node: _Node) -> bool:
  if node.name == "clamp":
    return True
  return node.name in ("max", "min") and len(node.act_ins()) == 1


def _is_pair_node(node: _Node) -> bool:
  return node.name in ("max", "min") and len(node.act_ins()) == 2


def _clamp_steps(node: _Node) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
  if node.name == "clamp":
    lo, hi = node.ins[0][1], node.ins[2][1]
    return (("max", (lo,)), ("min", (hi,)))
  return ((node.name, tuple(node.static_ins())),)


def _residual_group(b: _Builder, n: int, node: _Node, seg_of, seg_input) -> _Group:
  """A residual sum ``h + f(h)``: an addition of two values of different
  segments, one of which (``h``, the skip) is the input of its segment."""
  acts = node.act_ins()
  what = (f"{node.name} of values from different layers (lipjax bounds support "
          "residual sums h + f(h) with h the output of an activation, of a residual "
          "block or the model input)")
  if node.name not in ("add", "add_any") or len(acts) != 2 or len(node.ins) != 2:
    raise _unsupported(what, node.where)
  a0, a1 = acts
  skip, branch = (a0, a1) if seg_of[a0] < seg_of[a1] else (a1, a0)
  if seg_input[seg_of[skip]] != skip:
    raise _unsupported(what, node.where)
  if not (b.shapes[skip] == b.shapes[branch] == b.shapes[node.outs[0]]):
    raise _unsupported(f"a residual sum of shapes {b.shapes[skip][1:]} and "
                       f"{b.shapes[branch][1:]} (broadcast)", node.where)
  return _Group("residual", branch, node.outs[0], [n], node.where, skip=skip)


def _extract(b: _Builder, out_aid: int, in_aid: int) -> List[List[Any]]:
  nodes = b.nodes
  # Live nodes: those the output depends on.
  live = set()
  stack = [out_aid]
  seen = set()
  while stack:
    a = stack.pop()
    if a in seen or a not in b.producer:
      continue
    seen.add(a)
    n = b.producer[a]
    live.add(n)
    stack.extend(nodes[n].act_ins())
  consumers: Dict[int, List[int]] = collections.defaultdict(list)
  for n in sorted(live):
    for a in nodes[n].act_ins():
      consumers[a].append(n)

  def producer(a):
    n = b.producer.get(a)
    return n if n in live else None

  # 1. Clamp chains: elementwise max/min with static operands, fused while
  #    each intermediate value has a single use.
  chain_of: Dict[int, int] = {}
  chains: List[Dict[str, Any]] = []
  for n in sorted(live):
    node = nodes[n]
    if not _is_clamp_node(node):
      continue
    (a,) = node.act_ins()
    p = producer(a)
    if (p is not None and p in chain_of and consumers[a] == [n] and a != out_aid):
      ch = chains[chain_of[p]]
      ch["nodes"].append(n)
      ch["steps"] += _clamp_steps(node)
      ch["output"] = node.outs[0]
      chain_of[n] = chain_of[p]
    else:
      chain_of[n] = len(chains)
      chains.append({"input": a, "output": node.outs[0], "nodes": [n],
                     "steps": _clamp_steps(node), "where": node.where})
  chain_by_input: Dict[int, Dict[str, Any]] = {}
  for ch in chains:
    chain_by_input.setdefault(ch["input"], ch)

  # 2. MaxMin: max and min of the two halves of the last axis of one value.
  groups: List[_Group] = []
  in_maxmin = set()

  def halves(a):
    p = producer(a)
    if p is None:
      return None
    node = nodes[p]
    (src,) = node.act_ins() if len(node.act_ins()) == 1 else (None,)
    if src is None:
      return None
    shape = b.shapes[src]
    last = len(shape) - 1
    if shape[-1] % 2:
      return None
    c = shape[-1] // 2
    if node.name == "split":
      sizes = tuple(int(s) for s in node.params["sizes"])
      if node.params["axis"] == last and sizes == (c, c):
        return src, node.outs.index(a), p
    if node.name == "slice":
      start = tuple(node.params["start_indices"])
      limit = tuple(node.params["limit_indices"])
      strides = node.params.get("strides")
      if strides is not None and any(s != 1 for s in strides):
        return None
      if start[:last] != (0,) * last or limit[:last] != shape[:last]:
        return None
      if (start[last], limit[last]) == (0, c):
        return src, 0, p
      if (start[last], limit[last]) == (c, 2 * c):
        return src, 1, p
    return None

  for n in sorted(live):
    node = nodes[n]
    if not _is_pair_node(node) or n in in_maxmin:
      continue
    a0, a1 = node.act_ins()
    h0, h1 = halves(a0), halves(a1)
    what = (f"{node.name} of two values computed from the input (not MaxMin: max and min "
            "of the two halves of the last axis, concatenated)")
    if h0 is None or h1 is None or h0[0] != h1[0] or {h0[1], h1[1]} != {0, 1}:
      raise _unsupported(what, node.where)
    z = h0[0]
    half_nodes = {h0[2], h1[2]}
    halves_ids = {a0, a1}
    pair_nodes = [m for m in sorted(live) if _is_pair_node(nodes[m])
                  and set(nodes[m].act_ins()) == halves_ids]
    kinds = sorted(nodes[m].name for m in pair_nodes)
    if kinds != ["max", "min"]:
      raise _unsupported(what, node.where)
    for h in halves_ids:
      if sorted(consumers[h]) != sorted(pair_nodes):
        raise _unsupported("MaxMin whose halves are also used elsewhere", node.where)
    parts = {}
    extra = []
    for m in pair_nodes:
      out = nodes[m].outs[0]
      ch = chain_by_input.get(out)
      steps: Tuple = ()
      end = out
      if ch is not None and consumers[out] == [ch["nodes"][0]]:
        steps, end = ch["steps"], ch["output"]
        extra += ch["nodes"]
      parts[nodes[m].name] = (out, end, steps)
    ends = {parts["max"][1], parts["min"][1]}
    users = set(consumers[parts["max"][1]]) | set(consumers[parts["min"][1]])
    cat = None
    if len(users) == 1:
      cat = nodes[users.pop()]
    last = len(b.shapes[z]) - 1
    if (cat is None or cat.name != "concatenate" or cat.params["dimension"] != last
        or set(cat.act_ins()) != ends or len(cat.ins) != 2
        or any(len(consumers[e]) != 1 for e in ends)):
      raise _unsupported("max/min of the two channel halves that is not concatenated "
                         "into a MaxMin output", node.where)
    max_first = cat.ins[0][1] == parts["max"][1]
    members = sorted(half_nodes | set(pair_nodes) | set(extra) | {b.producer[cat.outs[0]]})
    in_maxmin.update(members)
    groups.append(_Group("maxmin", z, cat.outs[0], members, node.where,
                         max_steps=parts["max"][2], min_steps=parts["min"][2],
                         max_first=max_first))

  for n in sorted(live):
    if isinstance(nodes[n].rule, _ActivationRule):
      groups.append(_Group("user", nodes[n].act_ins()[0], nodes[n].outs[0], [n],
                           nodes[n].where, rule=nodes[n].rule))

  for ch in chains:
    if ch["nodes"][0] in in_maxmin:
      continue
    groups.append(_Group("clamp", ch["input"], ch["output"], ch["nodes"], ch["where"],
                         steps=ch["steps"]))

  grouped = set()
  for g in groups:
    grouped.update(g.nodes)
  by_output = {g.output: g for g in groups}
  by_input: Dict[int, List[_Group]] = collections.defaultdict(list)
  for g in groups:
    by_input[g.input].append(g)

  # 3. Segments: linear nodes grouped by the activation output (or the
  #    network input) they are computed from.
  seg_of: Dict[int, int] = {in_aid: 0}
  seg_input = [in_aid]
  seg_nodes: List[List[int]] = [[]]
  for n in sorted(live):
    node = nodes[n]
    if n in grouped:
      g = by_output.get(node.outs[0])
      if g is not None:
        seg_of[g.output] = len(seg_input)
        seg_input.append(g.output)
        seg_nodes.append([])
      continue
    segs = set()
    for a in node.act_ins():
      if a not in seg_of:
        raise _unsupported(f"{node.name} applied to an intermediate value of an "
                           "activation", node.where)
      segs.add(seg_of[a])
    if len(segs) > 1:
      g = _residual_group(b, n, node, seg_of, seg_input)
      groups.append(g)
      grouped.add(n)
      by_output[g.output] = g
      by_input[g.input].append(g)
      seg_of[g.output] = len(seg_input)
      seg_input.append(g.output)
      seg_nodes.append([])
      continue
    (s,) = segs
    for o in node.outs:
      seg_of[o] = s
    seg_nodes[s].append(n)

  # 4. Chain order: each segment has exactly one exit (the input of the next
  #    activation, or the logits).
  exits: List[List[int]] = [[] for _ in seg_input]
  for g in groups:
    if g.input not in seg_of:
      raise _unsupported("an activation applied to an intermediate value of another "
                         "activation", g.where)
    exits[seg_of[g.input]].append(g.input)
  if out_aid not in seg_of or out_aid in by_output:
    raise errors.UnsupportedModelError(
        "the model must end with a linear layer (the logits); its output comes "
        "straight from an activation")
  exits[seg_of[out_aid]].append(out_aid)
  for s, ex in enumerate(exits):
    if len(set(ex)) != 1 or len(ex) != 1:
      where = nodes[seg_nodes[s][-1]].where if seg_nodes[s] else "the model input"
      raise _unsupported(
          "a value that feeds several activations or both an activation and the logits "
          "(a branch; lipjax bounds need a chain of layers)", where)

  out: List[List[Any]] = []     # [program, group, (block start, post group) or None]
  stage_of_seg: Dict[int, int] = {}
  node_seg = {n: k for k, ns in enumerate(seg_nodes) for n in ns}
  last_end = -1

  def close_block(rg: _Group) -> int:
    """Ends the residual block ``rg`` at the last stage; returns the next segment."""
    nonlocal last_end
    h = rg.skip
    s_h = seg_of[h]
    start = stage_of_seg.get(s_h)
    if start is None:
      raise _unsupported("a residual addition whose skip value is not the input of a "
                         "linear layer of the chain", rg.where)
    end = len(out) - 1
    if start <= last_end:
      raise _unsupported("nested residual blocks (a residual addition whose branch "
                         "holds another one)", rg.where)
    if any(m != rg.nodes[0] and node_seg.get(m) != s_h for m in consumers[h]):
      raise _unsupported("a residual skip value that is also used elsewhere (lipjax "
                         "bounds need y = h + f(h) with h used by f and the sum only)",
                         rg.where)
    s_y = seg_of[rg.output]
    visited.add(s_y)
    (ex,) = exits[s_y]
    post = None
    nxt = s_y
    if ex == seg_input[s_y] and ex != out_aid:
      (post,) = by_input[ex]
      if post.kind == "residual":
        raise _unsupported("a residual sum used directly as the branch of another "
                           "residual addition", post.where)
      nxt = seg_of[post.output]
    out[end][2] = (start, post)
    last_end = end
    return nxt

  s = 0
  visited = set()
  while True:
    visited.add(s)
    (exit_aid,) = exits[s]
    if exit_aid == seg_input[s]:
      if s == 0:
        msg = "an activation applied to the model input (lipjax bounds need a linear layer first)"
      else:
        msg = "two activations in a row (lipjax bounds need a linear layer in between)"
      g = by_input[exit_aid][0] if exit_aid in by_input else None
      raise _unsupported(msg, g.where if g else "the model output")
    prog = _Program(nodes=tuple(nodes[n] for n in seg_nodes[s]), input=seg_input[s],
                    output=exit_aid, in_shape=b.shapes[seg_input[s]][1:],
                    out_shape=b.shapes[exit_aid][1:])
    stage_of_seg[s] = len(out)
    if exit_aid == out_aid:
      out.append([prog, None, None])
      break
    (g,) = by_input[exit_aid]
    if g.kind == "residual":      # a branch that ends with this linear map
      out.append([prog, _Group("identity", exit_aid, exit_aid, [], g.where), None])
      s = close_block(g)
      continue
    out.append([prog, g, None])
    s = seg_of[g.output]
    (nxt,) = exits[s]
    if nxt == seg_input[s] and nxt != out_aid and nxt in by_input \
        and by_input[nxt][0].kind == "residual":   # a branch that ends with g
      visited.add(s)
      s = close_block(by_input[nxt][0])
  if len(visited) != len(seg_input):
    raise errors.UnsupportedModelError("the traced model is not a chain of layers")
  return out


# ---------------------------------------------------------------------------
# Layer choice per segment
# ---------------------------------------------------------------------------


_PASS = ("convert_element_type", "copy", "copy_p")


def _bias_only(nodes: Sequence[_Node]) -> bool:
  """Only static additions (``z + b``, ``b + z``, ``z - b``) and no-op copies."""
  for n in nodes:
    if n.name in _PASS:
      continue
    if n.name in ("add", "add_any") and len(n.act_ins()) == 1:
      continue
    if n.name == "sub" and n.act_mask == (True, False):
      continue
    return False
  return True


def _bias_terms(nodes: Sequence[_Node]) -> Tuple[Tuple[int, float], ...]:
  """``(static id, sign)`` of the additions in a :func:`_bias_only` tail."""
  out = []
  for n in nodes:
    if n.name in _PASS:
      continue
    (sid,) = n.static_ins()
    out.append((sid, -1.0 if n.name == "sub" else 1.0))
  return tuple(out)


def _chain_order(prog: _Program) -> bool:
  """Every node consumes the previous node's (single) output."""
  cur = prog.input
  for n in prog.nodes:
    if len(n.outs) != 1 or n.act_ins() != [cur]:
      return False
    cur = n.outs[0]
  return cur == prog.output


def _classify(prog: _Program, statics: List[_Static]) -> Tuple[str, Dict[str, Any]]:
  nodes = list(prog.nodes)
  residual = _residual_conv_info(prog, statics)
  if residual is not None:
    return "residual_conv", residual
  scaled = _scaled_conv_info(prog, statics)
  if scaled is not None:
    return "traced_conv", scaled
  if _chain_order(prog):
    coef = [i for i, n in enumerate(nodes) if n.role in ("coef", "opaque")]
    if len(coef) == 1:
      k = coef[0]
      node = nodes[k]
      before, after = nodes[:k], nodes[k + 1:]
      if node.name == "dot_general" and _bias_only(after) and all(
          n.name in _PASS + ("reshape",) for n in before):
        (lc, rc), _ = node.params["dimension_numbers"]
        kernel = node.ins[1][1]
        kshape = _static_shape(statics, kernel)
        feats = math.prod(prog.in_shape)
        if (len(prog.out_shape) == 1 and len(kshape) == 2 and tuple(lc) == (1,)
            and tuple(rc) in ((0,), (1,)) and feats == kshape[rc[0]]):
          return "dense", {"kernel": kernel, "transpose": tuple(rc) == (1,),
                           "features": prog.out_shape[0], "flat": feats,
                           "bias": _bias_terms(after)}
      if node.name == "conv_general_dilated" and not before and _bias_only(after):
        info = _conv_info(node, prog, statics)
        if info is not None:
          info[1]["bias"] = _bias_terms(after)
          return info
  if len(prog.out_shape) == 1:
    n_out, n_in = prog.out_shape[0], math.prod(prog.in_shape)
    if n_out <= 4096 and n_out * n_in <= 2 ** 24:
      return "matrix", {}
  return "generic", {}


def _static_shape(statics, sid) -> Tuple[int, ...]:
  return tuple(statics[sid].shape)


def _conv_info(node: _Node, prog: _Program, statics) -> Optional[Tuple[str, Dict[str, Any]]]:
  p = node.params
  dn = p["dimension_numbers"]
  if len(dn.lhs_spec) != 4:
    return None
  strides = tuple(p["window_strides"])
  if (p["feature_group_count"] != 1 or p["batch_group_count"] != 1
      or any(d != 1 for d in p["lhs_dilation"]) or any(d != 1 for d in p["rhs_dilation"])
      or strides[0] != strides[1]):
    return None
  pads = tuple(tuple(int(v) for v in pr) for pr in p["padding"])
  if any(v < 0 for pr in pads for v in pr):
    return None
  kernel = node.ins[1][1]
  kshape = _static_shape(statics, kernel)
  in_full = (1,) + prog.in_shape
  sp = dn.lhs_spec[2:]
  padded = tuple(in_full[a] + pads[i][0] + pads[i][1] for i, a in enumerate(sp))
  out_axis = dn.out_spec[1]
  s = strides[0]
  nhwc = (tuple(dn.lhs_spec) == (0, 3, 1, 2) and tuple(dn.rhs_spec) == (3, 2, 0, 1)
          and tuple(dn.out_spec) == (0, 3, 1, 2))
  info = {"kernel": kernel, "rhs_spec": tuple(dn.rhs_spec), "out_channel_axis": out_axis,
          "padded": padded, "stride": s, "pads": pads, "kernel_shape": kshape}
  if (nhwc and len(kshape) == 4 and kshape[0] == kshape[1] and pads[0] == pads[1]
      and pads[0][0] == pads[0][1]):
    return "conv", dict(info, features=int(kshape[3]), kernel_size=int(kshape[0]),
                        padding=pads[0][0])
  return "traced_conv", info


def _scaled_conv_info(prog: _Program, statics) -> Optional[Dict[str, Any]]:
  """A convolution followed by static additions and per-output-channel
  scalings (e.g. inference BatchNorm), or None.

  ``s * conv(h, K) = conv(h, K s)`` with ``s`` scaling output channel ``o``,
  so the segment is the convolution with the scaled kernel; ``scales`` lists
  ``(static id, "mul" | "div")``.
  """
  if not _chain_order(prog) or not prog.nodes:
    return None
  conv, rest = prog.nodes[0], prog.nodes[1:]
  if conv.name != "conv_general_dilated":
    return None
  base = _conv_info(conv, prog, statics)
  if base is None:
    return None
  info = base[1]
  axis, rank = info["out_channel_axis"], len(prog.out_shape) + 1
  scales = []
  for n in rest:
    if _bias_only([n]):
      continue
    if n.name not in ("mul", "div") or (n.name == "div" and n.act_mask != (True, False)):
      return None
    (sid,) = n.static_ins()
    shape = _static_shape(statics, sid)
    if shape and (len(shape) != rank
                  or any(d != 1 for a, d in enumerate(shape) if a != axis)):
      return None
    scales.append((sid, n.name))
  if not scales:
    return None
  return dict(info, scales=tuple(scales))


def _residual_conv_info(prog: _Program, statics) -> Optional[Dict[str, Any]]:
  """``h + conv(h)`` (static additions anywhere) with the centre tap on the
  identity, or None."""
  nodes = list(prog.nodes)
  if len(nodes) < 2:
    return None
  conv = nodes[0]
  if (conv.name != "conv_general_dilated" or conv.act_ins() != [prog.input]
      or len(conv.outs) != 1):
    return None
  cur, residual = conv.outs[0], False
  for n in nodes[1:]:
    acts = n.act_ins()
    if len(n.outs) != 1:
      return None
    if (not residual and n.name in ("add", "add_any")
        and sorted(acts) == sorted([prog.input, cur])):
      residual = True
    elif acts != [cur] or not _bias_only([n]):
      return None
    cur = n.outs[0]
  if not residual or cur != prog.output:
    return None
  base = _conv_info(conv, prog, statics)
  if base is None:
    return None
  info = base[1]
  dn = conv.params["dimension_numbers"]
  o, i, h, w = dn.rhs_spec
  k = info["kernel_shape"]
  if (info["stride"] != 1 or tuple(dn.lhs_spec) != tuple(dn.out_spec) or k[i] != k[o]
      or k[h] % 2 == 0 or k[w] % 2 == 0
      or info["pads"] != (((k[h] - 1) // 2,) * 2, ((k[w] - 1) // 2,) * 2)):
    return None
  return info


# ---------------------------------------------------------------------------
# Activation parameters
# ---------------------------------------------------------------------------


def _fold_steps(steps, get, xp):
  """``(lo, hi)`` with ``f(z) = min(max(z, lo), hi)`` for a chain of max/min steps.

  ``max(min(max(z, lo), hi), c) = min(max(z, max(lo, c)), max(hi, c))`` and
  ``min(min(max(z, lo), hi), c) = min(max(z, lo), min(hi, c))`` (max
  distributes over min), so every chain is one clamp.
  """
  lo, hi = -xp.inf, xp.inf
  for op, sids in steps:
    for sid in sids:
      c = get(sid)
      if c is None:
        return None
      if op == "max":
        lo, hi = xp.maximum(lo, c), xp.maximum(hi, c)
      else:
        hi = xp.minimum(hi, c)
  return lo, hi


def _concrete_fold(steps, statics):
  return _fold_steps(steps, lambda s: statics[s].value, np)


def _all(v, pred) -> bool:
  return v is not None and bool(np.all(pred(np.asarray(v, np.float64))))


def _activation_kind(g: _Group, statics) -> str:
  """Which activation class a group becomes (decided on concrete values only)."""
  if g.kind in ("identity", "user"):
    return g.kind
  if g.kind == "clamp":
    # lo depends on the max steps only; hi on every step.
    lo = _concrete_fold([s for s in g.steps if s[0] == "max"], statics)
    hi = _concrete_fold(g.steps, statics)
    if lo is not None and _all(lo[0], lambda v: v == 0):
      if hi is not None and _all(hi[1], np.isposinf):
        return "relu"
      return "clipped_relu"
    return "clamp"
  # lipjax's ClippedMaxMin: max part first, clamped from above only, min part
  # clamped from below only (a max step on the max part would give it a
  # finite lower bound, a min step on the min part a finite upper bound).
  mx = _concrete_fold([s for s in g.max_steps if s[0] == "max"], statics)
  mn = _concrete_fold([s for s in g.min_steps if s[0] == "min"], statics)
  has_upper = any(op == "min" for op, _ in g.max_steps)
  has_lower = any(op == "max" for op, _ in g.min_steps)
  if (g.max_first and has_upper and has_lower and mx is not None and mn is not None
      and _all(mx[0], np.isneginf) and _all(mn[1], np.isposinf)):
    return "clipped_maxmin"
  return "pair_maxmin"


def _activation(kind: str, g: _Group, get, out_shape) -> Tuple[lnn.Activation, Dict[str, Array]]:
  def shaped(v, shape):
    return jnp.broadcast_to(jnp.asarray(v, jnp.float32), (1,) + tuple(shape))[0]

  if kind == "identity":
    return lnn.Identity(parent=None), {}
  if kind == "user":
    r = g.rule
    return RegisteredActivation(fn=r.fn, flat_below=r.flat_below, flat_above=r.flat_above,
                                ulps=r.ulps, label=r.name, parent=None), {}
  if kind in ("relu", "clipped_relu", "clamp"):
    lo, hi = _fold_steps(g.steps, get, jnp)
    if kind == "relu":
      return lnn.ReLU(parent=None), {}
    if kind == "clipped_relu":
      return lnn.ClippedReLU(parent=None), {"theta": shaped(hi, out_shape)}
    return Clamp(parent=None), {"lower": shaped(lo, out_shape), "upper": shaped(hi, out_shape)}
  half = tuple(out_shape[:-1]) + (out_shape[-1] // 2,)
  mlo, mhi = _fold_steps(g.max_steps, get, jnp)
  nlo, nhi = _fold_steps(g.min_steps, get, jnp)
  if kind == "clipped_maxmin":
    return (lnn.ClippedMaxMin(parent=None),
            {"upper": shaped(mhi, half), "lower": shaped(nlo, half)})
  return (PairMaxMin(max_first=g.max_first, parent=None),
          {"max_lower": shaped(mlo, half), "max_upper": shaped(mhi, half),
           "min_lower": shaped(nlo, half), "min_upper": shaped(nhi, half)})


# ---------------------------------------------------------------------------
# Plans (cached per model and shapes) and stages (per call)
# ---------------------------------------------------------------------------


_describe = frontends.describe


def _abstract(tree):
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree)


def _build_plan(model, variables, in_shape) -> _Plan:
  abstract_vars = _abstract(variables)
  x1 = jax.ShapeDtypeStruct((1,) + tuple(in_shape), jnp.float32)
  try:
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x))(abstract_vars, x1)
  except errors.UnsupportedModelError:
    raise
  except Exception as e:   # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise errors.model_error(
        f"tracing {_describe(model)} on an input of shape {tuple(in_shape)} failed "
        f"({type(e).__name__}: {errors.shorten(first, 70)}); lipjax calls "
        "model.apply(variables, x) with the variables given") from e
  b = _Builder()
  args = [b.leaf(i, a.shape) for i, a in enumerate(jax.tree_util.tree_leaves(abstract_vars))]
  x_act = b.new_act((1,) + tuple(in_shape))
  outs = b.walk(closed.jaxpr, closed.consts, args + [x_act], ())
  if len(outs) != 1:
    raise errors.UnsupportedModelError(
        f"{_describe(model)} returns {len(outs)} arrays; lipjax bounds need a single "
        "(batch, num_classes) array of logits")
  (out,) = outs
  if not isinstance(out, _A):
    raise errors.UnsupportedModelError(
        f"the output of {_describe(model)} does not depend on its input")
  if len(b.shapes[out.aid]) != 2:
    raise errors.UnsupportedModelError(
        f"the model must output (batch, num_classes), got per-example shape "
        f"{b.shapes[out.aid][1:]}")
  chain = _extract(b, out.aid, x_act.aid)
  segments, activations = [], []
  for i, (prog, group, block) in enumerate(chain):
    kind, info = _classify(prog, b.statics)
    main = next((n for n in prog.nodes if n.role in ("coef", "opaque")),
                prog.nodes[0] if prog.nodes else None)
    where = main.where if main is not None else f"stage {i}"
    label = where.split(", ")[0].replace("module ", "")
    spec = _SegmentSpec(prog, kind, f"{label} ({kind})", info, group)
    if block is not None:
      spec.block_start, spec.post = block
      spec.post_kind = None if spec.post is None else _activation_kind(spec.post, b.statics)
    segments.append(spec)
    activations.append(None if group is None else _activation_kind(group, b.statics))
  needed = _needed(b, segments)
  return _Plan(b.statics, b.calls, segments, needed, activations)


def _needed(b: _Builder, segments: List[_SegmentSpec]) -> Tuple[int, ...]:
  want = set()
  for seg in segments:
    want.update(seg.program.static_ids)
    for g in (seg.group, seg.post):
      if g is not None:
        for steps in (g.steps, g.max_steps, g.min_steps):
          for _, sids in steps:
            want.update(sids)
  stack = list(want)
  while stack:
    s = stack.pop()
    st = b.statics[s]
    if st.kind == "call" and st.value is None:
      for i in st.ins:
        if i not in want:
          want.add(i)
          stack.append(i)
  return tuple(sorted(want))


def _evaluate_statics(plan: _Plan, leaves) -> Dict[int, Any]:
  vals: Dict[int, Any] = {}
  done_calls: Dict[int, List[Any]] = {}
  for sid in plan.needed:
    st = plan.statics[sid]
    if st.value is not None:
      vals[sid] = jnp.asarray(st.value)
    elif st.kind == "leaf":
      vals[sid] = leaves[st.leaf]
    else:
      if st.call not in done_calls:
        prim, params, ins = plan.calls[st.call]
        done_calls[st.call] = _bind(prim, [vals[i] for i in ins], params)
      vals[sid] = done_calls[st.call][st.index]
  return vals


_PLANS: "collections.OrderedDict[Any, _Plan]" = collections.OrderedDict()
_PLANS_LOCK = threading.Lock()


def _plan_for(model, variables, in_shape) -> _Plan:
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  key = (model, treedef, tuple((tuple(np.shape(a)), str(jnp.result_type(a))) for a in leaves),
         tuple(in_shape))
  with _PLANS_LOCK:
    plan = _PLANS.get(key)
    if plan is not None:
      _PLANS.move_to_end(key)
      return plan
  plan = _build_plan(model, variables, in_shape)
  with _PLANS_LOCK:
    _PLANS[key] = plan
    while len(_PLANS) > 64:
      _PLANS.popitem(last=False)
  return plan


def trace(model, variables, in_shape: Tuple[int, ...]) -> List[network.Stage]:
  """Splits a Flax module or a function ``fn(variables, x)`` into stages.

  Args:
    model: a ``flax.linen`` module, any object with ``apply(variables, x)``,
      or a function ``fn(variables, x) -> logits``.
    variables: the variables passed to ``apply`` (any pytree of arrays; may
      be tracers: the stages' parameters are computed from them).
    in_shape: shape of one input example.

  Returns:
    The stages, as :func:`lipjax.bounds.network.trace` returns them for a
    :class:`lipjax.nn.Sequential`.

  Raises:
    UnsupportedModelError: one line naming the first operation without a
      sound rule, where it sits (module path, source line) and what is
      supported; or a model that is not a chain of linear layers and
      activations ending in a linear layer.
  """
  model = as_model(model)
  plan = _plan_for(model, variables, tuple(in_shape))
  vals = _evaluate_statics(plan, jax.tree_util.tree_leaves(variables))
  stages: List[network.Stage] = []
  for i, (seg, act_kind) in enumerate(zip(plan.segments, plan.activations)):
    prog = seg.program
    prog_params = {_key(s): vals[s] for s in prog.static_ids}
    reshapes: Tuple[lnn.Reshape, ...] = ()
    if seg.layer == "dense":
      kernel = prog_params[_key(seg.info["kernel"])]
      kernel = kernel.T if seg.info["transpose"] else kernel
      layer = lnn.Dense(seg.info["features"], parent=None)
      params = {"kernel": kernel,
                "bias": _bias_sum(seg.info["bias"], prog_params, prog.out_shape)}
      if prog.in_shape != (seg.info["flat"],):
        reshapes = (_ToShape(shape=(seg.info["flat"],), parent=None),)
    elif seg.layer == "conv":
      layer = lnn.Conv(seg.info["features"], kernel_size=seg.info["kernel_size"],
                       stride=seg.info["stride"], padding=seg.info["padding"], parent=None)
      params = {"kernel": prog_params[_key(seg.info["kernel"])],
                "bias": _bias_sum(seg.info["bias"], prog_params, prog.out_shape)}
    elif seg.layer in ("traced_conv", "residual_conv"):
      cls = TracedConv if seg.layer == "traced_conv" else TracedResidualConv
      layer = cls(program=prog, kernel_id=seg.info["kernel"],
                         rhs_spec=seg.info["rhs_spec"],
                         out_channel_axis=seg.info["out_channel_axis"],
                         padded=seg.info["padded"], stride=seg.info["stride"],
                         scales=seg.info.get("scales", ()), parent=None)
      params = prog_params
    elif seg.layer == "matrix":
      layer = TracedMatrix(program=prog, parent=None)
      params = prog_params
    else:
      layer = TracedLinear(program=prog, parent=None)
      params = prog_params
    activation, act_params = None, None
    if seg.group is not None:
      activation, act_params = _activation(act_kind, seg.group, lambda s: vals[s],
                                           prog.out_shape)
    block = None
    if seg.block_start >= 0:
      post, post_params = None, None
      if seg.post is not None:
        post, post_params = _activation(seg.post_kind, seg.post, lambda s: vals[s],
                                        prog.out_shape)
      block = network.BlockEnd(seg.block_start, post, post_params)
    stages.append(network.Stage(index=i, name=seg.name, layer=layer, params=params,
                                reshapes=reshapes, in_shape=prog.in_shape,
                                out_shape=prog.out_shape, activation=activation,
                                act_params=act_params, block=block))
  return stages


_SHAPE_ONLY = ("broadcast_in_dim", "reshape", "convert_element_type", "squeeze", "copy",
               "copy_p")


def _source_leaf(statics: List[_Static], sid: int) -> Optional[int]:
  """The variable leaf a static value is, up to broadcasts and reshapes."""
  while True:
    st = statics[sid]
    if st.kind == "leaf":
      return st.leaf
    if st.kind != "call" or st.value is not None or st.prim.name not in _SHAPE_ONLY:
      return None
    sid = st.ins[0]


def threshold_leaves(model, variables, in_shape: Tuple[int, ...]) -> List[int]:
  """Variable leaves used as the threshold ``theta`` of a clipped ReLU.

  For a traced model (not a :class:`lipjax.nn.Sequential`): the indices, in
  ``jax.tree_util.tree_leaves(variables)`` order, of the leaves that are
  (up to broadcasting and reshaping) the upper bound of a clipped ReLU
  ``min(max(z, 0), theta)``. The training step keeps them ``>= 0``.
  """
  model = as_model(model)
  if isinstance(model, lnn.Sequential):
    return []
  plan = _plan_for(model, variables, tuple(in_shape))
  out = set()
  for seg, kind in zip(plan.segments, plan.activations):
    for group, k in ((seg.group, kind), (seg.post, seg.post_kind)):
      if k != "clipped_relu":
        continue
      for op, sids in group.steps:
        if op == "min":
          out.update(l for l in (_source_leaf(plan.statics, s) for s in sids)
                     if l is not None)
  return sorted(out)


def check_model(model) -> None:
  """Raises ``TypeError`` unless ``model`` is something :func:`trace` can read."""
  as_model(model)
