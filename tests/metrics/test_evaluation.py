"""The eval/… wiring of IRLModule and the SampleLogger callback, on a tiny model and the modes task."""

import glob
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_irl.algorithms import SFT
from lightning_irl.callbacks import SampleLogger
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.metrics import EvalConfig, take_prompts
from lightning_irl.rollout import SamplingConfig

KNOWN_EXPERT = ["eval/forward_kl", "eval/reverse_kl", "eval/reverse_kl_se", "eval/invalid_mass",
                "eval/mode_coverage", "eval/mass_copy", "eval/mass_reverse", "eval/mass_sort"]
ANY_TASK = ["eval/entropy", "eval/distinct_1", "eval/distinct_2", "eval/self_bleu", "eval/response_length"]



def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(glob.glob(f"{folder}/**/events.out.tfevents*", recursive=True)[0],
                           size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_fit_logs_eval_metrics_and_text_samples(tmp_path, tiny_spec):
    module = SFT(tiny_spec, sampling=SamplingConfig(max_new_tokens=8),
                 evaluation=EvalConfig(num_prompts=6, num_samples=3, every_n_val=2))
    data = DemonstrationDataModule(task="modes", num_train=64, num_val=12, batch_size=8)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = L.Trainer(max_steps=4, val_check_interval=2, accelerator="cpu", logger=logger,
                        callbacks=[SampleLogger(every_n_steps=2, num_prompts=2, num_samples=2)],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module.export = False
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    for name in KNOWN_EXPERT + ANY_TASK:
        assert name in metrics, name
    assert 0.0 <= float(metrics["eval/invalid_mass"]) <= 1.0
    assert float(metrics["eval/reverse_kl"]) >= 0.0 and float(metrics["eval/reverse_kl_se"]) >= 0.0
    # the conditional KL needs at least one valid sample (NaN values are not logged)
    assert ("eval/reverse_kl_valid" in metrics) == (float(metrics["eval/invalid_mass"]) < 1)
    masses = sum(float(metrics[f"eval/mass_{m}"]) for m in ("copy", "reverse", "sort"))
    assert masses == pytest.approx(1.0 - float(metrics["eval/invalid_mass"]), abs=1e-5)

    acc = events(tmp_path)
    scalars = acc.Tags()["scalars"]
    assert len(acc.Scalars("val/loss")) == 2  # validations at steps 2 and 4 ...
    assert len(acc.Scalars("eval/reverse_kl")) == 1  # ... evaluation at every 2nd one
    assert set(KNOWN_EXPERT + ANY_TASK) <= set(scalars)
    text_tags = [t for t in acc.Tags()["tensors"] if t.startswith("samples")]
    assert text_tags
    texts = acc.Tensors(text_tags[0])
    assert [t.step for t in texts] == [2, 4]  # every 2 steps; the end-of-training one shares step 4
    table = texts[0].tensor_proto.string_val[0].decode()
    assert table.startswith("| prompt | response | log π | mode |") and " = |" in table


def test_validate_always_evaluates_and_eval_can_be_turned_off(tiny_spec):
    data = DemonstrationDataModule(task="modes", num_val=8, batch_size=8)
    kwargs = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    module = SFT(tiny_spec, evaluation=EvalConfig(num_prompts=4, num_samples=2, every_n_val=100))
    trainer = L.Trainer(**kwargs)
    trainer.validate(module, data)
    assert "eval/reverse_kl" in trainer.callback_metrics
    off = SFT(tiny_spec, evaluation=EvalConfig(enabled=False))
    trainer = L.Trainer(**kwargs)
    trainer.validate(off, data)
    assert "val/loss" in trainer.callback_metrics
    assert not any(k.startswith("eval/") for k in trainer.callback_metrics)


class Recording(SFT):
    """What a subclass (the adversarial module) sees: the evaluation's rollouts, via super()."""

    def _sample_eval_step(self, batch, logps, batch_idx):
        out = super()._sample_eval_step(batch, logps, batch_idx)
        self.returned.append(out)
        return out


def test_forward_kl_is_exact_and_the_eval_step_returns_its_rollout(tiny_spec):
    # 12 prompts in batches of 5; 4 rows per policy forward: several forwards per batch
    data = DemonstrationDataModule(task="modes", num_val=12, batch_size=5)
    module = Recording(tiny_spec, sampling=SamplingConfig(max_new_tokens=6),
                       evaluation=EvalConfig(num_prompts=6, num_samples=2, support_batch_size=4))
    module.returned = []
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, data)
    logged = float(trainer.callback_metrics["eval/forward_kl"])

    # brute force: each answer of each validation prompt scored on its own, unpadded
    tokenizer, policy, task = module.tokenizer, module.policy.eval(), data.task
    prompts = [example["prompt"] for example in data.datasets["val"]]
    assert len(prompts) == 12
    total = 0.0
    with torch.no_grad():
        for prompt in prompts:
            prompt_ids = tokenizer(prompt)["input_ids"]
            for answer, p in task.support(prompt).items():
                ids = prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                logits = policy(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
                log_pi = sum(float(logits[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids)))
                total += p * (math.log(p) - log_pi)
    assert logged == pytest.approx(total / len(prompts), abs=1e-5)

    # the rollouts of the first 6 prompts: 5 from the first batch, 1 from the second, none after
    assert len(module.returned) == 3 and module.returned[2] is None
    for (prompts_dict, rollout, config), n in zip(module.returned[:2], (5, 1)):
        assert len(prompts_dict["prompt"]) == n and config.num_samples == 2
        assert rollout.input_ids.size(0) == 2 * n and len(rollout.responses) == 2 * n


def test_eval_sampling_leaves_the_global_rng_alone():
    config = EvalConfig(seed=7)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with config.rng(torch.device("cpu"), rank=0, step=1):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with config.rng(torch.device("cpu"), rank=0, step=1):
        assert torch.equal(torch.rand(3), inside)  # same draws at every evaluation
    with config.rng(torch.device("cpu"), rank=1, step=1):
        assert not torch.equal(torch.rand(3), inside)


def test_take_prompts_trims_left_padding():
    batch = {"prompt_input_ids": torch.tensor([[0, 0, 5, 6], [0, 0, 0, 7], [8, 9, 10, 11]]),
             "prompt_attention_mask": torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]),
             "prompt": ["a", "b", "c"], "response": ["x", "y", "z"]}
    part = take_prompts(batch, 2)
    assert part["prompt_input_ids"].tolist() == [[5, 6], [0, 7]]
    assert part["prompt_attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert part["prompt"] == ["a", "b"] and part["response"] == ["x", "y"]
