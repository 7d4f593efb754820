"""Certified-training losses, pure functions of arrays.

:func:`worst_case_deltas` gives, per example and class, how much the gap
``z_y - z_i`` can shrink inside the ball according to the local (or global)
Lipschitz bound; the losses below consume it.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from lipjax._src import frontends
from lipjax._src import lipschitz, margins, pairwise
from lipjax._src import trace as trace_lib
from lipjax._src.options import check_choice

Array = jax.Array


#: The gradient options of the training estimates.
GRADS = ("constant", "through")

#: Power iterations that :func:`init_power_state` runs from the random start.
INIT_ITERATIONS = 30


def init_power_state(model, variables, input_shape=None, key=None, *,
                     iterations: int = INIT_ITERATIONS) -> lipschitz.PowerState:
  """Running global power vectors for training, one per linear layer.

  Each vector has shape ``(1, *in_shape)`` of its layer (the state's size does
  not depend on the batch or the dataset). They start Gaussian and are moved
  ``iterations`` power iterations towards each layer's top right singular
  vector, so the first training step already has usable global norms.

  Args:
    model: a :class:`lipjax.nn.Sequential`, a Flax module or a function
      ``fn(variables, x)`` (see :func:`lipjax.local_lipschitz_bound`).
    variables: its variables, ``{"params": ...}``.
    input_shape: shape of one example (defaults to ``model.input_shape``).
    key: PRNG key of the random start (default ``PRNGKey(0)``).
    iterations: power iterations from the random start (``>= 0``).

  Returns:
    A :class:`lipjax.PowerState` (a pytree of unit vectors).
  """
  if iterations < 0:
    raise ValueError(f"iterations must be >= 0, got {iterations}")
  model, variables = frontends.resolve(model, variables)
  shape = lipschitz.resolve_input_shape(model, input_shape)
  trace_lib.trace(model, variables, shape)   # validates the model
  key = jax.random.PRNGKey(0) if key is None else key
  return _init_power(model, variables, shape, key, int(iterations))


def _init_power(model, variables, shape, key, iterations):
  return lipschitz.global_vectors(trace_lib.trace(model, variables, shape), key, iterations,
                                  jnp.float32)


#: The training-estimator options of :func:`worst_case_deltas` a training step accepts.
BOUND_OPTIONS = ("estimator", "intermediate", "global_iterations", "pair", "box_clip",
                 "radius_grad")

#: The default training estimator (``"power"`` when gradients go through the iterations).
DEFAULT_ESTIMATOR = "lanczos"

#: Per-example steps of each estimator when ``iterations`` is not given: the paper's 5
#: power iterations; 3 Lanczos steps from the union-masked running vectors come closer
#: to the sound bound at a lower cost (README, "An honest training bound").
DEFAULT_STEPS = {"power": 5, "lanczos": 3}


def resolve_estimator(estimator: Optional[str], grad: str = "constant") -> str:
  """The estimator of a call: ``estimator``, or the default for ``grad``."""
  if estimator is None:
    return "power" if grad == "through" else DEFAULT_ESTIMATOR
  if estimator not in ("power", "lanczos"):
    raise ValueError(f"estimator must be 'power' or 'lanczos', got {estimator!r}")
  return estimator


def resolve_iterations(iterations: Optional[int], estimator: str) -> int:
  """``iterations``, or the estimator's default (:data:`DEFAULT_STEPS`); must be >= 0."""
  if iterations is None:
    return DEFAULT_STEPS[estimator]
  if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 0:
    raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
  return int(iterations)


def resolve_intermediate(estimator: str, intermediate: Optional[str]) -> str:
  """The intermediate-radius norms of an estimator (None: its default); raises for a
  combination the estimator does not support."""
  if estimator not in ("power", "lanczos"):
    raise ValueError(f"estimator must be 'power' or 'lanczos', got {estimator!r}")
  if intermediate is None:
    return "global" if estimator == "power" else "local"
  if intermediate not in ("global", "local"):
    raise ValueError(f"intermediate must be 'global' or 'local', got {intermediate!r}")
  if estimator == "lanczos" and intermediate == "global":
    raise ValueError("estimator='lanczos' builds its masks from its local estimates: "
                     "intermediate must be 'local'")
  return intermediate


