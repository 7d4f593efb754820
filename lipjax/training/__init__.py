"""Certified training: losses, projections and the training step."""

from lipjax.training.losses import bcp_loss, gloro_loss, sparsity_loss, worst_case_deltas
from lipjax.training.step import TrainState, create_train_state, make_train_step, project_thresholds
