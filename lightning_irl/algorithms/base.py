"""What every algorithm shares: the policy, its tokenizer, optimizer plumbing, validation NLL,
sampling for ``predict``, and the Hugging Face export. Algorithms subclass this and add a loss."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import lightning as L
import torch
import torchmetrics
from transformers import get_scheduler

from lightning_irl.metrics.evaluation import EvalConfig, SampleEvaluator, take_prompts
from lightning_irl.models.spec import ModelSpec
from lightning_irl.objectives.logprobs import token_logprobs, token_nll_sum
from lightning_irl.rollout import Rollout, SamplingConfig, sample

log = logging.getLogger(__name__)


@dataclass
class OptimizerSpec:
    """AdamW with warmup then a decay schedule (a transformers scheduler name).

    Args:
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay (not applied to biases and norms).
        betas: Adam betas.
        eps: Adam epsilon.
        warmup_steps: Linear warmup from 0 over this many optimizer steps.
        schedule: ``cosine``, ``linear``, ``constant_with_warmup``, ... (transformers get_scheduler).
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"


def build_optimizer(params_module: torch.nn.Module, spec: OptimizerSpec, total_steps: int,
                    own_lr: Optional[Dict[str, float]] = None):
    """AdamW + schedule over the trainable parameters of ``params_module``. ``own_lr`` maps
    parameter names to a peak learning rate of their own (no weight decay, same schedule)."""
    own_lr = own_lr or {}
    decay, no_decay, own = [], [], []
    for name, param in params_module.named_parameters():
        if not param.requires_grad:
            continue
        if name in own_lr:
            own.append({"params": [param], "weight_decay": 0.0, "lr": own_lr[name]})
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}, *own]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.lr, betas=tuple(spec.betas),
                                  eps=spec.eps)
    scheduler = get_scheduler(spec.schedule, optimizer, num_warmup_steps=spec.warmup_steps,
                              num_training_steps=max(total_steps, 1))
    return optimizer, {"scheduler": scheduler, "interval": "step"}


BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """No gradients and eval mode (no dropout): references, opponents, teachers, scorers."""
    model.requires_grad_(False)
    return model.eval()