def check_bound_options(options, *, grad: str = "constant") -> Dict[str, Any]:
  """Validates training-estimator options; returns them as a plain dict.

  Args:
    options: None or a mapping with keys from :data:`BOUND_OPTIONS`.
    grad: the step's ``grad`` option (``estimator="lanczos"`` needs
      ``"constant"``).

  Returns:
    Every option of :data:`BOUND_OPTIONS`, ``estimator`` and ``intermediate``
    resolved (:func:`resolve_estimator`, :func:`resolve_intermediate`).

  Raises:
    ValueError: one line naming the bad key or value.
  """
  options = dict(options or {})
  unknown = sorted(set(options) - set(BOUND_OPTIONS))
  if unknown:
    raise ValueError(f"unknown bound option(s) {', '.join(map(repr, unknown))}; "
                     f"known: {', '.join(BOUND_OPTIONS)}")
  options["estimator"] = resolve_estimator(options.get("estimator"), grad)
  options["intermediate"] = resolve_intermediate(options["estimator"],
                                                 options.get("intermediate"))
  if options["estimator"] == "lanczos" and grad != "constant":
    raise ValueError("estimator='lanczos' needs grad='constant'")
  for flag in ("pair", "box_clip", "radius_grad"):
    options.setdefault(flag, False)
    if not isinstance(options[flag], bool):
      raise ValueError(f"{flag} must be True or False, got {options[flag]!r}")
  g = options.setdefault("global_iterations", None)
  if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 0):
    raise ValueError(f"global_iterations must be an int >= 0, got {g!r}")
  return options


def worst_case_deltas(model, variables, x, y, eps, *, bound: str = "local",
                      iterations: Optional[int] = None, power=None, key=None,
                      grad: str = "constant", global_iterations: Optional[int] = None,
                      estimator: Optional[str] = None, intermediate: Optional[str] = None,
                      pair: bool = False, box_clip: bool = False,
                      radius_grad: bool = False,
                      batch_axis: Optional[str] = None) -> Tuple[Array, Array, Dict[str, Any]]:
  """Differentiable ``Delta_iy = eps * prod_{l<L} s_l * ||D (w_i - w_y)||``.

  Both bounds use the running global power vectors ``power`` (see
  :func:`init_power_state`): each call first runs ``global_iterations``
  power iterations (constant vectors) on every layer's global map from them.

  * ``bound="local"``: the global estimates give the intermediate radii and
    masks; the per-example masked power method (``iterations`` steps, from
    the global vector times the column mask) gives ``s_l``.
  * ``bound="global"``: ``s_l = ||W_l u_l||`` with the updated global vector
    ``u_l`` (the GloRo baseline; gradients through this final application).

  These are training estimates (from below), never certificates.

  Args:
    model, variables, x, y, eps: as in :func:`lipjax.certify` (``eps`` scalar or
      ``(B,)``).
    bound: ``"local"`` or ``"global"``.
    iterations: per-example steps of the estimator (local bound); default
      :data:`DEFAULT_STEPS` of the estimator.
    power: running global vectors from :func:`init_power_state` or from the
      previous call's ``aux["power"]``; None starts from
      ``init_power_state(model, variables, key=key)``.
    key: PRNG key, used only when ``power`` is None.
    grad: ``"constant"`` (final vectors constant) or ``"through"``
      (back-propagate through the per-example iterations).
    global_iterations: power iterations per call on the global maps
      (default ``max(iterations, 1)``).
    estimator: (default :data:`DEFAULT_ESTIMATOR`, or ``"power"`` with
      ``grad="through"``) ``"power"`` (the paper's method: ``iterations`` power
      iterations per layer and example from the running global vector
      times the column mask) or ``"lanczos"``: the running vectors follow
      each layer's map under the union of the batch's masks
      (``global_iterations`` Lanczos steps per call, one example's cost),
      and each example runs ``iterations`` Lanczos steps from its column
      mask times that vector; the loss uses the Rayleigh quotient of the top
      Ritz vector. With the global bound, ``"lanczos"`` runs Lanczos on the
      global maps instead of the power method.
    intermediate: local bound: the norms of the intermediate ball radii,
      ``"global"`` (the running global estimates, the paper's choice; power
      estimator only) or ``"local"`` (the per-example estimates, as the
      sound bound builds its masks). Default: ``"global"`` for the power
      estimator, ``"local"`` for Lanczos.
    pair: local bound: also the per-class-pair bound of
      :mod:`lipjax.bounds.pairwise` (the slopes of the estimate's boxes, its
      per-layer norms), each pair's delta the smaller of the two. A chain
      network only (no residual branch); gradients flow through the
      linearised network's backward pass.
    box_clip: also the box-clipped translation of the last layer (BCP, as
      the paper's reference code trains): each delta is at most the largest
      move of the gap over the part of the penultimate ball inside the
      penultimate box (:func:`lipjax._src.margins.box_ball_support`; the
      estimate's boxes with the local bound, boxes from the running global
      norms with the global one). Gradients flow through the box.
    radius_grad: gradients also flow through the norms that set the
      intermediate ball radii (see :func:`lipjax.local_lipschitz_bound`;
      with the global bound, the boxes of ``box_clip``), so the terms built
      on the boxes (``box_clip``, ``pair``, the sparsity loss) reward
      smaller radii. Default: those norms are constants.
    batch_axis: inside ``jax.pmap`` over a split batch, the mapped axis'
      name: the Lanczos running vectors then follow the union of masks of
      the whole batch (see :func:`lipjax.local_lipschitz_bound`).

  Returns:
    ``(logits (B, C), deltas (B, C), aux)`` with ``deltas[b, y_b] = 0`` and
    ``aux = {"power": updated PowerState, "local_bound": LocalBound or None,
    "layer_norms": per linear layer the norm the loss used ((B,) or scalar),
    "col_masks": per hidden layer the (B, units) column mask or None}``.
  """
  check_choice("bound", bound, lipschitz.BOUNDS)
  check_choice("grad", grad, GRADS)
  options = check_bound_options({"estimator": estimator, "intermediate": intermediate,
                                 "global_iterations": global_iterations, "pair": pair,
                                 "box_clip": box_clip, "radius_grad": radius_grad}, grad=grad)
  return deltas(model, variables, x, y, eps, bound=bound,
                iterations=resolve_iterations(iterations, options["estimator"]), power=power,
                key=key, grad=grad, batch_axis=batch_axis, **options)


