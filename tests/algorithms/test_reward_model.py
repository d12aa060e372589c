"""Reward models from two sample sources (Init-SFT & co.), their export, and Best-of-N."""

import json
import math
import os
import random
import subprocess
import sys

import lightning as L
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_irl.algorithms import BestOfN, RewardModel
from lightning_irl.algorithms.base import OptimizerSpec
from lightning_irl.algorithms.reward_model import best_of_n_indices
from lightning_irl.algorithms.reward_sources import SampleSource, encode_pairs
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.data.collate import DemonstrationCollator
from lightning_irl.data.encode import encode_records
from lightning_irl.models.scoring import sequence_logits
from lightning_irl.models.spec import ModelSpec
from lightning_irl.rollout import SamplingConfig

from tests.conftest import TINY_LLAMA

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(os.path.dirname(sys.executable), "lightning_irl")


def _spec(seed):
    return ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes", seed=seed)


def _trainer(steps, **kwargs):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     val_check_interval=steps, check_val_every_n_epoch=None, **kwargs)


def test_presets_name_the_papers_pairings_and_bad_combinations_fail():
    sft, init = ModelSpec(model_name_or_path="sft-folder", tokenizer="task:modes"), _spec(1)
    sources = RewardModel.resolve_sources("init_sft", init, sft, None, None)
    assert sources["positive"].policy is sft and sources["negative"].policy is init
    sources = RewardModel.resolve_sources("init_demo", init, None, None, None)
    assert sources["positive"].kind == "demonstrations" and sources["negative"].policy is init
    sources = RewardModel.resolve_sources("sft_demo", None, sft, None, None)
    assert sources["positive"].kind == "demonstrations" and sources["negative"].policy is sft
    with pytest.raises(ValueError, match="needs `sft_policy`"):
        RewardModel.resolve_sources("init_sft", init, None, None, None)
    with pytest.raises(ValueError, match="unknown preset"):
        RewardModel.resolve_sources("sft_init", init, sft, None, None)
    with pytest.raises(ValueError, match="leave positive/negative out"):
        RewardModel.resolve_sources("init_demo", init, None, SampleSource(), None)
    with pytest.raises(ValueError, match="a `preset`"):
        RewardModel.resolve_sources(None, None, None, SampleSource(), None)
    assert SampleSource(file="x.jsonl").kind == "file" and SampleSource(policy=init).kind == "policy"
    with pytest.raises(ValueError, match="needs `policy:`"):
        SampleSource(kind="policy")
    # a policy loaded from a folder is rebuilt from its spec, so it stays out of checkpoints
    module = RewardModel(classifier=_spec(0), preset="init_sft", initial_policy=init, sft_policy=sft)
    module.source_policies["positive"] = torch.nn.Linear(2, 2)
    module.source_policies["negative"] = torch.nn.Linear(2, 2)
    keys = module.state_dict().keys()
    assert not any(k.startswith("source_policies.positive.") for k in keys)
    assert any(k.startswith("source_policies.negative.") for k in keys)  # inline + seeded: saved


def test_separates_demonstrations_from_random_strings_and_exports_a_plain_hf_classifier(tmp_path):
    """init_demo with a random-initialised policy: its samples are near-uniform random strings over
    the task's symbols (letters, '=', <unk>, early EOS). Held-out AUROC > 0.95 after 30 steps."""
    L.seed_everything(0)
    export = tmp_path / "rm"
    module = RewardModel(classifier=_spec(0), preset="init_demo", initial_policy=_spec(1),
                         optimizer=OptimizerSpec(lr=3e-3, schedule="constant_with_warmup"),
                         sampling=SamplingConfig(max_new_tokens=8), export_dir=str(export))
    data = DemonstrationDataModule(task="modes", num_train=2048, num_val=128, batch_size=64)
    trainer = _trainer(30)
    trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["val/auroc"] > 0.95, metrics
    assert metrics["val/accuracy"] > 0.8 and metrics["val/reward_margin"] > 1.0, metrics
    assert metrics["val/reward_margin"] == pytest.approx(metrics["val/reward_positive"] - metrics["val/reward_negative"])
    assert math.isfinite(metrics["train/loss"])

    # Export round trip: a plain HF folder (safetensors + tokenizer) with the same scores, loadable
    # as the adversarial discriminator loads it; the score head is loaded, not re-initialised.
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()
    reloaded, info = AutoModelForSequenceClassification.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    as_discriminator = ModelSpec(model_name_or_path=str(export)).build_sequence_classifier(
        AutoTokenizer.from_pretrained(export))
    config = json.loads((export / "config.json").read_text())
    assert config["lightning_irl_reward_model"]["preset"] == "init_demo"
    batch = DemonstrationCollator(module.tokenizer.pad_token_id)(data.datasets["val"][:16])
    with torch.no_grad():
        expected = module.score(batch["input_ids"], batch["attention_mask"])
        for model in (reloaded.eval(), as_discriminator.eval()):
            torch.testing.assert_close(sequence_logits(model, batch["input_ids"], batch["attention_mask"]), expected)


