"""Adversarial IRL (AIRL / GAIL): CLI runs, exact resume, the discriminator's read position, the
token/sequence reward identity, normalisation, and the direction of a policy step."""

import copy
import dataclasses
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from lightning_irl.algorithms import Adversarial, OptimizerSpec
from lightning_irl.algorithms.adversarial import DiscriminatorTraining, PolicyUpdate
from lightning_irl.algorithms.engine import rollout_rows
from lightning_irl.cli import build_cli
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.data.collate import DemonstrationCollator
from lightning_irl.models.discriminator import build_discriminator, last_token_index, sequence_logits
from lightning_irl.objectives.divergences import bce_discriminator_loss, divergence_reward
from lightning_irl.objectives.policy_gradient import rloo_advantages
from lightning_irl.rollout import SamplingConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(os.path.dirname(sys.executable), "lightning_irl")
AIRL = os.path.join(REPO, "configs", "airl.yaml")
GAIL = os.path.join(REPO, "configs", "gail.yaml")
TINY = ["--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--data.init_args.num_train", "16", "--data.init_args.num_val", "8", "--data.init_args.batch_size", "4",
        "--model.init_args.evaluation.num_prompts", "4"]


def _module(tiny_spec, disc=None, update=None, num_samples=4, **kwargs):
    """An Adversarial module; ``disc`` / ``update`` are ``DiscriminatorTraining`` / ``PolicyUpdate`` fields."""
    defaults = dict(policy=tiny_spec, discriminator=dataclasses.replace(tiny_spec, seed=1),
                    sampling=SamplingConfig(max_new_tokens=6, num_samples=num_samples), export=False,
                    max_grad_norm=None, discriminator_training=DiscriminatorTraining(**(disc or {})),
                    policy_update=PolicyUpdate(**(update or {})))
    module = Adversarial(**{**defaults, **kwargs})
    module.configure_model()
    return module


def _batch(module, n=4, seed=0):
    data = DemonstrationDataModule(task="modes", num_train=n, num_val=0, batch_size=n, task_seed=seed)
    data.set_tokenizer(module.tokenizer)
    data.setup("fit")
    return DemonstrationCollator(module.tokenizer.pad_token_id)(data.datasets["train"])


def _trainer(max_steps, callbacks=(), **kwargs):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, callbacks=list(callbacks), **kwargs)


# ---- the shipped configs, through the CLI ---------------------------------------------------
@pytest.mark.slow
def test_airl_config_runs_in_process_and_logs_its_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", "--config", AIRL, "--trainer.max_steps", "3", *TINY,
                     "--model.init_args.discriminator_training.prefit_steps", "1",
                     "--model.init_args.discriminator_training.warmup_steps", "1"])
    assert cli.trainer.global_step == 3  # a pre-fit batch, a warm-up batch, a policy batch
    logged = set(cli.trainer.callback_metrics)
    for name in ("disc/prefit_nll", "disc/loss", "disc/acc_expert", "disc/acc_policy", "reward/mean", "reward/std", "kl/ref",
                 "policy/loss", "policy/entropy", "val/loss"):
        assert name in logged, (name, sorted(logged))
    run = tmp_path / "checkpoints" / "airl" / "version_0"
    assert (run / "last.ckpt").exists()
    assert (run / "export" / "model.safetensors").exists()
    assert (run / "export_discriminator" / "model.safetensors").exists()