def deltas(model, variables, x, y, eps, *, bound, iterations, power, key, grad,
           global_iterations, estimator, intermediate, pair, box_clip, radius_grad=False,
           batch_axis=None):
  """:func:`worst_case_deltas` for callers that checked and resolved its options
  (the training steps: :func:`check_bound_options`, :func:`resolve_iterations`)."""
  model, variables = frontends.resolve(model, variables)
  x = jnp.asarray(x, jnp.float32)
  b = x.shape[0]
  eps = jnp.broadcast_to(jnp.asarray(eps, jnp.float32), (b,))
  stages = trace_lib.trace(model, variables, tuple(x.shape[1:]))
  last = stages[-1]
  mat = last.layer.explicit_matrix(last.params)
  if mat is None:
    raise ValueError("training losses need a dense last layer")
  if global_iterations is None:   # batch-1 maps: cheap next to the per-example work
    n_global = max(int(iterations), 10) if estimator == "lanczos" else max(int(iterations), 1)
  else:
    n_global = int(global_iterations)
  if power is None:
    key = jax.random.PRNGKey(0) if key is None else key
    power = _init_power(model, variables, tuple(x.shape[1:]), key, INIT_ITERATIONS)
  else:
    lipschitz.check_global_state(stages, power)
  if bound == "local":
    lb = lipschitz.local_lipschitz_bound(model, variables, x, eps, mode="estimate",
                                         iterations=iterations, grad=grad,
                                         global_state=power,
                                         global_iterations=n_global,
                                         estimator=estimator, intermediate=intermediate,
                                         batch_axis=batch_axis, radius_grad=radius_grad)
    logits = lb.logits
    used = list(lb.layer_norms)
    inner = stages.product(used, logits=False)
    col = margins.last_layer_columns(stages, lb.layers, b)
    cols = [layer.col_mask.reshape(b, -1) for layer in lb.layers[:-1]]
    new_power = lb.global_state
  else:
    lb = None
    logits = model.apply(variables, x)
    used, new_power = lipschitz.running_global_norms(stages, power, n_global,
                                                     differentiable=True,
                                                     estimator=estimator)
    inner = jnp.full((b,), stages.product(used, logits=False))
    col = jnp.ones((b, mat.shape[1]))
    cols = [None] * (len(stages) - 1)
  out = margins.logit_deltas(eps, inner, margins.pair_norms(mat, col, y))
  if pair and lb is not None:
    # The per-class-pair bound of the sound certificate, as an estimate: the
    # estimate's boxes give the slopes, its per-layer norms the prefixes.
    # None where it does not apply (the estimate records no join boxes, so
    # networks with blocks keep the product bound).
    pb = pairwise.pair_bounds(stages, lb.layers, lb.layer_norms, y, sound=False)
    if pb is not None:
      out = jnp.minimum(out, eps[:, None] * pb)
  if box_clip:
    layers = (lb.layers if lb is not None else lipschitz.ball_bounds(
        stages, x, eps, used if radius_grad else [jax.lax.stop_gradient(g) for g in used]))
    out = jnp.minimum(out, _box_clipped_deltas(stages, layers, mat, y, eps * inner))
  return logits, out, {"power": new_power, "local_bound": lb, "layer_norms": used,
                       "col_masks": cols}