def test_init_sft_logit_approaches_the_exact_log_ratio_on_an_enumerable_toy(tmp_path):
    """A categorical world: one prompt, six responses, two known policies (π_init, π_SFT). The
    classifier is trained on 16000 samples of each (JSONL file sources) and its logits are
    compared with the exact log π_SFT − log π_init. Tolerance: Pearson r > 0.97, regression slope
    in [0.8, 1.2], max abs error < 0.35 nats (the empirical log-ratio of the samples is itself
    ≈ 0.1 away from the exact one)."""
    prompt = "c a b ="
    responses = ["a", "b c", "d", "e f", "g", "h"]
    p_init = [0.30, 0.25, 0.20, 0.10, 0.10, 0.05]
    p_sft = [0.05, 0.10, 0.15, 0.20, 0.25, 0.25]
    rng = random.Random(0)
    for name, probs in (("sft", p_sft), ("init", p_init)):
        with open(tmp_path / f"{name}.jsonl", "w") as handle:
            for response in rng.choices(responses, weights=probs, k=16000):
                handle.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    L.seed_everything(0)
    module = RewardModel(classifier=_spec(0), positive=SampleSource(file=str(tmp_path / "sft.jsonl"), val_fraction=0.05),
                         negative=SampleSource(file=str(tmp_path / "init.jsonl"), val_fraction=0.05),
                         optimizer=OptimizerSpec(lr=3e-3, warmup_steps=10, schedule="cosine"), export=False)
    # the demonstrations only pace the steps (file sides draw batch-size rows each step)
    data = DemonstrationDataModule(task="modes", num_train=1280, num_val=128, batch_size=128)
    trainer = _trainer(120)
    trainer.fit(module, datamodule=data)
    with torch.no_grad():
        logits = module.score_pairs([prompt] * len(responses), responses)
    exact = torch.tensor([math.log(s / i) for s, i in zip(p_sft, p_init)])
    centred_x, centred_y = exact - exact.mean(), logits - logits.mean()
    r = float((centred_x * centred_y).sum() / (centred_x.norm() * centred_y.norm()))
    slope = float((centred_x * centred_y).sum() / (centred_x ** 2).sum())
    assert r > 0.97 and 0.8 < slope < 1.2, (r, slope, logits.tolist(), exact.tolist())
    assert float((logits - exact).abs().max()) < 0.35, (logits.tolist(), exact.tolist())
    assert float(trainer.callback_metrics["val/auroc"]) > 0.5


def _pad_eos(module):
    module.tokenizer.pad_token = module.tokenizer.eos_token  # the hard case: pad id == EOS id
    assert module.tokenizer.pad_token_id == module.tokenizer.eos_token_id
    module.configure_model()
    return module


