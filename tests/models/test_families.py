"""The model-family matrix: tiny random models of nine Hugging Face causal-LM families, saved to a
folder with their own tokenizer as a user would have them, each run through the real code path
(``ModelSpec(model_name_or_path=folder)`` → the algorithm module under a Lightning ``Trainer``):
SFT, AIRL with both discriminator forms, LoRA SFT, and the export reloaded by plain transformers.

The families differ where it matters to the framework:

========  =====================================================================================
llama     the reference: RoPE, GQA, RMSNorm, untied head, SDPA, BOS prepended, no pad token
qwen2     biases on q/k/v, no BOS, pad = EOS token in the tokenizer
qwen3     q/k RMSNorm, explicit head_dim, tied head
mistral   sliding-window attention (window 4, shorter than the rows), GQA
gemma2    attention and final-logit soft-capping, no SDPA (eager picked), alternating sliding
          layers, scaled embeddings, own pad token at id 0
phi3      fused ``qkv_proj`` and ``gate_up_proj`` linears
gpt2      absolute learned positions, ``Conv1D`` layers (LoRA's ``fan_in_fan_out``), tied head,
          no pad token (BOS = EOS = UNK = ``<|endoftext|>``), dropout
gpt_neox  partial rotary (25%), parallel residual, fused ``query_key_value``
opt       learned positions with an offset of 2, BOS = EOS = ``</s>`` prepended to every prompt,
          ``fc1``/``fc2`` naming, dropout
========  =====================================================================================

Every folder is built once per module; the runs are a couple of steps each.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from typing import Any, Dict, List, Optional, Tuple

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Gemma2Config,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from lightning_irl.algorithms import SFT, Adversarial, OptimizerSpec
from lightning_irl.algorithms.adversarial import DiscriminatorTraining, PolicyUpdate
from lightning_irl.cli import build_cli
from lightning_irl.compat import attention_implementation
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.data.collate import DemonstrationCollator
from lightning_irl.data.tasks import get_task
from lightning_irl.models.discriminator import sequence_logits
from lightning_irl.models.lora import LoraSpec, merge_lora_state_dict
from lightning_irl.models.spec import ModelSpec
from lightning_irl.objectives.logprobs import token_logprobs
from lightning_irl.rollout import SamplingConfig


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- the families ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Style:
    """A tokenizer layout: its special tokens (in id order), which of them play which role, and
    whether the BOS is prepended to every encoded text."""

    specials: Tuple[str, ...]
    bos: Optional[str]
    eos: str
    unk: Optional[str]
    pad: Optional[str]
    add_bos: bool


LLAMA_STYLE = Style(("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", unk="<unk>", pad=None, add_bos=True)
GPT2_STYLE = Style(("<|endoftext|>",), bos="<|endoftext|>", eos="<|endoftext|>", unk="<|endoftext|>", pad=None,
                   add_bos=False)
QWEN_STYLE = Style(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos=None, eos="<|endoftext|>", unk=None,
                   pad="<|endoftext|>", add_bos=False)
GEMMA_STYLE = Style(("<pad>", "<eos>", "<bos>", "<unk>"), bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>",
                    add_bos=True)
PHI3_STYLE = Style(("<unk>", "<s>", "</s>", "<|endoftext|>"), bos="<s>", eos="<|endoftext|>", unk="<unk>",
                   pad="<|endoftext|>", add_bos=True)
OPT_STYLE = Style(("<s>", "<pad>", "</s>", "<unk>"), bos="</s>", eos="</s>", unk="<unk>", pad="<pad>", add_bos=True)

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config_class: type
    config: Dict[str, Any]
    style: Style
    attention: str  # what transformers picks when ModelSpec.attn_implementation is left at None


FAMILIES: List[Family] = [
    Family("llama", LlamaConfig, dict(SMALL, num_key_value_heads=2), LLAMA_STYLE, "sdpa"),
    Family("qwen2", Qwen2Config, dict(SMALL, num_key_value_heads=2), QWEN_STYLE, "sdpa"),
    Family("qwen3", Qwen3Config, dict(SMALL, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True),
           QWEN_STYLE, "sdpa"),
    Family("mistral", MistralConfig, dict(SMALL, num_key_value_heads=2, sliding_window=4), LLAMA_STYLE, "sdpa"),
    # Gemma 2's defaults keep attention (50) and final-logit (30) soft-capping on.
    Family("gemma2", Gemma2Config, dict(SMALL, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                                        sliding_window=4), GEMMA_STYLE, "eager"),
    Family("phi3", Phi3Config, dict(SMALL, num_key_value_heads=2, original_max_position_embeddings=64),
           PHI3_STYLE, "sdpa"),
    Family("gpt2", GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64), GPT2_STYLE, "sdpa"),
    Family("gpt_neox", GPTNeoXConfig, dict(SMALL), GPT2_STYLE, "sdpa"),
    Family("opt", OPTConfig, dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=64, word_embed_proj_dim=32), OPT_STYLE, "sdpa"),
]
NAMES = [f.name for f in FAMILIES]


def corpus(n: int = 300, seed: int = 0) -> List[str]:
    """Text of the built-in ``modes`` task (prompt and an expert answer) to train the BPE on."""
    task, rng = get_task("modes"), random.Random(seed)
    texts = []
    for _ in range(n):
        prompt = task.sample_prompt(rng)
        texts.append(prompt + " " + rng.choice(sorted(task.answers(prompt).values())))
    return texts


def build_tokenizer(style: Style) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme) trained on the task's text with the ``tokenizers``
    library, with ``style``'s special tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(style.specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if style.add_bos:
        bos_id = backend.token_to_id(style.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{style.bos} $A", pair=f"{style.bos} $A {style.bos} $B", special_tokens=[(style.bos, bos_id)])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    roles = {k: v for k, v in dict(bos_token=style.bos, eos_token=style.eos, unk_token=style.unk,
                                   pad_token=style.pad).items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **roles)


def save_family(family: Family, folder: str) -> str:
    """A random model of ``family`` and its tokenizer in ``folder``, as ``save_pretrained`` writes them."""
    tokenizer = build_tokenizer(family.style)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family.config_class(**family.config, **ids))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=FAMILIES, ids=NAMES)
def family(request, tmp_path_factory) -> Tuple[Family, str]:
    spec: Family = request.param
    return spec, save_family(spec, str(tmp_path_factory.mktemp(spec.name)))


# ---- helpers --------------------------------------------------------------------------------
def data_module(batch_size: int = 8, num_train: int = 8) -> DemonstrationDataModule:
    return DemonstrationDataModule(task="modes", num_train=num_train, num_val=0, num_test=0, batch_size=batch_size,
                                   max_length=32, shuffle=False)


class TrainingModes(L.Callback):
    """``module.training`` of the policy, the discriminator and the reference at the first
    training batch."""

    def __init__(self):
        self.modes: Optional[Dict[str, bool]] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.modes is None:
            self.modes = {name: getattr(pl_module, name).training for name in ("policy", "discriminator", "reference")
                          if getattr(pl_module, name, None) is not None}


def fit(module, max_steps: int, root) -> L.Trainer:
    L.seed_everything(0)
    modes = TrainingModes()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=str(root), callbacks=[modes])
    trainer.fit(module, datamodule=data_module())
    # from_pretrained hands back eval mode; the trained models must train with their dropout, the
    # frozen reference must not
    assert modes.modes is not None and modes.modes.pop("reference", False) is False, modes.modes
    assert modes.modes and all(modes.modes.values()), modes.modes
    return trainer


def demo_batch(tokenizer, n: int = 8) -> Dict[str, torch.Tensor]:
    data = data_module(batch_size=n, num_train=n)
    data.set_tokenizer(tokenizer)
    data.setup("fit")
    return DemonstrationCollator(tokenizer.pad_token_id)(data.datasets["train"])


def mean_nll(model, batch) -> float:
    """Mean response-token NLL of ``batch`` under ``model`` (eval mode, no gradient)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logps = token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    model.train(was_training)
    mask = batch["loss_mask"][:, 1:].float()
    return float(-(logps * mask).sum() / mask.sum())


