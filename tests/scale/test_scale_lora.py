"""LoRA: the adapter-off policy *is* the base model, and the merged export is the adapted model."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_irl.algorithms.export import write_hf_folder
from lightning_irl.algorithms import SFT, OptimizerSpec
from lightning_irl.algorithms.base import build_optimizer
from lightning_irl.models.lora import is_peft_model, merge_lora_state_dict
from lightning_irl.models.spec import LoraSpec, ModelSpec
from lightning_irl.objectives.logprobs import token_logprobs

from conftest import TINY_LLAMA

IDS = torch.tensor([[1, 5, 6, 7, 3, 4, 2], [1, 8, 9, 5, 3, 6, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])


def lora_spec(**lora):
    return ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes", seed=0, lora=LoraSpec(r=4, alpha=8, **lora))


def perturb_adapters(model):
    """LoRA's B starts at 0 (adapted == base); move every trainable tensor so tests can bite."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def test_lora_policy_trains_only_adapters():
    spec = lora_spec()
    model = spec.build_causal_lm(spec.load_tokenizer())
    assert is_peft_model(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer, _ = build_optimizer(model, OptimizerSpec(), 1)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


def test_adapter_disabled_gives_exactly_the_base_weights_logits():
    spec = lora_spec()
    tokenizer = spec.load_tokenizer()
    base = ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes", seed=0).build_causal_lm(tokenizer).eval()
    module = SFT(policy=spec)
    module.configure_model()
    perturb_adapters(module.policy)
    module.policy.train()
    with torch.no_grad():
        adapted = token_logprobs(module.policy.eval(), IDS, MASK)
    module.policy.train()
    reference = module.reference_logprobs(IDS, MASK)
    with torch.no_grad():
        expected = token_logprobs(base, IDS, MASK)
    assert torch.equal(reference, expected)  # bit for bit: the same weights, the same kernels
    assert not torch.allclose(adapted, expected, atol=1e-3)  # the adapter does change the policy
    # the context restores everything: training mode, adapter on, adapter trainable
    assert module.policy.training
    assert all(p.requires_grad for n, p in module.policy.named_parameters() if "lora_" in n)
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(module.policy.eval(), IDS, MASK), adapted)
    # no separate reference copy is built with LoRA, even when the algorithm asks for one
    module_with_reference = type("WithReference", (SFT,), {"needs_reference": True})(policy=spec)
    module_with_reference.configure_model()
    assert getattr(module_with_reference, "reference", None) is None


def test_without_lora_the_reference_is_a_frozen_copy_of_the_initial_policy():
    module = type("WithReference", (SFT,), {"needs_reference": True})(
        policy=ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes", seed=0))
    module.configure_model()
    assert module.reference is not module.policy
    assert not any(p.requires_grad for p in module.reference.parameters())
    initial = module.reference_logprobs(IDS, MASK)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.1)
    torch.testing.assert_close(module.reference_logprobs(IDS, MASK), initial)
    with pytest.raises(RuntimeError, match="needs_reference"):
        SFT(policy=ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes")).reference_mode().__enter__()


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_merged_export_is_a_plain_hf_folder_with_the_adapted_logits(tmp_path, modules_to_save):
    module = SFT(policy=lora_spec(modules_to_save=modules_to_save))
    module.configure_model()
    perturb_adapters(module.policy)
    module.policy.eval()
    write_hf_folder(module.policy, module.tokenizer, str(tmp_path / "export"))  # the export fit ends with
    assert not (tmp_path / "export" / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert not is_peft_model(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS, attention_mask=MASK).logits,
                                   module.policy(input_ids=IDS, attention_mask=MASK).logits, rtol=1e-5, atol=1e-5)
    # the state-dict merge (used for gathered FSDP2 shards) equals peft's merge_and_unload
    merged = merge_lora_state_dict(module.policy, module.policy.state_dict())
    reference = copy.deepcopy(module.policy).merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-6, atol=1e-6)


def test_lora_discriminator_trains_adapters_and_its_score_head():
    spec = lora_spec()
    classifier = spec.build_sequence_classifier(spec.load_tokenizer())
    trainable = {n for n, p in classifier.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)


def test_lora_log_ratio_discriminator_gets_its_own_adapter_on_a_frozen_base():
    from lightning_irl.algorithms.adversarial import Adversarial, DiscriminatorTraining
    from lightning_irl.metrics.evaluation import EvalConfig

    module = Adversarial(policy=lora_spec(), discriminator_training=DiscriminatorTraining(form="log_ratio"),
                         export=False,
                         evaluation=EvalConfig(enabled=False))
    module.configure_model()
    q = module.discriminator.q
    assert is_peft_model(q) and q is not module.policy
    trainable = {n for n, p in module.discriminator.named_parameters() if p.requires_grad}
    assert trainable == {"bias", "scale"} | {n for n in trainable if n.startswith("q.") and "lora_" in n}
    assert any("lora_" in n for n in trainable)
    # q starts as the policy: same logits; its adapter trains apart from the policy's
    ids = torch.tensor([[3, 4, 5, 6, 1]])
    mask = torch.ones_like(ids)
    torch.testing.assert_close(token_logprobs(q, ids, mask), token_logprobs(module.policy, ids, mask))
    perturb_adapters(q)
    assert not torch.allclose(token_logprobs(q, ids, mask), token_logprobs(module.policy, ids, mask))
    policy_params = {id(p) for p in module.policy.parameters()}
    assert not any(id(p) in policy_params for p in module.discriminator.parameters())
