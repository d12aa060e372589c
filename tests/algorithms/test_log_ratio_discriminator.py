"""The log-ratio discriminator ``h = log q_φ − log π + b``: its logit against a hand computation,
its start at ``b``, the token/sequence reward identity, its warm-up, resume and export."""

import json
import math
import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_irl.algorithms import Adversarial
from lightning_irl.algorithms.adversarial import DiscriminatorTraining
from lightning_irl.cli import build_cli
from lightning_irl.metrics.evaluation import EvalConfig
from lightning_irl.models.discriminator import LOG_RATIO_FILE, LogRatioDiscriminator
from lightning_irl.objectives.divergences import divergence_reward
from lightning_irl.rollout import SamplingConfig
from tests.algorithms.test_adversarial import _batch
from tests.algorithms.test_adversarial import _module as adversarial_module

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AIRL = os.path.join(REPO, "configs", "airl.yaml")
TINY = ["--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--data.init_args.num_train", "16", "--data.init_args.num_val", "8", "--data.init_args.batch_size", "4",
        "--model.init_args.evaluation.num_prompts", "4"]


def _module(tiny_spec, disc=None, **kwargs):
    return adversarial_module(tiny_spec, disc={"form": "log_ratio", **(disc or {})},
                              **{"discriminator": None, "evaluation": EvalConfig(enabled=False), **kwargs})


def _by_hand(model, ids, attention, response):
    """Σ over response tokens of log softmax(model(prefix))[next token], one row at a time,
    without padding: the independent computation."""
    out = []
    for row, att, resp in zip(ids, attention, response):
        keep = att.bool()
        tokens, is_response = row[keep], resp[keep].bool()
        logits = model(input_ids=tokens[None]).logits[0].float()
        logps = F.log_softmax(logits[:-1], -1).gather(1, tokens[1:, None])[:, 0]
        out.append(logps[is_response[1:]].sum())
    return torch.stack(out)


def test_logit_is_log_q_minus_log_pi_plus_b_and_starts_at_b(tiny_spec):
    module = _module(tiny_spec, divergence="reverse_kl", disc=dict(logit_clip=None))
    disc = module.discriminator
    assert isinstance(disc, LogRatioDiscriminator)
    batch = _batch(module)
    rollout = module.rollout(batch)
    rows = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask, "loss_mask": rollout.loss_mask,
            "policy_logps": rollout.logprobs}
    # q is a copy of the policy: h = b exactly at the start, on rollouts and demonstrations alike
    with torch.no_grad():
        disc.bias.fill_(0.37)
    torch.testing.assert_close(module._sequence_disc_logits(rows), torch.full((rows["input_ids"].size(0),), 0.37),
                               rtol=0, atol=1e-5)
    expert = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    torch.testing.assert_close(module._sequence_disc_logits(expert), torch.full((4,), 0.37), rtol=0, atol=1e-5)
    # move q away from π: h = log q(y|x) − log π(y|x) + b, each side computed row by row
    with torch.no_grad():
        for p in disc.q.parameters():
            p.add_(0.05 * torch.randn_like(p))
        h = module._sequence_disc_logits(rows)
        expected = (_by_hand(disc.q, rows["input_ids"], rows["attention_mask"], rows["loss_mask"])
                    - _by_hand(module.policy, rows["input_ids"], rows["attention_mask"], rows["loss_mask"]) + 0.37)
    assert (expected - 0.37).abs().max() > 1e-2  # the comparison bites
    torch.testing.assert_close(h, expected, rtol=1e-4, atol=1e-4)
    # the rewards are the divergence table applied to that logit
    scores = module.score_rollout(rows)
    torch.testing.assert_close(scores.sequence_reward, divergence_reward("reverse_kl", expected, None),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("divergence", ["reverse_kl", "js"])
def test_token_rewards_are_per_token_log_ratios_and_sum_to_the_sequence_reward(tiny_spec, divergence):
    token = _module(tiny_spec, divergence=divergence, disc=dict(level="token", logit_clip=None))
    sequence = _module(tiny_spec, divergence=divergence, disc=dict(level="sequence", logit_clip=None))
    with torch.no_grad():
        for p in token.discriminator.q.parameters():
            p.add_(0.05 * torch.randn_like(p))
        token.discriminator.bias.fill_(-0.2)
    sequence.discriminator.load_state_dict(token.discriminator.state_dict())
    rollout = token.rollout(_batch(token))
    rows = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask, "loss_mask": rollout.loss_mask,
            "policy_logps": rollout.logprobs}
    scores, seq_scores = token.score_rollout(rows), sequence.score_rollout(rows)
    torch.testing.assert_close(scores.token_rewards.sum(-1), seq_scores.sequence_reward, rtol=1e-5, atol=1e-5)
    if divergence == "reverse_kl":  # r_t = log q(y_t|s_t) − log π(y_t|s_t), the first token also gets b
        from lightning_irl.objectives.logprobs import token_logprobs

        mask = rows["loss_mask"][:, 1:].float()
        with torch.no_grad():
            ratio = (token_logprobs(token.discriminator.q, rows["input_ids"], rows["attention_mask"])
                     - rollout.logprobs) * mask
        first = mask.argmax(-1)
        ratio[torch.arange(ratio.size(0)), first] += -0.2
        torch.testing.assert_close(scores.token_rewards, ratio, rtol=1e-5, atol=1e-5)


