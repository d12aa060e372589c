from lightning_irl.algorithms.base import IRLModule, OptimizerSpec
from lightning_irl.algorithms.sft import SFT

__all__ = ["IRLModule", "OptimizerSpec", "SFT"]
