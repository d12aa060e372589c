"""The reward model's log-ratio form ``h = a·(Σ_response log q − Σ_response log p_neg) + b``: its value
against teacher forcing row by row, its start (at the Init-SFT optimum, or at ``b``), the export →
load → Best-of-N round trip, exact resume, and the shipped config on one and two processes."""

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lightning_irl.algorithms import BestOfN, RewardModel
from lightning_irl.algorithms.base import OptimizerSpec
from lightning_irl.algorithms.reward_model import load_reward_model, score_sequences
from lightning_irl.algorithms.reward_sources import SampleSource, encode_pairs
from lightning_irl.callbacks import ExactResume, RunCheckpoint
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.data.collate import DemonstrationCollator
from lightning_irl.models.discriminator import LOG_RATIO_FILE, LogRatioReward
from lightning_irl.models.spec import ModelSpec
from lightning_irl.rollout import SamplingConfig
from tests.algorithms.test_log_ratio_discriminator import _by_hand
from tests.algorithms.test_reward_model import _pad_eos, _trainer, save_stand_in_sft
from tests.conftest import TINY_LLAMA
from tests.reliability.test_resume import assert_bitwise_equal, final_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(os.path.dirname(sys.executable), "lightning_irl")
PROMPTS = ["c a f b =", "b a d =", "h g a c e ="]
RESPONSES = ["c a f b", "d a b", "a c e g h"]


def _spec(seed):
    return ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes", seed=seed)


def _left_padded(encoded, pad_id):
    ids, att, loss = encoded["input_ids"], encoded["attention_mask"], encoded["loss_mask"]
    out = {"input_ids": torch.full_like(ids, pad_id), "attention_mask": torch.zeros_like(att),
           "loss_mask": torch.zeros_like(loss)}
    for i, width in enumerate(att.sum(-1).tolist()):
        for key, value in (("input_ids", ids), ("attention_mask", att), ("loss_mask", loss)):
            out[key][i, -width:] = value[i, :width]
    return out


def test_log_ratio_reward_is_a_times_log_q_minus_log_p_neg_plus_b_over_response_tokens_only():
    module = _pad_eos(RewardModel(preset="init_sft", initial_policy=_spec(1), sft_policy=_spec(2), form="log_ratio"))
    init, sft, q = module.source_policies["negative"], module.source_policies["positive"], module.reward_model.q
    right = encode_pairs(module.tokenizer, PROMPTS, RESPONSES)  # right-padded with EOS ids
    left = _left_padded(right, module.tokenizer.pad_token_id)
    everything = right["attention_mask"]  # prompt tokens counted too: what the reward must not be

    def reward(rows):
        return module.score(rows["input_ids"], rows["attention_mask"], rows["loss_mask"])

    with torch.no_grad():
        # init_sft: q is a copy of π_SFT, so h starts exactly at log π_SFT − log π_init
        exact = (_by_hand(sft, right["input_ids"], right["attention_mask"], right["loss_mask"])
                 - _by_hand(init, right["input_ids"], right["attention_mask"], right["loss_mask"]))
        assert exact.abs().max() > 0.1  # two different random policies
        for rows in (right, left):
            torch.testing.assert_close(reward(rows), exact, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module.score_pairs(PROMPTS, RESPONSES), exact, rtol=1e-5, atol=1e-5)

        # q moved off π_SFT, a and b set: a·(log q − log p_neg) + b over the response tokens only
        for p in q.parameters():
            p.add_(0.05 * torch.randn_like(p))
        module.reward_model.scale.fill_(1.7)
        module.reward_model.bias.fill_(-0.3)
        ids, attention = right["input_ids"], right["attention_mask"]
        expected = 1.7 * (_by_hand(q, ids, attention, right["loss_mask"])
                          - _by_hand(init, ids, attention, right["loss_mask"])) - 0.3
        with_prompt = 1.7 * (_by_hand(q, ids, attention, everything)
                             - _by_hand(init, ids, attention, everything)) - 0.3
        assert (expected - with_prompt).abs().max() > 1e-2  # the prompt tokens would change it
        assert (expected - exact).abs().max() > 1e-2  # q moved
        for rows in (right, left):
            torch.testing.assert_close(reward(rows), expected, rtol=1e-5, atol=1e-5)
        # the training path (the logit the BCE sees) is the same value, and so are predict's rows
        torch.testing.assert_close(module._logits(right)[0], expected, rtol=1e-5, atol=1e-5)
        batch = DemonstrationCollator(module.tokenizer.pad_token_id)(
            [{"input_ids": ids[m.bool()].tolist(), "loss_mask": lm[m.bool()].tolist(), "prompt_length": 0,
              "prompt": p, "response": r}
             for ids, m, lm, p, r in zip(right["input_ids"], right["attention_mask"], right["loss_mask"], PROMPTS,
                                         RESPONSES)])
        rows = module.predict_step(batch, 0)
        torch.testing.assert_close(torch.tensor([row["reward"] for row in rows]), expected, rtol=1e-5, atol=1e-5)

        # q = p_neg: the reward is b whatever the response
        q.load_state_dict(init.state_dict())
        torch.testing.assert_close(reward(left), torch.full((3,), -0.3), rtol=0, atol=1e-5)