def logits(model, tokenizer) -> torch.Tensor:
    """Logits of a padded two-row batch (the shorter row padded on the tokenizer's side)."""
    ids = tokenizer(["c a f b = f a b c", "b a d ="], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits


def changed(before: Dict[str, torch.Tensor], after: Dict[str, torch.Tensor]) -> Dict[str, bool]:
    return {name: not torch.equal(before[name], after[name]) for name in before}


def finite_metrics(trainer, *names) -> Dict[str, float]:
    values = {}
    for name in names:
        assert name in trainer.callback_metrics, (name, sorted(trainer.callback_metrics))
        values[name] = float(trainer.callback_metrics[name])
        assert math.isfinite(values[name]), (name, values[name])
    return values


# ---- the matrix still tests what sets each family apart -------------------------------------
def test_the_saved_folders_keep_what_sets_each_family_apart(tmp_path):
    folders = {f.name: save_family(f, str(tmp_path / f.name)) for f in FAMILIES}
    configs = {name: AutoModelForCausalLM.from_pretrained(folder).config for name, folder in folders.items()}
    tokenizers = {name: AutoTokenizer.from_pretrained(folder) for name, folder in folders.items()}
    assert len(FAMILIES) >= 8 and len({c.model_type for c in configs.values()}) == len(FAMILIES)
    assert configs["gemma2"].attn_logit_softcapping and configs["gemma2"].final_logit_softcapping
    mistral_rows = demo_batch(ModelSpec(model_name_or_path=folders["mistral"]).load_tokenizer())["attention_mask"]
    assert configs["mistral"].sliding_window < mistral_rows.sum(-1).max()  # the window bites
    neox = configs["gpt_neox"]
    assert neox.rope_parameters["partial_rotary_factor"] < 1 and neox.use_parallel_residual
    for name in ("llama", "mistral", "gpt2", "gpt_neox"):  # no pad token: ensure_pad_token's case
        assert tokenizers[name].pad_token is None, name
    assert tokenizers["opt"]("a")["input_ids"][0] == tokenizers["opt"].eos_token_id  # OPT's BOS is its EOS
    assert tokenizers["gpt2"]("a")["input_ids"] == tokenizers["gpt2"]("a", add_special_tokens=False)["input_ids"]


# ---- attention implementation --------------------------------------------------------------
def test_the_default_attention_is_the_best_the_family_supports(family):
    spec, folder = family
    model_spec = ModelSpec(model_name_or_path=folder)
    assert model_spec.attn_implementation is None
    tokenizer = model_spec.load_tokenizer()
    policy, classifier = model_spec.build_causal_lm(tokenizer), model_spec.build_sequence_classifier(tokenizer)
    assert attention_implementation(policy) == spec.attention
    assert attention_implementation(classifier) == spec.attention
    assert policy.training and classifier.training  # as from an inline config (from_pretrained: eval)
    # "auto" spells the default in a YAML
    auto = dataclasses.replace(model_spec, attn_implementation="auto").build_causal_lm(tokenizer)
    assert attention_implementation(auto) == spec.attention


def test_an_explicit_attention_implementation_overrides_the_pick(tmp_path):
    llama, gemma2 = (next(f for f in FAMILIES if f.name == n) for n in ("llama", "gemma2"))
    llama_dir = save_family(llama, str(tmp_path / "llama"))
    gemma2_dir = save_family(gemma2, str(tmp_path / "gemma2"))
    tokenizer = ModelSpec(model_name_or_path=llama_dir).load_tokenizer()
    eager = ModelSpec(model_name_or_path=llama_dir, attn_implementation="eager")
    assert attention_implementation(eager.build_causal_lm(tokenizer)) == "eager"
    assert attention_implementation(eager.build_sequence_classifier(tokenizer)) == "eager"
    sdpa = ModelSpec(model_name_or_path=llama_dir, attn_implementation="sdpa")
    assert attention_implementation(sdpa.build_causal_lm(tokenizer)) == "sdpa"
    # an explicit choice the family lacks is an error, not a silent fallback
    gemma_tokenizer = ModelSpec(model_name_or_path=gemma2_dir).load_tokenizer()
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        ModelSpec(model_name_or_path=gemma2_dir, attn_implementation="sdpa").build_causal_lm(gemma_tokenizer)
    # the same weights under sdpa and eager give the same logits (Llama)
    torch.testing.assert_close(logits(eager.build_causal_lm(tokenizer), tokenizer),
                               logits(sdpa.build_causal_lm(tokenizer), tokenizer), rtol=1e-5, atol=1e-5)


# ---- padding: what every algorithm relies on ------------------------------------------------
def test_token_logprobs_do_not_depend_on_the_padding_side(family):
    """Rollouts are left-padded, demonstrations right-padded: the same row must score the same.
    Rotary families would pass even with positions counted from the padding (RoPE only sees
    differences); GPT-2's and OPT's learned absolute positions need them from the mask."""
    _, folder = family
    model_spec = ModelSpec(model_name_or_path=folder)
    tokenizer = model_spec.load_tokenizer()
    model = model_spec.build_causal_lm(tokenizer).eval()
    batch = demo_batch(tokenizer, n=4)
    ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    assert not bool(mask.all()), "the rows must differ in length for padding to matter"
    lengths = mask.sum(-1)
    left_ids, left_mask, left_loss = torch.full_like(ids, tokenizer.pad_token_id), torch.zeros_like(mask), \
        torch.zeros_like(loss_mask)
    width = ids.size(1)
    for row, n in enumerate(lengths.tolist()):
        left_ids[row, width - n:], left_mask[row, width - n:] = ids[row, :n], 1
        left_loss[row, width - n:] = loss_mask[row, :n]
    with torch.no_grad():
        right = token_logprobs(model, ids, mask)
        left = token_logprobs(model, left_ids, left_mask)
    right_scores = (right * loss_mask[:, 1:]).sum(-1)
    left_scores = (left * left_loss[:, 1:]).sum(-1)
    torch.testing.assert_close(left_scores, right_scores, rtol=1e-5, atol=1e-5)


# ---- SFT and the export ---------------------------------------------------------------------
def test_sft_trains_and_the_export_reloads_with_identical_logits(family, tmp_path):
    spec, folder = family
    module = SFT(policy=ModelSpec(model_name_or_path=folder), optimizer=OptimizerSpec(lr=1e-2, schedule="constant"),
                 export_dir=str(tmp_path / "export"))
    start = AutoModelForCausalLM.from_pretrained(folder)
    batch = demo_batch(module.tokenizer)
    trainer = fit(module, max_steps=3, root=tmp_path)
    assert trainer.global_step == 3
    finite_metrics(trainer, "train/loss")
    moved = changed(dict(start.named_parameters()), dict(module.policy.named_parameters()))
    assert all(moved.values()), [n for n, m in moved.items() if not m]
    before, after = mean_nll(start, batch), mean_nll(module.policy, batch)
    assert after < before - 0.05, (before, after)

    export = tmp_path / "export"
    reloaded = AutoModelForCausalLM.from_pretrained(export)
    assert type(reloaded) is type(module.policy)
    assert attention_implementation(reloaded) == spec.attention
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.pad_token_id == module.tokenizer.pad_token_id  # ensure_pad_token's choice is saved
    text = "c a f b = f a"
    assert tokenizer(text)["input_ids"] == module.tokenizer(text)["input_ids"]
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(module.policy, module.tokenizer), rtol=0, atol=0)
    assert not torch.equal(logits(reloaded, tokenizer), logits(start, tokenizer))


