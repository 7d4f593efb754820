"""Data-parallel training with ``jax.jit`` over a device mesh (``jax.sharding``).

The step of :func:`make_sharded_train_step` is the pure update of
:func:`lipjax.training.step.make_train_step` compiled once with explicit
shardings: the batch is split along one axis of a :class:`jax.sharding.Mesh`
and everything else (parameters, optimiser state, PRNG key and the running
power vectors, which depend on the weights only) is replicated. The loss and
the metrics are means over the whole global batch, so XLA's partitioner
inserts the all-reduces of the gradient and metric means itself and the step
computes what the single-device step computes on the same batch (up to the
order of float additions). State and metrics keep their single-device shapes:
no leading device axis, so a checkpoint is the same pytree whichever step
(single device, ``pmap`` or this one) wrote it.

Example::

  mesh = sharded.data_mesh()                               # all devices, axis "data"
  step = sharded.make_sharded_train_step(model, opt, mesh=mesh, eps_schedule=eps)
  state = sharded.replicate_on_mesh(create_train_state(...), mesh)
  for images, labels in batches:                           # this process's part
    state, metrics = step(state, images, labels)
  host_state = sharded.fetch_replicated(state)             # numpy, e.g. to save

In a multi-process run (after ``jax.distributed.initialize``) the default mesh
spans every process's devices; each process passes its own part of the global
batch, and :func:`shard_batch_on_mesh` assembles the global array with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lipjax.training import step as step_lib

DATA_AXIS = "data"


def data_mesh(devices: Optional[Sequence[jax.Device]] = None,
              axis_name: str = DATA_AXIS) -> Mesh:
  """A one-axis mesh for data parallelism.

  Args:
    devices: the mesh's devices, in batch order; default ``jax.devices()``
      (every process's devices after ``jax.distributed.initialize``, ordered
      by process, so process ``i`` holds the ``i``-th part of the batch).
    axis_name: name of the mesh axis the batch is split along.

  Returns:
    ``Mesh`` of shape ``(len(devices),)`` with one ``Auto`` axis
    ``axis_name`` (shardings are given explicitly, no mesh context needed).
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("data_mesh needs at least one device")
  if not isinstance(axis_name, str) or not axis_name:
    raise ValueError(f"axis_name must be a non-empty string, got {axis_name!r}")
  return Mesh(np.array(devices, dtype=object), (axis_name,),
              axis_types=(jax.sharding.AxisType.Auto,))


def _check_axis(mesh: Mesh, data_axis: str) -> None:
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if data_axis not in mesh.axis_names:
    raise ValueError(f"mesh has no axis {data_axis!r} (its axes: "
                     f"{', '.join(map(repr, mesh.axis_names))})")


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """The sharding of the state: a full copy on every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, data_axis: str = DATA_AXIS) -> NamedSharding:
  """The sharding of a batch: axis 0 split along ``data_axis``, the rest whole."""
  _check_axis(mesh, data_axis)
  return NamedSharding(mesh, PartitionSpec(data_axis))


def _local_data_shards(mesh: Mesh, data_axis: str) -> int:
  """How many distinct slices of the batch this process's devices of ``mesh`` hold."""
  axis = mesh.axis_names.index(data_axis)
  here = jax.process_index()
  coords = {idx[axis] for idx in np.ndindex(mesh.devices.shape)
            if mesh.devices[idx].process_index == here}
  return len(coords)


def replicate_on_mesh(tree, mesh: Optional[Mesh] = None):
  """Places a copy of every leaf on every device of ``mesh`` (the state's layout).

  Leaves already laid out so are returned as they are (a step's output goes
  back in without a copy). In a multi-process run every process must pass the
  same values (e.g. the same seed, or the same restored checkpoint).

  Args:
    tree: pytree of host (numpy) or device arrays, e.g. a
      :class:`~lipjax.training.step.TrainState` without a device axis (an
      ``unreplicate``-d pmap state, a restored checkpoint).
    mesh: default :func:`data_mesh`.

  Returns:
    The same pytree of global ``jax.Array`` s, each with its leaf's shape and
    sharding ``NamedSharding(mesh, P())``.
  """
  sharding = replicated_sharding(data_mesh() if mesh is None else mesh)
  return jax.tree_util.tree_map(lambda x: _place(x, sharding), tree)


