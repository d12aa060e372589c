"""Reward models from demonstrations alone (Inverse-RLignment, docs/theory.md §5), and Best-of-N.

``RewardModel`` trains a sequence classifier ``h(x, y)`` (one logit per prompt + response, read at
the last attended token by ``models.scoring.sequence_logits``) with binary cross-entropy to tell a
*positive* sample source (label 1) from a *negative* one (label 0). Each side's loss is averaged
over that side's rows in the global batch and the two halves are summed with weight 1/2:

    loss = ½·E_pos[softplus(−h)] + ½·E_neg[softplus(h)]

so the classes are balanced whatever the number of rows per side, and the optimum is
``h*(x, y) = log p_pos(y|x) − log p_neg(y|x)``. The logit is the reward.

Presets for the paper's pairings (positive vs negative):

- ``init_sft``: SFT-policy samples vs initial-policy samples (the paper's recommendation: both
  sides come from similar models, so the classifier learns what SFT changed, not the style of
  human text); ``h* = log π_SFT − log π_init``.
- ``init_demo``: demonstrations vs initial-policy samples.
- ``sft_demo``: demonstrations vs SFT-policy samples.

``BestOfN`` (``lightning_irl predict``) samples ``n`` responses per prompt from a policy, scores
them with a reward model and returns the best one per prompt with its reward.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
import torchmetrics
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from lightning_irl.algorithms.base import IRLModule, OptimizerSpec, build_optimizer, freeze
from lightning_irl.algorithms.engine import OnNonFinite, map_micro_batches, sequences
from lightning_irl.algorithms.export import Export
from lightning_irl.algorithms.policy import PolicyModule
from lightning_irl.algorithms.reward_sources import (
    DemonstrationSide,
    FileSide,
    PolicySide,
    SampleSource,
    Side,
    SideBatch,
    encode_pairs,
    same_vocabulary,
)
from lightning_irl.models.scoring import sequence_logits
from lightning_irl.models.spec import ModelSpec
from lightning_irl.objectives.divergences import bce_sum
from lightning_irl.rollout import SamplingConfig
from lightning_irl.strategies import require_supported_strategy

log = logging.getLogger(__name__)

PRESETS = {  # name -> (positive, negative); "initial" / "sft" name a policy argument
    "init_sft": ("sft", "initial"),
    "init_demo": ("demonstrations", "initial"),
    "sft_demo": ("demonstrations", "sft"),
}
SIDES = ("positive", "negative")


def score_sequences(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    micro_batch_size: Optional[int] = None) -> torch.Tensor:
    """Rewards [N] (float32) of whole sequences, in row chunks; any padding side, pad == EOS safe."""
    if input_ids.size(0) == 0:
        return torch.zeros(0, device=input_ids.device)
    return map_micro_batches({"input_ids": input_ids, "attention_mask": attention_mask},
                             lambda c: sequence_logits(model, c["input_ids"], c["attention_mask"]).float(),
                             micro_batch_size)


def score_pairs(model: torch.nn.Module, tokenizer, prompts: Sequence[str], responses: Sequence[str],
                micro_batch_size: Optional[int] = None, finished: Optional[Sequence[bool]] = None) -> torch.Tensor:
    """Rewards [N] of (prompt, response) texts, encoded exactly as demonstrations are."""
    device = next(model.parameters()).device
    encoded = encode_pairs(tokenizer, prompts, responses, finished)
    with torch.no_grad():
        return score_sequences(model, encoded["input_ids"].to(device), encoded["attention_mask"].to(device),
                               micro_batch_size)


def best_of_n_indices(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Row index of the highest reward in each contiguous group of ``n`` rows (first on ties;
    NaN counts as −inf): [N / n]."""
    grouped = torch.nan_to_num(rewards.float(), nan=-torch.inf).view(-1, n)
    return torch.arange(grouped.size(0), device=rewards.device) * n + grouped.argmax(-1)