def test_fit_trains_a_model_left_in_eval_mode_with_its_dropout(tmp_path):
    """``IRLModule.on_fit_start``: Lightning does not call ``.train()`` when fit starts, so a
    trained model left in eval mode (a subclass's own ``from_pretrained``) would train without
    dropout."""
    gpt2 = save_family(next(f for f in FAMILIES if f.name == "gpt2"), str(tmp_path / "gpt2"))
    module = SFT(policy=ModelSpec(model_name_or_path=gpt2), export=False)
    module.configure_model()
    module.policy.eval()
    fit(module, max_steps=1, root=tmp_path)  # asserts the policy trained in train mode


# ---- AIRL, both discriminator forms --------------------------------------------------------
def airl(folder: str, form: str, tmp_path, export: bool = False) -> Adversarial:
    disc = DiscriminatorTraining(form=form, steps=1, warmup_steps=0,
                                 optimizer=OptimizerSpec(lr=1e-2, schedule="constant"),
                                 mle_weight=1.0 if form == "log_ratio" else 0.0, bias_lr=1e-2)
    return Adversarial(policy=ModelSpec(model_name_or_path=folder), divergence="reverse_kl",
                       discriminator_training=disc, policy_update=PolicyUpdate(kl_coef=0.1),
                       sampling=SamplingConfig(max_new_tokens=6, num_samples=2),
                       optimizer=OptimizerSpec(lr=1e-2, schedule="constant"), export=export,
                       export_dir=str(tmp_path / "export"))


