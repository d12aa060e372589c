"""One LightningModule per method; each file is thin and calls the math in ``objectives/``."""

from lightning_irl.algorithms.adversarial import Adversarial
from lightning_irl.algorithms.base import IRLModule, OptimizerSpec
from lightning_irl.algorithms.distill import Distill
from lightning_irl.algorithms.engine import NonFiniteError
from lightning_irl.algorithms.iq_learn import IQLearn
from lightning_irl.algorithms.reward_model import BestOfN, RewardModel
from lightning_irl.algorithms.sft import SFT
from lightning_irl.algorithms.spin import SPIN

__all__ = ["Adversarial", "BestOfN", "Distill", "IQLearn", "IRLModule", "NonFiniteError", "OptimizerSpec",
           "RewardModel", "SFT", "SPIN"]
