"""Where a network comes from: a Hub id or folder, or a small architecture written in the YAML."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lightning_irl.compat import attention_implementation
from lightning_irl.data.tasks import task_tokenizer
from lightning_irl.models.lora import LoraSpec, apply_lora  # re-exported: user code names models.spec.LoraSpec
from lightning_irl.tokenizers import ensure_pad_token

log = logging.getLogger(__name__)

_DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class SourceError(ValueError):
    """A model or tokenizer source that cannot load: ``path`` (as given), ``field`` (the
    ``ModelSpec`` field that names it) and ``reason``. The message is ``<path>: <reason> (<field>)``."""

    def __init__(self, path: str, field: str, reason: str) -> None:
        super().__init__(f"{path}: {reason} ({field})")
        self.path, self.field, self.reason = path, field, reason


def looks_local(name: str) -> bool:
    """Whether ``name`` can only mean a local folder, never a Hub id (``name`` or ``org/name``):
    it starts with ``.``, ``/`` or ``~``, has more than one ``/`` or a backslash, contains
    ``checkpoints/``, or its first part is a local folder (``exports/run1`` with ``exports/``
    here). Such a name is never sent to the Hub when the folder is missing."""
    if name.startswith((".", "/", "~")) or os.path.isabs(name) or "\\" in name:
        return True
    parts = name.split("/")
    return len(parts) > 2 or "checkpoints/" in name or (len(parts) == 2 and os.path.isdir(parts[0]))


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


_MODEL_FILES = ("config.json", "adapter_config.json")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")


def check_source(name: str, field: str, files=_MODEL_FILES) -> None:
    """Raise ``SourceError`` when ``name`` (a ``model_name_or_path`` or ``tokenizer``) cannot
    load: a local-looking path (``looks_local``) that does not exist, is not a folder or holds
    none of ``files``; or, with ``HF_HUB_OFFLINE=1``, a Hub id whose files are not in the local
    cache. Never contacts the Hub."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in files):
            kind = "model" if files is _MODEL_FILES else "tokenizer"
            raise SourceError(name, field, f"not a Hugging Face {kind} folder (none of {', '.join(files)})")
        return
    if os.path.exists(path):
        raise SourceError(name, field, "is a file, not a Hugging Face folder")
    if looks_local(name):
        hint = ("; a fit run writes its export there when it ends"
                if re.search(r"version_\d+/export[^/]*/?$", name) else "")
        raise SourceError(name, field, f"no such folder (a local path, so not looked up on the Hub){hint}")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not any(isinstance(try_to_load_from_cache(name, f), str) for f in files):
            raise SourceError(name, field, "not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 keeps "
                                           "the Hub out of reach")