def test_discriminator_step_learns_and_the_mle_term_raises_q_on_demonstrations(tiny_spec):
    module = _module(tiny_spec, disc=dict(mle_weight=1.0))
    batch = _batch(module, n=8)
    optimizer = torch.optim.Adam(module.discriminator.parameters(), lr=1e-3)
    rollout = module.rollout(batch)
    rows = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask, "loss_mask": rollout.loss_mask,
            "policy_logps": rollout.logprobs}
    expert = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    expert["policy_logps"] = module._policy_logprobs(expert)
    module.manual_backward = lambda loss: loss.backward()  # no trainer attached
    losses = []
    for _ in range(5):
        loss, _, expert_h, policy_h = module.discriminator_backward(expert, rows)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[0] == pytest.approx(2 * 0.6931, abs=1e-3)  # h = b = 0 at the start: log 4
    assert losses[-1] < losses[0] - 0.05
    assert float(expert_h.mean()) > float(policy_h.mean())


def test_prefit_is_sft_of_q_on_the_demonstrations_without_rollouts(tiny_spec, monkeypatch):
    """N pre-fit batches = N SFT steps of q (same start, data, optimizer and schedule), computed
    independently by the SFT module; the policy, a and b stay put and nothing is sampled."""
    from lightning_irl.algorithms import SFT, OptimizerSpec
    from lightning_irl.data import DemonstrationDataModule

    steps, spec = 4, OptimizerSpec(lr=3e-3, weight_decay=0.01, warmup_steps=1, schedule="cosine")

    def data():
        return DemonstrationDataModule(task="modes", num_train=16, num_val=0, batch_size=4, task_seed=0)

    def fit(module):
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(module, datamodule=data())
        return trainer

    sft = SFT(policy=tiny_spec, optimizer=spec, evaluation=EvalConfig(enabled=False), export=False)
    fit(sft)
    adversarial = Adversarial(policy=tiny_spec, discriminator_training=DiscriminatorTraining(
        form="log_ratio", prefit_steps=steps, prefit_optimizer=spec, warmup_steps=2),
        sampling=SamplingConfig(max_new_tokens=4, num_samples=2), evaluation=EvalConfig(enabled=False), export=False)
    monkeypatch.setattr(Adversarial, "rollout", lambda *a, **k: pytest.fail("the pre-fit sampled a rollout"))
    trainer = fit(adversarial)
    assert trainer.global_step == steps and adversarial.in_warmup() and not adversarial.in_prefit()
    for key, value in sft.policy.state_dict().items():
        torch.testing.assert_close(adversarial.discriminator.q.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    for key, value in adversarial.reference.state_dict().items():
        torch.testing.assert_close(adversarial.policy.state_dict()[key], value, rtol=0, atol=0)
    assert float(adversarial.discriminator.bias_value()) == 0.0 and float(adversarial.discriminator.scale_value()) == 1.0
    assert not trainer.optimizers[2].state  # the pre-fit's Adam moments are freed when it ends
    assert trainer.callback_metrics["disc/prefit_nll"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("prefit", [0, 1])
def test_warmup_trains_only_the_discriminator_and_resume_restores_q_b_and_the_warmup(tmp_path, monkeypatch, prefit):
    monkeypatch.chdir(tmp_path)
    extra = ["--model.init_args.discriminator_training.form", "log_ratio",
             "--model.init_args.discriminator_training.prefit_steps", str(prefit),
             "--model.init_args.discriminator_training.warmup_steps", str(3 - prefit),
             "--model.init_args.discriminator_training.steps", "2", "--model.init_args.evaluation.enabled", "false",
             "--model.init_args.export", "false"]
    first = build_cli(["fit", "--config", AIRL, "--trainer.max_steps", "2", *TINY, *extra])
    module = first.model
    assert first.trainer.global_step == 2
    start = module.reference.state_dict()
    # two warm-up batches: the policy has not moved, q and b have
    for key, value in module.policy.state_dict().items():
        torch.testing.assert_close(value, start[key], rtol=0, atol=0)
    assert any(not torch.equal(v, start[k]) for k, v in module.discriminator.q.state_dict().items())
    ckpt_path = tmp_path / "checkpoints" / "airl" / "version_0" / "last.ckpt"
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert "discriminator.bias" in checkpoint["state_dict"]
    assert any(k.startswith("discriminator.q.") for k in checkpoint["state_dict"])

    # resume: batch 3 is still warm-up (policy fixed); batches 4-5 move the policy (the policy's own
    # lr warm-up starts with the policy: its first step has lr 0)
    second = build_cli(["--config", AIRL, "--trainer.max_steps", "5", *TINY, *extra], run=False)
    seen = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:  # restored exactly before the first resumed batch
                state = pl_module.state_dict()
                for key, value in checkpoint["state_dict"].items():
                    torch.testing.assert_close(state[key], value, rtol=0, atol=0)
                seen["restored"] = True
            seen[trainer.global_step] = {k: v.clone() for k, v in pl_module.policy.state_dict().items()}

    second.trainer.callbacks.append(Watch())
    second.trainer.fit(second.model, datamodule=second.datamodule, ckpt_path=str(ckpt_path))
    assert seen.get("restored") and second.trainer.global_step == 5
    for key, value in seen[3].items():  # batch 3 was warm-up: same policy as after batch 2
        torch.testing.assert_close(value, seen[2][key], rtol=0, atol=0)
    assert any(not torch.equal(v, seen[3][k]) for k, v in second.model.policy.state_dict().items())


@pytest.mark.slow
def test_fit_exports_q_with_its_bias_and_logs_fidelity(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", "--config", AIRL, "--trainer.max_steps", "2", *TINY,
                     "--model.init_args.discriminator_training.form", "log_ratio",
                     "--model.init_args.discriminator_training.prefit_steps", "0",
                     "--model.init_args.discriminator_training.warmup_steps", "1"])
    logged = set(cli.trainer.callback_metrics)
    for name in ("disc/bce_heldout", "disc/bce_bayes", "disc/bayes_gap_closed", "disc/bias", "eval/reverse_kl"):
        assert name in logged, (name, sorted(logged))
    folder = tmp_path / "checkpoints" / "airl" / "version_0" / "export_discriminator"
    assert (folder / "model.safetensors").exists()
    described = json.loads((folder / LOG_RATIO_FILE).read_text())
    assert described["form"] == "log_ratio"
    assert described["bias"] == pytest.approx(float(cli.model.discriminator.bias), abs=1e-6)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    for key, value in cli.model.discriminator.q.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value, rtol=0, atol=0)