def test_default_form_and_log_ratio_needs_a_negative_policy_sharing_one_tokenizer():
    # the log-ratio form with its likelihood term unless a classifier network is named
    default = RewardModel(preset="init_demo", initial_policy=_spec(1))
    assert (default.form, default.mle_weight) == ("log_ratio", 1.0)
    named = RewardModel(classifier=_spec(0), preset="init_demo", initial_policy=_spec(1))
    assert (named.form, named.mle_weight) == ("classifier", 0.0)
    with pytest.raises(ValueError, match="negative side must be a policy"):
        RewardModel(positive=SampleSource(policy=_spec(1)), negative=SampleSource())
    with pytest.raises(ValueError, match="needs `classifier`"):
        RewardModel(preset="init_demo", initial_policy=_spec(1), form="classifier")
    with pytest.raises(ValueError, match="form must be one of"):
        RewardModel(classifier=_spec(0), preset="init_demo", initial_policy=_spec(1), form="ratio")
    other = ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes?alphabet=abcdefghij", seed=2)
    module = RewardModel(preset="init_sft", initial_policy=_spec(1), sft_policy=other, form="log_ratio")
    with pytest.raises(ValueError, match="need one tokenizer"):
        module.configure_model()


def test_export_loads_with_identical_scores_and_best_of_n_takes_the_argmax(tmp_path):
    """sft_demo with the likelihood term: q starts as a copy of the negative (SFT) policy, so h = b
    = 0 before training; after 4 steps the export (q, reference/, a and b) scores exactly as the
    module did, and Best-of-N keeps each prompt's highest-reward candidate."""
    L.seed_everything(0)
    export = tmp_path / "rm"
    module = RewardModel(preset="sft_demo", sft_policy=_spec(2), form="log_ratio", mle_weight=1.0, bias_lr=0.05,
                         optimizer=OptimizerSpec(lr=3e-3, schedule="constant"),
                         sampling=SamplingConfig(max_new_tokens=6), export_dir=str(export))
    module.configure_model()
    with torch.no_grad():
        assert module.score_pairs(PROMPTS, RESPONSES).abs().max() == 0  # q = p_neg and b = 0: exactly 0
    data = DemonstrationDataModule(task="modes", num_train=64, num_val=16, batch_size=16)
    trainer = _trainer(4)
    trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["train/mle"] > 0 and metrics["val/reward_margin"] == metrics["val/reward_margin"], metrics
    scale, bias = float(module.reward_model.scale_value()), float(module.reward_model.bias_value())
    assert scale != 1.0 and bias != 0.0

    # the folder: q as a causal LM, the reference (the SFT policy, untouched) in reference/, a and b
    info = json.loads((export / LOG_RATIO_FILE).read_text())
    assert info["form"] == "log_ratio" and info["reference"] == "reference"
    assert info["scale"] == pytest.approx(scale) and info["bias"] == pytest.approx(bias)
    assert (export / "tokenizer.json").exists() and (export / "reference" / "tokenizer.json").exists()
    reference = load_file(export / "reference" / "model.safetensors")
    for name, value in module.reference.state_dict().items():
        torch.testing.assert_close(reference[name], value, rtol=0, atol=0)
    q = load_file(export / "model.safetensors")
    assert any(not torch.equal(q[name], value) for name, value in module.reference.state_dict().items())

    loaded, tokenizer, form = load_reward_model(str(export))
    assert form == "log_ratio" and isinstance(loaded, LogRatioReward) and not loaded.training
    batch = DemonstrationCollator(module.tokenizer.pad_token_id)(data.datasets["val"][:16])
    module.eval()
    with torch.no_grad():
        expected = module.score(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        assert expected.std() > 1e-3
        torch.testing.assert_close(score_sequences(loaded, batch["input_ids"], batch["attention_mask"],
                                                   loss_mask=batch["loss_mask"]), expected, rtol=0, atol=1e-6)

    best = BestOfN(policy=_spec(3), reward_model=ModelSpec(model_name_or_path=str(export)), return_all=True,
                   sampling=SamplingConfig(max_new_tokens=6, num_samples=4))
    best.configure_model()
    assert isinstance(best.reward_model, LogRatioReward) and best.reward_tokenizer is best.tokenizer
    prompts = {k: batch[k][:3] for k in ("input_ids", "attention_mask", "loss_mask", "prompt_input_ids",
                                         "prompt_attention_mask")}
    prompts["prompt"] = batch["prompt"][:3]
    torch.manual_seed(0)
    rollout = best.rollout(prompts, SamplingConfig(max_new_tokens=6, num_samples=4))
    with torch.no_grad():
        batched = best.score_rollout(rollout, [p for p in prompts["prompt"] for _ in range(4)])
        for i in range(rollout.input_ids.size(0)):  # each candidate scored alone, without padding
            keep = rollout.attention_mask[i].bool()
            ids, loss = rollout.input_ids[i][keep][None], rollout.loss_mask[i][keep][None]
            alone = score_sequences(loaded, ids, torch.ones_like(ids), loss_mask=loss)
            assert float(alone) == pytest.approx(float(batched[i]), abs=1e-5)
    assert batched.view(3, 4).std(-1).min() > 1e-3  # the pick means something
    torch.manual_seed(0)
    for i, row in enumerate(best.predict_step(prompts, 0)):  # same seed, same samples
        rewards = [c["reward"] for c in row["candidates"]]
        assert rewards == pytest.approx(batched[4 * i : 4 * i + 4].tolist(), abs=1e-6)
        top = max(range(4), key=rewards.__getitem__)
        assert row["reward"] == rewards[top] and row["response"] == row["candidates"][top]["response"]


def _resume_run(folder, ckpt_path=None):
    L.seed_everything(0)
    module = RewardModel(preset="init_demo", initial_policy=_spec(3), form="log_ratio", mle_weight=0.5,
                         optimizer=OptimizerSpec(lr=3e-3, warmup_steps=2), sampling=SamplingConfig(max_new_tokens=6,
                                                                                                  num_samples=2),
                         export=False)
    data = DemonstrationDataModule(task="modes", num_train=20, num_val=8, batch_size=4)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=3, num_sanity_val_steps=0,
                        default_root_dir=str(folder),
                        callbacks=[RunCheckpoint(dirpath=str(folder), every_n_train_steps=1, save_top_k=-1,
                                                 filename="{step}"), ExactResume()])
    trainer.fit(module, datamodule=data, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    assert trainer.global_step == 6
    return trainer


def test_log_ratio_resumes_q_a_b_and_their_optimizer_bitwise(tmp_path):
    reference = final_state(_resume_run(tmp_path / "full"))
    assert {"reward_model.bias", "reward_model.scale"} <= set(reference["weights"])
    assert any(k.startswith("reward_model.q.") for k in reference["weights"])
    assert float(reference["weights"]["reward_model.bias"]) != 0.0
    resumed = final_state(_resume_run(tmp_path / "resumed", tmp_path / "full" / "step=3.ckpt"))
    assert_bitwise_equal(resumed, reference)


@pytest.mark.slow
@pytest.mark.distributed
def test_shipped_log_ratio_config_on_one_process_ddp_and_fsdp2_alike_then_best_of_n_reads_its_export(tmp_path):
    """configs/reward_model_log_ratio.yaml through the console script, 3 steps, greedy sampling and
    file-order batches (so every run sees the same rows): 2 gloo processes × 4 rows, under DDP and
    under FSDP2, end with the q, a and b of 1 process × 8 rows. Then configs/best_of_n.yaml scores
    with the exported folder."""
    sft = save_stand_in_sft(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)

    def run(args):
        proc = subprocess.run([CLI, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    config = os.path.join(REPO, "configs/reward_model_log_ratio.yaml")
    common = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.precision", "32-true",
              "--trainer.enable_progress_bar", "false", "--data.init_args.num_train", "48",
              "--data.init_args.num_val", "16", "--data.init_args.shuffle", "false",
              "--model.init_args.sampling.temperature", "0", "--model.init_args.sampling.num_samples", "1"]
    run(["fit", "--config", config, *common, "--data.init_args.batch_size", "8",
         "--model.init_args.export_dir", str(tmp_path / "one")])
    run(["fit", "--config", config, "--config", os.path.join(REPO, "configs/strategies/ddp.yaml"), *common,
         "--trainer.devices", "2", "--data.init_args.batch_size", "4", "--model.init_args.export_dir",
         str(tmp_path / "two")])
    # FSDP2: q and the sampling policies (a ModuleDict) sharded over the 2 ranks
    run(["fit", "--config", config, "--config", os.path.join(REPO, "configs/strategies/fsdp2.yaml"), *common,
         "--data.init_args.batch_size", "4", "--model.init_args.export_dir", str(tmp_path / "sharded")])
    one = load_file(tmp_path / "one/model.safetensors")
    start = load_file(sft / "model.safetensors")
    assert any(not torch.equal(one[name], start[name]) for name in start)  # q trained
    info_one = json.loads((tmp_path / f"one/{LOG_RATIO_FILE}").read_text())
    assert info_one["bias"] != 0.0
    for other in ("two", "sharded"):
        weights = load_file(tmp_path / f"{other}/model.safetensors")
        for name, value in one.items():
            torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-4, msg=f"{other}: {name}")
        info = json.loads((tmp_path / f"{other}/{LOG_RATIO_FILE}").read_text())
        for key in ("scale", "bias"):
            assert info[key] == pytest.approx(info_one[key], abs=1e-4), (other, key)

    out = tmp_path / "best.jsonl"
    run(["predict", "--config", os.path.join(REPO, "configs/best_of_n.yaml"), "--predictions.output_path", str(out),
         "--model.init_args.policy.model_name_or_path", str(sft),
         "--model.init_args.reward_model.model_name_or_path", str(tmp_path / "one"),
         "--model.init_args.sampling.num_samples", "3", "--model.init_args.return_all", "true",
         "--data.init_args.num_test", "5"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    for row in rows:
        assert len(row["candidates"]) == 3 and row["reward"] == max(c["reward"] for c in row["candidates"])
