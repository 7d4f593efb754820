"""Reading a model into the bounds' graph (:class:`lipjax._src.graph.Graph`).

:func:`trace` takes any model lipjax accepts (:mod:`lipjax._src.frontends`):

* a ``lipjax.nn.Sequential`` of layers is read layer by layer, each layer's
  rule from the registry (:func:`lipjax._src.rules.module_rule`);
* anything else (a Flax linen or NNX module, a function ``fn(variables, x)``,
  a ``Sequential`` holding ``lipjax.nn.Residual`` blocks) is traced: the
  per-example function ``x -> apply(variables, x[None])[0]`` becomes a
  jaxpr once per model and shapes (``jax.make_jaxpr``, the variables being
  inputs), whose equations (sub-jaxprs of ``jit``, ``custom_jvp`` and
  ``custom_vjp`` calls inlined) are sorted into *static* values (computed from
  the variables and constants only) and *activation* values (computed from
  the input). Each primitive applied to an activation value must be a
  registered linear primitive (:mod:`lipjax._src.rules.primitives`), part of
  an activation pattern, or a call of a registered map
  (:mod:`lipjax._src.rules.registered`); anything else raises one short line
  naming it, its module path and the user's source line.
  :func:`lipjax._src.patterns.build_skeleton` reads the nodes into stages and
  blocks; the skeleton is cached per model, variable structure and input
  shape, and each call fills in the parameters from its variables (which may
  be tracers).

The traced function is the model applied to a batch of one; examples must
not interact (a primitive that mixes the batch axis is rejected).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from lipjax import nn as lnn
from lipjax._src import errors, frontends, patterns, program
from lipjax._src.graph import Block, Graph, Stage
from lipjax._src.rules import registered, registry
from lipjax._src.rules.relu import Identity

Array = jax.Array

__all__ = ["cast_floating", "check_model", "threshold_leaves", "trace", "working_dtype"]

_CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "checkpoint", "remat", "remat2", "named_call")


# ---------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# lipjax.nn.Sequential, layer by layer
# ---------------------------------------------------------------------------


def _short_name(layer) -> str:
  """``package.subpackage.Name`` of a layer's class (``flax.linen.Dense``)."""
  return ".".join(type(layer).__module__.split(".")[:2] + [type(layer).__name__])


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


def _sequential(model, variables, in_shape, dtype) -> Graph:
  """The graph of a ``lipjax.nn.Sequential`` without residual blocks."""
  if not isinstance(variables, dict) and not hasattr(variables, "get"):
    raise TypeError("variables must be the dict returned by model.init")
  dtype = working_dtype(variables) if dtype is None else jnp.dtype(dtype)
  layers = list(model.layers)
  if not layers:
    raise errors.model_error("the model has no layers")
  stages: List[Stage] = []
  pending: List[Any] = []
  current = None   # dict of the open linear stage
  shape = tuple(in_shape)

  def close(activation, act_params):
    nonlocal current
    stages.append(Stage(activation=activation, act_params=cast_floating(act_params, dtype),
                        dtype=dtype, **current))
    current = None

  def unsupported(i, layer):
    return errors.model_error(
        f"layers_{i} ({_short_name(layer)}) has no sound rule; supported: lipjax.nn.Dense, "
        "lipjax.nn.Conv, lipjax.nn.ClippedReLU etc., subclasses of lipjax.nn.LinearLayer "
        "or lipjax.nn.Activation")

  for i, layer in enumerate(layers):
    if isinstance(layer, lnn.LinearLayer):
      rule = registry.module_rule(layer)
      if rule is None:
        raise unsupported(i, layer)
      if current is not None:
        close(Identity(), {})
      params = cast_floating(_params_of(variables, i), dtype)
      stage_in = shape
      probe = Stage(len(stages), f"layers_{i} ({type(layer).__name__})", rule, params,
                    tuple(pending), stage_in, (), None, None, dtype)
      if math.prod(stage_in) and getattr(layer, "check_shape", None) is not None \
          and len(probe.layer_in_shape) == 3:
        layer.check_shape(probe.layer_in_shape, label=probe.name)   # one line if empty
      try:
        out = jax.eval_shape(probe.linear, jax.ShapeDtypeStruct((1,) + stage_in, dtype))
      except KeyError as e:
        top = variables.get("params", {}) if hasattr(variables, "get") else {}
        raise errors.UnsupportedModelError(
            f"variables['params'] has no parameter {e} for layers_{i} "
            f"({type(layer).__name__}); its top-level keys are {sorted(top)[:8]}. For a "
            "lipjax model held as a submodule named NAME, pass "
            "{'params': variables['params'][NAME]}") from None
      shape = tuple(out.shape[1:])
      _check_not_empty(layer, probe.name, probe.layer_in_shape, shape)
      current = dict(index=len(stages), name=probe.name, layer=rule, params=params,
                     reshapes=tuple(pending), in_shape=stage_in, out_shape=shape)
      pending = []
    elif isinstance(layer, lnn.Activation):
      rule = registry.module_rule(layer)
      if rule is None:
        raise unsupported(i, layer)
      if current is None:
        raise errors.model_error(
            f"layers_{i} ({type(layer).__name__}) is an activation that does not "
            "follow a linear layer; lipjax bounds need linear -> activation chains")
      close(rule, _params_of(variables, i))
    elif isinstance(layer, lnn.Reshape):
      if current is not None:
        close(Identity(), {})
      pending.append(layer)
    else:
      raise unsupported(i, layer)
  if current is None or pending:
    raise errors.model_error(
        "the model must end with a linear layer (the logits); found "
        f"{_short_name(layers[-1])} last")
  close(None, None)
  if len(shape) != 1:
    raise errors.model_error(
        f"the last layer must output (B, num_classes), got per-example shape {shape}")
  return Graph(stages)


