"""Certified training: losses, schedules, projections and the training steps
(single device, ``pmap``, and ``jit`` over a device mesh)."""

from lipjax.training import schedules
from lipjax.training.losses import (bcp_loss, gloro_loss, init_power_state, sparsity_loss,
                                    worst_case_deltas)
from lipjax.training.schedules import eps_schedule, kappa_schedule, lr_schedule
from lipjax.training.sharded import (data_mesh, fetch_replicated, make_sharded_train_step,
                                     replicate_on_mesh, shard_batch_on_mesh)
from lipjax.training.step import (TrainState, create_train_state, make_parallel_train_step,
                                  make_train_step, project_thresholds, replicate,
                                  shard_batch, unreplicate)

__all__ = [
    "TrainState",
    "bcp_loss",
    "create_train_state",
    "data_mesh",
    "eps_schedule",
    "fetch_replicated",
    "gloro_loss",
    "init_power_state",
    "kappa_schedule",
    "lr_schedule",
    "make_parallel_train_step",
    "make_sharded_train_step",
    "make_train_step",
    "project_thresholds",
    "replicate",
    "replicate_on_mesh",
    "schedules",
    "shard_batch",
    "shard_batch_on_mesh",
    "sparsity_loss",
    "unreplicate",
    "worst_case_deltas",
]
