"""LoRA through ``peft``: wrapping a model, the adapter-off reference, and merging for export.

With LoRA on the policy, the frozen reference of KL-regularised methods is the *same* base model
with the adapter switched off (``reference_forward``): the base weights are held once, so a
policy + reference setup costs one model plus the adapters instead of two models.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import torch


@dataclass
class LoraSpec:
    """LoRA adapters through ``peft``. With LoRA on the policy, the frozen reference is the same
    base model with the adapter disabled: one copy of the base weights in memory.

    Args:
        r: Rank of the adapter matrices.
        alpha: Scale numerator: the update is ``alpha / r · B A`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: Dropout on the adapter's input.
        target_modules: ``all-linear`` (every linear layer but the output layer) or a list of
            module-name suffixes such as ``[q_proj, v_proj]``.
        modules_to_save: Modules trained in full next to the adapters (e.g. ``[lm_head]``).
        use_rslora: Rank-stabilised scaling ``alpha / sqrt(r)``.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Any = "all-linear"
    modules_to_save: Optional[List[str]] = None
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")


def is_peft_model(model: Optional[torch.nn.Module]) -> bool:
    """True for a ``peft.PeftModel`` (an adapter-wrapped policy)."""
    if model is None:
        return False
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def apply_lora(model: torch.nn.Module, spec: LoraSpec, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Freeze ``model`` and add trainable LoRA adapters (``peft.get_peft_model``).

    ``task_type`` is ``CAUSAL_LM`` for a policy or ``SEQ_CLS`` for a classifier (peft then also
    trains the fresh score head in full).
    """
    from peft import LoraConfig, get_peft_model

    target = spec.target_modules
    if isinstance(target, (list, tuple)):
        target = list(target)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=target,
        modules_to_save=list(spec.modules_to_save) if spec.modules_to_save else None,
        use_rslora=spec.use_rslora,
        bias="none",
        task_type=task_type,
    )
    return get_peft_model(model, config)


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``model`` as its base weights: the LoRA adapter is off inside the block.

    For a model that is not a PeftModel this is a no-op. The adapter's ``requires_grad`` flags are
    restored on exit (peft re-enables the active adapter's parameters).
    """
    if not is_peft_model(model):
        yield model
        return
    with model.disable_adapter():
        yield model


_LORA_KEY = re.compile(r"^(?P<prefix>.*)\.lora_(?P<which>A|B)\.(?P<adapter>[^.]+)\.weight$")


def merge_lora_state_dict(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A plain Hugging Face state dict (keys of the base model) with the adapter merged in.

    ``state_dict`` is the PeftModel's *full* state dict (e.g. gathered from FSDP2 shards with
    ``get_model_state_dict(full_state_dict=True)``), ``model`` the live PeftModel, read only for
    each adapted layer's ``scaling`` and ``fan_in_fan_out``. ``W' = W + scaling · B A``, the same
    as ``merge_and_unload`` without touching (or deep-copying) a possibly sharded model.
    """
    if not is_peft_model(model):
        return state_dict
    adapter = model.active_adapter
    layers = {name: module for name, module in model.named_modules() if hasattr(module, "lora_A")}
    lora: Dict[str, Dict[str, torch.Tensor]] = {}
    plain: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _LORA_KEY.match(key)
        if match:
            if match["adapter"] == adapter:
                lora.setdefault(match["prefix"], {})[match["which"]] = value
            continue
        if ".lora_" in key:  # lora_embedding_A/B, magnitude vectors, ...: not supported here
            raise ValueError(f"cannot merge adapter tensor {key!r}: only LoRA A/B linear adapters are supported")
        plain[key] = value
    for prefix, pair in lora.items():
        module = layers[prefix]
        weight_key = f"{prefix}.base_layer.weight"
        delta = (pair["B"].float() @ pair["A"].float()) * module.scaling[adapter]
        if getattr(module, "fan_in_fan_out", False):
            delta = delta.T
        plain[weight_key] = (plain[weight_key].float() + delta).to(plain[weight_key].dtype)
    out: Dict[str, torch.Tensor] = {}
    base_prefix = "base_model.model."
    for key, value in plain.items():
        if key.startswith(base_prefix):
            key = key[len(base_prefix):]
        key = key.replace(".base_layer.", ".")
        if ".modules_to_save." in key:  # the trained copy replaces the original
            key = key.replace(f".modules_to_save.{adapter}.", ".")
        elif ".original_module." in key:
            continue
        out[key] = value
    return out


@contextlib.contextmanager
def reference_context(policy: torch.nn.Module, reference: Optional[torch.nn.Module], owner: str = "module"):
    """The frozen reference: ``policy`` with its adapter off when it is a PeftModel, else
    ``reference`` (a separate frozen copy). Eval mode and no gradients inside the block."""
    if is_peft_model(policy):
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad(), adapter_disabled(policy):
                yield policy
        finally:
            policy.train(was_training)
        return
    if reference is None:
        raise RuntimeError(f"{owner} has no reference model: set `needs_reference = True` on the class "
                           "(or use LoRA on the policy)")
    reference.eval()
    with torch.no_grad():
        yield reference