# ---------------------------------------------------------------------------
# Locations for error messages
# ---------------------------------------------------------------------------


_SKIPPED_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                      for m in (jax, flax, np))
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _user_line(source_info) -> Optional[str]:
  """``file:line`` of the innermost frame outside JAX, Flax, numpy and lipjax
  (the user's own code), or None."""
  try:
    frames = list(source_info.traceback.frames)
  except Exception:   # pylint: disable=broad-except
    return None
  for frame in frames:
    path = os.path.abspath(frame.file_name)
    if "/jaxlib/" in path or path.startswith(_SKIPPED_DIRS) or path.startswith(_OWN_DIR):
      continue
    return f"{frame.file_name}:{frame.line_num}"
  return None


def _where(eqn, context: Tuple[str, ...]) -> str:
  """``module <Flax name stack>, inside <calls>, <file>:<line>`` of an equation.

  ``context`` holds, for each enclosing inlined call, ``"module <stack>"``
  (its name stack, relative to the enclosing call), its name, and
  ``"line <file>:<line>"`` (the call's place in the user's code, for
  equations whose own trace has none, e.g. inside a cached ``jax.jit``).
  """
  line = _user_line(eqn.source_info)
  if line is None:
    outer = [c[len("line "):] for c in context if c.startswith("line ")]
    line = outer[-1] if outer else None
  context = tuple(c for c in context if not c.startswith("line "))
  try:
    stack = str(eqn.source_info.name_stack)
  except Exception:   # pylint: disable=broad-except
    stack = ""
  outer = [c[len("module "):] for c in context if c.startswith("module ")]
  calls = [c for c in context if not c.startswith("module ")]
  path = "/".join(outer + ([stack] if stack else []))
  return errors.short_where(path or None, " > ".join(calls) or None, line)


# ---------------------------------------------------------------------------
# Walking the jaxpr
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _S:
  sid: int


@dataclasses.dataclass(frozen=True)
class _A:
  aid: int


def _sub_jaxpr(eqn):
  for k in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    j = eqn.params.get(k)
    if j is None:
      continue
    if isinstance(j, jcore.ClosedJaxpr):
      return j.jaxpr, j.consts
    if isinstance(j, jcore.Jaxpr):
      return j, ()
  return None


def _acts(ins) -> List[int]:
  return [k for k, i in enumerate(ins) if isinstance(i, _A)]


