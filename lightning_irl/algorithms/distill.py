"""Distillation from a teacher model with the generalized JSD (GKD, Agarwal et al. 2024).

Per response token, ``JSD_β(p_T ‖ p_S)`` between the teacher's and the student's next-token
distributions at ``temperature`` (``objectives.gkd.masked_generalized_jsd_loss``, TRL's
conventions): β = 0 is forward KL ``KL(p_T‖p_S)``, β = 1 reverse KL ``KL(p_S‖p_T)``. docs/theory.md §4.

The tokens scored are the demonstrations or, on a seeded share ``on_policy_fraction`` of the
steps, the student's own samples for the same prompts (GKD's on-policy mode, λ in the paper).
"""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, Optional

import torch

from lightning_irl.algorithms.base import freeze
from lightning_irl.algorithms.engine import response_tokens, rollout_rows, sequence_rows
from lightning_irl.algorithms.policy import PolicyModule
from lightning_irl.models.spec import ModelSpec
from lightning_irl.objectives.gkd import masked_generalized_jsd_loss
from lightning_irl.objectives.logprobs import shifted_logits

log = logging.getLogger(__name__)


def output_size(model: torch.nn.Module) -> int:
    embeddings = model.get_output_embeddings()
    return int(embeddings.weight.shape[0]) if embeddings is not None else int(model.config.vocab_size)


class Distill(PolicyModule):
    """Generalized-JSD distillation of a teacher into the policy (the student).

    Args:
        policy: The student being trained.
        teacher: The teacher: a Hub id / folder (a real teacher), or an inline config (tests).
            Frozen, eval mode, never in the optimizer. It must share the student's tokenizer:
            a teacher with its own ``tokenizer`` (or folder) whose vocabulary differs from the
            student's is refused, and so are output layers of different sizes (unless both
            cover the tokenizer and differ only in padding rows, which are then ignored). An
            inline teacher without ``tokenizer:`` uses the student's.
        jsd_beta: β ∈ [0, 1] of the generalized JSD (0 forward KL, 1 reverse KL, 0.5 JSD; TRL's
            ``GKDConfig.beta``).
        temperature: Softmax temperature of both distributions inside the loss (separate from
            ``sampling.temperature``, used when the student samples).
        on_policy_fraction: λ ∈ [0, 1]: each step, with probability λ, the demonstrated responses
            are replaced by the student's samples (``sampling``) for the same prompts. Decided
            from (``seed``, global step), so every rank and a resumed run agree.
        seed: Seed of the on-policy draws.
        **kwargs: ``PolicyModule`` arguments (optimizer, micro_batch_size, max_grad_norm, sampling, ...).

    Normalisation (the engine): the per-token JSD averaged over the response tokens of the global
    step, as SFT's NLL. A teacher loaded from a folder or the Hub is left out of checkpoints (it
    is rebuilt from its spec on resume); an inline teacher is small and is saved with them.
    """

    def __init__(
        self,
        policy: ModelSpec,
        teacher: ModelSpec,
        jsd_beta: float = 0.5,
        temperature: float = 1.0,
        on_policy_fraction: float = 0.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, **kwargs)
        if not 0.0 <= jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {jsd_beta}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= on_policy_fraction <= 1.0:
            raise ValueError(f"on_policy_fraction must be in [0, 1], got {on_policy_fraction}")
        self.teacher_spec = teacher
        self.jsd_beta = jsd_beta
        self.temperature = temperature
        self.on_policy_fraction = on_policy_fraction
        self.seed = seed
        self.teacher: Optional[torch.nn.Module] = None
        self._vocab: Optional[int] = None  # logits columns compared (None = all)
        if teacher.tokenizer is not None or teacher.model_name_or_path is not None:
            self._check_tokenizer(teacher.load_tokenizer())
        if teacher.model_name_or_path is not None:  # rebuilt from its spec: keep it out of checkpoints
            self.register_state_dict_post_hook(_drop_teacher_keys)
            self.register_load_state_dict_post_hook(_ignore_missing_teacher_keys)

    def _check_tokenizer(self, teacher_tokenizer) -> None:
        if teacher_tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(
                f"teacher and student tokenizers differ ({len(teacher_tokenizer)} vs {len(self.tokenizer)} "
                "tokens or different ids): distillation compares next-token distributions id by id, "
                "so the teacher must use the student's tokenizer"
            )

    # ---- building ----------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        if self.teacher is None:
            teacher = self.teacher_spec.build_causal_lm(self.tokenizer)
            student_size, teacher_size = output_size(self.policy), output_size(teacher)
            if student_size != teacher_size:
                if min(student_size, teacher_size) < len(self.tokenizer):
                    raise ValueError(
                        f"teacher vocabulary size {teacher_size} != student vocabulary size {student_size} "
                        f"(tokenizer has {len(self.tokenizer)} tokens): the teacher must share the student's "
                        "tokenizer and output layer"
                    )
                log.info("teacher/student output sizes %d/%d differ only in padding rows: comparing the first %d",
                         teacher_size, student_size, len(self.tokenizer))
                self._vocab = len(self.tokenizer)
            self.teacher = freeze(teacher)

    # ---- training ----------------------------------------------------------------------
    def use_on_policy(self, step: int) -> bool:
        """The seeded draw of step ``step``: True = train on the student's own samples."""
        if self.on_policy_fraction <= 0:
            return False
        return random.Random(self.seed * 1_000_003 + step).random() < self.on_policy_fraction

    def _jsd_sum(self, micro: Dict[str, torch.Tensor]) -> torch.Tensor:
        student = shifted_logits(self.policy, micro["input_ids"], micro["attention_mask"])
        with torch.no_grad():
            teacher = shifted_logits(self.teacher, micro["input_ids"], micro["attention_mask"])
        if self._vocab is not None:
            student, teacher = student[..., : self._vocab], teacher[..., : self._vocab]
        return masked_generalized_jsd_loss(student, teacher, micro["loss_mask"][:, 1:], beta=self.jsd_beta,
                                           temperature=self.temperature, num_loss_tokens=1)  # a sum

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        self.count_tokens(batch)
        on_policy = self.use_on_policy(self.trainer.global_step)
        rows = rollout_rows(self.rollout(batch, compute_logprobs=False)) if on_policy else sequence_rows(batch)
        loss = self.engine.backward(rows, self._jsd_sum, response_tokens, self.micro_batch_size,
                                    names={"loss": "distillation loss"})["loss"]
        self.step(optimizer, scheduler)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, reduce_fx="sum")
        self.log("distill/on_policy", float(on_policy))
        self.log("train/lr", scheduler.get_last_lr()[0], on_step=True, on_epoch=False)


def _drop_teacher_keys(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "teacher.")]:
        del state_dict[key]


def _ignore_missing_teacher_keys(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith("teacher.")]
