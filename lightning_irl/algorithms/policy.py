"""The base of every policy-training method: the policy, its frozen reference, rollouts,
validation (held-out NLL and the sample-based ``eval/`` metrics) and ``predict``."""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch
import torchmetrics

from lightning_irl.algorithms.base import IRLModule, OptimizerSpec, build_optimizer, freeze
from lightning_irl.algorithms.engine import OnNonFinite, response_tokens, sequence_rows
from lightning_irl.algorithms.export import Export
from lightning_irl.metrics.evaluation import EvalConfig, SampleEvaluator, take_prompts
from lightning_irl.models.lora import is_peft_model, reference_context
from lightning_irl.models.spec import ModelSpec
from lightning_irl.objectives.logprobs import masked_token_nll_sum, scored_token_logprobs, token_logprobs, token_nll_sum
from lightning_irl.rollout import Rollout, SamplingConfig, sample
from lightning_irl.strategies import require_supported_strategy


class PolicyModule(IRLModule):
    """A policy being trained. Subclasses write ``training_step``: build the loss sums, hand them
    to ``self.engine.backward``, ``self.step`` the optimizer, log (docs/adding_a_method.md).

    Args:
        policy: The model being trained (Hub id / folder, or an inline config).
        optimizer: Optimizer and schedule of the policy.
        micro_batch_size: Rows per forward/backward; gradients are accumulated (see ``IRLModule``).
        max_grad_norm: Clip the global gradient norm (None = no clipping).
        sampling: Sampling settings for rollouts and ``predict``.
        export_dir: Where the final policy and tokenizer are saved in Hugging Face format
            (safetensors) when ``fit`` ends. Default: ``export`` inside the run's checkpoint folder.
        export: Turn the export off with False.
        evaluation: Sample-based metrics at validation, logged under ``eval/`` (forward / reverse
            KL, invalid mass, mode coverage against a built-in task's exact expert; entropy,
            distinct-n, self-BLEU, length for any data). See ``EvalConfig``.
        on_nonfinite: ``stop`` or ``skip`` at a NaN / infinite loss, reward or gradient norm
            (see ``IRLModule``).
        max_nonfinite_skips: With ``skip``, stop once more steps than this were skipped.
    """

    #: A method whose loss needs the frozen initial policy (a KL anchor, AIRL's log π_ref) sets
    #: this True; it then reads the reference through ``reference_mode`` / ``reference_logprobs``,
    #: never through an attribute.
    needs_reference: bool = False

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
        on_nonfinite: OnNonFinite = "stop",
        max_nonfinite_skips: int = 10,
    ) -> None:
        super().__init__(policy.load_tokenizer(), optimizer=optimizer, micro_batch_size=micro_batch_size,
                         max_grad_norm=max_grad_norm, export_dir=export_dir, export=export,
                         on_nonfinite=on_nonfinite, max_nonfinite_skips=max_nonfinite_skips)
        self.policy_spec = policy
        self.sampling = sampling
        self.policy: Optional[torch.nn.Module] = None
        self.val_nll = torchmetrics.MeanMetric()
        self.evaluation = evaluation
        self.evaluator: Optional[SampleEvaluator] = None  # built at the first evaluation (needs the task)
        self._eval_active = False
        self._eval_prompts = 0
        self._val_runs = 0

    # ---- building ----------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the policy (and, if ``needs_reference``, a frozen reference) once.

        Models are only built here. Under ``lightning_irl.strategies.FSDP2Strategy`` every model
        this hook (or an override of it) built is sharded after it returns, by the rules in
        ``lightning_irl/strategies.py``, so overrides may deep-copy the policy freely.
        """
        require_supported_strategy(self)
        if self.policy is None:
            self.policy = self.policy_spec.build_causal_lm(self.tokenizer)
        if self.needs_reference and not is_peft_model(self.policy) and getattr(self, "reference", None) is None:
            # A separate frozen copy of the *initial* policy. It stays in the state dict, so a
            # resumed run gets the true initial weights back even from an unseeded init.
            self.reference = freeze(copy.deepcopy(self.policy))

    def reference_mode(self):
        """``with self.reference_mode() as ref: ref(input_ids=...)`` — the frozen reference model.

        With LoRA on the policy, ``ref`` is the policy itself with its adapter switched off (the
        base weights, held once); otherwise the frozen copy made in ``configure_model``. Inside
        the block gradients are off and the model is in eval mode (no dropout); the policy's
        training mode and adapter are restored on exit.
        """
        return reference_context(self.policy, getattr(self, "reference", None), owner=type(self).__name__)

    def reference_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Shifted per-token log-probs [B, T-1] under the frozen reference (see ``reference_mode``)."""
        with self.reference_mode() as reference:
            return token_logprobs(reference, input_ids, attention_mask)

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.policy, self.optimizer_spec, self.total_steps(),
                                               precision=self.trainer.precision)
        return [optimizer], [scheduler]

    # ---- the SFT term, shared by SFT and every method that mixes it in -------------------
    def nll_sum(self, micro: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ response-token NLL of demonstration rows under the policy (packed rows' position ids
        honoured): the SFT loss's sum, normalised per response token by the engine. The output
        head runs on the response positions only (``masked_token_nll_sum``)."""
        return masked_token_nll_sum(self.policy, micro["input_ids"], micro["attention_mask"], micro["loss_mask"][:, 1:],
                                    position_ids=micro.get("position_ids"))

    def nll_backward(self, batch: Dict[str, Any], weight: float = 1.0) -> torch.Tensor:
        """Backward of ``weight ×`` the SFT loss of ``batch``; returns this rank's share of the
        (unweighted) global mean NLL."""
        shares = self.engine.backward(sequence_rows(batch), lambda micro: {"nll": self.nll_sum(micro)},
                                      {"nll": response_tokens}, self.micro_batch_size, weights={"nll": weight})
        return shares["nll"]

    # ---- validation / test: held-out NLL on demonstrations -----------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_nll.reset()
        self._sample_eval_start()

    def _nll_eval_step(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Updates the held-out NLL; returns the shifted [B, T-1] log-probs of the response tokens
        (0 at prompt and padding positions: every reader masks them, so they are not computed)."""
        mask = batch["loss_mask"][:, 1:]
        logps = scored_token_logprobs(self.policy, batch["input_ids"], batch["attention_mask"], mask)
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
        if self.engine.world > 1 and evaluator.task is not None:
            # sharded (FSDP2) forwards are collective: every rank must run as many as the busiest
            forwards = int(self.trainer.strategy.reduce(torch.tensor(float(forwards), device=self.device),
                                                        reduce_op="max"))
        with torch.no_grad():
            for i in range(forwards):
                if i < len(supports):
                    rows = supports[i]
                    ids, mask = rows["input_ids"].to(self.device), rows["attention_mask"].to(self.device)
                    scored = rows["loss_mask"][:, 1:].to(self.device)
                    evaluator.update_support(rows, scored_token_logprobs(self.policy, ids, mask, scored))
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
        """Samples of the policy for the batch's prompts (``config`` defaults to ``sampling``)."""
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
    def exports(self) -> List[Export]:
        return [Export(self.policy, "policy")]


__all__ = ["PolicyModule"]
