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

Two forms of ``h`` (``form``), trained by the same loss:

- ``classifier``: a one-logit sequence classifier (a causal backbone with a fresh scalar head,
  ``models.scoring.sequence_logits`` at the last attended token);
- ``log_ratio``: ``h = a·(Σ_response log q(y_t|·) − Σ_response log p_neg(y_t|·)) + b``, with ``q`` a
  trainable causal LM, ``p_neg`` the *negative side's policy*, frozen, and ``a``, ``b`` two scalars
  (``models.discriminator.LogRatioDiscriminator`` / ``log_ratio_rewards``, the adversarial
  module's log-ratio discriminator with a fixed reference). The optimum is reached at ``q = p_pos``,
  ``a = 1``, ``b = 0``. ``q`` starts as a copy of the positive side's policy when that side is a
  policy (``init_sft``: ``h = log π_SFT − log π_init`` exactly, the pairing's optimum, from step 0),
  else as a copy of the negative policy (``h = b = 0``: "cannot tell them apart"). Sums run over
  response tokens only (the loss mask), in training and when scoring. ``mle_weight`` adds the
  positive rows' NLL under ``q``. The default form (no ``classifier`` named), with
  ``mle_weight = 1``: on ``modes`` it gave the better Best-of-N for both pairings measured.

``BestOfN`` (``lightning_irl predict``) samples ``n`` responses per prompt from a policy, scores
them with a reward model of either form (``load_reward_model`` reads the form from the exported
folder) and returns the best one per prompt with its reward.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Literal, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torchmetrics
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC

from lightning_irl.algorithms.base import IRLModule, OptimizerSpec, build_optimizer, check_choices, freeze
from lightning_irl.algorithms.engine import OnNonFinite, map_micro_batches, response_tokens, sequences
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
from lightning_irl.models.discriminator import LOG_RATIO_FILE, LogRatioDiscriminator, LogRatioReward, log_ratio_rewards
from lightning_irl.models.scoring import sequence_logits
from lightning_irl.models.spec import ModelSpec
from lightning_irl.objectives.divergences import bce_sum
from lightning_irl.objectives.logprobs import token_nll_sum
from lightning_irl.rollout import SamplingConfig
from lightning_irl.strategies import require_supported_strategy

log = logging.getLogger(__name__)

PRESETS = {  # name -> (positive, negative); "initial" / "sft" name a policy argument
    "init_sft": ("sft", "initial"),
    "init_demo": ("demonstrations", "initial"),
    "sft_demo": ("demonstrations", "sft"),
}
SIDES = ("positive", "negative")


RewardForm = Literal["classifier", "log_ratio"]
#: The subfolder of a log-ratio export that holds the frozen reference ``p_neg``.
REFERENCE_FOLDER = "reference"


def reward_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rewards [N] (float32) of whole rows from a reward model of either form: a one-logit
    classifier (read at the last attended token) or a ``LogRatioReward`` (needs ``loss_mask``:
    it sums over the response tokens only)."""
    if isinstance(model, LogRatioReward):
        return model(input_ids, attention_mask, loss_mask).float()
    return sequence_logits(model, input_ids, attention_mask).float()


def score_sequences(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    micro_batch_size: Optional[int] = None, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rewards [N] (float32) of whole sequences, in row chunks; any padding side, pad == EOS safe.
    ``loss_mask`` (the response tokens) is required by a log-ratio reward model."""
    if input_ids.size(0) == 0:
        return torch.zeros(0, device=input_ids.device)
    rows = {"input_ids": input_ids, "attention_mask": attention_mask}
    if loss_mask is not None:
        rows["loss_mask"] = loss_mask
    return map_micro_batches(rows, lambda c: reward_logits(model, c["input_ids"], c["attention_mask"],
                                                           c.get("loss_mask")), micro_batch_size)


def score_pairs(model: torch.nn.Module, tokenizer, prompts: Sequence[str], responses: Sequence[str],
                micro_batch_size: Optional[int] = None, finished: Optional[Sequence[bool]] = None) -> torch.Tensor:
    """Rewards [N] of (prompt, response) texts, encoded exactly as demonstrations are."""
    device = next(model.parameters()).device
    encoded = encode_pairs(tokenizer, prompts, responses, finished)
    with torch.no_grad():
        return score_sequences(model, encoded["input_ids"].to(device), encoded["attention_mask"].to(device),
                               micro_batch_size, encoded["loss_mask"].to(device))


class LoadedRewardModel(NamedTuple):
    """``load_reward_model``'s answer: the frozen model (score it with ``score_pairs`` /
    ``score_sequences``), its tokenizer and its form."""

    model: torch.nn.Module
    tokenizer: Any
    form: str


def read_log_ratio_info(folder: Optional[str]) -> Optional[Dict[str, Any]]:
    """The ``log_ratio_discriminator.json`` of a local folder (``a``, ``b``, form), or None."""
    path = os.path.join(os.path.expanduser(folder), LOG_RATIO_FILE) if folder else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def load_reward_model(source: Union[str, ModelSpec], tokenizer=None) -> LoadedRewardModel:
    """A reward model exported by ``RewardModel`` (either form), or any one-logit classifier
    (folder, Hub id or inline ``ModelSpec``), frozen, in eval mode.

    The form is read from the folder: a log-ratio export holds ``log_ratio_discriminator.json``
    (``a``, ``b``), ``q`` as a causal LM and the frozen reference in ``reference/``; anything else
    is built as a sequence classifier, as before. ``tokenizer``: the one to build with (default:
    the source's own)::

        model, tokenizer, form = load_reward_model("checkpoints/reward_model/version_0/export")
        rewards = score_pairs(model, tokenizer, prompts, responses)
    """
    spec = source if isinstance(source, ModelSpec) else ModelSpec(model_name_or_path=str(source))
    spec = dataclasses.replace(spec, lora=None)  # a scorer is frozen: no adapter to train
    tokenizer = tokenizer if tokenizer is not None else spec.load_tokenizer()
    info = read_log_ratio_info(spec.model_name_or_path)
    if info is None:
        return LoadedRewardModel(freeze(spec.build_sequence_classifier(tokenizer)), tokenizer, "classifier")
    reference_folder = os.path.join(spec.model_name_or_path, info.get("reference") or REFERENCE_FOLDER)
    if info.get("form") != "log_ratio" or not os.path.isdir(reference_folder):
        raise ValueError(
            f"{spec.model_name_or_path} holds a log-ratio discriminator (q, a, b) without its reference model "
            f"({REFERENCE_FOLDER}/): an adversarial run's discriminator, whose reward also needs that run's policy. "
            "RewardModel(form=log_ratio) exports carry their reference")
    q = spec.build_causal_lm(tokenizer)
    reference = dataclasses.replace(spec, model_name_or_path=reference_folder).build_causal_lm(tokenizer)
    discriminator = LogRatioDiscriminator(q, bias=info["bias"], scale=info["scale"])
    return LoadedRewardModel(freeze(LogRatioReward(discriminator, reference)), tokenizer, "log_ratio")


def trainable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A trainable copy (every weight, training mode) of a frozen source policy: ``q``'s start."""
    q = copy.deepcopy(model)
    q.requires_grad_(True)
    return q.train()


def best_of_n_indices(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Row index of the highest reward in each contiguous group of ``n`` rows (first on ties;
    NaN counts as −inf): [N / n]."""
    grouped = torch.nan_to_num(rewards.float(), nan=-torch.inf).view(-1, n)
    return torch.arange(grouped.size(0), device=rewards.device) * n + grouped.argmax(-1)


class RewardModel(IRLModule):
    """A reward ``h(x, y)`` trained to separate two sample sources: a sequence classifier's logit, or
    the log-ratio ``a·(log q − log p_neg) + b`` (``form``).

    Args:
        classifier: The classifier of ``form: classifier``: a folder / Hub id (a causal-LM folder
            gets a fresh score head; a folder exported by this module keeps its head) or an inline
            config. Its tokenizer is the run's tokenizer (the data module encodes with it). Not
            used by ``form: log_ratio`` (ignored with a warning, so one flag switches a config).
        preset: ``init_sft``, ``init_demo`` or ``sft_demo`` (see the module docstring); needs
            ``initial_policy`` and/or ``sft_policy``. Leave it out to give ``positive`` and
            ``negative`` yourself.
        initial_policy: The initial (pre-SFT) policy of the presets, sampled on the batch prompts.
        sft_policy: The SFT policy of the presets, e.g. ``checkpoints/quickstart/version_0/export``.
        positive: Label-1 source (``SampleSource``: demonstrations, a policy or a file).
        negative: Label-0 source.
        form: ``classifier`` or ``log_ratio`` (module docstring). Default (None): ``classifier``
            when a ``classifier`` network is given, else ``log_ratio``, the better one on
            ``modes`` (``benchmarks/best_of_n.py``, 3 seeds): with its likelihood term the
            Init-SFT log-ratio reward does in Best-of-N what the exact ``log π_SFT − log π_init``
            does up to N = 16, while the classifier's Best-of-N is more often invalid at N = 16
            than the SFT policy itself; SFT-demo improves too. ``log_ratio`` needs a policy on
            the negative side: its frozen ``p_neg`` is the reference, and its tokenizer is the
            run's (a positive policy that ``q`` is copied from must share it). Memory: ``q`` and
            the frozen reference are two policy-sized models; the reference is the negative
            policy already held to sample, and ``q`` has its own gradients and Adam state (full
            fine-tuning, even of a LoRA source policy). ``init_sft`` holds three policy-sized
            models: π_SFT (samples), π_init (samples, reference) and ``q``.
        bias_lr: Learning rate of ``a`` and ``b`` (``log_ratio``): two scalars that calibrate fast
            while ``q`` moves slowly (the adversarial ``discriminator_training.bias_lr``).
        mle_weight: ``log_ratio``: adds this × the positive rows' mean token NLL under ``q`` to the
            loss: ``q`` stays a language model of the positive side (π_SFT's samples in
            ``init_sft``, the demonstrations in ``sft_demo``) instead of drifting wherever the
            BCE alone can separate the sides. Default (None): 1.0 for ``log_ratio`` (it helped in
            both pairings measured), 0 = off.
        optimizer: Optimizer and schedule of the classifier / of ``q``.
        micro_batch_size: Score each side in chunks of this many rows and accumulate gradients.
        max_grad_norm: Clip the trained model's global gradient norm (None = off).
        sampling: Sampling of policy sources (per-source ``sampling`` overrides it);
            ``num_samples`` responses per prompt.
        export_dir: Where the trained reward model and its tokenizer go (Hugging Face format,
            safetensors) when ``fit`` ends; default ``export`` in the run's checkpoint folder.
            ``classifier``: a sequence-classifier folder. ``log_ratio``: ``q`` as a causal-LM
            folder, the frozen reference in ``reference/``, ``a`` and ``b`` in
            ``log_ratio_discriminator.json`` (``load_reward_model`` reads either).
        export: Turn the export off with False.
        on_nonfinite: ``stop`` or ``skip`` at a NaN / infinite loss or gradient norm (see
            ``IRLModule``).
        max_nonfinite_skips: With ``skip``, stop once more steps than this were skipped.

    Logs ``train/loss`` (the balanced BCE above), ``train/accuracy``, ``train/reward_margin``
    (``log_ratio``: also ``train/reward_scale`` a, ``train/reward_bias`` b, and ``train/mle``)
    and, on held-out data (the validation split's prompts and demonstrations; a file source's
    held-out records), ``val/loss``, ``val/accuracy`` (logit > 0 ⇔ positive), ``val/auroc``,
    ``val/reward_margin`` (mean positive − mean negative logit), ``val/reward_positive``,
    ``val/reward_negative``. ``predict`` scores the data module's (prompt, response) records.
    Checkpoints hold the trained model (``q``, ``a``, ``b`` for ``log_ratio``) and its optimizer.
    """

    def __init__(
        self,
        classifier: Optional[ModelSpec] = None,
        preset: Optional[str] = None,
        initial_policy: Optional[ModelSpec] = None,
        sft_policy: Optional[ModelSpec] = None,
        positive: Optional[SampleSource] = None,
        negative: Optional[SampleSource] = None,
        form: Optional[RewardForm] = None,
        bias_lr: float = 1e-2,
        mle_weight: Optional[float] = None,
        optimizer: OptimizerSpec = OptimizerSpec(),
        micro_batch_size: Optional[int] = None,
        max_grad_norm: Optional[float] = 1.0,
        sampling: SamplingConfig = SamplingConfig(),
        export_dir: Optional[str] = None,
        export: bool = True,
        on_nonfinite: OnNonFinite = "stop",
        max_nonfinite_skips: int = 10,
    ) -> None:
        # the log-ratio form (with its likelihood term) unless a classifier network is named: see `form`
        form = form or ("classifier" if classifier is not None else "log_ratio")
        check_choices(RewardModel.__init__, form=form)
        explicit_mle = mle_weight is not None
        mle_weight = mle_weight if explicit_mle else (1.0 if form == "log_ratio" else 0.0)
        sources = self.resolve_sources(preset, initial_policy, sft_policy, positive, negative)
        if bias_lr < 0 or mle_weight < 0:
            raise ValueError(f"RewardModel: bias_lr and mle_weight must be >= 0, got {bias_lr}, {mle_weight}")
        if form == "classifier":
            if classifier is None:
                raise ValueError("RewardModel(form=classifier) needs `classifier` (a folder, Hub id or inline config)")
            if explicit_mle and mle_weight > 0:
                log.warning("RewardModel(form=classifier): mle_weight applies to the log-ratio form only; ignored")
                mle_weight = 0.0
            tokenizer = classifier.load_tokenizer()
        else:
            if sources["negative"].kind != "policy":
                raise ValueError("RewardModel(form=log_ratio): h = a·(log q − log p_neg) + b needs the negative "
                                 "side's probabilities, so the negative side must be a policy, not "
                                 f"{sources['negative'].kind}")
            if classifier is not None:
                log.warning("RewardModel(form=log_ratio): `classifier` is not used (q starts as a copy of the %s "
                            "policy)", self.q_start_side(sources))
            # the reference's tokenizer: q and p_neg read the same ids (a copied positive policy must share it)
            tokenizer = sources["negative"].policy.load_tokenizer()
        super().__init__(tokenizer, optimizer=optimizer, micro_batch_size=micro_batch_size,
                         max_grad_norm=max_grad_norm, export_dir=export_dir, export=export,
                         on_nonfinite=on_nonfinite, max_nonfinite_skips=max_nonfinite_skips)
        self.classifier_spec = classifier
        self.form = form
        self.bias_lr = bias_lr
        self.mle_weight = mle_weight
        self.sampling = sampling
        self.preset = preset
        self.sources = sources
        self.reward_model: Optional[torch.nn.Module] = None  # the classifier, or the LogRatioDiscriminator
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
    def q_start_side(sources: Dict[str, SampleSource]) -> str:
        """Whose policy ``q`` starts as (log-ratio form): the positive side's when it is a policy
        (then ``h`` starts at the optimum ``log p_pos − log p_neg``), else the negative's (``h = b``)."""
        return "positive" if sources["positive"].kind == "policy" else "negative"

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
        if self.reward_model is None and self.form == "classifier":
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
        if self.form == "log_ratio":
            start = self.q_start_side(self.sources)
            if not self.sides[start].shared_vocabulary:
                raise ValueError("RewardModel(form=log_ratio): q starts as a copy of the positive policy and reads the "
                                 "ids the reference (the negative policy) reads: both policies need one tokenizer")
            if self.reward_model is None:
                self.reward_model = LogRatioDiscriminator(trainable_copy(self.source_policies[start]))

    @property
    def reference(self) -> torch.nn.Module:
        """The log-ratio form's frozen ``p_neg``: the negative side's policy (no extra copy)."""
        return self.source_policies["negative"]

    @property
    def scorer(self) -> torch.nn.Module:
        """What scores rows (``reward_logits``): the classifier, or a ``LogRatioReward`` view of
        ``q`` + the reference (built on the fly, so no module is registered twice)."""
        if self.form == "log_ratio":
            return LogRatioReward(self.reward_model, self.reference)
        return self.reward_model

    def setup(self, stage: str) -> None:
        for side, source in self.sources.items():
            if source.kind == "demonstrations":
                self.sides[side] = DemonstrationSide(source)
            elif source.kind == "file" and side not in self.sides:
                self.sides[side] = FileSide(source, self.tokenizer, self.global_rank, self.engine.world)

    def configure_optimizers(self):
        own = {"bias": self.bias_lr, "scale": self.bias_lr} if self.form == "log_ratio" else None
        optimizer, scheduler = build_optimizer(self.reward_model, self.optimizer_spec, self.total_steps(),
                                               own_lr=own, precision=self.trainer.precision)
        return [optimizer], [scheduler]

    # ---- scoring -----------------------------------------------------------------------
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rewards [N] of whole sequences (prompt + response), any padding side; the log-ratio
        form needs ``loss_mask`` (the response tokens)."""
        return score_sequences(self.scorer, input_ids, attention_mask, self.micro_batch_size, loss_mask)

    def score_pairs(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Rewards [N] of (prompt, response) texts."""
        return score_pairs(self.scorer, self.tokenizer, prompts, responses, self.micro_batch_size)

    def _logits(self, rows: Dict[str, torch.Tensor]):
        """(rewards [N] with gradient, q's shifted response-token log-probs or None)."""
        if self.form == "log_ratio":
            return log_ratio_rewards(self.reward_model, self.reference, rows["input_ids"], rows["attention_mask"],
                                     rows.get("loss_mask"))
        return reward_logits(self.reward_model, rows["input_ids"], rows["attention_mask"]), None

    def _draw(self, batch: Dict[str, Any], stage: str) -> Dict[str, Optional[SideBatch]]:
        return {side: self.sides[side].draw(batch, stage) for side in SIDES}

    # ---- training ----------------------------------------------------------------------
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        self.count_tokens(batch)
        drawn = self._draw(batch, "train")
        loss = torch.zeros((), device=self.device)
        mle = None
        scores: Dict[str, List[torch.Tensor]] = {side: [] for side in SIDES}
        for side, target in (("positive", 1.0), ("negative", 0.0)):
            with_mle = side == "positive" and self.mle_weight > 0

            def side_sums(micro, side=side, target=target, with_mle=with_mle):
                h, q_logps = self._logits(micro)
                scores[side].append(h.detach())
                sums = {"loss": bce_sum(h, target)}
                if with_mle:  # q kept a language model of the positive rows
                    sums["mle"] = token_nll_sum(q_logps, micro["loss_mask"][:, 1 : q_logps.size(1) + 1])
                return sums

            units = {"loss": sequences, **({"mle": response_tokens} if with_mle else {})}
            # each side a mean over its own rows, the two halves weighted ½: balanced classes
            shares = self.engine.backward(drawn[side].rows(), side_sums, units, self.micro_batch_size,
                                          weights={"loss": 0.5, "mle": self.mle_weight},
                                          names={"loss": "reward model loss", "mle": "reward model MLE term"})
            loss = loss + 0.5 * shares["loss"]
            mle = shares.get("mle", mle)
        self.step(optimizer, scheduler)
        pos, neg = torch.cat(scores["positive"]), torch.cat(scores["negative"])
        accuracy = torch.cat([(pos > 0).float(), (neg <= 0).float()]).mean()
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, reduce_fx="sum")
        self.log("train/accuracy", accuracy, sync_dist=True)
        self.log("train/reward_margin", pos.mean() - neg.mean(), sync_dist=True)
        if mle is not None:
            self.log("train/mle", mle, sync_dist=True, reduce_fx="sum")
        if self.form == "log_ratio":
            self.log("train/reward_scale", self.reward_model.scale_value(), on_step=True, on_epoch=False)
            self.log("train/reward_bias", self.reward_model.bias_value(), on_step=True, on_epoch=False)
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
        h = self.score(**rows.rows(self.device))
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
        rewards = self.score(batch["input_ids"], batch["attention_mask"], batch.get("loss_mask")).tolist()
        return [{"prompt": p, "response": r, "reward": float(s)}
                for p, r, s in zip(batch["prompt"], batch["response"], rewards)]

    # ---- export ------------------------------------------------------------------------
    def export_info(self) -> Dict[str, Any]:
        if self.form == "log_ratio":
            score = ("scale * (sum over response tokens of log q - log p_ref) + bias; q = the causal LM in this "
                     f"folder, p_ref = {REFERENCE_FOLDER}/ (the negative side's policy), scale and bias in "
                     f"{LOG_RATIO_FILE} (lightning_irl.algorithms.reward_model.load_reward_model); "
                     "reward = log p_positive - log p_negative at the optimum")
        else:
            score = ("logit at the last attended token (lightning_irl.models.scoring.sequence_logits); "
                     "reward = log p_positive - log p_negative at the optimum")
        return {
            "preset": self.preset,
            "form": self.form,
            "positive": self.sources["positive"].describe(),
            "negative": self.sources["negative"].describe(),
            "score": score,
        }

    def exports(self) -> List[Export]:
        """``classifier``: the classifier folder. ``log_ratio``: ``q`` (a causal-LM folder) with
        ``log_ratio_discriminator.json`` (a, b), then the reference into its ``reference/``."""
        info = self.export_info()
        if self.form == "classifier":
            self.reward_model.config.lightning_irl_reward_model = info
            return [Export(self.reward_model, "reward model")]
        self.reward_model.q.config.lightning_irl_reward_model = info

        def side_files():  # describe() gathers a and b under FSDP2: called on every rank
            return {LOG_RATIO_FILE: {**self.reward_model.describe(), "reward": info["score"],
                                     "reference": REFERENCE_FOLDER, "preset": self.preset}}

        return [Export(self.reward_model.q, "log-ratio reward model's q", side_files=side_files),
                Export(self.reference, "log-ratio reward model's reference", "/" + REFERENCE_FOLDER)]


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
        reward_model: The reward model, e.g. a folder exported by ``RewardModel`` of either form
            (``load_reward_model`` reads the form from the folder; a log-ratio export brings ``q``
            and its reference: two more policy-sized models). With its own tokenizer (a folder
            holds one) whose vocabulary differs from the policy's, responses are decoded and
            re-encoded for it as demonstrations are. Rewards read the response tokens (the
            log-ratio form sums over them only).
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
            self.reward_model = load_reward_model(spec, self.reward_tokenizer).model

    def score_rollout(self, rollout, prompts: Sequence[str]) -> torch.Tensor:
        """Rewards [N] of a rollout's rows (left-padded prompt, right-padded response)."""
        if self.reward_tokenizer is self.tokenizer:
            return score_sequences(self.reward_model, rollout.input_ids, rollout.attention_mask, self.micro_batch_size,
                                   rollout.loss_mask)
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