def test_on_data_without_a_known_expert_validation_logs_the_heldout_bce_only(tmp_path, monkeypatch):
    """A user's demonstration file: no exact answer exists, but the discriminator's BCE on held-out
    demonstrations vs fresh samples does (set against the training loss, it shows over-fitting)."""
    from lightning_irl.data.tasks import get_task

    monkeypatch.chdir(tmp_path)
    for name, seed in (("train", 0), ("val", 1)):
        with open(tmp_path / f"{name}.jsonl", "w") as handle:
            for record in get_task("modes").records(16 if name == "train" else 8, seed=seed):
                handle.write(json.dumps(record) + "\n")
    cli = build_cli(["fit", "--config", AIRL, "--trainer.max_steps", "2", *TINY[:2], "--trainer.enable_progress_bar",
                     "false", "--data.init_args.task", "null", "--data.init_args.train_file", "train.jsonl",
                     "--data.init_args.val_file", "val.jsonl", "--data.init_args.batch_size", "4",
                     "--model.init_args.evaluation.num_prompts", "4",
                     "--model.init_args.discriminator_training.prefit_steps", "0",
                     "--model.init_args.discriminator_training.warmup_steps", "1"])
    logged = cli.trainer.callback_metrics
    # below chance (log 4, where h = b = 0 starts): the samples of this untrained policy are easy
    # to tell from the demonstrations (1.23 here)
    assert 0.0 < float(logged["disc/bce_heldout"]) < math.log(4.0) - 0.05
    assert not {"disc/bce_bayes", "disc/bayes_gap_closed", "disc/corr_exact", "disc/auroc_invalid"} & set(logged)