@dataclass
class ModelSpec:
    """A network: ``model_name_or_path`` (Hub id or local folder) or an inline ``config``.

    A named model wins: when ``model_name_or_path`` is set, ``config`` and a ``task:`` tokenizer
    (both from-scratch settings) are ignored, so ``--model.policy.model_name_or_path <folder>``
    alone switches any shipped YAML from a scratch-built model to a pretrained one.

    Args:
        model_name_or_path: Hub id or local folder, loaded with ``from_pretrained``. The Hub is
            reached only when an id is named here and the files are not cached; a name that can
            only be a path (``./x``, ``/x``, ``a/b/c``, ``checkpoints/...``: ``looks_local``) is
            never sent to it, and a missing folder is named in the error.
        config: A small architecture built from scratch, e.g. ``{model_type: llama,
            hidden_size: 64, num_hidden_layers: 2, ...}``. ``vocab_size`` and the special token
            ids are filled in from the tokenizer.
        tokenizer: Hub id or folder of the tokenizer (default: ``model_name_or_path``), or
            ``task:<name>`` for the word-level tokenizer of a built-in task (scratch models).
            A task option that changes the vocabulary goes after ``?``:
            ``task:modes?alphabet=abcdefghij`` to match ``data.task_args: {alphabet: abcdefghij}``.
        dtype: Weights dtype at load: ``float32`` (default; Lightning's precision flag then
            chooses the compute dtype), ``bfloat16``, ``float16`` or ``auto``.
        trust_remote_code: Run code shipped with a Hub model. Off unless you turn it on.
        gradient_checkpointing: Recompute activations in backward to save memory.
        attn_implementation: The attention kernel. ``None`` or ``auto`` (default): transformers
            picks the best one the architecture supports, ``sdpa`` where it has it, else
            ``eager`` (Gemma 2: SDPA cannot soft-cap attention logits); the build logs the pick
            (``lightning_irl.compat.attention_implementation(model)``). An explicit ``eager``,
            ``sdpa``, ``flash_attention_2``, ... is passed to transformers as given and overrides
            the pick (an architecture without it fails at build).
        lora: LoRA adapter settings, or None for full fine-tuning. With LoRA the built model is a
            ``peft.PeftModel`` whose base weights are frozen; the export merges the adapter into a
            plain Hugging Face folder.
    """

    model_name_or_path: Optional[str] = None
    config: Optional[Dict[str, Any]] = None
    tokenizer: Optional[str] = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None
    lora: Optional[LoraSpec] = None
    seed: Optional[int] = field(default=None)

    def __post_init__(self) -> None:
        if self.model_name_or_path is None and self.config is None:
            raise ValueError("a model needs model_name_or_path (Hub id or folder) or an inline config")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        if self.from_scratch and "model_type" not in self.config:
            raise ValueError("an inline config needs a model_type (llama, gpt2, qwen2, ...)")

    @property
    def from_scratch(self) -> bool:
        return self.model_name_or_path is None

    def check_sources(self) -> None:
        """Raise ``SourceError`` naming the model or tokenizer source that cannot load (see
        ``check_source``): a missing local folder is named, never looked up on the Hub."""
        if self.model_name_or_path is not None:
            check_source(self.model_name_or_path, "model_name_or_path")
        tokenizer = self.tokenizer
        if tokenizer is not None and not tokenizer.startswith("task:") and tokenizer != self.model_name_or_path:
            check_source(tokenizer, "tokenizer", _TOKENIZER_FILES)

    @staticmethod
    def _require_local(source: Optional[str], field: str) -> None:
        """Name a missing local folder before transformers turns it into a Hub lookup."""
        if source is not None and looks_local(source) and not os.path.isdir(os.path.expanduser(source)):
            check_source(source, field)

    # ---------------------------------------------------------------------------------
    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        source = self.tokenizer or self.model_name_or_path
        if not self.from_scratch and source.startswith("task:"):
            source = self.model_name_or_path
        if source is None:
            raise ValueError(
                "a model built from an inline config needs `tokenizer:` (a folder, a Hub id, "
                "or task:<name> for a built-in task)"
            )
        if source.startswith("task:"):
            tokenizer = task_tokenizer(source)
        else:
            self._require_local(source, "tokenizer" if source == self.tokenizer else "model_name_or_path")
            tokenizer = AutoTokenizer.from_pretrained(
                source, trust_remote_code=self.trust_remote_code
            )
        return ensure_pad_token(tokenizer)

    def _config(self, tokenizer: PreTrainedTokenizerBase, **overrides: Any):
        assert self.config is not None
        values = dict(self.config)
        model_type = values.pop("model_type")
        values.setdefault("vocab_size", len(tokenizer))
        values.setdefault("pad_token_id", tokenizer.pad_token_id)
        values.setdefault("eos_token_id", tokenizer.eos_token_id)
        values.setdefault("bos_token_id", tokenizer.bos_token_id)
        values.update(overrides)
        return AutoConfig.for_model(model_type, **values)

    def _kwargs(self) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        # None / "auto": not passed, so transformers picks per architecture (sdpa, else eager). A
        # fixed "sdpa" default refused every model without SDPA support (Gemma 2) at build time.
        if self.attn_implementation and self.attn_implementation != "auto":
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs

    def _finish(self, model: PreTrainedModel, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
        # from_pretrained hands back eval mode, from_config train mode: one answer whatever the
        # source, so a folder's dropout (GPT-2, OPT: 0.1) is on in training as for an inline
        # config. Frozen models (references, teachers, scorers) are put in eval mode by freeze().
        model.train()
        log.info("%s: %s attention%s", type(model).__name__, attention_implementation(model),
                 "" if self.attn_implementation not in (None, "auto") else " (picked by transformers)")
        if self.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.config.use_cache = False
        if self.lora is not None:
            model = apply_lora(model, self.lora, task_type=task_type)
        return model

    def build_causal_lm(self, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        dtype = _DTYPES[self.dtype]
        if self.from_scratch:
            if self.seed is not None:
                torch.manual_seed(self.seed)
            model = AutoModelForCausalLM.from_config(
                self._config(tokenizer), dtype=None if dtype == "auto" else dtype, **self._kwargs()
            )
        else:
            self._require_local(self.model_name_or_path, "model_name_or_path")
            model = AutoModelForCausalLM.from_pretrained(
                self.model_name_or_path, dtype=dtype, **self._kwargs()
            )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        return self._finish(model)

    def build_sequence_classifier(
        self, tokenizer: PreTrainedTokenizerBase, num_labels: int = 1
    ) -> PreTrainedModel:
        """A scalar-logit classifier (discriminator / reward model). From a causal-LM folder the
        backbone is reused and a fresh score head is added (transformers does that)."""
        dtype = _DTYPES[self.dtype]
        if self.from_scratch:
            if self.seed is not None:
                torch.manual_seed(self.seed)
            model = AutoModelForSequenceClassification.from_config(
                self._config(tokenizer, num_labels=num_labels),
                dtype=None if dtype == "auto" else dtype,
                **self._kwargs(),
            )
        else:
            self._require_local(self.model_name_or_path, "model_name_or_path")
            model = AutoModelForSequenceClassification.from_pretrained(
                self.model_name_or_path, num_labels=num_labels, dtype=dtype, **self._kwargs()
            )
        model.config.pad_token_id = tokenizer.pad_token_id
        return self._finish(model, task_type="SEQ_CLS")