class _Builder:
  """Sorts the values of a jaxpr into static ones and activation ones."""

  def __init__(self):
    self.statics: List[program.Static] = []
    self.calls: List[Tuple[Any, Dict[str, Any], Tuple[int, ...]]] = []
    self.nodes: List[program.Node] = []
    self.shapes: Dict[int, Tuple[int, ...]] = {}
    self.producer: Dict[int, int] = {}

  # -- values --------------------------------------------------------------
  def const(self, value) -> _S:
    value = np.asarray(value)
    self.statics.append(program.Static("const", value=value, shape=value.shape))
    return _S(len(self.statics) - 1)

  def leaf(self, i: int, shape) -> _S:
    self.statics.append(program.Static("leaf", leaf=i, shape=tuple(shape)))
    return _S(len(self.statics) - 1)

  def new_act(self, shape) -> _A:
    aid = len(self.shapes)
    self.shapes[aid] = tuple(int(s) for s in shape)
    return _A(aid)

  def add_node(self, eqn, ins, outs, where, rule=None) -> None:
    refs = tuple(("a", i.aid) if isinstance(i, _A) else ("s", i.sid) for i in ins)
    node = program.Node(eqn.primitive, dict(eqn.params), refs, tuple(o.aid for o in outs),
                        where, rule=rule, order=len(self.nodes))
    self.nodes.append(node)
    for o in outs:
      self.producer[o.aid] = len(self.nodes) - 1

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
        entry = registered.lookup(eqn.params.get("name", ""))
        if entry is not None and any(isinstance(i, _A) for i in ins):
          outs = self.registered_eqn(eqn, ins, context, entry)
          for v, o in zip(eqn.outvars, outs):
            env[v] = o
          continue
        sub = _sub_jaxpr(eqn)
        if sub is not None:
          inner, inner_consts = sub
          stack = str(eqn.source_info.name_stack)
          label = eqn.params.get("name") or getattr(eqn.params.get("call_jaxpr"), "name", None)
          line = _user_line(eqn.source_info)
          ctx = context + ((f"module {stack}",) if stack else ()) + \
              ((str(label),) if label else ()) + ((f"line {line}",) if line else ())
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
          values = [np.asarray(o) for o in program.bind(eqn.primitive, list(known),
                                                        eqn.params)]
      except Exception:   # pylint: disable=broad-except
        values = None   # evaluated with the variables instead
    outs = []
    for k in range(len(eqn.outvars)):
      self.statics.append(program.Static("call", prim=eqn.primitive, params=eqn.params,
                                         ins=sids, index=k, call=call,
                                         value=None if values is None else values[k],
                                         shape=tuple(eqn.outvars[k].aval.shape)))
      outs.append(_S(len(self.statics) - 1))
    return outs

  def registered_eqn(self, eqn, ins: List[Any], context, entry) -> List[_A]:
    """A call of a registered linear map or activation: one node."""
    where = _where(eqn, context)
    acts = _acts(ins)
    activation = isinstance(entry, registered.ActivationCall)
    what = "activation" if activation else "linear map"
    if acts != [0] or len(eqn.outvars) != 1:
      raise errors.unsupported(f"the registered {what} {entry.name!r} with an input-"
                               "dependent value past its first argument, or several outputs",
                               where)
    out_aval = eqn.outvars[0].aval
    in_shape = tuple(eqn.invars[0].aval.shape)
    if out_aval.dtype != jnp.float32 or not out_aval.shape or out_aval.shape[0] != 1:
      raise errors.unsupported(f"the registered {what} {entry.name!r} (float32 output with "
                               "the batch axis first needed)", where)
    if activation:
      if tuple(out_aval.shape) != in_shape or len(ins) != 1:
        raise errors.unsupported(f"the registered activation {entry.name!r} (elementwise: "
                                 "one argument, output of the input's shape)", where)
    else:
      _check_registered_linear(eqn, entry, where)
    out = self.new_act(out_aval.shape)
    self.add_node(eqn, ins, [out], where, rule=entry)
    return [out]

  def act_eqn(self, eqn, ins: List[Any], context) -> List[_A]:
    name = eqn.primitive.name
    where = _where(eqn, context)
    prim = registry.linear_primitive(name)
    act = registry.activation_primitive(name)
    if prim is None and act is None:
      raise errors.unsupported(f"the operation {name!r}", where)
    for v in eqn.outvars:
      dtype = getattr(v.aval, "dtype", None)
      if dtype != jnp.float32 and not (act is not None and act[1]):
        raise errors.unsupported(f"a value of dtype {dtype} computed from the input by "
                                 f"{name}", where)
    bad = (prim.check(name, eqn.params, _acts(ins)) if prim is not None
           else act[0](eqn, _acts(ins)) if act[0] is not None else None)
    if bad:
      raise errors.unsupported(bad, where)
    outs = []
    for v in eqn.outvars:
      shape = tuple(v.aval.shape)
      if not shape or shape[0] != 1:
        raise errors.unsupported(f"{name} (which moves or reduces the batch axis: output "
                                 f"shape {shape} for a batch of one)", where)
      outs.append(self.new_act(shape))
    self.add_node(eqn, ins, outs, where)
    return outs