def _place(x, sharding: NamedSharding):
  if isinstance(x, jax.Array):
    if x.sharding == sharding:
      return x
    if not x.is_fully_addressable:
      if x.sharding.is_fully_replicated:
        x = x.addressable_shards[0].data
      else:
        raise ValueError(f"cannot re-place an array of shape {x.shape} that spans several "
                         f"processes with sharding {x.sharding}")
  if isinstance(x, jax.Array) and jax.process_count() == 1:
    return jax.device_put(x, sharding)
  return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def shard_batch_on_mesh(array, mesh: Optional[Mesh] = None, data_axis: str = DATA_AXIS):
  """A global batch array split along ``data_axis`` of ``mesh``.

  Args:
    array: ``(B, ...)``, this process's part of the global batch (in a single
      process: the whole batch), a host or device array. A global array that
      already has the batch sharding is returned as it is.
    mesh: default :func:`data_mesh` (``data_axis``).
    data_axis: the mesh axis to split the batch along.

  Returns:
    ``jax.Array`` of shape ``(B * P, ...)`` for ``P`` processes, sharding
    ``NamedSharding(mesh, P(data_axis))``; process ``i``'s rows come after
    those of the processes before it in the mesh's device order.

  Raises:
    ValueError: ``B`` is not divisible by the number of batch slices this
      process's devices hold (one line).
  """
  mesh = data_mesh(axis_name=data_axis) if mesh is None else mesh
  sharding = batch_sharding(mesh, data_axis)
  return _put_batch(array, sharding, _local_data_shards(mesh, data_axis), data_axis)


def _put_batch(array, sharding, local_shards, data_axis):
  if isinstance(array, jax.Array) and array.sharding == sharding:
    return array
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    raise ValueError(f"a global batch array must have the sharding {sharding.spec} of the "
                     f"step's mesh, got {array.sharding}")
  shape = np.shape(array)
  if len(shape) == 0:
    raise ValueError("a batch must have a leading batch axis, got a scalar")
  if local_shards == 0:
    raise ValueError("this process holds no device of the mesh")
  if shape[0] % local_shards:
    raise ValueError(f"batch of {shape[0]} examples is not divisible by the {local_shards} "
                     f"device(s) of mesh axis {data_axis!r} in this process")
  if isinstance(array, jax.Array) and jax.process_count() == 1:
    return jax.device_put(array, sharding)
  return jax.make_array_from_process_local_data(sharding, np.asarray(array))


def fetch_replicated(tree):
  """Host copy of a replicated pytree (a sharded step's state or metrics).

  Reads this process's first copy of each leaf, so it needs no communication
  and works in every process of a multi-process run.

  Args:
    tree: pytree of replicated ``jax.Array`` s (or host arrays).

  Returns:
    The same pytree of numpy arrays, shapes unchanged.

  Raises:
    ValueError: a leaf is split across devices of several processes.
  """

  def get(x):
    if isinstance(x, jax.Array):
      if x.is_fully_addressable:
        return np.asarray(x)
      if not x.sharding.is_fully_replicated:
        raise ValueError(f"fetch_replicated: an array of shape {x.shape} is split across "
                         f"processes ({x.sharding}); it is not a replicated leaf")
      return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)

  return jax.tree_util.tree_map(get, tree)


