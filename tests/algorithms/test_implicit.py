"""SPIN / IRFT, IQ-Learn and teacher distillation: CLI runs of the shipped YAMLs and module checks
that can fail (log 2 at a fresh opponent, refresh at iteration boundaries, λ = 0 is SFT, zero JSD
against an identical teacher, accumulation-invariant normalisation)."""

from __future__ import annotations

import math
import os

import lightning as L
import pytest
import torch

from lightning_irl.algorithms import SFT, SPIN, Distill, IQLearn, OptimizerSpec
from lightning_irl.cli import build_cli
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.models.spec import ModelSpec
from lightning_irl.rollout import SamplingConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


# ---- helpers --------------------------------------------------------------------------------
def spec(seed: int = 0, **config) -> ModelSpec:
    return ModelSpec(config={**TINY_LLAMA, **config}, tokenizer="task:modes", seed=seed)


def fit(module, steps: int, callbacks=(), batch_size: int = 8) -> L.Trainer:
    L.seed_everything(0)
    data = DemonstrationDataModule(task="modes", num_train=64, num_val=8, batch_size=batch_size, max_length=32)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=list(callbacks))
    trainer.fit(module, data)
    return trainer


class GradCapture(L.Callback):
    """Policy gradients of every optimizer step (after clipping, before the update)."""

    def __init__(self) -> None:
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.policy.named_parameters()
                           if p.grad is not None})


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def assert_same_grads(a, b, **tol) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


SMALL = dict(export=False, max_grad_norm=None, sampling=SamplingConfig(max_new_tokens=8))


# ---- the shipped configs, end to end through the CLI ------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name, metrics", [
    ("spin", ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "train/loss",
              "spin/identical_fraction"]),
    ("iq_learn", ["iq/reward_mean", "iq/reward_std", "train/loss", "train/nll", "train/penalty"]),
    ("distill", ["train/loss", "distill/on_policy"]),
])
def test_config_runs_through_cli(name, metrics, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(args=[
        "fit", "--config", os.path.join(REPO, "configs", f"{name}.yaml"),
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.num_train", "96", "--data.init_args.num_val", "16",
    ])
    assert cli.trainer.global_step == 3
    for metric in metrics + ["eval/forward_kl", "eval/invalid_mass", "val/loss"]:
        assert metric in cli.trainer.callback_metrics, metric
        assert torch.isfinite(cli.trainer.callback_metrics[metric])
    assert os.path.exists(tmp_path / "checkpoints" / name / "version_0" / "export" / "model.safetensors")


# ---- SPIN ------------------------------------------------------------------------------------
def test_spin_loss_is_log2_while_opponent_equals_policy():
    module = SPIN(spec(), kl_coef=0.5, **SMALL)
    trainer = fit(module, steps=1)
    metrics = trainer.callback_metrics
    assert metrics["train/loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["rewards/accuracies"].item() == 0.0  # ties are not wins (TRL)


def test_identical_fraction_compares_response_tokens_across_layouts():
    from lightning_irl.algorithms.spin import identical_fraction

    # chosen: right-padded [prompt | response]; rejected: left-padded prompt, right-padded response
    chosen = {"input_ids": torch.tensor([[5, 6, 7, 1, 0], [5, 8, 9, 1, 0]]),
              "loss_mask": torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]])}
    rejected = {"input_ids": torch.tensor([[0, 5, 6, 7, 1], [5, 8, 4, 1, 0]]),
                "loss_mask": torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 0]])}
    assert identical_fraction(chosen, rejected) == 0.5


class OpponentWatch(L.Callback):
    def __init__(self) -> None:
        self.before_step, self.after_step, self.iteration = [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before_step.append(same_weights(pl_module.opponent, pl_module.policy))
        self.iteration.append(int(pl_module.opponent_iteration))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_step.append(same_weights(pl_module.opponent, pl_module.policy))


def test_spin_opponent_refreshes_at_iteration_boundaries_and_stops():
    watch = OpponentWatch()
    module = SPIN(spec(), iterations=3, steps_per_iteration=2, optimizer=OptimizerSpec(lr=1e-2), **SMALL)
    trainer = fit(module, steps=50, callbacks=[watch])
    assert trainer.global_step == 6  # 3 iterations x 2 steps, then it stops
    # right after a refresh (first step of each iteration) the opponent is the policy ...
    assert watch.before_step == [True, False, True, False, True, False]
    # ... and one optimizer step later they differ
    assert watch.after_step == [False] * 6
    assert watch.iteration == [0, 0, 1, 1, 2, 2]
    assert not any(p.requires_grad for p in module.opponent.parameters())
    assert not module.opponent.training
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.opponent.parameters()}


def test_spin_even_split_of_max_steps():
    watch = OpponentWatch()
    fit(SPIN(spec(), iterations=2, **SMALL), steps=4, callbacks=[watch])
    assert watch.iteration == [0, 0, 1, 1]
    assert watch.before_step == [True, False, True, False]


def test_spin_opponent_is_in_the_checkpoint(tmp_path):
    module = SPIN(spec(), iterations=2, steps_per_iteration=2, optimizer=OptimizerSpec(lr=1e-2), **SMALL)
    trainer = fit(module, steps=3)
    path = tmp_path / "spin.ckpt"
    trainer.save_checkpoint(path)
    initial = SPIN(spec(), **SMALL)
    initial.configure_model()
    # after the refresh the opponent is neither the starting model nor the current policy
    assert not same_weights(module.opponent, initial.policy)
    assert not same_weights(module.opponent, module.policy)
    restored = SPIN.load_from_checkpoint(path, policy=spec(), **SMALL)
    assert same_weights(restored.opponent, module.opponent)
    assert same_weights(restored.policy, module.policy)
    assert int(restored.opponent_iteration) == 1


