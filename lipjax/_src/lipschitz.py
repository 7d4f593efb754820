"""Local and global Lipschitz bounds of a lipjax network's logits.

``local_lipschitz_bound`` composes the pieces of the method: interval
bounds over the ball, activation-status masks, and per-layer norms of the
masked weights ``||D_l W_l D_{l-1}||``. Two modes:

``mode="sound"`` (default)
  Every per-layer norm is an upper bound:

  * dense layers (explicit matrix): deterministic, the exact norm of the
    masked matrix in float64 (:func:`lipjax._src.norms.masked_dense_norm`);
  * other layers (convolutions, user layers): Lanczos from a Gaussian start
    with the Kuczynski-Wozniakowski failure bound, so the norm holds with
    probability ``>= 1 - delta_l`` over the start vector;
  * every local norm is also capped by the layer's exact global norm.

  The intermediate ball radii use these sound local norms (a tightening the
  reference lacks). The union bound gives ``result.failure_probability``: the
  probability (over the start vectors, for this example) that ``bound`` is
  not an upper bound. It is 0 for networks of dense layers only.

``mode="estimate"``
  For training: a few power iterations per layer (warm-startable, gradients
  through the final application or through every iteration). Each norm is an
  *estimate* from below, so ``bound`` is **not** guaranteed. The intermediate
  radii (and so the masks) use exact global norms, or, when ``global_state``
  is given, running power-method estimates of the global norms: a few
  iterations per call from the previous call's global vectors, which converge
  over calls and cost a single-example operator application each (no SVD or
  FFT per call). The per-example iteration then starts from the running
  global vector times the column mask unless ``state`` is given.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from lipjax._src import frontends, interpret, norms, per_example, power, rounding
from lipjax._src.options import check_choice
from lipjax._src import trace as trace_lib
from lipjax._src.graph import Stage

Array = jax.Array

#: The modes of :func:`local_lipschitz_bound` and the two bounds.
MODES = ("sound", "estimate", "lower")
BOUNDS = ("local", "global")
#: The per-layer methods of estimate mode.
ESTIMATORS = ("power", "lanczos")

_GENERIC_EXPLICIT_LIMIT = 2 ** 24   # entries of an explicit generic Jacobian
_GENERIC_GLOBAL_STEPS = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PowerState:
  """Power-method vectors, one ``(B, *in_shape)`` array per linear layer."""

  vectors: Tuple[Array, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LocalBound:
  """Result of :func:`local_lipschitz_bound` for a batch of ``B`` examples.

  Attributes:
    bound: ``(B,)`` bound on the l2 Lipschitz constant of the logits over
      ``B(x_b, eps_b)``: the product of ``layer_norms``, with ``1 + (product
      over the branch)`` for each residual block
      (:meth:`lipjax._src.graph.Graph.product`). An upper bound in
      ``"sound"`` mode (see ``failure_probability``), an estimate otherwise.
    layer_norms: per linear layer, ``(B,)`` local norms
      ``||D_l W_l D_{l-1}||`` (the last layer column-masked only).
    global_norms: per linear layer, a scalar sound bound on ``||W_l||``.
    estimate: ``(B,)`` product of the per-layer estimates from below (the
      Lanczos / power Ritz values); ``estimate <= bound``.
    failure_probability: ``(B,)`` probability over the random start vectors
      that ``bound`` fails to be an upper bound (sound mode; 1 in estimate
      mode, meaning "no guarantee").
    logits: ``(B, C)`` logits at ``x``.
    layers: per linear layer, the :class:`~lipjax.bounds.LayerBounds`
      (boxes, centres and the row/column masks).
    state: :class:`PowerState` to warm-start the next estimate-mode call.
    global_state: estimate mode with ``global_state``: the updated running
      global vectors, one ``(1, *in_shape)`` array per linear layer (else None).
  """

  bound: Array
  layer_norms: Tuple[Array, ...]
  global_norms: Tuple[Array, ...]
  estimate: Array
  failure_probability: Array
  logits: Array
  layers: Tuple[interpret.LayerBounds, ...]
  state: PowerState
  global_state: Optional[PowerState] = None

  @property
  def masks(self) -> Tuple[Tuple[Array, Array], ...]:
    """Per hidden layer, ``(row_mask, col_mask)`` (1 = varying)."""
    return tuple((lb.row_mask, lb.col_mask) for lb in self.layers[:-1])


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def _concrete(a) -> bool:
  return not isinstance(a, jax.core.Tracer)


def resolve_input_shape(model, input_shape=None):
  shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
  if shape is None:
    raise ValueError("the input shape is unknown: pass input_shape=(H, W, C) or "
                     "(features,), or build the model with Sequential(input_shape=...)")
  return tuple(int(s) for s in shape)


def check_inputs(model, x, eps, variables=None) -> Tuple[Array, Array]:
  """Validates ``x`` and ``eps``; returns ``(x, eps)`` with ``eps`` of shape ``(B,)``.

  Both come back in the working precision (:func:`lipjax.bounds.working_dtype`
  of ``variables`` and ``x``): float32, or float64 when ``x`` or a parameter
  is float64 (under ``jax.enable_x64``). ``x`` is never rounded to a
  narrower type than it has.
  """
  trace_lib.check_model(model)
  if _concrete(x):
    x_host = np.asarray(x)
    if x_host.dtype.kind == "f" and not np.all(np.isfinite(x_host)):
      raise ValueError("x contains NaN or inf")
  if _concrete(eps):
    e_host = np.asarray(eps, dtype=np.float64)
    if not np.all(np.isfinite(e_host)):
      raise ValueError("eps must be finite")
    if np.any(e_host < 0):
      raise ValueError(f"eps must be >= 0, got min {float(np.min(e_host))}")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
  expected = getattr(model, "input_shape", None)
  if x.ndim < 2:
    raise ValueError(f"x must have shape (batch, *input_shape), got {x.shape}")
  if expected is not None and tuple(x.shape[1:]) != tuple(expected):
    raise ValueError(f"x has per-example shape {tuple(x.shape[1:])}, but the model "
                     f"expects {tuple(expected)}")
  if x.shape[0] == 0:
    raise ValueError("x is an empty batch")
  dtype = trace_lib.working_dtype(variables, x.dtype)
  eps = jnp.asarray(eps, dtype=dtype)
  if eps.ndim == 0:
    eps = jnp.broadcast_to(eps, (x.shape[0],))
  if eps.shape != (x.shape[0],):
    raise ValueError(f"eps must be a scalar or have shape ({x.shape[0]},), got {eps.shape}")
  return x.astype(dtype), eps


# ---------------------------------------------------------------------------
# Per-layer norms
# ---------------------------------------------------------------------------


def _size(shape) -> int:
  return int(math.prod(shape))


def needs_probabilistic_global(stage: Stage) -> bool:
  """Whether the stage's global norm is a Lanczos bound (not deterministic).

  True only for a layer without its own ``global_norm`` whose explicit
  Jacobian would have more than ``2^24`` entries (every built-in layer has
  an exact or deterministic rule).
  """
  if stage.layer.deterministic_global:
    return False   # the rule supplies its own (deterministic) global norm
  return _size(stage.in_shape) * _size(stage.out_shape) > _GENERIC_EXPLICIT_LIMIT


def _lanczos(*args, **kwargs):
  """:func:`lipjax._src.power.lanczos_norm_bound` with full-precision matrix products.

  Its failure bound is for exact arithmetic, with ``ROUNDING_SLACK`` covering
  float32 rounding; accelerators' default reduced-precision products
  (bfloat16 passes, TensorFloat-32) are not covered, so they are turned off
  here (a no-op on the CPU).
  """
  with jax.default_matmul_precision("float32"):
    return power.lanczos_norm_bound(*args, **kwargs)


def _global_norm(stage: Stage, key, delta, lower: bool = False) -> Array:
  """A bound on ``||W||`` (deterministic for built-in layers).

  With ``lower``, a layer without a deterministic rule gets the Lanczos
  estimate from below instead of the probabilistic upper bound (for
  ``mode="lower"``, whose every quantity must stay below the sound one's).
  """
  g = stage.layer.global_norm(stage.params, stage.layer_in_shape)
  if g is not None:
    return jnp.asarray(g, jnp.promote_types(jnp.asarray(g).dtype, stage.dtype))
  if not needs_probabilistic_global(stage):
    with jax.default_matmul_precision("float32"):   # exact weights on accelerators too
      mat = norms.explicit_jacobian(stage.linear, stage.in_shape, stage.dtype)
    return norms.top_singular_value(mat[None])
  shape = (1,) + stage.in_shape
  upper, est = _lanczos(stage.linear, key, shape, jnp.ones(shape, stage.dtype),
                        _GENERIC_GLOBAL_STEPS, delta)
  return est[0] if lower else upper[0]


def probabilistic_count(stages, mode: str, dense: str) -> int:
  """How many probabilistic computations a bound of ``mode`` makes: the
  probabilistic global norms (generic layers too large for an explicit
  Jacobian) and, in ``"sound"`` mode, the layers whose local norm uses
  Lanczos. ``mode="global"`` counts the global norms only (as
  :func:`global_lipschitz_bound` does)."""
  n_prob = sum(needs_probabilistic_global(st) for st in stages)
  if mode == "sound":
    n_prob += sum(_uses_lanczos(st, dense) for st in stages)
  return n_prob


def failure_share(stages, mode: str, dense: str, failure_probability: float) -> float:
  """Failure probability of each probabilistic computation of a bound:
  ``failure_probability`` split evenly over :func:`probabilistic_count`."""
  return failure_probability / max(probabilistic_count(stages, mode, dense), 1)


def _global_norms(stages, keys, delta, differentiable=True, lower=False):
  """Per-stage global norms (the SVDs run on the host, see ``norms.top_singular_value``)."""
  out = []
  for st, k in zip(stages, keys):
    params = st.params if differentiable else jax.lax.stop_gradient(st.params)
    out.append(_global_norm(dataclasses.replace(st, params=params), k, delta, lower))
  return out


def check_global_state(stages, global_state: PowerState, batch: Optional[int] = None,
                       what: str = "global power state") -> None:
  """Raises ``ValueError`` unless ``global_state`` has one ``(1, *in_shape)`` per stage.

  With ``batch``, ``(batch, *in_shape)`` vectors are accepted too.
  """
  vecs = getattr(global_state, "vectors", None)
  if vecs is None or len(vecs) != len(stages):
    raise ValueError(f"{what} must be a PowerState with {len(stages)} "
                     f"vectors (one per linear layer), got {type(global_state).__name__}")
  lead = (1,) if batch is None or batch == 1 else (1, batch)
  for st, v in zip(stages, vecs):
    if tuple(v.shape) not in [(n,) + tuple(st.in_shape) for n in lead]:
      expected = " or ".join(str((n,) + tuple(st.in_shape)) for n in lead)
      raise ValueError(f"{what} vector of {st.name} has shape "
                       f"{tuple(v.shape)}, expected {expected}")


def global_power(stages, vectors, iterations: int, *, loop: bool = False,
                 differentiable: bool = False, estimator: str = "power"):
  """Power iterations on every stage's global map ``W_l`` from ``vectors``.

  ``iterations`` iterations per stage with the parameters frozen (the
  adjoint ``Stage.adjoint``: the rule's explicit one where it has one),
  then ``||W_l u_l||``: estimates from below, for training and for
  start vectors (never for a bound).

  Args:
    stages: the graph of :func:`lipjax._src.trace.trace`.
    vectors: one ``(1, *in_shape)`` start vector per stage.
    iterations: power iterations (or Lanczos steps) per stage (``>= 0``).
    loop: run power iterations in a ``fori_loop`` (many iterations) instead
      of unrolled.
    differentiable: gradients flow into the parameters through the final
      application (GloRo-style); otherwise the norms are constants.
    estimator: ``"power"`` (``iterations`` power iterations) or
      ``"lanczos"`` (``iterations`` Lanczos steps, the new vector the top
      Ritz vector: much closer for layers whose top singular values are
      clustered, as a convolution's are).

  Returns:
    ``(norms, state)``: a list of scalars and the :class:`PowerState` of the
    final unit vectors (no gradient).
  """
  out, vecs = [], []
  for st, u in zip(stages, vectors):
    frozen = dataclasses.replace(st, params=jax.lax.stop_gradient(st.params))
    if estimator == "lanczos":
      u = power.lanczos_ritz_vector(frozen.linear, frozen.adjoint, jax.lax.stop_gradient(u),
                                    int(iterations))
      sigma = power.norm_at(frozen.linear, u)
    else:
      sigma, u = power.power_iteration(frozen.linear, jax.lax.stop_gradient(u),
                                       int(iterations), adjoint_op=frozen.adjoint, loop=loop)
    if differentiable:
      sigma = power.norm_at(st.linear, u)
    out.append(sigma[0])
    vecs.append(u)
  return out, PowerState(tuple(vecs))


def global_vectors(stages, key, iterations: int, dtype=None) -> PowerState:
  """Estimates of every stage's top right singular vector: :func:`global_power`
  (``iterations`` in a loop) from Gaussian starts (``key`` split per stage;
  ``dtype`` default each stage's working precision)."""
  keys = jax.random.split(key, len(stages))
  starts = [jax.random.normal(k, (1,) + tuple(st.in_shape), dtype or st.dtype)
            for st, k in zip(stages, keys)]
  return global_power(stages, starts, iterations, loop=True)[1]


def running_global_norms(stages, global_state: PowerState, iterations: int,
                         differentiable: bool = False, estimator: str = "power"):
  """Power-method estimates of every ``||W_l||`` from running global vectors.

  :func:`global_power` (unrolled) from ``global_state``: one single-example
  forward and transpose per iteration and layer. Repeated calls with the
  returned state converge to the top singular values. ``estimator``:
  ``"power"`` or ``"lanczos"`` (see :func:`global_power`).

  Returns:
    ``(norms, new_state)``: a list of scalars and the updated
    :class:`PowerState` (unit vectors, no gradient).
  """
  check_global_state(stages, global_state)
  return global_power(stages, global_state.vectors, iterations,
                      differentiable=differentiable, estimator=estimator)


def row_norm_bounds(stage: Stage, gnorm: Array) -> Array:
  """Upper bounds on the row norms of the stage's map (shape ``out_shape``):
  the layer's own rule, else the global norm ``gnorm`` for every row."""
  rn = stage.layer.row_norms(stage.params, stage.layer_in_shape)
  if rn is None:
    return jnp.broadcast_to(gnorm, stage.out_shape)
  return jnp.reshape(rn, stage.out_shape)


def ball_bounds(stages, x: Array, eps: Array, gnorms, with_joins: bool = False):
  """Boxes and forward-pass rounding bounds over ``B(x, eps)`` with global norms.

  :func:`lipjax._src.interpret.propagate` with ``r <- r ||W_l||`` (no local
  norms): what the global certificate needs to bound the float32 rounding of
  the forward pass over the ball. ``gnorms`` are upper bounds on ``||W_l||``.
  Returns the list of per-stage :class:`~lipjax._src.interpret.LayerBounds`,
  and with ``with_joins`` also the blocks' :class:`~lipjax._src.interpret.JoinBounds`.
  """
  rnorms = [row_norm_bounds(st, g) for st, g in zip(stages, gnorms)]
  layers, _, joins = interpret.propagate(stages, x, eps, rnorms,
                                         lambda l, lb, col: gnorms[l],
                                         error_norms=list(gnorms))
  return (layers, joins) if with_joins else layers


def _nonzero_start(q0: Array, col: Array) -> Array:
  """``q0``, or the mask ``col`` itself for an example whose ``q0`` is zero."""
  return jnp.where(per_example.expand(per_example.l2_norm(q0) > 0, q0), q0, col)


def _masked_op(stage: Stage, row: Array, col: Array):
  return lambda u: row * stage.linear(col * u)


def _masked_op_for_adjoint(stage: Stage, row: Array, col: Array):
  return lambda u: row * stage.linear_for_adjoint(col * u)


def _masked_adjoint(stage: Stage, row: Array, col: Array):
  """The exact transpose of :func:`_masked_op`: ``v -> D_c W^T (D_r v)``."""
  return lambda v: col * stage.adjoint(row * v)


def _uses_lanczos(stage: Stage, dense: str) -> bool:
  return not (dense == "exact" and stage.layer.explicit_matrix(stage.params) is not None)


def _sound_local_norm(stage, row, col, gnorm, key, delta, steps, dense, lower=False,
                      start=None):
  """``(upper bound, estimate from below)`` of ``||D_r W D_c||`` per example.

  With ``lower`` both entries are the estimate from below (Lanczos Ritz
  value, dense layers included), from ``start * D_c`` when ``start`` (a
  ``(1 or B, *in_shape)`` array) is given (``D_c`` itself where that is
  zero), else from a Gaussian start. The sound bound always starts from a
  Gaussian.
  """
  b = col.shape[0]
  row, col = row.astype(stage.dtype), col.astype(stage.dtype)
  mat = stage.layer.explicit_matrix(stage.params)
  if lower:
    op, opt = _masked_op(stage, row, col), _masked_adjoint(stage, row, col)
    if start is None:
      _, est = _lanczos(op, key, col.shape, col, steps, delta, transpose=opt)
    else:
      q0 = col * jnp.broadcast_to(start.astype(col.dtype), col.shape)
      q0 = _nonzero_start(q0, col)   # any start will do
      with jax.default_matmul_precision("float32"):
        est = power.lanczos_estimate(op, opt, q0, steps)
    est = jnp.minimum(est, gnorm)
    return est, est
  if dense == "exact" and mat is not None:
    r = row.reshape(b, -1)
    c = stage.layer_input(col).reshape(b, -1)
    s = norms.masked_dense_norm(mat, r, c)
    return jnp.minimum(s, gnorm), s / (1.0 + norms.ROUNDING_SLACK)
  # (A cap above some examples' own only delays their stop: still sound.)
  cap = jnp.max(jax.lax.stop_gradient(gnorm))
  # Examples whose masks equal the batch's elementwise maximum (e.g. masks
  # that keep every row and column) all have that one operator: a single
  # Lanczos run on it (an extra example, with its own start) bounds each of
  # them, and their own runs are skipped. Steps stop once no example's bound
  # can come below the global norm.
  ref_row = jnp.max(row, axis=0, keepdims=True)
  ref_col = jnp.max(col, axis=0, keepdims=True)
  shared_masks = (jnp.all((row == ref_row).reshape(b, -1), axis=1)
                  & jnp.all((col == ref_col).reshape(b, -1), axis=1))
  row_x = jnp.concatenate([row, ref_row])
  col_x = jnp.concatenate([col, ref_col])
  upper, est = _lanczos(
      _masked_op(stage, row_x, col_x), key, col_x.shape, col_x, steps, delta,
      rank_bound=jnp.sum(row_x.reshape(b + 1, -1), axis=1),
      transpose=_masked_adjoint(stage, row_x, col_x), cap=cap, shared=shared_masks)
  return jnp.minimum(upper[:b], gnorm), jnp.minimum(est[:b], gnorm)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def _check_options(mode, iterations, lanczos_steps, failure_probability, grad,
                   intermediate, dense, global_state, global_iterations,
                   rounding=True, estimator="power", radius_grad=False) -> str:
  """Raises (one line) for bad options; returns the resolved ``intermediate``."""
  check_choice("mode", mode, MODES)
  check_choice("grad", grad, ("constant", "through"))
  check_choice("dense", dense, ("exact", "lanczos"))
  if intermediate is None:
    intermediate = ("global" if mode == "estimate" and estimator == "power" else "local")
  check_choice("intermediate", intermediate, ("local", "global"))
  check_choice("estimator", estimator, ESTIMATORS)
  if estimator == "lanczos" and grad == "through":
    raise ValueError("estimator='lanczos' differentiates the final application only "
                     "(grad='constant')")
  if (mode == "estimate" and estimator == "lanczos" and global_state is not None
      and intermediate == "global"):
    raise ValueError("estimator='lanczos' with running vectors (global_state) follows "
                     "the masked maps, not the global ones: use intermediate='local'")
  if not 0 < failure_probability < 1:
    raise ValueError(f"failure_probability must be in (0, 1), got {failure_probability}")
  if iterations < 0 or global_iterations < 0:
    raise ValueError("iterations and global_iterations must be >= 0")
  if lanczos_steps < (1 if mode == "lower" else 2):
    raise ValueError(f"lanczos_steps must be >= 2 (>= 1 in lower mode), got {lanczos_steps}")
  if global_state is not None and mode != "estimate":
    raise ValueError("global_state is for mode='estimate' (sound mode uses exact "
                     "global norms)")
  if not isinstance(radius_grad, bool):
    raise ValueError(f"radius_grad must be True or False, got {radius_grad!r}")
  if radius_grad and mode != "estimate":
    raise ValueError("radius_grad is for mode='estimate' (training estimates)")
  if radius_grad and intermediate == "global" and global_state is None:
    raise ValueError("radius_grad with intermediate='global' differentiates the running "
                     "global norms: pass global_state")
  if not rounding and mode != "lower":
    raise ValueError("rounding=False is for mode='lower' (sound bounds always bound "
                     "the float32 rounding; estimates never do)")
  return intermediate


def check_local_options(**options) -> None:
  """Raises (one line) for options :func:`local_lipschitz_bound` would reject.

  Cheap (nothing is computed), so a caller can fail before expensive work.
  """
  try:
    args = inspect.signature(local_lipschitz_bound).bind(None, None, None, None, **options)
  except TypeError as e:
    raise TypeError(f"bad option for local_lipschitz_bound: {e}") from None
  args.apply_defaults()
  a = args.arguments
  _check_options(a["mode"], a["iterations"], a["lanczos_steps"], a["failure_probability"],
                 a["grad"], a["intermediate"], a["dense"], a["global_state"],
                 a["global_iterations"], a["rounding"], a["estimator"])


def local_lipschitz_bound(model, variables, x, eps, *,
                          mode: str = "sound",
                          iterations: int = 5,
                          lanczos_steps: int = 100,
                          failure_probability: float = 1e-9,
                          state: Optional[PowerState] = None,
                          key: Optional[Array] = None,
                          grad: str = "constant",
                          intermediate: Optional[str] = None,
                          dense: str = "exact",
                          global_state: Optional[PowerState] = None,
                          global_iterations: int = 2,
                          global_norms: Optional[Sequence[Array]] = None,
                          rounding: bool = True,
                          estimator: str = "power",
                          batch_axis: Optional[str] = None,
                          radius_grad: bool = False) -> LocalBound:
  """Local Lipschitz bound of ``model``'s logits on ``B(x_b, eps_b)``.

  Args:
    model: a :class:`lipjax.nn.Sequential` (e.g. from :func:`lipjax.models.get`),
      any other Flax module or a function ``fn(variables, x) -> logits``, read
      by tracing (:mod:`lipjax._src.trace`).
    variables: its variables, ``{"params": ...}``.
    x: ``(B, *input_shape)`` float inputs.
    eps: scalar or ``(B,)`` l2 radii, ``>= 0``.
    mode: ``"sound"`` (upper bounds, the default), ``"estimate"`` (training)
      or ``"lower"``: the sound computation with the same ``intermediate``
      choice and every per-layer upper bound replaced by an estimate from
      below (``lanczos_steps`` Lanczos steps for every local norm, dense
      layers included; the Lanczos estimate for a global norm without a
      deterministic rule; exact global norms are the same in both modes).
      Smaller norms give smaller intermediate radii, hence boxes inside the
      sound boxes, masks inside the sound masks and norms below the sound
      ones, so this ``bound`` is below the sound one (up to rounding) and the
      margins computed from it are above the sound margins: a cheap test
      that a point cannot be certified.
    iterations: power iterations per layer in estimate mode.
    lanczos_steps: Lanczos steps per non-dense layer in sound mode; more steps
      give a smaller relative slack for the same ``failure_probability``.
    failure_probability: sound mode: total probability, per example, that the
      bound fails, split evenly over the layers that use Lanczos.
    state: estimate mode: :class:`PowerState` from a previous call to warm
      start (shapes must match ``x``'s batch). Lower mode: start vectors of
      the Lanczos runs, one ``(1 or B, *in_shape)`` array per linear layer
      (e.g. :func:`global_top_vectors`), each times the example's column
      mask; any start gives an estimate from below. Not used in sound mode,
      whose guarantee needs Gaussian starts.
    key: PRNG key for random start vectors (defaults to ``PRNGKey(0)``; the
      guarantee needs only that it is chosen independently of the model).
    grad: estimate mode: ``"constant"`` (final vectors treated as constants)
      or ``"through"`` (back-propagate through every iteration).
    intermediate: norms used for the intermediate ball radii: ``"local"``
      (the local norms of the mode: sound upper bounds in sound mode, the
      estimates in the other modes; default in sound and lower mode) or
      ``"global"`` (the global norms, as in the paper; default in estimate
      mode). Estimate mode with ``"local"`` builds its masks the way the
      sound bound does (from estimates, so they carry no guarantee).
    dense: sound mode: ``"exact"`` (deterministic float64 eigensolver on the
      host, through ``pure_callback``: not differentiable) or ``"lanczos"``
      (probabilistic, like convolutions) for dense layers.
    global_state: estimate mode: running global vectors (:class:`PowerState`
      with one ``(1, *in_shape)`` array per linear layer). When given, the
      intermediate radii use ``global_iterations`` warm-started power
      iterations on the global maps instead of exact global norms, and the
      per-example iteration starts from the updated global vector times the
      column mask (unless ``state`` is given). The result's ``global_state``
      carries the updated vectors.
    global_iterations: power iterations per call on the global maps.
    global_norms: per linear layer, the global norms of *these* ``variables``
      from :func:`layer_global_norms` (same ``mode``, ``dense``,
      ``failure_probability`` and input shape), to skip recomputing them when
      the same parameters are bounded batch after batch. They are used as
      given (no gradient flows through them); norms of other parameters void
      the guarantee. Not with ``global_state``.
    estimator: estimate mode, per-layer method: ``"power"`` (``iterations``
      power iterations) or ``"lanczos"`` (``iterations`` Lanczos steps from
      the same start, then the Rayleigh quotient of the top Ritz vector:
      the same number of operator applications, a closer estimate).
    rounding: lower mode only: False leaves out the float32 rounding bounds
      (the boxes are not widened, so they stay inside the sound boxes, and
      the estimates from below stay below; the error fields of ``layers``
      are NaN). About a third cheaper. Sound mode always bounds rounding.
    batch_axis: estimate mode with ``estimator="lanczos"`` and
      ``global_state``, called inside ``jax.pmap`` (or ``shard_map``) whose
      mapped axis ``batch_axis`` splits the batch: the union of masks the
      running vectors follow is taken over the whole batch (``lax.pmax`` over
      that axis), so the result is that of the unsplit batch. Not needed
      under ``jax.jit`` with a sharded batch.
    radius_grad: estimate mode: gradients flow through the norms that set the
      intermediate ball radii (the per-example estimates with
      ``intermediate="local"``, the running global estimates, which then
      need ``global_state``, with ``"global"``), so the boxes, and whatever
      a loss computes from them, reward smaller radii. Default: those norms
      are constants (the masks are discrete either way).

  Returns:
    A :class:`LocalBound`; ``.bound`` has shape ``(B,)``.
  """
  intermediate = _check_options(mode, iterations, lanczos_steps, failure_probability, grad,
                                intermediate, dense, global_state, global_iterations, rounding,
                                estimator, radius_grad)
  if batch_axis is not None and (not isinstance(batch_axis, str) or not batch_axis):
    raise ValueError(f"batch_axis must be None or a mapped axis' name, got {batch_axis!r}")
  model, variables = frontends.resolve(model, variables)
  x, eps = check_inputs(model, x, eps, variables)
  model = frontends.keyed(model, variables, x.shape[1:])   # caches by traced structure
  stages = trace_lib.trace(model, variables, tuple(x.shape[1:]), x.dtype)   # validates the model early
  if global_norms is not None:
    if global_state is not None:
      raise ValueError("pass global_norms or global_state, not both")
    global_norms = check_global_norms(stages, global_norms)
  key = jax.random.PRNGKey(0) if key is None else key
  opts = (("mode", mode), ("iterations", int(iterations)),
          ("lanczos_steps", int(lanczos_steps)),
          ("failure_probability", float(failure_probability)), ("grad", grad),
          ("intermediate", intermediate), ("dense", dense),
          ("global_iterations", int(global_iterations)), ("rounding", bool(rounding)),
          ("estimator", estimator), ("batch_axis", batch_axis),
          ("radius_grad", radius_grad))
  return compiled_local(model, opts)(variables, x, eps, key, state, global_state,
                                      global_norms)


def check_global_norms(stages, global_norms) -> Tuple[Array, ...]:
  """Checks that ``global_norms`` has one scalar per stage; returns them in the stages' precision."""
  try:
    norms_ = tuple(global_norms)
  except TypeError:
    raise TypeError("global_norms must be a sequence of scalars, one per linear layer, "
                    f"got {type(global_norms).__name__}") from None
  if len(norms_) != len(stages) or any(jnp.ndim(g) != 0 for g in norms_):
    raise ValueError(f"global_norms must hold {len(stages)} scalars (one per linear "
                     f"layer), got {len(norms_)} values of shapes "
                     f"{[tuple(jnp.shape(g)) for g in norms_]}")
  return tuple(jnp.asarray(g, st.dtype) for g, st in zip(norms_, stages))


@functools.lru_cache(maxsize=64)
def compiled_local(model, opts):
  return jax.jit(functools.partial(_local_core, model, **dict(opts)))


def _lower_starts(stages, state, batch: int) -> list:
  """Per stage, the Lanczos start of ``mode="lower"``: ``state``'s vector or None."""
  if state is None:
    return [None] * len(stages)
  check_global_state(stages, state, batch=batch, what="state")
  return [jax.lax.stop_gradient(v) for v in state.vectors]


def global_top_vectors(model, variables, *, input_shape=None, key=None,
                       iterations: int = 50) -> PowerState:
  """Estimates of every linear layer's top right singular vector.

  ``iterations`` power iterations on each layer's global map ``W_l`` from a
  Gaussian start (``key``). They depend on the parameters only: compute them
  once and pass them as ``local_lipschitz_bound(..., mode="lower",
  state=...)``, whose Lanczos runs then start from them (times each
  example's column mask) and need far fewer steps for a close estimate from
  below. They never enter a sound bound.

  Returns:
    A :class:`PowerState` with one ``(1, *in_shape)`` unit vector per linear
    layer.
  """
  if iterations < 1:
    raise ValueError(f"iterations must be >= 1, got {iterations}")
  model, variables = frontends.resolve(model, variables)
  shape = resolve_input_shape(model, input_shape)
  model = frontends.keyed(model, variables, shape)
  trace_lib.trace(model, variables, shape)   # validates the model early
  key = jax.random.PRNGKey(0) if key is None else key
  return _compiled_top(model, shape, int(iterations))(variables, key)


@functools.lru_cache(maxsize=64)
def _compiled_top(model, shape, iterations):
  return jax.jit(functools.partial(_top_core, model, shape, iterations))


def _top_core(model, shape, iterations, variables, key):
  return global_vectors(trace_lib.trace(model, variables, shape), key, iterations)


def _local_core(model, variables, x, eps, key, state, global_state=None, global_norms=None,
                *, mode, iterations, lanczos_steps, failure_probability, grad, intermediate,
                dense, global_iterations=2, rounding=True, estimator="power",
                batch_axis=None, radius_grad=False) -> LocalBound:
  stages = trace_lib.trace(model, variables, tuple(x.shape[1:]), x.dtype)
  b = x.shape[0]
  keys = jax.random.split(key, 2 * len(stages))

  lower = mode == "lower"
  # Failure budget: one share per probabilistic computation.
  n_prob = probabilistic_count(stages, mode, dense)
  delta = failure_share(stages, mode, dense, failure_probability)

  # Estimate mode uses the global norms only for the masks: no gradient (and
  # no SVD derivative, which needs the full singular vectors).
  new_global = None
  # Lanczos estimates keep, per layer, the top right singular vector of the
  # map masked by the batch's union of masks (see ``estimate_norm``).
  union = mode == "estimate" and estimator == "lanczos" and global_state is not None
  running = {}
  if global_norms is not None:   # computed once for these parameters by the caller
    gnorms = [jax.lax.stop_gradient(g) for g in global_norms]
  elif union:
    check_global_state(stages, global_state)
    # Only generic layers' row norms read these (estimates of masked norms).
    gnorms = [jax.lax.stop_gradient(power.norm_at(st.linear, u)[0])
              for st, u in zip(stages, global_state.vectors)]
  elif global_state is not None:
    gnorms, new_global = running_global_norms(
        stages, global_state, global_iterations, estimator=estimator,
        differentiable=radius_grad and intermediate == "global")
  else:
    gnorms = _global_norms(stages, keys[0::2], delta, differentiable=(mode != "estimate"),
                           lower=lower)
  rnorms = [row_norm_bounds(st, g) for st, g in zip(stages, gnorms)]
  local = {}
  starts = _lower_starts(stages, state, b) if lower else [None] * len(stages)

  def estimate_norm(l, row, col_prev):
    """Estimate mode: ``(||D_r W D_c|| estimate, final vector)`` per example."""
    st = stages[l]
    if state is not None:
      u0 = state.vectors[l]
      if u0.shape != col_prev.shape:
        raise ValueError(f"state vector {l} has shape {u0.shape}, expected "
                         f"{col_prev.shape}")
    elif new_global is not None:
      u0 = jnp.broadcast_to(new_global.vectors[l], col_prev.shape)
    else:
      u0 = jax.random.normal(keys[2 * l + 1], col_prev.shape, st.dtype)
    # With constant vectors the iterations run on frozen parameters, so the
    # derivative is only that of the final application, and the adjoint
    # uses the layer's transpose-friendly form. Back-propagating through
    # the iterations differentiates the plain adjoint instead (the
    # derivative of the polyphase form's transpose is the slower one).
    if grad == "through":
      return power.power_iteration(_masked_op(st, row, col_prev), u0 * col_prev,
                                   iterations, grad_through=True)
    frozen = dataclasses.replace(st, params=jax.lax.stop_gradient(st.params))
    if estimator == "lanczos":
      if union:
        # The running vector follows the map under the union of the batch's
        # masks (a mask shared by most examples: units dead on the whole
        # batch drop out), so each example starts close to its own top vector.
        row_u = jnp.max(row, axis=0, keepdims=True)
        # (The first layer's columns are all kept: no reduction of a constant.)
        col_u = (jnp.ones_like(col_prev[:1]) if l == 0
                 else jnp.max(col_prev, axis=0, keepdims=True))
        if batch_axis is not None:   # the batch is split over a mapped axis
          row_u = jax.lax.pmax(row_u, batch_axis)
          col_u = col_u if l == 0 else jax.lax.pmax(col_u, batch_axis)
        u_run = power.lanczos_ritz_vector(
            _masked_op(frozen, row_u, col_u), _masked_adjoint(frozen, row_u, col_u),
            _nonzero_start(global_state.vectors[l] * col_u, col_u), global_iterations)
        running[l] = u_run
        u0 = jnp.broadcast_to(u_run, col_prev.shape)
      u = power.lanczos_ritz_vector(_masked_op(frozen, row, col_prev),
                                    _masked_adjoint(frozen, row, col_prev),
                                    _nonzero_start(u0 * col_prev, col_prev), iterations)
      return power.norm_at(_masked_op(st, row, col_prev), u), u
    return power.power_iteration(_masked_op(frozen, row, col_prev), u0 * col_prev,
                                 iterations,
                                 adjoint_of=_masked_op_for_adjoint(frozen, row, col_prev),
                                 final_op=_masked_op(st, row, col_prev))

  def radius_norm(l, lb, col_prev):
    st = stages[l]
    if mode != "estimate":
      local[l] = _sound_local_norm(st, lb.row_mask, col_prev, gnorms[l], keys[2 * l + 1],
                                   delta, lanczos_steps, dense, lower, starts[l])
      if intermediate == "local":
        return jax.lax.stop_gradient(local[l][0])
    elif intermediate == "local":
      local[l] = estimate_norm(l, lb.row_mask, col_prev)
      return local[l][0] if radius_grad else jax.lax.stop_gradient(local[l][0])
    return gnorms[l]

  # Training estimates need no rounding bounds (they carry no guarantee).
  layers, in_cols, _ = interpret.propagate(
      stages, x, eps, rnorms, radius_norm,
      error_norms=[jax.lax.stop_gradient(g) for g in gnorms],
      rounding_bounds=mode == "sound" or (lower and rounding), widen=not lower)
  chex.assert_shape(layers[-1].center, (b, stages[-1].out_shape[0]))

  layer_norms, estimates, vectors = [], [], []
  for l, (st, lb, col_prev) in enumerate(zip(stages, layers, in_cols)):
    row = lb.row_mask
    if mode != "estimate":
      if l not in local:   # the last stage
        local[l] = _sound_local_norm(st, row, col_prev, gnorms[l], keys[2 * l + 1],
                                     delta, lanczos_steps, dense, lower, starts[l])
      s, est = local[l]
      vectors.append(jnp.zeros_like(col_prev))
    else:
      s, u = local[l] if l in local else estimate_norm(l, row, col_prev)
      est = s
      vectors.append(u)
    layer_norms.append(s)
    estimates.append(est)

  if union:
    new_global = PowerState(tuple(running[l] for l in range(len(stages))))
  bound = stages.product(layer_norms)
  # NaN anywhere (parameters, boxes) must never look like a finite bound.
  finite = jnp.all(jnp.isfinite(layers[-1].center), axis=1)
  for lb_ in layers:
    finite &= jnp.all(jnp.isfinite(lb_.lower.reshape(b, -1)), axis=1)
    finite &= jnp.all(jnp.isfinite(lb_.upper.reshape(b, -1)), axis=1)
  bound = jnp.where(finite, bound, jnp.nan)
  estimate = stages.product(estimates)
  if mode == "sound":
    fail = jnp.full((b,), failure_probability if n_prob else 0.0, jnp.float32)
  else:
    fail = jnp.ones((b,), jnp.float32)
  return LocalBound(bound=bound, layer_norms=tuple(layer_norms),
                    global_norms=tuple(gnorms), estimate=estimate,
                    failure_probability=fail, logits=layers[-1].center,
                    layers=tuple(layers), state=PowerState(tuple(vectors)),
                    global_state=new_global)


def global_lipschitz_bound(model, variables, *, input_shape=None,
                           per_layer: bool = False, key=None,
                           failure_probability: float = 1e-9):
  """Upper bound on the l2 Lipschitz constant of the logits over all inputs.

  The product of per-layer bounds on ``||W_l||_2``: exact SVD for dense
  layers, the circulant (FFT) bound for convolutions and average pooling, a
  layer's own ``global_norm`` when it has one, and for other user layers the
  SVD of the explicit Jacobian when it has at most 2^24 entries. Deterministic
  for every built-in layer. Only a user layer without its own ``global_norm``
  whose Jacobian is larger gets a Lanczos bound, which fails with probability
  at most ``failure_probability`` over the start vector (``key``); see
  :func:`bound_guarantee` (``bound="global"``) for which case applies.

  Args:
    model: a :class:`lipjax.nn.Sequential`, a Flax module or a function
      ``fn(variables, x)``.
    variables: its variables.
    input_shape: shape of one example (defaults to ``model.input_shape``;
      required for models without that attribute).
    per_layer: also return the tuple of per-layer norms.
    key: PRNG key of the Lanczos start vectors (default ``PRNGKey(0)``).
    failure_probability: total failure probability of the Lanczos bounds
      (split over the layers that need one; unused when none does).

  Returns:
    A scalar (or ``(scalar, per_layer_norms)``).
  """
  model, variables = frontends.resolve(model, variables)
  shape = resolve_input_shape(model, input_shape)
  model = frontends.keyed(model, variables, shape)
  stages = trace_lib.trace(model, variables, shape)
  key = jax.random.PRNGKey(0) if key is None else key
  delta = failure_share(stages, "global", "exact", float(failure_probability))
  gn = compiled_norms(model, shape, delta)(variables, key)
  total = stages.product(gn)
  return (total, gn) if per_layer else total


def layer_global_norms(model, variables, *, input_shape=None, key=None,
                       mode: str = "sound", dense: str = "exact",
                       failure_probability: float = 1e-9) -> Tuple[Array, ...]:
  """The per-layer global norms :func:`local_lipschitz_bound` would compute.

  They depend on the parameters only, so a caller that bounds many batches
  with the same ``variables`` computes them once and passes them back as
  ``local_lipschitz_bound(..., global_norms=...)``. For built-in layers they
  are deterministic and equal to ``global_lipschitz_bound(per_layer=True)``;
  a generic layer too large for an explicit Jacobian gets a Lanczos bound
  with the failure share of ``mode``, ``dense`` and ``failure_probability``.

  Returns:
    A tuple of float32 scalars, one per linear layer.
  """
  check_choice("mode", mode, MODES)
  check_choice("dense", dense, ("exact", "lanczos"))
  if not 0 < failure_probability < 1:
    raise ValueError(f"failure_probability must be in (0, 1), got {failure_probability}")
  model, variables = frontends.resolve(model, variables)
  shape = resolve_input_shape(model, input_shape)
  model = frontends.keyed(model, variables, shape)
  stages = trace_lib.trace(model, variables, shape)
  key = jax.random.PRNGKey(0) if key is None else key
  delta = failure_share(stages, mode, dense, float(failure_probability))
  return compiled_norms(model, shape, delta, mode == "lower")(variables, key)


@functools.lru_cache(maxsize=64)
def compiled_norms(model, shape, delta, lower=False):
  return jax.jit(functools.partial(_norms_core, model, shape, delta, lower))


def _norms_core(model, shape, delta, lower, variables, key):
  stages = trace_lib.trace(model, variables, shape)
  keys = jax.random.split(key, len(stages))
  return tuple(_global_norms(stages, keys, delta, lower=lower))


@dataclasses.dataclass(frozen=True)
class Guarantee:
  """What a bound's guarantee rests on (see :func:`bound_guarantee`).

  Attributes:
    failure_probability: probability over the Lanczos start vectors that the
      bound fails to be an upper bound (per example for the local bound); 0
      when every per-layer norm is deterministic.
    layers: per linear layer, ``(name, rule)`` with rule one of ``"exact"``
      (SVD or float64 eigensolver of the explicit matrix),
      ``"deterministic"`` (the layer's own upper bound, e.g. the circulant
      FFT bound) or ``"probabilistic"`` (Lanczos upper bound).
    operand_roundoff: unit roundoff assumed for the operands of float32
      products in the forward pass that certificates cover
      (:func:`lipjax.bounds.operand_roundoff`).
  """

  failure_probability: float
  layers: Tuple[Tuple[str, str], ...]
  operand_roundoff: float = 0.0

  @property
  def deterministic(self) -> bool:
    return self.failure_probability == 0.0


def bound_guarantee(model, variables, *, bound: str = "local", input_shape=None,
                    dense: str = "exact", failure_probability: float = 1e-9) -> Guarantee:
  """Which per-layer norms of a bound are exact, deterministic or probabilistic.

  Follows the rules of :func:`local_lipschitz_bound` (sound mode, the default
  ``intermediate="local"``) for ``bound="local"`` and of
  :func:`global_lipschitz_bound` (and ``certify(bound="global")``, and the
  points ``certify``'s triage decides with the global certificate) for
  ``bound="global"``.

  Args:
    model: a :class:`lipjax.nn.Sequential`.
    variables: its variables.
    bound: ``"local"`` or ``"global"``.
    input_shape: shape of one example (defaults to ``model.input_shape``).
    dense: as in :func:`local_lipschitz_bound`.
    failure_probability: the failure probability the bound is computed with.

  Returns:
    A :class:`Guarantee`.
  """
  check_choice("bound", bound, BOUNDS)
  check_choice("dense", dense, ("exact", "lanczos"))
  model, variables = frontends.resolve(model, variables)
  shape = resolve_input_shape(model, input_shape)
  model = frontends.keyed(model, variables, shape)
  stages = trace_lib.trace(model, variables, shape)
  rows, probabilistic = [], False
  for st in stages:
    if needs_probabilistic_global(st):
      glob = "probabilistic"
    elif st.layer.explicit_matrix(st.params) is not None:
      glob = "exact"
    elif st.layer.deterministic_global:
      glob = "deterministic"
    else:
      glob = "exact"   # SVD of the explicit Jacobian
    if bound == "global":
      rule = glob
    else:
      rule = "probabilistic" if (_uses_lanczos(st, dense) or glob == "probabilistic") \
          else "exact"
    probabilistic |= rule == "probabilistic"
    rows.append((st.name, rule))
  return Guarantee(failure_probability=float(failure_probability) if probabilistic else 0.0,
                   layers=tuple(rows), operand_roundoff=rounding.operand_roundoff())