def make_sharded_train_step(model, optimizer: optax.GradientTransformation, *,
                            mesh: Optional[Mesh] = None, data_axis: str = DATA_AXIS,
                            loss: str = "gloro", bound: str = "local",
                            iterations: Optional[int] = None,
                            grad: str = "constant", sparsity_weight: float = 0.0,
                            eps_schedule=None, kappa_schedule=None, bound_options=None):
  """Data-parallel step compiled once with ``jax.jit`` over a device mesh.

  Same options and metrics as :func:`~lipjax.training.step.make_train_step`;
  the update is the same pure function, without any explicit collective. The
  batch is split along ``data_axis`` of ``mesh``
  (``NamedSharding(mesh, P(data_axis))``); the state (parameters, optimiser
  state, PRNG key, running power vectors of shape ``(1, *in_shape)`` per
  layer) is replicated (``NamedSharding(mesh, P())``) in and out. The loss
  and metrics are means over the global batch, so with ``D`` devices the
  step equals the single-device step on the same ``B`` examples up to float
  rounding, and the replicated state stays identical on every device. The
  step donates ``state``. Models that constrain shardings with bare
  ``PartitionSpec`` s need ``with jax.set_mesh(mesh):`` around the calls;
  lipjax's own models need no mesh context.

  Args:
    model, optimizer, loss, bound, iterations, grad, sparsity_weight,
      eps_schedule, kappa_schedule, bound_options: as for ``make_train_step``.
    mesh: the devices; default :func:`data_mesh` (all devices of all
      processes, one axis ``data_axis``). Other mesh axes, if any, hold
      copies of the batch slices.
    data_axis: the mesh axis the batch is split along.

  Returns:
    ``step(state, images (B, ...), labels (B,) int) -> (state, metrics)``.
    ``images`` and ``labels`` are this process's part of the global batch
    (host or device arrays, ``B`` divisible by the devices of ``data_axis``
    in this process) or global arrays from :func:`shard_batch_on_mesh`.
    ``state`` is a :class:`~lipjax.training.step.TrainState` without a device
    axis; leaves not yet replicated on ``mesh`` are placed there (see
    :func:`replicate_on_mesh`). The returned state and the scalar metrics
    are replicated global arrays (read them with :func:`fetch_replicated`).
    The step has attributes ``mesh``, ``state_sharding``,
    ``batch_sharding`` and ``jitted`` (the compiled function).

  Raises:
    ValueError: ``mesh`` has no axis ``data_axis``; at a call, a batch that
      does not divide over the devices, or images and labels of mismatched
      batch sizes (one line).
  """
  mesh = data_mesh(axis_name=data_axis) if mesh is None else mesh
  _check_axis(mesh, data_axis)
  update = step_lib.make_update(
      model, optimizer, loss=loss, bound=bound, iterations=iterations, grad=grad,
      sparsity_weight=sparsity_weight, eps_schedule=eps_schedule,
      kappa_schedule=kappa_schedule, axis_name=None, bound_options=bound_options)
  state_sharding = replicated_sharding(mesh)
  data_sharding = batch_sharding(mesh, data_axis)
  local_shards = _local_data_shards(mesh, data_axis)
  # Shardings as pytree prefixes: one for the whole state, one per batch array.
  jitted = jax.jit(update, in_shardings=(state_sharding, data_sharding, data_sharding),
                   out_shardings=(state_sharding, state_sharding), donate_argnums=(0,))

  def place_state(state):
    leaves, treedef = jax.tree_util.tree_flatten(state)
    if all(isinstance(x, jax.Array) and x.sharding == state_sharding for x in leaves):
      return state
    return jax.tree_util.tree_unflatten(treedef, [_place(x, state_sharding) for x in leaves])

  def step(state: step_lib.TrainState, images, labels):
    n_images, n_labels = np.shape(images)[:1], np.shape(labels)[:1]
    if np.ndim(images) < 2 or np.ndim(labels) != 1 or n_images != n_labels:
      raise ValueError(f"expected images (B, ...) and labels (B,), got {np.shape(images)} "
                       f"and {np.shape(labels)}")
    images = _put_batch(images, data_sharding, local_shards, data_axis)
    labels = _put_batch(labels, data_sharding, local_shards, data_axis)
    return jitted(place_state(state), images, labels)

  step.mesh = mesh
  step.state_sharding = state_sharding
  step.batch_sharding = data_sharding
  step.jitted = jitted
  return step