def full_state_dict(model: torch.nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The full state dict (on CPU) when the model is sharded (FSDP2 DTensors), else None.

    Collective under FSDP2: every rank must call it."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None


def split_micro_batches(batch: Dict[str, Any], micro_batch_size: Optional[int]) -> Iterator[Dict[str, Any]]:
    """Row slices of aligned [B, T] tensors, each cut after its last attended column.

    Cutting after the last attended *column* (not at the longest row's length) keeps whole rows
    for right-padded demonstrations, left-padded-prompt rollouts and packed rows alike.
    """
    size = batch["input_ids"].size(0)
    step = micro_batch_size or size
    for start in range(0, size, step):
        part = {k: v[start : start + step] for k, v in batch.items() if torch.is_tensor(v) and v.dim() == 2
                and k in BATCH_KEYS + ("position_ids",)}
        columns = part["attention_mask"].bool().any(0).nonzero()
        width = int(columns[-1]) + 1 if columns.numel() else 1
        yield {k: v[:, :width] for k, v in part.items()}


class IRLModule(L.LightningModule):
    """Base of every algorithm. Manual optimisation throughout: the loss is normalised by the
    number of loss tokens of the *global* step (all micro-batches, all ranks), which needs the
    token count before the first backward, and adversarial methods step two optimizers anyway.

    Args:
        policy: The model being trained (Hub id / folder, or an inline config).
        optimizer: Optimizer and schedule of the policy.
        micro_batch_size: Split each batch into micro-batches of this many examples and accumulate
            gradients (the gradient equals the full batch's). Lightning's
            ``accumulate_grad_batches`` is not used; raise ``data.batch_size`` instead.
        max_grad_norm: Clip the global gradient norm (None = no clipping).
        sampling: Sampling settings for rollouts and ``predict``.
        export_dir: Where the final policy and tokenizer are saved in Hugging Face format
            (safetensors) when ``fit`` ends. Default: ``export`` inside the run's checkpoint folder.
        export: Turn the export off with False.
        evaluation: Sample-based metrics at validation, logged under ``eval/`` (forward / reverse
            KL, invalid mass, mode coverage against a built-in task's exact expert; entropy,
            distinct-n, self-BLEU, length for any data). See ``EvalConfig``.
    """

    def __init__(
        self,
        policy: ModelSpec,
        optimizer: OptimizerSpec = OptimizerSpec(),
        micro_batch_size: Optional[int] = None,
        max_grad_norm: Optional[float] = 1.0,
        sampling: SamplingConfig = SamplingConfig(),
        export_dir: Optional[str] = None,
        export: bool = True,
        evaluation: EvalConfig = EvalConfig(),
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy_spec = policy
        self.optimizer_spec = optimizer
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.sampling = sampling
        self.export_dir = export_dir
        self.export = export
        self.tokenizer = policy.load_tokenizer()
        self.policy: Optional[torch.nn.Module] = None
        self.val_nll = torchmetrics.MeanMetric()
        self._tokens_seen = 0
        self._clock: Optional[float] = None
        self.evaluation = evaluation
        self.evaluator: Optional[SampleEvaluator] = None  # built at the first evaluation (needs the task)
        self._eval_active = False
        self._eval_prompts = 0
        self._val_runs = 0

    def train(self, mode: bool = True):
        """Lightning calls ``.train()`` on the whole module each epoch; models whose parameters are
        all frozen (reference, opponent, teacher, scoring policies) stay in eval mode."""
        super().train(mode)
        for child in self.children():
            params = list(child.parameters())
            if params and not any(p.requires_grad for p in params):
                child.eval()
        return self

    # ---- building ----------------------------------------------------------------------
    #: An algorithm whose loss needs the frozen initial policy (a KL anchor, AIRL's log π_ref)
    #: sets this True; it then reads the reference through ``reference_mode`` /
    #: ``reference_logprobs``, never through an attribute.
    needs_reference: bool = False

    def configure_model(self) -> None:
        """Build the policy (and, if ``needs_reference``, a frozen reference) once.

        Models are only built here. Under ``lightning_irl.strategies.FSDP2Strategy`` every model
        this hook (or an override of it) built is sharded after it returns, by the rules in
        ``lightning_irl/strategies.py``, so overrides may deep-copy the policy freely.
        """
        from lightning_irl.models.lora import is_peft_model
        from lightning_irl.strategies import require_supported_strategy

        require_supported_strategy(self)
        if self.policy is None:
            self.policy = self.policy_spec.build_causal_lm(self.tokenizer)
        if self.needs_reference and not is_peft_model(self.policy) and getattr(self, "reference", None) is None:
            # A separate frozen copy of the *initial* policy. It stays in the state dict, so a
            # resumed run gets the true initial weights back even from an unseeded init.
            import copy

            self.reference = freeze(copy.deepcopy(self.policy))

    def reference_mode(self):
        """``with self.reference_mode() as ref: ref(input_ids=...)`` — the frozen reference model.

        With LoRA on the policy, ``ref`` is the policy itself with its adapter switched off (the
        base weights, held once); otherwise the frozen copy made in ``configure_model``. Inside
        the block gradients are off and the model is in eval mode (no dropout); the policy's
        training mode and adapter are restored on exit.
        """
        from lightning_irl.models.lora import reference_context

        return reference_context(self.policy, getattr(self, "reference", None), owner=type(self).__name__)

    def reference_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Shifted per-token log-probs [B, T-1] under the frozen reference (see ``reference_mode``)."""
        with self.reference_mode() as reference:
            return token_logprobs(reference, input_ids, attention_mask)

    def total_steps(self) -> int:
        try:
            return int(self.trainer.estimated_stepping_batches)
        except Exception:  # no trainer or an infinite loader
            return 1

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.policy, self.optimizer_spec, self.total_steps())
        return [optimizer], [scheduler]

    # ---- shared training plumbing ------------------------------------------------------
    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (identity on one device)."""
        if self.trainer is None or self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value.float(), reduce_op="sum")

    def step_optimizer(self, optimizer, scheduler=None) -> None:
        if self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    def nll_backward(self, batch: Dict[str, Any], scale: float = 1.0) -> torch.Tensor:
        """Backward of scale × (Σ response-token NLL) / (global loss-token count), micro-batched.

        Returns the detached global mean NLL contribution of this rank (sum over ranks = mean).
        """
        world = self.trainer.world_size if self.trainer is not None else 1
        local_tokens = batch["loss_mask"][:, 1:].sum()
        global_tokens = self.global_sum(local_tokens.float()).clamp(min=1)
        total = torch.zeros((), device=self.device)
        for micro in split_micro_batches(batch, self.micro_batch_size):
            logps = token_logprobs(self.policy, micro["input_ids"], micro["attention_mask"],
                                   position_ids=micro.get("position_ids"))
            loss = token_nll_sum(logps, micro["loss_mask"][:, 1:]) * world / global_tokens
            self.manual_backward(loss * scale)
            total += loss.detach()
        return total / world

    def count_tokens(self, batch: Dict[str, Any]) -> None:
        """Non-pad tokens processed, for ``perf/tokens_per_sec``."""
        now = time.perf_counter()
        tokens = int(batch["attention_mask"].sum())
        if self._clock is not None:
            elapsed = now - self._clock
            if elapsed > 0:
                self.log("perf/tokens_per_sec", self._tokens_seen / elapsed * self.trainer.world_size,
                         on_step=True, on_epoch=False)
        self._clock, self._tokens_seen = now, tokens

    # ---- validation / test: held-out NLL on demonstrations -----------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_nll.reset()
        self._sample_eval_start()

    def _nll_eval_step(self, batch: Dict[str, Any]) -> torch.Tensor:
        logps = token_logprobs(self.policy, batch["input_ids"], batch["attention_mask"])
        mask = batch["loss_mask"][:, 1:]
        tokens = mask.sum()
        if tokens > 0:
            self.val_nll.update(token_nll_sum(logps, mask) / tokens, weight=tokens)
        return logps

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        logps = self._nll_eval_step(batch)
        self._sample_eval_step(batch, logps, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_nll("val")
        self._sample_eval_end()

    def _log_nll(self, stage: str) -> None:
        nll = self.val_nll.compute()
        self.log(f"{stage}/loss", nll, sync_dist=False)
        self.log(f"{stage}/perplexity", torch.exp(nll), sync_dist=False)
        self.val_nll.reset()

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        self._nll_eval_step(batch)

    def on_test_epoch_start(self) -> None:
        self.val_nll.reset()

    def on_test_epoch_end(self) -> None:
        self._log_nll("test")

    # ---- sample-based evaluation: eval/… (lightning_irl.metrics.evaluation) -------------
    def _sample_eval_start(self) -> None:
        trainer = self.trainer
        self._eval_active = False
        if not self.evaluation.enabled or trainer.sanity_checking:
            return
        if trainer.state.fn == "fit":
            self._val_runs += 1
            if self._val_runs % self.evaluation.every_n_val:
                return
        if self.evaluator is None:
            self.evaluator = self.evaluation.build_evaluator(getattr(trainer.datamodule, "task", None))
        self.evaluator.to(self.device).reset()
        self._eval_active, self._eval_prompts = True, 0

    def _sample_eval_step(self, batch: Dict[str, Any], logps: torch.Tensor,
                          batch_idx: int) -> Optional[Tuple[Dict[str, Any], Rollout, SamplingConfig]]:
        """Exact forward KL over this batch's prompts, then policy samples for the first
        ``evaluation.num_prompts`` prompts. Returns ``(prompts, rollout, sampling config)`` of
        the samples drawn here (for subclasses that score them further), else None."""
        if not self._eval_active:
            return None
        evaluator = self.evaluator
        datamodule = getattr(self.trainer, "datamodule", None)
        max_prompt_length = getattr(getattr(datamodule, "hparams", None), "max_prompt_length", None)
        supports = evaluator.support_batches(batch["prompt"], self.tokenizer, max_prompt_length)
        forwards = len(supports)
        if self.trainer.world_size > 1 and evaluator.task is not None:
            # sharded (FSDP2) forwards are collective: every rank must run as many as the busiest
            forwards = int(self.trainer.strategy.reduce(torch.tensor(float(forwards), device=self.device),
                                                        reduce_op="max"))
        with torch.no_grad():
            for i in range(forwards):
                if i < len(supports):
                    rows = supports[i]
                    ids, mask = rows["input_ids"].to(self.device), rows["attention_mask"].to(self.device)
                    evaluator.update_support(rows, token_logprobs(self.policy, ids, mask))
                else:  # an idle rank keeps step with the others; the result is discarded
                    token_logprobs(self.policy, batch["input_ids"][:1], batch["attention_mask"][:1])
        wanted = self.evaluation.num_prompts - self._eval_prompts
        if wanted <= 0:
            return None
        prompts = take_prompts(batch, wanted)
        config = self.evaluation.sampling(self.sampling)
        with self.evaluation.rng(self.device, self.global_rank, batch_idx):
            rollout = self.rollout(prompts, config)
        head = self.policy.get_output_embeddings()  # a PeftModel forwards this to its base model
        vocab_size = int(head.weight.shape[0]) if head is not None else int(self.policy.config.vocab_size)
        evaluator.update_rollout(prompts["prompt"], rollout, self.tokenizer, config.num_samples, vocab_size)
        self._eval_prompts += len(prompts["prompt"])
        return prompts, rollout, config

    def _sample_eval_end(self) -> None:
        if not self._eval_active:
            return
        for name, value in self.evaluator.compute().items():  # already reduced over ranks
            if torch.isfinite(value):
                self.log(f"eval/{name}", value, sync_dist=False)
        self.evaluator.reset()
        self._eval_active = False

    # ---- sampling ----------------------------------------------------------------------
    def rollout(self, batch: Dict[str, Any], config: Optional[SamplingConfig] = None,
                compute_logprobs: bool = True) -> Rollout:
        return sample(self.policy, self.tokenizer, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                      config or self.sampling, compute_logprobs=compute_logprobs)

    def predict_step(self, batch: Dict[str, Any], batch_idx: int) -> List[Dict[str, Any]]:
        rollout = self.rollout(batch)
        seq_logps = rollout.sequence_logprobs
        k = self.sampling.num_samples
        return [
            {"prompt": batch["prompt"][i // k], "response": rollout.responses[i],
             "logprob": float(seq_logps[i]), "finished": bool(rollout.finished[i])}
            for i in range(len(rollout.responses))
        ]

    # ---- export ------------------------------------------------------------------------
    def resolve_export_dir(self) -> Optional[str]:
        if not self.export:
            return None
        if self.export_dir:
            return self.export_dir
        callback = getattr(self.trainer, "checkpoint_callback", None)
        base = getattr(callback, "dirpath", None) or self.trainer.default_root_dir
        return os.path.join(base, "export")

    def export_model(self, model, path: str, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write an HF folder atomically: a crash mid-write leaves the previous export intact."""
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        to_save = model
        if hasattr(model, "merge_and_unload"):
            if state_dict is None:
                import copy

                to_save = copy.deepcopy(model).merge_and_unload()
            else:  # gathered FSDP2 shards of a PeftModel: merge the adapter into the base weights
                from lightning_irl.models.lora import merge_lora_state_dict

                state_dict = merge_lora_state_dict(model, state_dict)
                to_save = model.get_base_model()
        to_save.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp)
        old = path.rstrip("/") + ".old"
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)

    def export_from_all_ranks(self, model, path: str, what: str) -> None:
        """Collective export: every rank gathers (FSDP2 shards), rank 0 writes, all wait."""
        path = self.trainer.strategy.broadcast(path)
        state_dict = full_state_dict(model)
        if self.trainer.is_global_zero:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.export_model(model, path, state_dict)
            log.info("exported the %s and tokenizer to %s", what, path)
        self.trainer.strategy.barrier(f"export {what}")

    def on_fit_end(self) -> None:
        path = self.resolve_export_dir()
        if path is not None:
            self.export_from_all_ranks(self.policy, path, "policy")