def check_airl_step(module: Adversarial, trainer, start: Dict[str, torch.Tensor]) -> None:
    assert trainer.global_step == 2
    finite_metrics(trainer, "disc/loss", "reward/mean", "kl/ref", "policy/loss", "policy/entropy")
    moved = changed(start, dict(module.policy.named_parameters()))
    assert sum(moved.values()) > len(moved) // 2, "the policy step moved fewer than half of the weights"
    for name, param in module.reference.named_parameters():  # the frozen reference is the start
        torch.testing.assert_close(param, start[name], rtol=0, atol=0, msg=name)


def test_airl_with_the_log_ratio_discriminator(family, tmp_path):
    _, folder = family
    module = airl(folder, "log_ratio", tmp_path)
    start = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(folder).named_parameters()}
    trainer = fit(module, max_steps=2, root=tmp_path)
    check_airl_step(module, trainer, start)
    q_moved = changed(start, dict(module.discriminator.q.named_parameters()))
    assert sum(q_moved.values()) > len(q_moved) // 2
    assert float(module.discriminator.bias_value()) != 0.0


def test_airl_with_the_classifier_discriminator_and_its_export(family, tmp_path):
    _, folder = family
    module = airl(folder, "classifier", tmp_path, export=True)
    start = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(folder).named_parameters()}
    trainer = fit(module, max_steps=2, root=tmp_path)
    check_airl_step(module, trainer, start)
    # the classifier reuses the folder's backbone with a fresh head; both trained
    fresh = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    backbone = {n: p for n, p in fresh.named_parameters() if "score" not in n}
    moved = changed(backbone, dict(module.discriminator.named_parameters()))
    assert sum(moved.values()) > len(moved) // 2
    # the exported discriminator scores as the trained one
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export_discriminator")
    batch = demo_batch(module.tokenizer, n=4)
    module.discriminator.eval()
    with torch.no_grad():
        torch.testing.assert_close(sequence_logits(reloaded.eval(), batch["input_ids"], batch["attention_mask"]),
                                   sequence_logits(module.discriminator, batch["input_ids"], batch["attention_mask"]),
                                   rtol=0, atol=0)