@pytest.mark.slow
def test_gail_config_runs_through_the_console_script_with_token_level_ppo(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([CLI, "fit", "--config", GAIL, "--trainer.max_steps", "2", *TINY,
                           "--model.init_args.discriminator_training.form", "classifier",
                           "--model.init_args.discriminator_training.level", "token",
                           "--model.init_args.discriminator_training.r1_gamma", "1.0",
                           "--model.init_args.policy_update.loss", "ppo",
                           "--model.init_args.policy_update.sft_weight", "0.1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "gail" / "version_0" / "last.ckpt").exists()


# ---- resume -------------------------------------------------------------------------------
class _CompareOnResume(L.Callback):
    """Before the first step after a resume: everything equals the checkpoint."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self.checked = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.checked:
            return
        self.checked = True
        ckpt = self.checkpoint
        assert trainer.global_step == ckpt["global_step"] == 2
        state = pl_module.state_dict()
        for name in ("policy.", "discriminator.", "reference."):
            keys = [k for k in ckpt["state_dict"] if k.startswith(name)]
            assert keys, name
            for key in keys:
                torch.testing.assert_close(state[key], ckpt["state_dict"][key], rtol=0, atol=0)
        assert len(trainer.optimizers) == 2
        for optimizer, saved in zip(trainer.optimizers, ckpt["optimizer_states"]):
            restored = optimizer.state_dict()
            assert restored["state"].keys() == saved["state"].keys() and restored["state"]
            for index, values in saved["state"].items():
                for key, value in values.items():
                    torch.testing.assert_close(restored["state"][index][key], value, rtol=0, atol=0)
        for config, saved in zip(trainer.lr_scheduler_configs, ckpt["lr_schedulers"]):
            assert config.scheduler.state_dict() == saved


@pytest.mark.slow
def test_resume_restores_models_both_optimizers_and_the_step_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # PPO 2 epochs x 2 minibatches and 2 discriminator steps: 4 + 2 optimizer steps per batch,
    # yet global_step counts batches.
    extra = ["--model.init_args.policy_update.loss", "ppo", "--model.init_args.policy_update.ppo_epochs", "2",
             "--model.init_args.policy_update.ppo_minibatches", "2",
             "--model.init_args.discriminator_training.steps", "2",
             "--model.init_args.discriminator_training.prefit_steps", "0",
             "--model.init_args.discriminator_training.warmup_steps", "0",
             "--model.init_args.evaluation.enabled", "false", "--model.init_args.export", "false"]
    first = build_cli(["fit", "--config", AIRL, "--trainer.max_steps", "2", *TINY, *extra])
    assert first.trainer.global_step == 2
    ckpt_path = tmp_path / "checkpoints" / "airl" / "version_0" / "last.ckpt"
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    policy_opt, disc_opt = checkpoint["optimizer_states"]
    assert int(next(iter(policy_opt["state"].values()))["step"]) == 2 * 4
    assert int(next(iter(disc_opt["state"].values()))["step"]) == 2 * 2
    # the comparison bites: a fresh module differs from the checkpoint
    fresh = build_cli(["--config", AIRL, *TINY, *extra], run=False).model
    fresh.configure_model()
    assert any(not torch.equal(v, checkpoint["state_dict"][k]) for k, v in fresh.state_dict().items()
               if k.startswith("policy."))
    assert any(not torch.equal(v, checkpoint["state_dict"][k]) for k, v in fresh.state_dict().items()
               if k.startswith("discriminator."))

    second = build_cli(["--config", AIRL, "--trainer.max_steps", "3", *TINY, *extra], run=False)
    compare = _CompareOnResume(checkpoint)
    second.trainer.callbacks.append(compare)
    second.trainer.fit(second.model, datamodule=second.datamodule, ckpt_path=str(ckpt_path))
    assert compare.checked and second.trainer.global_step == 3


# ---- the discriminator's read position ------------------------------------------------------
def test_sequence_logit_is_read_at_the_last_real_token_for_both_padding_sides_and_pad_eq_eos(tiny_spec):
    tokenizer = copy.deepcopy(tiny_spec.load_tokenizer())
    tokenizer.pad_token = tokenizer.eos_token  # pad == eos: transformers' own pooling goes wrong
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    classifier = tiny_spec.build_sequence_classifier(tokenizer, num_labels=1).eval()
    classifier.config.pad_token_id = eos
    rows = [[5, 6, 7, 4, eos], [8, 3, eos], [4, 5, 6, 7, 8, 3]]  # finished, finished, truncated (no EOS)
    width = max(map(len, rows))

    def padded(left):
        ids = torch.full((len(rows), width), eos)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            cols = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, cols], mask[i, cols] = torch.tensor(row), 1
        return ids, mask

    with torch.no_grad():
        # reference: each row alone, unpadded, the head applied to the backbone's last hidden state
        alone = torch.stack([classifier.score(classifier.model(torch.tensor([row])).last_hidden_state)[0, -1, 0]
                             for row in rows])
        for left in (False, True):
            ids, mask = padded(left)
            torch.testing.assert_close(last_token_index(mask), torch.tensor([width - 1 if left else len(r) - 1
                                                                             for r in rows]))
            torch.testing.assert_close(sequence_logits(classifier, ids, mask), alone, rtol=1e-4, atol=1e-5)
        # the trap this avoids: transformers' pooled logit skips the final EOS when pad == eos
        ids, mask = padded(False)
        pooled = classifier(input_ids=ids, attention_mask=mask).logits[:, 0]
        assert not torch.allclose(pooled[:2], alone[:2], atol=1e-4)


def test_discriminator_needs_the_policy_vocabulary(tiny_spec, tokenizer):
    small = dataclasses.replace(tiny_spec, config={**tiny_spec.config, "vocab_size": 4})
    with pytest.raises(ValueError, match="vocabulary"):
        build_discriminator(small, tokenizer)


# ---- rewards --------------------------------------------------------------------------------
@pytest.mark.parametrize("divergence", ["reverse_kl", "js", "forward_kl"])
def test_token_rewards_sum_to_the_sequence_reward_in_the_pipeline(tiny_spec, divergence):
    token = _module(tiny_spec, divergence=divergence, disc=dict(level="token", logit_clip=3.0),
                    update=dict(kl_coef=0.1))
    sequence = _module(tiny_spec, divergence=divergence, disc=dict(level="sequence", logit_clip=3.0),
                       update=dict(kl_coef=0.1))
    sequence.discriminator.load_state_dict(token.discriminator.state_dict())
    with torch.no_grad():  # make the logits spread so the clip and the nonlinearity matter
        token.discriminator.score.weight.mul_(300.0)
        sequence.discriminator.score.weight.mul_(300.0)
    batch = _batch(token)
    rollout = token.rollout(batch)
    rows = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask, "loss_mask": rollout.loss_mask}
    mask = rollout.loss_mask[:, 1:]
    scores = token.score_rollout(rows)
    seq_scores = sequence.score_rollout(rows)
    assert scores.token_rewards is not None and seq_scores.token_rewards is None
    assert scores.logits.abs().max() > 3.0  # the clip binds somewhere
    torch.testing.assert_close(scores.token_rewards.sum(-1), scores.sequence_reward, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seq_scores.sequence_reward, scores.sequence_reward, rtol=1e-5, atol=1e-5)
    direct = divergence_reward(divergence, sequence_logits(sequence.discriminator, rows["input_ids"],
                                                           rows["attention_mask"]), 3.0)
    torch.testing.assert_close(seq_scores.sequence_reward, direct, rtol=1e-5, atol=1e-5)
    # advantages: the first response token gets exactly RLOO of the (KL-shaped) sequence reward
    kl = torch.rand(mask.shape) * mask
    adv_token = token.advantages(scores, kl, mask)
    adv_seq = sequence.advantages(seq_scores, kl, mask)
    first = mask.float().argmax(-1, keepdim=True)
    torch.testing.assert_close(adv_token.gather(1, first), adv_seq.gather(1, first), rtol=1e-5, atol=1e-5)
    shaped = scores.sequence_reward - 0.1 * kl.sum(-1)
    torch.testing.assert_close(adv_seq.gather(1, first).squeeze(1), rloo_advantages(shaped, 4), rtol=1e-5, atol=1e-5)
    assert torch.all(adv_token[mask == 0] == 0) and torch.all(adv_seq[mask == 0] == 0)


def test_discriminator_loss_is_the_bce_loss_and_micro_batching_gives_the_same_gradient(tiny_spec):
    def grads(micro):
        module = _module(tiny_spec, micro_batch_size=micro, disc=dict(label_smoothing=0.1))
        module.manual_backward = lambda loss: loss.backward()  # no trainer attached
        batch = _batch(module, n=6)
        expert = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
        torch.manual_seed(3)
        rollout = module.rollout(batch)
        policy = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
                  "loss_mask": rollout.loss_mask}
        module.discriminator.zero_grad()
        loss, _, e_logits, p_logits = module.discriminator_backward(expert, policy)
        torch.testing.assert_close(loss, bce_discriminator_loss(e_logits, p_logits, 0.1), rtol=1e-5, atol=1e-6)
        return {n: p.grad.clone() for n, p in module.discriminator.named_parameters()}

    full, micro = grads(None), grads(4)
    for name in full:
        torch.testing.assert_close(micro[name], full[name], rtol=1e-4, atol=1e-6)


# ---- the policy step moves toward higher reward -----------------------------------------------
class _FixedReward:
    """Reward 1 for responses whose first token is ``a``, else 0 (replaces the discriminator)."""

    def __init__(self, module, token_id, level):
        self.module, self.token_id, self.level = module, token_id, level

    def __call__(self, rows):
        from lightning_irl.algorithms.adversarial import RolloutScores

        mask = rows["loss_mask"][:, 1:]
        first = mask.float().argmax(-1, keepdim=True)
        reward = (rows["input_ids"][:, 1:].gather(1, first).squeeze(1) == self.token_id).float()
        token_rewards = None
        if self.level == "token":  # the whole reward at the first response token
            token_rewards = torch.zeros(mask.shape).scatter(1, first, reward.unsqueeze(1))
        return RolloutScores(reward, token_rewards, reward)


def _p_first_token(module, batch, token_id):
    with torch.no_grad():
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        from lightning_irl.objectives.logprobs import position_ids_from_mask

        logits = module.policy(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        return torch.softmax(logits[:, -1].float(), -1)[:, token_id].mean()


@pytest.mark.parametrize("policy_loss,level", [("rloo", "sequence"), ("ppo", "sequence"), ("ppo", "token"),
                                               ("rloo", "token")])
def test_one_policy_step_with_a_fixed_reward_moves_toward_the_rewarded_samples(tiny_spec, policy_loss, level):
    L.seed_everything(0)
    module = _module(tiny_spec, disc=dict(level=level), num_samples=8, optimizer=OptimizerSpec(lr=3e-3, schedule="constant"),
                     update=dict(loss=policy_loss, kl_coef=0.0, ppo_epochs=1, ppo_minibatches=1))
    token_id = module.tokenizer.convert_tokens_to_ids("a")
    module.score_rollout = _FixedReward(module, token_id, level)
    data = DemonstrationDataModule(task="modes", num_train=16, num_val=0, batch_size=16)
    data.set_tokenizer(module.tokenizer)
    data.setup("fit")
    batch = DemonstrationCollator(module.tokenizer.pad_token_id)(data.datasets["train"])
    before = _p_first_token(module, batch, token_id)
    trainer = _trainer(1)
    trainer.fit(module, datamodule=data)
    after = _p_first_token(module, batch, token_id)
    assert trainer.global_step == 1
    assert after > before * 1.05, (float(before), float(after))


class _FirstRatio(L.Callback):
    """Records the largest |log π_θ − log π_old| of the first PPO minibatch (before any update)."""

    def __init__(self):
        self.values = []

    def setup(self, trainer, pl_module, stage):
        from lightning_irl.models.scoring import response_token_logprobs

        original = pl_module._policy_sums

        def recording(micro):
            if not self.values:
                with torch.no_grad():
                    logps = response_token_logprobs(pl_module.policy, micro["input_ids"], micro["attention_mask"],
                                                    micro["loss_mask"])
                mask = micro["loss_mask"][:, 1:].bool()
                self.values.append(float((logps - micro["old_logps"])[mask].abs().max()))
            return original(micro)

        pl_module._policy_sums = recording


@pytest.mark.parametrize("precision,source", [("32-true", "generate"), ("bf16-mixed", "forward")])
def test_ppo_starts_at_ratio_one_with_auto_logprobs(tiny_spec, precision, source):
    """``logprobs_from: auto`` gives PPO old log-probs whose first ratio is 1: the sampling pass's
    in float32 (within 1e-5), a recomputation under bf16 (exactly the training forward's on the
    CPU). RLOO takes the sampling pass's in both."""
    L.seed_everything(0)
    sources = []
    for loss in ("ppo", "rloo"):
        module = _module(tiny_spec, num_samples=4, update=dict(loss=loss, ppo_epochs=1, ppo_minibatches=2))
        assert module.sampling.logprobs_from == "auto"
        rollout = module.rollout

        def recorded(*args, _rollout=rollout, _loss=loss, **kwargs):
            out = _rollout(*args, **kwargs)
            sources.append((_loss, out.logprobs_source))
            return out

        module.rollout = recorded
        data = DemonstrationDataModule(task="modes", num_train=8, num_val=0, batch_size=4)
        ratio = _FirstRatio()
        trainer = _trainer(2, callbacks=[ratio], precision=precision)
        trainer.fit(module, datamodule=data)
        assert trainer.global_step == 2
        if loss == "ppo":
            assert ratio.values and ratio.values[0] <= (1e-5 if source == "generate" else 0.0), ratio.values
    # (the first auto rollout of a model at a precision runs the one-time check; it reports its verdict)
    assert [s for loss, s in sources if loss == "ppo"] == [source, source]
    assert [s for loss, s in sources if loss == "rloo"] == ["generate", "generate"]


def test_shared_prefixes_and_length_buckets_give_the_padded_batch_results(tiny_spec, monkeypatch):
    """The classifier's and the reference's reads of a rollout batch whose prompts differ in
    length: over a cache of the prompts shared by the k samples (the default here), in length
    buckets, or in one padded call: the same values and the same discriminator gradient."""
    from lightning_irl.models import scoring

    L.seed_everything(0)
    module = _module(tiny_spec, num_samples=3)
    prompts = ["c a b =", "d b a f g a b c d =", "h =", "a b c d e f g h a b c d e f ="]
    encoded = [module.tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[module.tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    batch = {"prompt_input_ids": ids, "prompt_attention_mask": mask}
    torch.manual_seed(1)
    rows = rollout_rows(module.rollout(batch, SamplingConfig(max_new_tokens=6, num_samples=3, temperature=3.0)))
    start = scoring.first_scored_column(rows["loss_mask"])
    assert scoring.shared_prefix_plan(rows["input_ids"], rows["attention_mask"], start) is not None
    assert len(scoring.length_buckets(rows["attention_mask"])) > 1
    plan, buckets = scoring.shared_prefix_plan, scoring.length_buckets
    results = {}
    for path in ("shared prefix", "buckets", "one call"):
        if path != "shared prefix":
            monkeypatch.setattr(scoring, "shared_prefix_plan", lambda *a: None)
        if path == "one call":
            monkeypatch.setattr(scoring, "length_buckets", lambda m, enabled=True: buckets(m, enabled=False))
        module.discriminator.zero_grad()
        logits = module._classifier_logits(rows)
        logits.sum().backward()
        grads = [p.grad.clone() for p in module.discriminator.parameters() if p.grad is not None]
        results[path] = (logits.detach(), module._reference_logprobs(rows), module._prefix_logits_full(rows), grads)
    monkeypatch.setattr(scoring, "shared_prefix_plan", plan)
    assert scoring._PREFIX_VERIFIED[module.discriminator] == {False: True}
    assert scoring._PREFIX_VERIFIED[module.reference] == {False: True}
    m = rows["loss_mask"][:, 1:].bool()
    expected = results["one call"]
    for path in ("shared prefix", "buckets"):
        logits, ref, prefix, grads = results[path]
        torch.testing.assert_close(logits, expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref[m], expected[1][m], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prefix[rows["loss_mask"].bool()], expected[2][rows["loss_mask"].bool()],
                                   atol=1e-5, rtol=1e-5)
        for a, b in zip(grads, expected[3]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_ppo_clip_loss_takes_per_token_advantages():
    """The extension used by token-level discriminators: [B, T] advantages at level="token"."""
    from lightning_irl.objectives.policy_gradient import ppo_clip_loss

    g = torch.Generator().manual_seed(0)
    logp_old = -torch.rand(3, 4, generator=g)
    logp_new = (logp_old + 0.3 * torch.randn(3, 4, generator=g)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    seq_adv = torch.tensor([1.0, -2.0, 0.5])
    broadcast = ppo_clip_loss(logp_new, logp_old, seq_adv, mask, 0.2, "token")
    per_token = ppo_clip_loss(logp_new, logp_old, seq_adv.unsqueeze(1).expand(3, 4), mask, 0.2, "token")
    torch.testing.assert_close(per_token.loss, broadcast.loss)
    adv = torch.randn(3, 4, generator=g)
    out = ppo_clip_loss(logp_new, logp_old, adv, mask, 0.2, "token")
    terms = [max(-r * a, -min(max(r, 0.8), 1.2) * a)
             for r, a, m in zip((logp_new - logp_old).exp().flatten().tolist(), adv.flatten().tolist(),
                                mask.flatten().tolist()) if m]
    assert abs(float(out.loss) - sum(terms) / len(terms)) < 1e-6
    with pytest.raises(ValueError, match=r"\[B\] or \[B, T\]"):
        ppo_clip_loss(logp_new, logp_old, torch.zeros(3, 2), mask, 0.2, "token")


_DDP_WORKER = r'''
import sys, torch, lightning as L
torch.set_num_threads(1)
from lightning_irl.algorithms import Adversarial, OptimizerSpec
from lightning_irl.algorithms.adversarial import DiscriminatorTraining, PolicyUpdate
from lightning_irl.algorithms.engine import rollout_rows
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.metrics.evaluation import EvalConfig
from lightning_irl.models.spec import ModelSpec
from lightning_irl.rollout import SamplingConfig
cfg = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)
class Save(L.Callback):
    def on_train_end(self, trainer, pl_module):
        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()
                    if k.startswith(("policy.", "discriminator."))}, f"rank{trainer.global_rank}.pt")
L.seed_everything(0)
net = dict(discriminator=ModelSpec(config=cfg, tokenizer="task:modes", seed=1))
disc = dict(optimizer=OptimizerSpec(lr=1e-2))
if sys.argv[2] == "log_ratio":  # q = a copy of the policy, one warm-up batch, then a policy step
    net, disc = dict(discriminator=None), dict(disc, form="log_ratio", warmup_steps=1, mle_weight=1.0)
m = Adversarial(policy=ModelSpec(config=cfg, tokenizer="task:modes", seed=0), **net,
                discriminator_training=DiscriminatorTraining(**disc), policy_update=PolicyUpdate(loss=sys.argv[1]),
                sampling=SamplingConfig(max_new_tokens=6, num_samples=4), evaluation=EvalConfig(enabled=False),
                export=False, optimizer=OptimizerSpec(lr=1e-2))
trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, callbacks=[Save()])
trainer.fit(m, datamodule=DemonstrationDataModule(task="modes", num_train=32, num_val=0, batch_size=4))
assert trainer.global_step == 2
# as lightning_irl.cli.main does: an exit with gloo's threads still up aborts now and then
# ("terminate called without an active exception", status -6)
torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("form", ["classifier", "log_ratio"])
def test_ddp_two_processes_stay_identical(tmp_path, tiny_spec, form):
    """Two ranks on different prompts: discriminator and policy gradients are all-reduced, so the
    weights stay equal. Needs ``ddp_find_unused_parameters_true``: each of the two backward passes
    of a step leaves the other network's parameters without a gradient."""
    (tmp_path / "worker.py").write_text(_DDP_WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "worker.py", "ppo", form], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    initial = _module(tiny_spec).policy.state_dict()  # the worker's cfg is conftest's TINY_LLAMA, seed 0
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)
    assert any(not torch.equal(ranks[0]["policy." + k], v) for k, v in initial.items())