def test_bad_combinations_are_refused(tiny_spec):
    with pytest.raises(ValueError, match="r1_gamma"):
        DiscriminatorTraining(form="log_ratio", r1_gamma=1.0)
    with pytest.raises(ValueError, match="mle_weight > 0"):
        DiscriminatorTraining(form="log_ratio", warmup_fit="mle", mle_weight=0.0)
    # switching a log-ratio config to the classifier by one flag: the q-only settings are dropped
    disc = DiscriminatorTraining(form="classifier", mle_weight=1.0, warmup_fit="mle")
    assert disc.mle_weight == 0.0 and disc.warmup_fit == "bce"
    with pytest.raises(ValueError, match=r"form must be one of \['classifier', 'log_ratio'\], got 'ratio'"):
        DiscriminatorTraining(form="ratio")
    with pytest.raises(ValueError, match="warmup_steps"):
        DiscriminatorTraining(form="log_ratio", warmup_steps=-1)
    disc = DiscriminatorTraining(form="classifier", prefit_steps=10)  # no LM head to pre-fit
    assert disc.prefit_steps == 0
    with pytest.raises(ValueError, match="divergence must be one of"):
        Adversarial(policy=tiny_spec, divergence="kl")
    with pytest.raises(ValueError, match="num_samples must be >= 2"):
        Adversarial(policy=tiny_spec, sampling=SamplingConfig(num_samples=1))


def test_bad_choices_are_refused_by_the_command_line_with_the_choices_listed(tmp_path, monkeypatch):
    from lightning_irl.errors import OptionError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OptionError) as refused:
        build_cli(["fit", "--config", AIRL, "--model.init_args.discriminator_training.form", "ratio"], run=False)
    assert str(refused.value) == ("model.init_args.discriminator_training.form: expected one of classifier, "
                                  "log_ratio, got 'ratio'")