# ---- LoRA -----------------------------------------------------------------------------------
def test_lora_sft_trains_only_the_adapters_and_the_merged_export_reloads(family, tmp_path):
    _, folder = family
    policy = ModelSpec(model_name_or_path=folder, lora=LoraSpec(r=4, alpha=8, target_modules="all-linear"))
    module = SFT(policy=policy, optimizer=OptimizerSpec(lr=1e-2, schedule="constant"),
                 export_dir=str(tmp_path / "export"))
    module.configure_model()
    start = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    adapters = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters), sorted(adapters)
    layers = {n.split(".lora_")[0] for n in adapters}
    assert len(layers) >= 4 * 2, sorted(layers)  # every linear of both blocks (Conv1D in GPT-2)
    trainer = fit(module, max_steps=3, root=tmp_path)
    finite_metrics(trainer, "train/loss")
    moved = changed(start, dict(module.policy.named_parameters()))
    assert {n for n, m in moved.items() if m} == adapters  # every adapter trained, the base stayed frozen

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(module.policy, module.tokenizer),
                               rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(folder)
    assert (logits(reloaded, tokenizer) - logits(base, tokenizer)).abs().max() > 1e-3  # the adapter was merged
    # The sharded (FSDP2) export merges a gathered state dict itself: same weights as peft's
    # merge_and_unload, Conv1D's transposed layout (fan_in_fan_out) included.
    merged = merge_lora_state_dict(module.policy, module.policy.state_dict())
    assert merged.keys() == reloaded.state_dict().keys()
    for name, value in reloaded.state_dict().items():
        torch.testing.assert_close(merged[name], value, rtol=1e-6, atol=1e-6, msg=name)