def _check_registered_linear(eqn, entry, where):
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
    raise errors.unsupported(f"the registered linear map {entry.name!r}, which is not linear "
                             "in its first argument (jax.linear_transpose fails)",
                             where) from None


# ---------------------------------------------------------------------------
# Plans (cached per model and shapes) and graphs (per call)
# ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Plan:
  statics: List[program.Static]
  calls: List[Tuple[Any, Dict[str, Any], Tuple[int, ...]]]
  skeleton: patterns.Skeleton
  needed: Tuple[int, ...]          # static ids to evaluate, in order


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
        f"tracing {frontends.describe(model)} on an input of shape {tuple(in_shape)} failed "
        f"({type(e).__name__}: {errors.shorten(first, 70)}); lipjax calls "
        "model.apply(variables, x) with the variables given") from e
  b = _Builder()
  args = [b.leaf(i, a.shape) for i, a in enumerate(jax.tree_util.tree_leaves(abstract_vars))]
  x_act = b.new_act((1,) + tuple(in_shape))
  outs = b.walk(closed.jaxpr, closed.consts, args + [x_act], ())
  described = frontends.describe(model)
  if len(outs) != 1:
    raise errors.model_error(f"{described} returns {len(outs)} arrays; lipjax bounds need "
                             "a single (batch, num_classes) array of logits")
  (out,) = outs
  if not isinstance(out, _A):
    raise errors.model_error(f"the output of {described} does not depend on its input")
  if len(b.shapes[out.aid]) != 2:
    raise errors.model_error(f"the model must output (batch, num_classes), got per-example "
                             f"shape {b.shapes[out.aid][1:]}")
  ctx = patterns.Context(b.nodes, b.shapes, b.producer, b.statics, out.aid, x_act.aid)
  skeleton = patterns.build_skeleton(ctx)
  return _Plan(b.statics, b.calls, skeleton, patterns.needed_statics(skeleton, b.statics))


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
        done_calls[st.call] = program.bind(prim, [vals[i] for i in ins], params)
      vals[sid] = done_calls[st.call][st.index]
  return vals


_PLANS: "collections.OrderedDict[Any, _Plan]" = collections.OrderedDict()
_PLANS_LOCK = threading.Lock()


def _plan_for(model, variables, in_shape) -> _Plan:
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  k = (model, treedef, tuple((tuple(np.shape(a)), str(jnp.result_type(a))) for a in leaves),
       tuple(in_shape))
  with _PLANS_LOCK:
    plan = _PLANS.get(k)
    if plan is not None:
      _PLANS.move_to_end(k)
      return plan
  plan = _build_plan(model, variables, in_shape)
  with _PLANS_LOCK:
    _PLANS[k] = plan
    while len(_PLANS) > 64:
      _PLANS.popitem(last=False)
  return plan