def test_reward_does_not_depend_on_batch_composition_or_padding_side_with_pad_equal_eos():
    module = _pad_eos(RewardModel(classifier=_spec(0), preset="init_demo", initial_policy=_spec(1)))
    module.setup("predict")
    tokenizer = module.tokenizer
    prompts = ["c a f b =", "b a d =", "h g a c e ="]
    responses = ["c a f b", "d a b", "a c e g h"]
    with torch.no_grad():
        alone = torch.cat([module.score_pairs([p], [r]) for p, r in zip(prompts, responses)])
        together = module.score_pairs(prompts, responses)  # right-padded with EOS ids
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
        right = encode_pairs(tokenizer, prompts, responses)
        widths = right["attention_mask"].sum(-1)
        left_ids = torch.full_like(right["input_ids"], tokenizer.pad_token_id)
        left_mask = torch.zeros_like(right["attention_mask"])
        for i, w in enumerate(widths.tolist()):
            left_ids[i, -w:], left_mask[i, -w:] = right["input_ids"][i, :w], 1
        torch.testing.assert_close(module.score(left_ids, left_mask), alone, atol=1e-5, rtol=1e-5)
        # a demonstration batch from the collator, and predict rows, read the same rewards
        examples, _ = encode_records([{"prompt": p, "response": r} for p, r in zip(prompts, responses)], tokenizer)
        batch = DemonstrationCollator(tokenizer.pad_token_id)(examples)
        rows = module.predict_step(batch, 0)
        torch.testing.assert_close(torch.tensor([row["reward"] for row in rows]), alone, atol=1e-5, rtol=1e-5)

    # Best-of-N scores rollouts (left-padded prompts, right-padded responses, pad == EOS): each
    # candidate's reward is the reward of its own tokens scored alone, without any padding.
    best = _pad_eos(BestOfN(policy=_spec(2), reward_model=_spec(0), return_all=True,
                            sampling=SamplingConfig(max_new_tokens=6, num_samples=4)))
    torch.manual_seed(0)
    rollout = best.rollout(batch, SamplingConfig(max_new_tokens=6, num_samples=4))
    assert (rollout.attention_mask[:, 0] == 0).any() and (rollout.attention_mask[:, -1] == 0).any()
    with torch.no_grad():
        batched = best.score_rollout(rollout, [p for p in batch["prompt"] for _ in range(4)])
        for i in range(rollout.input_ids.size(0)):
            ids = rollout.input_ids[i][rollout.attention_mask[i].bool()][None]
            single = sequence_logits(best.reward_model, ids, torch.ones_like(ids))
            assert float(single) == pytest.approx(float(batched[i]), abs=1e-5)
    torch.manual_seed(0)
    out = best.predict_step(batch, 0)  # same seed, same samples
    assert len(out) == 3
    for i, row in enumerate(out):
        candidates = row["candidates"]
        assert [c["reward"] for c in candidates] == pytest.approx(batched[4 * i : 4 * i + 4].tolist(), abs=1e-6)
        assert row["reward"] == max(c["reward"] for c in candidates)
    assert best_of_n_indices(torch.tensor([0.1, 0.5, float("nan"), -1.0, 2.0, 2.0]), 3).tolist() == [1, 4]


def save_stand_in_sft(root):
    """A stand-in for the quickstart's SFT export under ``root`` (the path the reward-model configs
    name): a small policy folder with its tokenizer. Returns the folder."""
    sft = root / "checkpoints/quickstart/version_0/export"
    spec = ModelSpec(config={**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                             "num_key_value_heads": 4, "max_position_embeddings": 32},
                     tokenizer="task:modes", seed=3)
    tokenizer = spec.load_tokenizer()
    spec.build_causal_lm(tokenizer).save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    return sft


@pytest.mark.slow
def test_cli_fits_the_reward_model_config_then_best_of_n_predicts(tmp_path):
    save_stand_in_sft(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    small = ["--data.init_args.num_train", "64", "--data.init_args.num_val", "16", "--data.init_args.batch_size", "8"]

    def run(args):
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    run([CLI, "fit", "--config", os.path.join(REPO, "configs/reward_model.yaml"), "--trainer.max_steps", "3",
         "--trainer.val_check_interval", "3", *small])
    export = tmp_path / "checkpoints/reward_model/version_0/export"
    assert (export / "model.safetensors").exists() and (export / "tokenizer.json").exists()
    assert list((tmp_path / "logs/reward_model/version_0").glob("events.out.tfevents.*"))

    out = tmp_path / "best.jsonl"
    run([CLI, "predict", "--config", os.path.join(REPO, "configs/best_of_n.yaml"), "--predictions.output_path",
         str(out), "--model.init_args.policy.model_name_or_path", "checkpoints/quickstart/version_0/export",
         "--model.init_args.reward_model.model_name_or_path", "checkpoints/reward_model/version_0/export",
         "--model.init_args.sampling.num_samples", "3", "--model.init_args.return_all", "true", "--data.init_args.num_test", "5"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    for row in rows:
        assert {"prompt", "response", "reward", "logprob", "n", "candidates"} <= set(row)
        assert len(row["candidates"]) == 3 and row["reward"] == max(c["reward"] for c in row["candidates"])