class RewardModel(IRLModule):
    """A sequence classifier trained to separate two sample sources; its logit is a reward.

    Args:
        classifier: The classifier: a folder / Hub id (a causal-LM folder gets a fresh score
            head; a folder exported by this module keeps its head) or an inline config. Its
            tokenizer is the run's tokenizer (the data module encodes with it).
        preset: ``init_sft``, ``init_demo`` or ``sft_demo`` (see the module docstring); needs
            ``initial_policy`` and/or ``sft_policy``. Leave it out to give ``positive`` and
            ``negative`` yourself.
        initial_policy: The initial (pre-SFT) policy of the presets, sampled on the batch prompts.
        sft_policy: The SFT policy of the presets, e.g. ``checkpoints/quickstart/version_0/export``.
        positive: Label-1 source (``SampleSource``: demonstrations, a policy or a file).
        negative: Label-0 source.
        optimizer: Optimizer and schedule of the classifier.
        micro_batch_size: Score each side in chunks of this many rows and accumulate gradients.
        max_grad_norm: Clip the classifier's global gradient norm (None = off).
        sampling: Sampling of policy sources (per-source ``sampling`` overrides it);
            ``num_samples`` responses per prompt.
        export_dir: Where the trained classifier and its tokenizer go (Hugging Face format,
            safetensors) when ``fit`` ends; default ``export`` in the run's checkpoint folder.
        export: Turn the export off with False.
        on_nonfinite: ``stop`` or ``skip`` at a NaN / infinite loss or gradient norm (see
            ``IRLModule``).
        max_nonfinite_skips: With ``skip``, stop once more steps than this were skipped.

    Logs ``train/loss`` (the balanced BCE above), ``train/accuracy``, ``train/reward_margin``
    and, on held-out data (the validation split's prompts and demonstrations; a file source's
    held-out records), ``val/loss``, ``val/accuracy`` (logit > 0 ⇔ positive), ``val/auroc``,
    ``val/reward_margin`` (mean positive − mean negative logit), ``val/reward_positive``,
    ``val/reward_negative``. ``predict`` scores the data module's (prompt, response) records.
    """

    def __init__(
        self,
        classifier: ModelSpec,
        preset: Optional[str] = None,
        initial_policy: Optional[ModelSpec] = None,
        sft_policy: Optional[ModelSpec] = None,
        positive: Optional[SampleSource] = None,
        negative: Optional[SampleSource] = None,
        optimizer: OptimizerSpec = OptimizerSpec(),
        micro_batch_size: Optional[int] = None,
        max_grad_norm: Optional[float] = 1.0,
        sampling: SamplingConfig = SamplingConfig(),
        export_dir: Optional[str] = None,
        export: bool = True,
        on_nonfinite: OnNonFinite = "stop",
        max_nonfinite_skips: int = 10,
    ) -> None:
        super().__init__(classifier.load_tokenizer(), optimizer=optimizer, micro_batch_size=micro_batch_size,
                         max_grad_norm=max_grad_norm, export_dir=export_dir, export=export,
                         on_nonfinite=on_nonfinite, max_nonfinite_skips=max_nonfinite_skips)
        self.classifier_spec = classifier
        self.sampling = sampling
        self.preset = preset
        self.sources = self.resolve_sources(preset, initial_policy, sft_policy, positive, negative)
        self.reward_model: Optional[torch.nn.Module] = None
        self.source_policies = torch.nn.ModuleDict()
        self.sides: Dict[str, Side] = {}
        for side, source in self.sources.items():
            log.info("reward model %s side: %s", side, source.describe())
        self.register_state_dict_post_hook(_drop_loaded_policies)
        self.register_load_state_dict_post_hook(_ignore_loaded_policies)
        self.val_accuracy = BinaryAccuracy()
        self.val_auroc = BinaryAUROC()
        self.val_positive = torchmetrics.MeanMetric()
        self.val_negative = torchmetrics.MeanMetric()
        self.val_loss = torchmetrics.MeanMetric()

    @staticmethod
    def resolve_sources(preset: Optional[str], initial_policy: Optional[ModelSpec], sft_policy: Optional[ModelSpec],
                        positive: Optional[SampleSource], negative: Optional[SampleSource]) -> Dict[str, SampleSource]:
        if preset is None:
            if positive is None or negative is None:
                raise ValueError("RewardModel: give a `preset` (init_sft, init_demo, sft_demo) or both "
                                 "`positive` and `negative` sample sources")
            if initial_policy is not None or sft_policy is not None:
                raise ValueError("RewardModel: initial_policy / sft_policy are used by presets only; "
                                 "without a preset put the policy into a sample source")
            return {"positive": positive, "negative": negative}
        if preset not in PRESETS:
            raise ValueError(f"RewardModel: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        if positive is not None or negative is not None:
            raise ValueError(f"RewardModel: preset {preset!r} sets both sources; leave positive/negative out")
        policies = {"initial": initial_policy, "sft": sft_policy}
        out = {}
        for side, name in zip(SIDES, PRESETS[preset]):
            if name == "demonstrations":
                out[side] = SampleSource(kind="demonstrations")
            elif policies[name] is None:
                raise ValueError(f"RewardModel: preset {preset!r} needs `{name}_policy`")
            else:
                out[side] = SampleSource(kind="policy", policy=policies[name])
        return out

    # ---- checkpoints: policies loaded from a folder / the Hub are rebuilt from their specs ----
    def _loaded_prefixes(self) -> List[str]:
        return [f"source_policies.{side}." for side, source in self.sources.items()
                if source.kind == "policy" and source.policy.model_name_or_path is not None]

    # ---- building ----------------------------------------------------------------------
    def configure_model(self) -> None:
        require_supported_strategy(self)
        if self.reward_model is None:
            self.reward_model = self.classifier_spec.build_sequence_classifier(self.tokenizer)
        for side, source in self.sources.items():
            if source.kind == "policy" and side not in self.source_policies:
                spec = source.policy
                tokenizer = self.tokenizer if spec.tokenizer is None and spec.model_name_or_path is None \
                    else spec.load_tokenizer()
                self.source_policies[side] = freeze(spec.build_causal_lm(tokenizer))
                self.sides[side] = PolicySide(source, self.source_policies[side], tokenizer, self.tokenizer,
                                              self.sampling)
                if self.sides[side].retokenize and not same_vocabulary(tokenizer, self.tokenizer):
                    log.info("%s policy has its own tokenizer: its samples are re-encoded for the classifier", side)

    def setup(self, stage: str) -> None:
        for side, source in self.sources.items():
            if source.kind == "demonstrations":
                self.sides[side] = DemonstrationSide(source)
            elif source.kind == "file" and side not in self.sides:
                self.sides[side] = FileSide(source, self.tokenizer, self.global_rank, self.engine.world)

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.reward_model, self.optimizer_spec, self.total_steps(),
                                               precision=self.trainer.precision)
        return [optimizer], [scheduler]

    # ---- scoring -----------------------------------------------------------------------
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards [N] of whole sequences (prompt + response), any padding side."""
        return score_sequences(self.reward_model, input_ids, attention_mask, self.micro_batch_size)

    def score_pairs(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Rewards [N] of (prompt, response) texts."""
        return score_pairs(self.reward_model, self.tokenizer, prompts, responses, self.micro_batch_size)

    def _draw(self, batch: Dict[str, Any], stage: str) -> Dict[str, Optional[SideBatch]]:
        return {side: self.sides[side].draw(batch, stage) for side in SIDES}

    # ---- training ----------------------------------------------------------------------
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        self.count_tokens(batch)
        drawn = self._draw(batch, "train")
        loss = torch.zeros((), device=self.device)
        scores: Dict[str, List[torch.Tensor]] = {side: [] for side in SIDES}
        for side, target in (("positive", 1.0), ("negative", 0.0)):
            def side_sum(micro, side=side, target=target):
                h = sequence_logits(self.reward_model, micro["input_ids"], micro["attention_mask"]).float()
                scores[side].append(h.detach())
                return bce_sum(h, target)

            rows = {"input_ids": drawn[side].input_ids, "attention_mask": drawn[side].attention_mask}
            # each side a mean over its own rows, the two halves weighted ½: balanced classes
            loss = loss + 0.5 * self.engine.backward(rows, side_sum, sequences, self.micro_batch_size,
                                                     weights={"loss": 0.5},
                                                     names={"loss": "reward model loss"})["loss"]
        self.step(optimizer, scheduler)
        pos, neg = torch.cat(scores["positive"]), torch.cat(scores["negative"])
        accuracy = torch.cat([(pos > 0).float(), (neg <= 0).float()]).mean()
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, reduce_fx="sum")
        self.log("train/accuracy", accuracy, sync_dist=True)
        self.log("train/reward_margin", pos.mean() - neg.mean(), sync_dist=True)
        self.log("train/lr", scheduler.get_last_lr()[0], on_step=True, on_epoch=False)

    # ---- validation / test: held-out separation -----------------------------------------
    def _eval_metrics(self):
        return (self.val_accuracy, self.val_auroc, self.val_positive, self.val_negative, self.val_loss)

    def _eval_start(self, stage: str) -> None:
        for metric in self._eval_metrics():
            metric.reset()
        for side in self.sides.values():
            side.start(stage)

    def _eval_update(self, side: str, rows: Optional[SideBatch]) -> None:
        if rows is None or len(rows) == 0:
            return
        h = self.score(rows.input_ids.to(self.device), rows.attention_mask.to(self.device))
        label = 1 if side == "positive" else 0
        target = torch.full_like(h, label, dtype=torch.long)
        self.val_accuracy.update(torch.sigmoid(h), target)
        self.val_auroc.update(torch.sigmoid(h), target)
        (self.val_positive if label else self.val_negative).update(h)
        self.val_loss.update(F.softplus(-h if label else h))

    def _eval_step(self, batch: Dict[str, Any], stage: str) -> None:
        for side, rows in self._draw(batch, stage).items():
            self._eval_update(side, rows)

    def _eval_end(self, stage: str) -> None:
        size = self.trainer.datamodule.hparams.get("batch_size", 32) if getattr(self.trainer, "datamodule", None) \
            else 32
        for side in SIDES:
            for rows in self.sides[side].rest(stage, size):
                self._eval_update(side, rows)
        # every metric is reduced over ranks by torchmetrics; log the values as they are
        positive, negative = self.val_positive.compute(), self.val_negative.compute()
        values = {"accuracy": self.val_accuracy.compute(), "reward_positive": positive,
                  "reward_negative": negative, "reward_margin": positive - negative, "loss": self.val_loss.compute()}
        if self.val_auroc.update_count > 0:
            try:
                values["auroc"] = self.val_auroc.compute()
            except Exception:  # pragma: no cover - one class only
                pass
        for name, value in values.items():
            if torch.isfinite(value):
                self.log(f"{stage}/{name}", value, sync_dist=False)
        for metric in self._eval_metrics():
            metric.reset()

    def on_validation_epoch_start(self) -> None:
        self._eval_start("val")

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def predict_step(self, batch: Dict[str, Any], batch_idx: int) -> List[Dict[str, Any]]:
        """Rewards of the data module's (prompt, response) records."""
        rewards = self.score(batch["input_ids"], batch["attention_mask"]).tolist()
        return [{"prompt": p, "response": r, "reward": float(s)}
                for p, r, s in zip(batch["prompt"], batch["response"], rewards)]

    # ---- export ------------------------------------------------------------------------
    def export_info(self) -> Dict[str, Any]:
        return {
            "preset": self.preset,
            "positive": self.sources["positive"].describe(),
            "negative": self.sources["negative"].describe(),
            "score": "logit at the last attended token (lightning_irl.models.scoring.sequence_logits); "
                     "reward = log p_positive - log p_negative at the optimum",
        }

    def exports(self) -> List[Export]:
        self.reward_model.config.lightning_irl_reward_model = self.export_info()
        return [Export(self.reward_model, "reward model")]


