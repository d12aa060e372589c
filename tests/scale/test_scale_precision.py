"""Lightning precision flags and gradient checkpointing: an SFT step runs with each flag that
works on CPU; 16-mixed is not available on CPU (Lightning falls back to bf16-mixed, with a
warning; FSDP2 refuses it outright)."""

import lightning as L
import pytest
import torch

from lightning_irl.algorithms import SFT, OptimizerSpec
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.models.spec import ModelSpec

from conftest import TINY_LLAMA


class Capture(L.Callback):
    def __init__(self):
        self.grads = None
        self.dtypes = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.detach().float().clone() for n, p in pl_module.policy.named_parameters()
                          if p.grad is not None}
            self.dtypes = {p.dtype for p in pl_module.policy.parameters()}


def one_step(precision, gradient_checkpointing=False, lora=None):
    L.seed_everything(0)
    spec = ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes", seed=0,
                     gradient_checkpointing=gradient_checkpointing, lora=lora)
    module = SFT(policy=spec, optimizer=OptimizerSpec(lr=1e-3), max_grad_norm=1.0, export=False)
    data = DemonstrationDataModule(task="modes", num_train=8, num_val=0, batch_size=8, shuffle=False)
    capture = Capture()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[capture], limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return trainer, module, capture


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_an_sft_step_runs(precision, gradient_checkpointing):
    trainer, module, capture = one_step(precision, gradient_checkpointing)
    assert trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(torch.isfinite(g).all() for g in capture.grads.values())
    assert any(g.abs().sum() > 0 for g in capture.grads.values())
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert capture.dtypes == {expected}  # weights: fp32 master copy unless bf16-true
    policy = module.policy
    enabled = getattr(policy, "is_activation_checkpointing", None)
    assert (enabled if enabled is not None else policy.is_gradient_checkpointing) == gradient_checkpointing


def test_gradient_checkpointing_gives_the_same_gradient():
    _, _, plain = one_step("32-true", gradient_checkpointing=False)
    _, _, checkpointed = one_step("32-true", gradient_checkpointing=True)
    for name, grad in plain.grads.items():
        torch.testing.assert_close(checkpointed.grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_lora_step_in_bf16_mixed_with_checkpointing():
    from lightning_irl.models.spec import LoraSpec

    trainer, module, capture = one_step("bf16-mixed", gradient_checkpointing=True, lora=LoraSpec(r=4, alpha=8))
    assert trainer.global_step == 1
    trained = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trained and all(capture.grads[n].abs().sum() > 0 for n in trained if "lora_B" in n)  # A gets 0 while B = 0


def test_16_mixed_on_cpu_falls_back_to_bf16_mixed():
    with pytest.warns(UserWarning, match="not supported on CPU"):
        trainer = L.Trainer(accelerator="cpu", precision="16-mixed", logger=False)
    assert trainer.precision == "bf16-mixed"


def test_fsdp2_refuses_16_mixed():
    from lightning_irl.strategies import FSDP2Strategy

    with pytest.raises(ValueError, match="does not support"):
        L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2Strategy(), precision="16-mixed", logger=False)
