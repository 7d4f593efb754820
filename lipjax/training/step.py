"""Certified-training steps (single device and data-parallel) and Optax pieces."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from lipjax._src import frontends
from lipjax._src import trace as trace_lib
from lipjax._src.options import check_choice
from lipjax.training import losses

_THRESHOLDS = ("theta",)


def _is_threshold(path) -> bool:
  last = path[-1]
  return getattr(last, "key", None) in _THRESHOLDS


def project_thresholds() -> optax.GradientTransformation:
  """Optax transform keeping every clipped-ReLU ``theta >= 0`` after the step.

  Rewrites the update of each ``theta`` leaf so that ``params + update`` is
  the projection ``max(params + update, 0)``. Chain it last.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("project_thresholds needs params")

    def fix(path, u, p):
      return jnp.maximum(p + u, 0.0) - p if _is_threshold(path) else u

    return jax.tree_util.tree_map_with_path(fix, updates, params), state

  return optax.GradientTransformation(init, update)


class TrainState(NamedTuple):
  """Training state, a pytree that a resumed run continues from exactly.

  Attributes:
    step: int32 scalar, optimiser updates done so far; the schedules are
      evaluated at it.
    params: model parameters (the ``"params"`` collection).
    opt_state: Optax state of the optimiser.
    rng: PRNG key data (uint32, shape ``(2,)`` for the default generator);
      each step splits it, using one half and keeping the other.
    power: running global power vectors (:func:`losses.init_power_state`),
      warm-starting each step's power method and updated by it; None makes
      the first certified step start them from ``rng`` (and changes the
      state's structure once, so the step compiles twice: prefer passing
      ``init_power_state(...)`` to :func:`create_train_state`).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  power: Any = None


def _key_data(rng) -> jax.Array:
  if isinstance(rng, (int, np.integer)):
    return jax.random.PRNGKey(int(rng))
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  if rng.dtype != jnp.uint32 or rng.ndim != 1:
    raise ValueError(f"rng must be an int seed or a single PRNG key, got dtype {rng.dtype} "
                     f"shape {rng.shape}")
  return jnp.array(rng)


def _strong_copy(a) -> jax.Array:
  """A copy of ``a`` without JAX's weak type (``jnp.full(shape, 0.7)`` is weakly
  typed; the step's outputs are not, so a weak leaf would make the second
  step compile the whole update again)."""
  a = jnp.asarray(a)
  return jnp.array(a, dtype=a.dtype)


def create_train_state(params, optimizer: optax.GradientTransformation, *, rng,
                       power=None) -> TrainState:
  """Fresh :class:`TrainState` at step 0.

  Args:
    params: model parameters (copied, without weak types: the training steps
      donate the state, and their outputs are strongly typed).
    optimizer: the Optax transformation the step will use.
    rng: int seed or PRNG key (raw uint32 key data or a typed key).
    power: initial running power vectors, ``losses.init_power_state(model,
      variables, input_shape, key)``; None: the first certified step makes them.
  """
  params = jax.tree_util.tree_map(_strong_copy, params)
  power = None if power is None else jax.tree_util.tree_map(_strong_copy, power)
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                    _key_data(rng), power)


def _project_all_thresholds(model, params, in_shape):
  """``max(theta, 0)`` for every clipped-ReLU threshold, in one pass: the
  leaves named ``theta`` and those a traced model uses as thresholds
  (see :func:`lipjax._src.trace.threshold_leaves`), whatever their names."""
  index = set(trace_lib.threshold_leaves(model, _variables(model, params), in_shape))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  leaves = [jnp.maximum(a, 0.0) if (i in index or _is_threshold(path)) else a
            for i, (path, a) in enumerate(leaves)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _variables(model, params):
  """The variables the model is applied with during training: ``{"params": params}``
  (for an NNX module, its other variables come from the module itself).

  Their leaves are ``params``' leaves, in the same order, so that a leaf
  index into the one is an index into the other."""
  return {"params": params}


def _as_schedule(value, name):
  if value is None:
    return None
  if callable(value):
    return value
  try:
    const = float(value)
  except TypeError:
    raise ValueError(f"{name} must be a schedule (step -> value) or a number, "
                     f"got {type(value).__name__}") from None
  return lambda step: jnp.full((), const, jnp.float32)


def make_update(model, optimizer, *, loss, bound, iterations, grad, sparsity_weight,
                eps_schedule, kappa_schedule, axis_name, bound_options=None):
  """Pure ``update(state, images, labels) -> (state, metrics)``.

  With ``axis_name`` set, gradients, metrics and the power state are averaged
  over that mapped axis (each member holding an equal share of the batch).
  """
  check_choice("loss", loss, ("gloro", "bcp", "ce"))
  model = frontends.as_model(model)
  check_choice("bound", bound, ("local", "global"))
  check_choice("grad", grad, losses.GRADS)
  bound_options = losses.check_bound_options(bound_options, grad=grad)
  iterations = losses.resolve_iterations(iterations, bound_options["estimator"])
  eps_fn = _as_schedule(eps_schedule, "eps_schedule")
  kappa_fn = _as_schedule(kappa_schedule, "kappa_schedule")
  if loss != "ce" and eps_fn is None:
    raise ValueError(f"loss {loss!r} needs eps_schedule")
  if loss == "bcp" and kappa_fn is None:
    raise ValueError("loss 'bcp' needs kappa_schedule")
  eps_fn = eps_fn or _as_schedule(0.0, "eps_schedule")
  kappa_fn = kappa_fn or _as_schedule(0.0, "kappa_schedule")

  def loss_fn(params, power, images, labels, eps, kappa, key):
    variables = _variables(model, params)
    if loss == "ce":
      logits = model.apply(variables, images)
      deltas = jnp.zeros_like(logits)
      value = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    else:
      logits, deltas, aux = losses.deltas(
          model, variables, images, labels, eps, bound=bound, iterations=iterations,
          power=power, key=key, grad=grad, batch_axis=axis_name, **bound_options)
      power = jax.lax.stop_gradient(aux["power"])
      value = (losses.gloro_loss(logits, deltas, labels) if loss == "gloro"
               else losses.bcp_loss(logits, deltas, labels, kappa))
      if sparsity_weight and aux["local_bound"] is not None:
        value = value + sparsity_weight * losses.sparsity_loss(model, variables,
                                                               aux["local_bound"])
    pred = jnp.argmax(logits, -1)
    gap = jnp.take_along_axis(logits, labels[:, None], 1) - logits - deltas
    other = jax.nn.one_hot(labels, logits.shape[-1]) == 0
    robust = jnp.all(jnp.where(other, gap > 0, True), axis=-1) & (pred == labels)
    metrics = {"loss": value, "accuracy": jnp.mean(pred == labels),
               "vra_estimate": jnp.mean(robust)}
    return value, (metrics, power)

  def update(state: TrainState, images, labels):
    if images.ndim < 2 or labels.shape != images.shape[:1]:
      raise ValueError(f"expected images (B, ...) and labels (B,), got {images.shape} and "
                       f"{labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"labels must be integers, got {labels.dtype}")
    rng, key = jax.random.split(state.rng)
    eps = jnp.asarray(eps_fn(state.step), jnp.float32)
    kappa = jnp.asarray(kappa_fn(state.step), jnp.float32)
    grads, (metrics, power) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.power, images, labels, eps, kappa, key)
    if axis_name is not None:
      grads = lax.pmean(grads, axis_name)
      metrics = lax.pmean(metrics, axis_name)
      power = _pmean_floats(power, axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # theta >= 0 whatever the optimiser (idempotent if it already projects).
    params = _project_all_thresholds(model, params, tuple(images.shape[1:]))
    metrics = dict(metrics, eps=eps, kappa=kappa)
    return TrainState(state.step + 1, params, opt_state, rng, power), metrics

  return update


def _pmean_floats(tree, axis_name):
  def mean(x):
    return lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree_util.tree_map(mean, tree)


def make_train_step(model, optimizer: optax.GradientTransformation, *,
                    loss: str = "gloro", bound: str = "local",
                    iterations: Optional[int] = None,
                    grad: str = "constant", sparsity_weight: float = 0.0,
                    eps_schedule=None, kappa_schedule=None, bound_options=None):
  """Jitted single-device ``step(state, images, labels) -> (state, metrics)``.

  ``eps`` and ``kappa`` are the schedules evaluated at ``state.step`` (see
  :mod:`lipjax.training.schedules`), so a restored state continues the run
  exactly. The power method warm-starts from ``state.power`` and stores the
  updated vectors there; ``state.rng`` is split every step (its key is used
  only when ``state.power`` is None). The step donates ``state``.

  Args:
    model: a lipjax model, a plain Flax module or a function
      ``fn(variables, x)`` that lipjax's bounds accept (with a dense last
      layer).
    optimizer: Optax transformation. Every update is followed by the
      projection of :func:`project_thresholds`, so clipped-ReLU thresholds
      stay ``theta >= 0`` (also during a clean warm-up). For a plain Flax
      model the thresholds are found by tracing it (any parameter used as
      ``theta`` in ``jnp.clip(z, 0, theta)`` or
      ``jnp.minimum(jnp.maximum(z, 0), theta)``), whatever their names.
    loss: ``"gloro"``, ``"bcp"`` or ``"ce"`` (plain cross-entropy).
    bound: ``"local"`` or ``"global"`` Lipschitz bound inside the loss.
    iterations: per-example steps of the training estimator per step (default:
      :data:`lipjax.training.losses.DEFAULT_STEPS` of the estimator).
    grad: ``"constant"`` (final power vectors treated as constants) or
      ``"through"`` (back-propagate through the iterations).
    sparsity_weight: weight of :func:`losses.sparsity_loss` (local bound).
    eps_schedule: ``step -> eps`` (or a constant); required unless ``loss="ce"``.
    kappa_schedule: ``step -> kappa`` (or a constant); required for ``"bcp"``.
    bound_options: further keyword options of
      :func:`lipjax.training.losses.worst_case_deltas` (the training
      estimator: ``estimator``, ``intermediate``, ...), checked here.

  Returns:
    ``step(state, images (B, ...), labels (B,) int) -> (state, metrics)`` with
    scalar metrics ``loss``, ``accuracy`` (clean), ``eps``, ``kappa`` and
    ``vra_estimate`` (fraction whose estimated margin exceeds the estimated
    ``Delta``: a training signal, not a certificate).
  """
  update = make_update(model, optimizer, loss=loss, bound=bound, iterations=iterations,
                        grad=grad, sparsity_weight=sparsity_weight,
                        eps_schedule=eps_schedule, kappa_schedule=kappa_schedule,
                        axis_name=None, bound_options=bound_options)
  return jax.jit(update, donate_argnums=(0,))


def make_parallel_train_step(model, optimizer: optax.GradientTransformation, *,
                             loss: str = "gloro", bound: str = "local",
                             iterations: Optional[int] = None,
                             grad: str = "constant", sparsity_weight: float = 0.0,
                             eps_schedule=None, kappa_schedule=None,
                             axis_name: str = "batch", bound_options=None):
  """Data-parallel step over the local devices (``jax.pmap``).

  Same arguments and metrics as :func:`make_train_step`. Parameters and
  state are replicated (see :func:`replicate`); each device computes the
  gradient of its share of the batch, and gradients, metrics and the power
  state are averaged with ``lax.pmean`` over ``axis_name``, so every replica
  applies the same update: with ``D`` devices and ``B/D`` examples each the
  step equals the single-device step on the ``B`` examples (up to float
  rounding). After ``jax.distributed.initialize`` the mapped axis spans all
  processes; each process passes its own local shard. For new code prefer
  :func:`lipjax.training.sharded.make_sharded_train_step` (``jax.jit`` over a
  device mesh, no device axis in the state); both write the same checkpoints.

  Returns:
    ``p_step(state, images (D, B/D, ...), labels (D, B/D)) -> (state, metrics)``
    with ``D = jax.local_device_count()``; state and metrics keep the leading
    device axis (take one copy with :func:`unreplicate`).
  """
  update = make_update(model, optimizer, loss=loss, bound=bound, iterations=iterations,
                        grad=grad, sparsity_weight=sparsity_weight,
                        eps_schedule=eps_schedule, kappa_schedule=kappa_schedule,
                        axis_name=axis_name, bound_options=bound_options)
  mapped = jax.pmap(update, axis_name=axis_name, donate_argnums=(0,))

  def p_step(state: TrainState, images, labels):
    n = jax.local_device_count()
    if np.ndim(images) < 3 or np.shape(images)[0] != n or np.shape(labels)[:2] != np.shape(images)[:2]:
      raise ValueError(f"expected images ({n}, B/{n}, ...) and labels ({n}, B/{n}) for {n} "
                       f"local devices, got {np.shape(images)} and {np.shape(labels)}; "
                       "use shard_batch")
    return mapped(state, images, labels)

  return p_step


def replicate(tree, devices=None, axis_name: str = "batch"):
  """Copies every leaf onto each local device: leaves gain a leading axis ``D``.

  Args:
    tree: pytree of arrays (e.g. a :class:`TrainState`).
    devices: target devices; default ``jax.local_devices()`` (pmap's order).
    axis_name: the ``axis_name`` of the parallel step. The copies are laid
      out as that step lays out its outputs, so feeding its output back in
      does not compile the step a second time.
  """
  devices = list(devices or jax.local_devices())
  mesh = jax.sharding.Mesh(np.array(devices), (axis_name,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))

  def put(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    stacked = (jnp if isinstance(x, jax.Array) else np).stack([x] * len(devices))
    return jax.device_put(stacked, sharding)

  return jax.tree_util.tree_map(put, tree)


def unreplicate(tree):
  """One copy of a replicated pytree (the first local device's), no leading axis."""

  def first(x):
    if isinstance(x, jax.Array):
      # Works for arrays spanning several processes too: read a local copy.
      return x.addressable_shards[0].data[0]
    return np.asarray(x)[0]

  return jax.tree_util.tree_map(first, tree)


def shard_batch(array, num_devices: Optional[int] = None):
  """Reshapes a batch ``(B, ...)`` to ``(D, B/D, ...)`` for the parallel step.

  Args:
    array: a host (numpy) or device array with the batch on axis 0.
    num_devices: ``D``; default ``jax.local_device_count()`` (in a
      multi-process run each process shards its own part of the batch).

  Raises:
    ValueError: if ``B`` is not divisible by ``D``.
  """
  n = jax.local_device_count() if num_devices is None else int(num_devices)
  shape = np.shape(array)
  if n < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices!r}")
  if len(shape) == 0 or shape[0] % n:
    raise ValueError(f"batch of {shape[0] if shape else 'a scalar'} examples is not divisible "
                     f"by {n} devices")
  return array.reshape((n, shape[0] // n) + tuple(shape[1:]))