@pytest.mark.parametrize("cls, kwargs", [
    (SPIN, {"kl_coef": 0.5, "sft_weight": 0.3, "sampling": SamplingConfig(max_new_tokens=8, num_samples=2)}),
    (IQLearn, {"lam": 0.5, "gamma": 0.9}),
    (Distill, {"teacher": spec(seed=1), "jsd_beta": 0.5, "on_policy_fraction": 1.0}),
])
def test_micro_batches_give_the_full_batch_gradient(cls, kwargs):
    grads = []
    for micro in (None, 3):
        capture = GradCapture()
        fit(cls(spec(), micro_batch_size=micro, **{**SMALL, **kwargs}), steps=1, callbacks=[capture])
        grads.append(capture.grads[0])
    assert_same_grads(*grads, atol=1e-6, rtol=1e-4)


# ---- IQ-Learn --------------------------------------------------------------------------------
def test_iq_learn_with_lam_zero_is_sft():
    captures = {}
    for name, module in [("sft", SFT(spec(), **SMALL)), ("iq0", IQLearn(spec(), lam=0.0, **SMALL)),
                         ("iq1", IQLearn(spec(), lam=1.0, **SMALL))]:
        captures[name] = GradCapture()
        trainer = fit(module, steps=2, callbacks=[captures[name]])
        if name == "iq0":
            assert trainer.callback_metrics["train/penalty"].item() == 0.0
    for step in range(2):
        assert_same_grads(captures["sft"].grads[step], captures["iq0"].grads[step], atol=1e-7, rtol=1e-5)
    differs = [not torch.allclose(captures["sft"].grads[0][n], captures["iq1"].grads[0][n], atol=1e-6)
               for n in captures["sft"].grads[0]]
    assert any(differs)


def test_iq_learn_reward_stats_and_policy_samples():
    module = IQLearn(spec(), lam=0.5, policy_sample_weight=1.0, **SMALL)
    metrics = fit(module, steps=2).callback_metrics
    for name in ("iq/reward_mean", "iq/reward_std", "train/nll", "train/penalty", "train/penalty_policy"):
        assert torch.isfinite(metrics[name]), name
    assert metrics["iq/reward_std"] > 0
    assert metrics["train/penalty_policy"] > 0
    total = metrics["train/nll"] + metrics["train/penalty"] + metrics["train/penalty_policy"]
    assert metrics["train/loss"].item() == pytest.approx(total.item(), rel=1e-5)


def test_iq_learn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lam"):
        IQLearn(spec(), lam=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        IQLearn(spec(), gamma=1.5)


# ---- Distill ---------------------------------------------------------------------------------
@pytest.mark.parametrize("beta, on_policy", [(0.0, 0.0), (1.0, 0.0), (0.5, 1.0)])
def test_distill_identical_teacher_gives_zero_loss(beta, on_policy):
    module = Distill(spec(seed=0), teacher=spec(seed=0), jsd_beta=beta, on_policy_fraction=on_policy, **SMALL)
    metrics = fit(module, steps=1).callback_metrics
    assert metrics["distill/on_policy"].item() == on_policy
    assert abs(metrics["train/loss"].item()) < 1e-6


def test_distill_different_teacher_gives_positive_loss_and_teacher_is_frozen():
    module = Distill(spec(seed=0), teacher=spec(seed=1), jsd_beta=0.0, **SMALL)
    trainer = fit(module, steps=2)
    assert trainer.callback_metrics["train/loss"].item() > 1e-3
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not module.teacher.training
    assert same_weights(module.teacher, spec(seed=1).build_causal_lm(module.tokenizer))


def test_distill_on_policy_draws_are_seeded():
    module = Distill(spec(), teacher=spec(seed=1), on_policy_fraction=0.3, seed=7)
    draws = [module.use_on_policy(step) for step in range(2000)]
    assert draws == [module.use_on_policy(step) for step in range(2000)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    other = Distill(spec(), teacher=spec(seed=1), on_policy_fraction=0.3, seed=8)
    assert draws != [other.use_on_policy(step) for step in range(2000)]


def test_distill_refuses_a_teacher_with_another_vocabulary(tmp_path):
    module = Distill(spec(), teacher=spec(vocab_size=8))  # fewer logits than the tokenizer's 12 tokens
    with pytest.raises(ValueError, match="vocabulary size"):
        module.configure_model()
    from lightning_irl.tokenizers import word_level_tokenizer

    word_level_tokenizer(list("xyz")).save_pretrained(tmp_path / "other")
    other = ModelSpec(config=dict(TINY_LLAMA), tokenizer=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="tokenizers differ"):
        Distill(spec(), teacher=other)


def test_distill_folder_teacher_is_left_out_of_checkpoints(tmp_path):
    student = spec()
    tokenizer = student.load_tokenizer()
    teacher_model = spec(seed=1).build_causal_lm(tokenizer)
    teacher_model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    module = Distill(student, teacher=ModelSpec(model_name_or_path=str(tmp_path / "teacher")))
    module.configure_model()
    state = module.state_dict()
    assert not any(k.startswith("teacher.") for k in state)
    assert any(k.startswith("policy.") for k in state)
    fresh = Distill(student, teacher=ModelSpec(model_name_or_path=str(tmp_path / "teacher")))
    fresh.configure_model()
    fresh.load_state_dict(state)  # strict: only the teacher's keys may be missing
    assert same_weights(fresh.teacher, teacher_model)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in state.items() if not k.startswith("policy.model.norm")})
