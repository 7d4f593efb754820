"""Evaluation of trained networks: PGD attacks, certification at many radii,
tightness of the bounds, Markdown / JSON reports and plots."""

from lipjax.evaluation.pgd import AttackResult, margin, pgd_attack, perturbation_norm, project
from lipjax.evaluation.runner import BOUNDS, EvalOptions, check_eps_list, describe_guarantee, evaluate
from lipjax.evaluation.tightness import JacobianSearch, jacobian_norm_lower_bound, power_norm

__all__ = [
    "AttackResult", "BOUNDS", "EvalOptions", "JacobianSearch", "check_eps_list",
    "describe_guarantee", "evaluate", "jacobian_norm_lower_bound", "margin", "perturbation_norm",
    "pgd_attack", "power_norm", "project",
]