def _box_clipped_deltas(stages, layers, mat, y, radius):
  """``(B, C)`` largest moves of the gaps over the penultimate ball within the box."""
  last = stages[-1]
  b = radius.shape[0]
  lo, hi, mid = (last.layer_input(t).reshape(b, -1) for t in (
      layers[-1].input_lower, layers[-1].input_upper, layers[-1].input_center))
  move, _ = margins.box_ball_support(margins.class_differences(mat, y),
                                     jnp.minimum(lo - mid, 0.0)[:, None, :],
                                     jnp.maximum(hi - mid, 0.0)[:, None, :], radius[:, None])
  return move


def gloro_loss(logits: Array, deltas: Array, y: Array) -> Array:
  """GloRo loss: cross-entropy over ``[z_1..z_C, z_bot]`` (mean over the batch).

  ``z_bot = max_{i != y} (z_i + Delta_iy)``.
  """
  c = logits.shape[-1]
  other = jax.nn.one_hot(y, c) == 0
  z_bot = jnp.max(jnp.where(other, logits + deltas, -jnp.inf), axis=-1)
  aug = jnp.concatenate([logits, z_bot[:, None]], axis=-1)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(aug, y))


def bcp_loss(logits: Array, deltas: Array, y: Array, kappa) -> Array:
  """``kappa * CE(z, y) + (1 - kappa) * CE(z + Delta_{.y}, y)`` (batch mean)."""
  clean = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  robust = optax.softmax_cross_entropy_with_integer_labels(logits + deltas, y)
  return jnp.mean(kappa * clean + (1.0 - kappa) * robust)


def sparsity_loss(model, variables, local_bound, theta_weight: float = 0.1) -> Array:
  """Pushes neurons towards constant status.

  Clipped ReLU: ``mean(relu(ub)) + theta_weight * mean(relu(theta - lb))``;
  clipped MaxMin: ``mean(relu(M - lb_max)) + mean(relu(ub_min - m))``; summed
  over hidden layers (means over batch and neurons). Other activations
  contribute 0.

  Args:
    model, variables: the network.
    local_bound: a :class:`lipjax.LocalBound`, or the ``aux`` dict returned by
      :func:`worst_case_deltas` (its ``"local_bound"``; a global-bound aux
      without one gives 0).
    theta_weight: weight of the clipped-ReLU upper-threshold term.

  Returns:
    A scalar.
  """
  if isinstance(local_bound, dict):
    local_bound = local_bound.get("local_bound")
  if local_bound is None:
    return jnp.zeros(())
  model, variables = frontends.resolve(model, variables)
  stages = trace_lib.trace(model, variables, tuple(local_bound.layers[0].input_center.shape[1:]))
  total = jnp.zeros(())
  for st, lb in zip(stages[:-1], local_bound.layers[:-1]):
    term = st.activation.sparsity(st.act_params, lb.lower, lb.upper, theta_weight)
    if term is not None:
      total += term
  return total