# ---- the shipped YAMLs with a family folder, through the CLI ------------------------------------
@pytest.mark.slow
def test_the_shipped_configs_run_a_folder_of_a_family_without_sdpa_and_take_an_explicit_attention(tmp_path,
                                                                                                  monkeypatch):
    """configs/airl.yaml with a Gemma 2 folder (no SDPA: its default pick is eager), and
    configs/quickstart.yaml with a GPT-2 folder told ``attn_implementation: eager`` on the line."""
    monkeypatch.chdir(tmp_path)
    gemma2 = save_family(next(f for f in FAMILIES if f.name == "gemma2"), str(tmp_path / "gemma2"))
    gpt2 = save_family(next(f for f in FAMILIES if f.name == "gpt2"), str(tmp_path / "gpt2"))
    small = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
             "--data.init_args.num_train", "16", "--data.init_args.num_val", "4",
             "--data.init_args.batch_size", "4", "--model.init_args.evaluation.num_prompts", "2"]
    cli = build_cli(["fit", "--config", os.path.join(REPO, "configs", "airl.yaml"), *small,
                     "--model.init_args.policy.model_name_or_path", gemma2,
                     "--model.init_args.discriminator_training.prefit_steps", "0",
                     "--model.init_args.discriminator_training.warmup_steps", "1"])
    assert cli.trainer.global_step == 2
    assert attention_implementation(cli.model.policy) == "eager"
    assert math.isfinite(float(cli.trainer.callback_metrics["policy/loss"]))
    export = tmp_path / "checkpoints" / "airl" / "version_0" / "export"
    assert type(AutoModelForCausalLM.from_pretrained(export)).__name__ == "Gemma2ForCausalLM"

    cli = build_cli(["fit", "--config", os.path.join(REPO, "configs", "quickstart.yaml"), *small,
                     "--model.init_args.policy.model_name_or_path", gpt2,
                     "--model.init_args.policy.attn_implementation", "eager"])
    assert cli.trainer.global_step == 2
    assert attention_implementation(cli.model.policy) == "eager"  # GPT-2 would get sdpa by default
    assert math.isfinite(float(cli.trainer.callback_metrics["val/loss"]))
