from lightning_irl.algorithms.base import IRLModule, OptimizerSpec
from lightning_irl.algorithms.sft import SFT
from lightning_irl.algorithms.adversarial import Adversarial
from lightning_irl.algorithms.spin import SPIN
from lightning_irl.algorithms.iq_learn import IQLearn
from lightning_irl.algorithms.distill import Distill

__all__ = ["IRLModule", "OptimizerSpec", "SFT"]
__all__ += ["SPIN", "IQLearn", "Distill"]
from lightning_irl.algorithms.reward_model import BestOfN, RewardModel  # noqa: E402

__all__ += ["RewardModel", "BestOfN"]
__all__ += ["Adversarial"]
