"""Evaluation metrics: torchmetrics ``Metric`` classes with summed (DDP-reducible) states, the
pure functions behind them, and the ``eval/…`` evaluation wired into every algorithm."""

from lightning_irl.metrics.diversity import DistinctN, ResponseLength, SelfBLEU
from lightning_irl.metrics.evaluation import EvalConfig, SampleEvaluator, take_prompts, task_mode_names
from lightning_irl.metrics.functional import COVERAGE_THRESHOLD, SMOOTHING
from lightning_irl.metrics.known_expert import ForwardKL, InvalidMass, ModeMass, PolicyEntropy, ReverseKL, ValidReverseKL

__all__ = [
    "COVERAGE_THRESHOLD",
    "DistinctN",
    "EvalConfig",
    "ForwardKL",
    "InvalidMass",
    "ModeMass",
    "PolicyEntropy",
    "ResponseLength",
    "ReverseKL",
    "SMOOTHING",
    "SampleEvaluator",
    "SelfBLEU",
    "ValidReverseKL",
    "take_prompts",
    "task_mode_names",
]