def _drop_loaded_policies(module, state_dict, prefix, local_metadata) -> None:
    for start in module._loaded_prefixes():
        for key in [k for k in state_dict if k.startswith(prefix + start)]:
            del state_dict[key]


def _ignore_loaded_policies(module, incompatible_keys) -> None:
    starts = tuple(module._loaded_prefixes())
    if starts:
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(starts)]


class BestOfN(PolicyModule):
    """Best-of-N sampling: ``sampling.num_samples`` (N) responses per prompt from ``policy``, the one
    the reward model scores highest is kept (``lightning_irl predict``; rows go to the JSONL
    prediction writer).

    Args:
        policy: The policy to sample (e.g. an SFT export).
        reward_model: The reward model, e.g. a folder exported by ``RewardModel``. With its own
            tokenizer (a folder holds one) whose vocabulary differs from the policy's, responses
            are decoded and re-encoded for it as demonstrations are.
        return_all: Also return every candidate with its reward and log-probability
            (``candidates``).
        sampling: Sampling settings: ``num_samples`` responses per prompt (N), temperature, top-p,
            length cap, ...
        micro_batch_size: Score candidates in chunks of this many rows.

    Each row: ``prompt``, ``response`` (the best), ``reward``, ``logprob`` (policy log-probability
    of the response), ``finished`` (ended with EOS), ``n``, ``rank_of_first`` (where the first
    sample ranked: 0 = best), and with ``return_all`` ``candidates: [{response, reward, logprob,
    finished}]``.
    """

    def __init__(
        self,
        policy: ModelSpec,
        reward_model: ModelSpec,
        return_all: bool = False,
        sampling: SamplingConfig = SamplingConfig(num_samples=4),
        micro_batch_size: Optional[int] = None,
    ) -> None:
        super().__init__(policy, sampling=sampling, micro_batch_size=micro_batch_size, export=False)
        self.reward_spec = reward_model
        self.return_all = return_all
        self.reward_model: Optional[torch.nn.Module] = None
        self.reward_tokenizer = None

    def configure_model(self) -> None:
        super().configure_model()
        if self.reward_model is None:
            spec = self.reward_spec
            own = spec.tokenizer is not None or spec.model_name_or_path is not None
            tokenizer = spec.load_tokenizer() if own else self.tokenizer
            self.reward_tokenizer = self.tokenizer if same_vocabulary(tokenizer, self.tokenizer) else tokenizer
            self.reward_model = freeze(spec.build_sequence_classifier(self.reward_tokenizer))

    def score_rollout(self, rollout, prompts: Sequence[str]) -> torch.Tensor:
        """Rewards [N] of a rollout's rows (left-padded prompt, right-padded response)."""
        if self.reward_tokenizer is self.tokenizer:
            return score_sequences(self.reward_model, rollout.input_ids, rollout.attention_mask, self.micro_batch_size)
        return score_pairs(self.reward_model, self.reward_tokenizer, prompts, rollout.responses,
                           self.micro_batch_size, rollout.finished.tolist())

    @torch.no_grad()
    def predict_step(self, batch: Dict[str, Any], batch_idx: int) -> List[Dict[str, Any]]:
        n = self.sampling.num_samples
        rollout = self.rollout(batch)
        prompts = [p for p in batch["prompt"] for _ in range(n)]
        rewards = self.score_rollout(rollout, prompts)
        logps = rollout.sequence_logprobs.tolist()
        best = best_of_n_indices(rewards, n).tolist()
        grouped = rewards.view(-1, n)
        rank_of_first = (grouped > grouped[:, :1]).sum(-1).tolist()
        values = rewards.tolist()
        rows = []
        for i, index in enumerate(best):
            row = {"prompt": batch["prompt"][i], "response": rollout.responses[index], "reward": values[index],
                   "logprob": logps[index], "finished": bool(rollout.finished[index]), "n": n,
                   "rank_of_first": int(rank_of_first[i])}
            if self.return_all:
                row["candidates"] = [
                    {"response": rollout.responses[j], "reward": values[j], "logprob": logps[j],
                     "finished": bool(rollout.finished[j])}
                    for j in range(i * n, (i + 1) * n)
                ]
            rows.append(row)
        return rows
