"""Certified training: losses, schedules, projections and the training steps."""

from lipjax.training import schedules
from lipjax.training.losses import (bcp_loss, gloro_loss, init_power_state, sparsity_loss,
                                    worst_case_deltas)
from lipjax.training.schedules import eps_schedule, kappa_schedule, lr_schedule
from lipjax.training.step import (TrainState, create_train_state, make_parallel_train_step,
                                  make_train_step, project_thresholds, replicate,
                                  shard_batch, unreplicate)

__all__ = [
    "TrainState",
    "bcp_loss",
    "create_train_state",
    "eps_schedule",
    "gloro_loss",
    "init_power_state",
    "kappa_schedule",
    "lr_schedule",
    "make_parallel_train_step",
    "make_train_step",
    "project_thresholds",
    "replicate",
    "schedules",
    "shard_batch",
    "sparsity_loss",
    "unreplicate",
    "worst_case_deltas",
]
