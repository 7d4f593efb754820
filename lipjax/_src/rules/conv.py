"""Convolutions: ``lipjax.nn.Conv``, traced convolutions (any layout, stride and
padding; per-channel scalings such as inference BatchNorm folded in) and the
linear residual block ``h + conv(h)`` as one operator ``I + W``.

Global norms come from the circulant (FFT) bound of
:func:`lipjax._src.norms.conv_global_norm`; row norms from each output
channel's whole filter.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lipjax import nn as lnn
from lipjax._src import norms, patterns, program
from lipjax._src.rules import registry
from lipjax._src.rules.base import LinearRule
from lipjax._src.rules.traced import TracedLinear

__all__ = ["Conv", "TracedConv", "TracedResidualConv"]


def _flip_kernel(kernel):
  """HWIO kernel of the transposed correlation: flipped in space, I and O swapped."""
  return jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)


@dataclasses.dataclass(frozen=True)
class Conv(LinearRule):
  """2-D convolution, NHWC / HWIO, square kernel, symmetric zero padding.

  ``params = {"kernel": (k, k, C_in, C_out), "bias": (C_out,)}``.
  """

  kernel_size: int = 3
  stride: int = 1
  padding: int = 1
  use_bias: bool = True
  deterministic_global = True

  def _conv(self, h, kernel):
    p = self.padding
    return jax.lax.conv_general_dilated(
        h, kernel, window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def forward(self, params, h):
    return self._conv(h, params["kernel"])

  def bias(self, params):
    return params.get("bias") if self.use_bias else None

  def forward_for_adjoint(self, params, h):
    """The strided convolution as a stride-1 one on its polyphase components.

    With stride ``s`` the padded input splits into ``s * s`` sub-grids
    (stacked as channels) and the kernel into matching ``ceil(k/s)``-sized
    pieces; a VALID stride-1 correlation of the two is the same map. Its
    transpose (from ``jax.linear_transpose``) is a stride-1 convolution, which
    XLA runs several times faster on CPU than the transpose of a strided one.
    """
    if self.stride == 1:
      return self.forward(params, h)
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
    return kp.reshape(ka, s, ka, s, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(
        ka, ka, s * s * c, o)

  @staticmethod
  def _valid_conv(x, kernel, pad=0):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def abs_forward(self, params, h):
    return self._conv(h, jnp.abs(params["kernel"]))

  def row_norms(self, params, in_shape):
    # The whole filter of output channel k bounds every row of channel k
    # (border rows see only part of it).
    out_shape = jax.eval_shape(
        lambda x: self._conv(x, params["kernel"]),
        jax.ShapeDtypeStruct((1,) + tuple(in_shape), params["kernel"].dtype)).shape[1:]
    n = jnp.sqrt(jnp.sum(jnp.square(params["kernel"]), axis=(0, 1, 2)))
    return jnp.broadcast_to(n, out_shape)

  def global_norm(self, params, in_shape):
    return norms.conv_global_norm(params["kernel"], in_shape[:2], stride=self.stride,
                                  padding=self.padding)

  def fan_in(self, params, in_shape):
    del in_shape
    k = params["kernel"].shape
    return int(k[0] * k[1] * k[2])


registry.register_module(lnn.Conv, lambda m: Conv(kernel_size=m.kernel_size, stride=m.stride,
                                                  padding=m.padding, use_bias=m.use_bias))


# ---------------------------------------------------------------------------
# Traced convolutions
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class TracedConv(TracedLinear):
  """A single 2-D convolution (any layout, stride, padding), static additions
  and per-output-channel scalings (inference BatchNorm).

  Global norm: the circulant (FFT) bound of the (scaled) kernel on the
  zero-padded input (a zero padding is an isometric embedding, so any
  padding, symmetric or not, is covered). Row norms: the whole filter of
  each output channel.
  """

  kernel_id: int = -1
  rhs_spec: Tuple[int, ...] = ()
  out_channel_axis: int = -1
  padded: Tuple[int, int] = (0, 0)
  stride: int = 1
  scales: Tuple[Tuple[int, str], ...] = ()
  deterministic_global = True

  def _hwio(self, params):
    """The kernel (HWIO), each output channel times its static scalings."""
    o, i, h, w = self.rhs_spec
    k = jnp.transpose(params[program.key(self.kernel_id)], (h, w, i, o))
    for sid, op in self.scales:
      s = jnp.asarray(params[program.key(sid)], k.dtype)
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
    return norms.conv_global_norm(self._hwio(params), self.padded, stride=self.stride,
                                  padding=0)

  def adjoint_terms(self, params, out_shape):
    # The transposed convolution sums at most one term per output entry,
    # after one multiplication per static scaling.
    del params
    return int(np.prod(out_shape)) + 2 * len(self.scales) + 2


@dataclasses.dataclass(frozen=True, eq=False)
class TracedResidualConv(TracedConv):
  """A linear residual block ``h + conv(h)`` (plus a bias) as one operator ``I + W``.

  With stride 1, equal input and output channels and the padding that keeps
  the centre tap aligned, ``I + W`` is itself a convolution: the kernel with
  1 added at the centre tap between matching channels. Its global norm is
  the circulant bound of that kernel (computed jointly, never
  ``1 + ||W||``); row norms and ``|I + W|`` come from it too. ``forward``
  still replays the traced primitives.
  """

  def _hwio(self, params):
    k = super()._hwio(params)
    kh, kw, c, _ = k.shape
    return k.at[kh // 2, kw // 2].add(jnp.eye(c, dtype=k.dtype))

  def abs_forward(self, params, h):
    o, i, hh, ww = self.rhs_spec
    k = jnp.transpose(jnp.abs(self._hwio(params)), tuple(np.argsort((hh, ww, i, o))))
    conv = self.program.nodes[0]
    return jax.vmap(lambda e: program.bind(conv.prim, [e[None], k], conv.params)[0][0])(h)

  def rounding_abs_forward(self, params, h):
    # The replay adds h to conv(h): its rounding follows |W| + I, entrywise
    # above |I + W| (which a negative centre tap makes smaller).
    k = jnp.abs(super()._hwio(params))
    kh, kw, c, _ = k.shape
    k = k.at[kh // 2, kw // 2].add(jnp.eye(c, dtype=k.dtype))
    o, i, hh, ww = self.rhs_spec
    k = jnp.transpose(k, tuple(np.argsort((hh, ww, i, o))))
    conv = self.program.nodes[0]
    return jax.vmap(lambda e: program.bind(conv.prim, [e[None], k], conv.params)[0][0])(h)

  def adjoint_terms(self, params, out_shape):
    return super().adjoint_terms(params, out_shape) + 1   # the identity's addition


def conv_info(node, prog, statics) -> Optional[Tuple[str, dict]]:
  """``("conv", info)`` for a convolution ``lipjax.nn.Conv`` runs (NHWC/HWIO,
  square kernel, symmetric padding), ``("traced_conv", info)`` for another
  2-D convolution the circulant bound covers, or None."""
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
  kshape = tuple(statics[kernel].shape)
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


def _traced(cls, prog, info, scales=()):
  def build(get):
    params = {program.key(s): get(s) for s in prog.static_ids}
    rule = cls(program=prog, kernel_id=info["kernel"], rhs_spec=info["rhs_spec"],
               out_channel_axis=info["out_channel_axis"], padded=info["padded"],
               stride=info["stride"], scales=tuple(scales))
    return rule, params, ()
  return build


def _residual_segment(prog, statics) -> Optional[patterns.SegmentMatch]:
  """``h + conv(h)`` (static additions anywhere) with the centre tap on the identity."""
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
    elif acts != [cur] or not patterns.bias_only([n]):
      return None
    cur = n.outs[0]
  if not residual or cur != prog.output:
    return None
  base = conv_info(conv, prog, statics)
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
  return patterns.SegmentMatch("residual_conv", _traced(TracedResidualConv, prog, info))


def _scaled_segment(prog, statics) -> Optional[patterns.SegmentMatch]:
  """A convolution followed by static additions and per-output-channel
  scalings (e.g. inference BatchNorm): ``s * conv(h, K) = conv(h, K s)``."""
  if not patterns.chain_order(prog) or not prog.nodes:
    return None
  conv, rest = prog.nodes[0], prog.nodes[1:]
  if conv.name != "conv_general_dilated":
    return None
  base = conv_info(conv, prog, statics)
  if base is None:
    return None
  info = base[1]
  axis, rank = info["out_channel_axis"], len(prog.out_shape) + 1
  scales = []
  for n in rest:
    if patterns.bias_only([n]):
      continue
    if n.name not in ("mul", "div") or (n.name == "div" and n.act_mask != (True, False)):
      return None
    (sid,) = n.static_ins()
    shape = tuple(statics[sid].shape)
    if shape and (len(shape) != rank
                  or any(d != 1 for a, d in enumerate(shape) if a != axis)):
      return None
    scales.append((sid, n.name))
  if not scales:
    return None
  return patterns.SegmentMatch("traced_conv", _traced(TracedConv, prog, info, scales))


def _conv_segment(prog, statics) -> Optional[patterns.SegmentMatch]:
  """One convolution then static additions: ``lipjax.nn.Conv`` when it has
  that form (same code, same speed), else a traced convolution."""
  split = patterns.single_coefficient(prog)
  if split is None:
    return None
  before, node, after = split
  if node.name != "conv_general_dilated" or before or not patterns.bias_only(after):
    return None
  found = conv_info(node, prog, statics)
  if found is None:
    return None
  kind, info = found
  if kind == "traced_conv":
    return patterns.SegmentMatch("traced_conv", _traced(TracedConv, prog, info))
  terms = patterns.bias_terms(after)

  def build(get):
    params = {"kernel": get(info["kernel"]),
              "bias": patterns.bias_sum(terms, get, prog.out_shape)}
    return (Conv(kernel_size=info["kernel_size"], stride=info["stride"],
                 padding=info["padding"]), params, ())

  return patterns.SegmentMatch("conv", build)


registry.register_segment_pattern("residual_conv", _residual_segment, priority=10)
registry.register_segment_pattern("scaled_conv", _scaled_segment, priority=20)
registry.register_segment_pattern("conv", _conv_segment, priority=30)
