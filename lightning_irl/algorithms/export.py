"""The Hugging Face export every module ends ``fit`` with: one piece for policies, discriminators
and reward models alike.

A module lists what it exports (``IRLModule.exports``: models, folder suffixes, side files);
``export_all`` writes them collectively — under FSDP2 every rank gathers its shards, rank 0
writes — and atomically: a crash mid-write leaves the previous export intact.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from lightning_irl.models.lora import merge_lora_state_dict

log = logging.getLogger(__name__)


@dataclass
class Export:
    """One exported model.

    Args:
        model: The model (a PreTrainedModel or PeftModel; LoRA adapters are merged on export).
        what: Its name in log lines ("policy", "discriminator", ...).
        suffix: Appended to the run's export folder (``export`` + ``_discriminator`` ...).
        side_files: ``() → {file name: JSON-able object}`` written beside the weights. Called on
            every rank (it may gather sharded values), written by rank 0.
    """

    model: torch.nn.Module
    what: str
    suffix: str = ""
    side_files: Optional[Callable[[], Dict[str, Any]]] = field(default=None)


def full_state_dict(model: torch.nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The full state dict (on CPU) when the model is sharded (FSDP2 DTensors), else None.

    Collective under FSDP2: every rank must call it."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None


def write_hf_folder(model: torch.nn.Module, tokenizer, path: str,
                    state_dict: Optional[Dict[str, torch.Tensor]] = None,
                    side_files: Optional[Dict[str, Any]] = None) -> None:
    """Save ``model``, ``tokenizer`` and JSON ``side_files`` to ``path`` in Hugging Face format
    (safetensors), atomically."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if hasattr(model, "merge_and_unload"):
        if state_dict is None:
            to_save = copy.deepcopy(model).merge_and_unload()
        else:  # gathered FSDP2 shards of a PeftModel: merge the adapter into the base weights
            state_dict = merge_lora_state_dict(model, state_dict)
            to_save = model.get_base_model()
    to_save.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, content in (side_files or {}).items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(content, f, indent=1)
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def default_export_dir(trainer) -> str:
    """``export`` inside the run's checkpoint folder (or the trainer's root folder)."""
    callback = getattr(trainer, "checkpoint_callback", None)
    base = getattr(callback, "dirpath", None) or trainer.default_root_dir
    return os.path.join(base, "export")


def export_all(trainer, tokenizer, base_path: str, exports: Sequence[Export]) -> None:
    """Write every export under ``base_path + suffix``; collective (all ranks call it)."""
    strategy = trainer.strategy
    base_path = strategy.broadcast(base_path)
    for item in exports:
        path = base_path.rstrip("/") + item.suffix
        state_dict = full_state_dict(item.model)
        side_files = item.side_files() if item.side_files is not None else {}
        if trainer.is_global_zero:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write_hf_folder(item.model, tokenizer, path, state_dict, side_files)
            log.info("exported the %s and tokenizer to %s", item.what, path)
        strategy.barrier(f"export {item.what}")


__all__ = ["Export", "default_export_dir", "export_all", "full_state_dict", "write_hf_folder"]