def _traced(model, variables, in_shape) -> Graph:
  plan = _plan_for(model, variables, tuple(in_shape))
  vals = _evaluate_statics(plan, jax.tree_util.tree_leaves(variables))
  get = vals.get
  counter = [0]

  def activation(act, in_shape_):
    if act is None:
      return None, None
    if act == "identity":
      return Identity(), {}
    return act.build(get, in_shape_)

  def build(items):
    out = []
    for spec in items:
      if isinstance(spec, patterns.BlockSpec):
        paths = tuple(tuple(build(p)) for p in spec.paths)
        act, act_params = activation(spec.activation, spec.shape)
        out.append(Block(paths, spec.combine, act, act_params, spec.shape, spec.name))
        continue
      prog = spec.program
      rule, params, reshapes = spec.segment.build(get)
      act, act_params = activation(spec.activation, prog.out_shape)
      out.append(Stage(index=counter[0], name=spec.name, layer=rule, params=params,
                       reshapes=tuple(reshapes), in_shape=prog.in_shape,
                       out_shape=prog.out_shape, activation=act, act_params=act_params))
      counter[0] += 1
    return out

  return Graph(build(plan.skeleton.items))


def trace(model, variables, in_shape: Tuple[int, ...], dtype=None) -> Graph:
  """Reads a model into its graph.

  Args:
    model: a ``lipjax.nn.Sequential``, a Flax linen or NNX module (or its
      adapter), any object with ``apply(variables, x)``, or a function
      ``fn(variables, x) -> logits``.
    variables: the variables passed to ``apply`` (any pytree of arrays; may
      be tracers: the stages' parameters are computed from them).
    in_shape: shape of one input example.
    dtype: a ``Sequential``'s working precision (its parameters are cast to
      it; default :func:`working_dtype` of ``variables``).

  Returns:
    A :class:`~lipjax._src.graph.Graph`.

  Raises:
    UnsupportedModelError: one line naming the first operation without a
      sound rule, where it sits (module path, source line) and what is
      supported; or a model that is not a chain of stages and blocks ending
      in a linear layer.
    ValueError: for a ``Sequential`` layer whose output is empty, naming the
      layer and the shapes.
  """
  model = frontends.as_model(model)
  if _layer_by_layer(model):
    return _sequential(frontends.unwrap(model), variables, in_shape, dtype)
  return _traced(model, variables, in_shape)


def _layer_by_layer(model) -> bool:
  """A ``lipjax.nn.Sequential`` without residual blocks (read layer by layer)."""
  m = frontends.unwrap(model)
  return isinstance(m, lnn.Sequential) and not any(
      isinstance(layer, lnn.Residual) for layer in m.layers)


_SHAPE_ONLY = ("broadcast_in_dim", "reshape", "convert_element_type", "squeeze", "copy",
               "copy_p")


def _source_leaf(statics: List[program.Static], sid: int) -> Optional[int]:
  """The variable leaf a static value is, up to broadcasts and reshapes."""
  while True:
    st = statics[sid]
    if st.kind == "leaf":
      return st.leaf
    if st.kind != "call" or st.value is not None or st.prim.name not in _SHAPE_ONLY:
      return None
    sid = st.ins[0]


def threshold_leaves(model, variables, in_shape: Tuple[int, ...]) -> List[int]:
  """Variable leaves that are learnable thresholds to keep ``>= 0``.

  For a traced model (not a ``lipjax.nn.Sequential`` of layers): the
  indices, in ``jax.tree_util.tree_leaves(variables)`` order, of the leaves
  that are (up to broadcasting and reshaping) the upper bound of a clipped
  ReLU ``min(max(z, 0), theta)``, wherever it sits (blocks included).
  """
  model = frontends.as_model(model)
  if _layer_by_layer(model):
    return []
  plan = _plan_for(model, variables, tuple(in_shape))
  out = set()
  for act in plan.skeleton.activations():
    out.update(l for l in (_source_leaf(plan.statics, s) for s in act.thresholds)
               if l is not None)
  return sorted(out)


def check_model(model) -> None:
  """Raises ``TypeError`` unless ``model`` is something :func:`trace` can read."""
  frontends.as_model(model)

