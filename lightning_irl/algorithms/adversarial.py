"""Adversarial imitation: a discriminator tells demonstrations from the policy's samples, and its
logit, turned into a reward by the divergence table, trains the policy by RL (docs/theory.md §2–3).

``divergence: reverse_kl`` is AIRL (reward ``h``), ``js`` is GAIL (reward ``softplus(h) =
−log(1 − D)``); ``forward_kl``, ``chi2`` and ``squared_hellinger`` are the other rows of
``objectives.divergences.DIVERGENCES``. All of them are minimised from policy rollouts, unlike SFT.

One training step (one batch of demonstrations; ``trainer.global_step`` grows by 1, see below):

1. **Rollout.** ``num_samples`` (k) responses per prompt of the batch, sampled from the policy with
   the ``sampling`` settings (k samples of a prompt are contiguous rows); their per-token
   log-probs at temperature 1 are kept as the "old" log-probs, the frozen reference scores them.
2. **Discriminator** (``disc_steps`` optimizer steps on this batch): binary cross-entropy with
   logits, demonstrations labelled 1 and rollouts 0 (``label_smoothing`` ε gives targets 1−ε / ε),
   each side a mean over its units. Optional R1 penalty ``r1_gamma/2 · E_E‖∇_emb h‖²`` on the
   demonstrations' input embeddings (computed with the math attention kernel, the only one with a
   double backward). At the optimum ``h = log d_E − log d_π``.

   With ``discriminator_form: log_ratio`` the logit is ``h = a·(log q_φ − log π_θ) + b`` (``π_θ``
   the current policy, without gradient; ``q_φ`` a causal LM; ``a``, ``b`` scalars), trained by
   the same BCE (+ ``disc_mle_weight`` × the demonstrations' NLL under ``q_φ``). The first
   ``disc_warmup_steps`` batches run only this step (see ``in_warmup``).
3. **Rewards** from the *updated* discriminator on the rollouts, ``g = divergence_reward(divergence,
   h, log_ratio_clip)``:

   - ``discriminator_level: sequence``: one logit per (prompt, response), read at the last real
     token of the row (``models.discriminator``; padding side and pad == EOS do not matter). The
     reward ``R = g(h)`` is given at the end of the response.
   - ``discriminator_level: token``: a logit ``h_t`` for every response prefix ``y_≤t``. *Training
     target:* every prefix of a demonstration's response is labelled 1 and every prefix of a
     rollout 0, each side averaged over all its prefixes (tokens); prompt and padding positions are
     not scored. The optimum is ``h_t = log d_E(y_≤t|x) − log d_π(y_≤t|x) + c`` with
     ``c = log(E_π[T] / E_E[T])`` (the prefix pools are normalised by their token counts), a
     constant that cancels in every advantage below. Per-token rewards are the differences
     ``r_t = g(h_t) − g(h_{t−1})`` (``token_rewards_from_prefix_logits``), so ``Σ_t r_t = g(h_T)``,
     exactly the sequence-level read of the same network.

   KL to the reference: per-token ``kl_t = kl_penalty(log π_old, log π_ref, kl_estimator)``.
   ``kl_in: reward`` subtracts ``kl_coef · kl_t`` from the reward (per token; summed for a sequence
   reward), ``kl_in: loss`` adds ``kl_coef · Σ kl_penalty(log π_θ, log π_ref)`` to the policy loss
   with the policy loss's normalisation (use ``k2`` there: ``objectives/kl.py`` shows k1 has no
   gradient in expectation and k3 has the forward KL's).
4. **Advantages**, always leave-one-out over the k samples of a prompt (so ``num_samples ≥ 2``):

   - sequence level: RLOO, ``A_i = R_i − mean_{j≠i} R_j`` with ``R`` the (KL-shaped) sequence
     reward, the same advantage on every token of the response;
   - token level: the per-token reward-to-go ``G_{i,t} = Σ_{t'≥t} r_{i,t'}`` minus the mean
     reward-to-go of the other k−1 samples of the prompt at the same position (0 past their end).
     ``G_{i,1}`` is the whole sequence reward, so the first token gets exactly RLOO's advantage;
     later tokens lose the part of the return earned before them (``g(h_{t−1})`` is a function of
     the state, a baseline), which lowers the variance without biasing the gradient.
   - ``whiten_advantages`` optionally rescales them over the batch's response tokens.
5. **Policy.** ``policy_loss: rloo``: one optimizer step on ``−Σ_t A_t log π_θ(y_t|s_t)``, averaged
   over sequences (REINFORCE with the RLOO baseline; ``policy_gradient_loss`` for sequence-level
   advantages). ``policy_loss: ppo``: ``ppo_epochs`` passes over the rollouts in
   ``ppo_minibatches`` shuffled minibatches, one optimizer step each, PPO-clip with ratio
   ``π_θ / π_old`` per token (``ppo_level: token``, loss averaged over tokens) or per sequence
   (``ppo_level: sequence``, sequence-level discriminator only) clipped at ``1 ± clip_eps``.
   ``sft_weight > 0`` adds ``sft_weight ×`` the SFT loss of the demonstrations (base
   ``nll_backward``) to every policy step.

Normalisation: every loss is divided by its unit count over the *global* step (all micro-batches,
all ranks), so ``micro_batch_size`` and data parallelism give the gradient of one large batch.

Steps and schedules: Lightning counts ``trainer.global_step`` once per ``optimizer.step()`` call in
manual optimisation, which would make ``max_steps`` count discriminator and PPO minibatch steps.
Here only the *last* policy step of a training step is counted: ``global_step`` = number of
training batches (policy iterations), so ``trainer.max_steps: 200`` means 200 rollout batches
whatever ``disc_steps``/``ppo_epochs`` are. Both learning-rate schedules step once per training
batch too, over ``trainer.estimated_stepping_batches``.

Data parallel: use ``trainer.strategy: ddp_find_unused_parameters_true`` (plain ``ddp`` refuses:
the discriminator's backward leaves the policy without gradients and vice versa). Tested with
two gloo processes on CPU: the ranks stay identical.

Checkpoints hold the policy, the frozen reference, the discriminator, both optimizers and both
schedules, so ``--ckpt_path last.ckpt`` resumes exactly. ``fit`` exports the policy (HF format)
to ``export_dir`` and the discriminator, a reward model that reads the same tokenizer's ids, to
``<export_dir>_discriminator`` (read it at the last real token: ``models.discriminator``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import math
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from lightning_irl.algorithms.base import IRLModule, OptimizerSpec, build_optimizer
from lightning_irl.models.discriminator import (
    LOG_RATIO_FILE,
    LogRatioDiscriminator,
    build_discriminator,
    last_token_index,
    prefix_logits,
    sequence_logits,
)
from lightning_irl.metrics.discriminator import DiscriminatorFidelity
from lightning_irl.models.spec import ModelSpec
from lightning_irl.objectives.divergences import (
    DIVERGENCES,
    discriminator_accuracy,
    divergence_reward,
    r1_penalty,
    token_rewards_from_prefix_logits,
)
from lightning_irl.objectives.kl import kl_penalty
from lightning_irl.objectives.logprobs import masked_sum, token_logprobs, token_nll_sum
from lightning_irl.objectives.policy_gradient import (
    policy_gradient_loss,
    ppo_clip_loss,
    rloo_advantages,
    whiten,
)
from lightning_irl.rollout import Rollout, sample

log = logging.getLogger(__name__)

ROW_KEYS = ("input_ids", "attention_mask", "loss_mask")


# ---- small helpers ---------------------------------------------------------------------------
def row_chunks(rows: Dict[str, torch.Tensor], size: Optional[int]) -> Iterator[Dict[str, torch.Tensor]]:
    """Row slices of aligned tensors, each cut after its last attended column.

    ``[B, T]`` tensors are cut to the slice's width ``W``; shifted ``[B, T−1]`` ones (log-probs,
    advantages) to ``W − 1``. Right for left-padded prompts + right-padded responses (rollouts) as
    well as for right-padded demonstrations.
    """
    total = rows["attention_mask"].size(0)
    width_full = rows["attention_mask"].size(1)
    step = size or total
    for start in range(0, total, step):
        part = {k: v[start : start + step] for k, v in rows.items()}
        columns = part["attention_mask"].bool().any(0).nonzero()
        width = int(columns[-1]) + 1 if columns.numel() else 1
        yield {k: (v[:, :width] if v.size(1) == width_full else v[:, : max(width - 1, 1)]) for k, v in part.items()}


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``G_t = Σ_{t'≥t} r_{t'}`` over valid positions of each row; 0 elsewhere. [B, T] → [B, T]."""
    rewards = rewards * mask.to(rewards.dtype)
    return rewards.flip(-1).cumsum(-1).flip(-1) * mask.to(rewards.dtype)


def positionwise_rloo(returns: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out baseline per position: ``G_{i,t} − mean_{j≠i} G_{j,t}`` within each prompt's
    k contiguous rows. [B·k, T] → [B·k, T]."""
    n, width = returns.shape
    grouped = returns.reshape(n // k, k, width).transpose(1, 2).reshape(-1, k)
    return rloo_advantages(grouped, k).reshape(n // k, width, k).transpose(1, 2).reshape(n, width)


def bce_sums(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Σ of binary cross-entropy with logits against a constant target: the numerator of one side
    of ``objectives.divergences.bce_discriminator_loss`` (summed, so micro-batches and ranks can be
    normalised by the global count)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="sum")


@contextlib.contextmanager
def uncounted(optimizer) -> Iterator[None]:
    """Step a LightningOptimizer without advancing ``trainer.global_step``.

    In manual optimisation the loop counts steps through the optimizer's ``_on_before_step`` /
    ``_on_after_step`` callbacks (Lightning 2.x, ``loops/optimization/manual.py``); they are
    swapped for no-ops for the duration. Everything else (precision plugin, strategy) is untouched.
    """
    before = getattr(optimizer, "_on_before_step", None)
    after = getattr(optimizer, "_on_after_step", None)
    if before is None or after is None:  # a plain torch optimizer: nothing counts it
        yield
        return
    optimizer._on_before_step = optimizer._on_after_step = lambda: None
    try:
        yield
    finally:
        optimizer._on_before_step, optimizer._on_after_step = before, after


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclasses.dataclass
class RolloutScores:
    """What the reward stage produces for a rollout of N rows (shifted [N, T−1] alignment)."""

    sequence_reward: torch.Tensor  # [N]  g(h_T), before the KL
    token_rewards: Optional[torch.Tensor]  # [N, T−1] differences of g(h_t) (token level), before the KL
    logits: torch.Tensor  # [N] sequence logits h_T


class Adversarial(IRLModule):
    """Adversarial IRL from demonstrations: AIRL (reverse KL), GAIL (JS) and other f-divergences.

    Args:
        policy: The model being trained; start from an SFT export (``model_name_or_path``).
        discriminator: The discriminator network (Hub id / folder / inline config); it reads the
            policy tokenizer's ids. ``classifier`` form: built as a one-logit
            ``AutoModelForSequenceClassification``; None = the policy's spec (from a folder, the
            same backbone weights with a fresh head). ``log_ratio`` form: the causal LM ``q``;
            None = a copy of the policy as it starts (so ``h = b`` at step 0).
        discriminator_form: ``log_ratio``: ``h = a·(log q_φ(y|x) − log π(y|x)) + b`` with ``q_φ``
            a causal LM, ``a``/``b`` scalars (``models.discriminator.LogRatioDiscriminator``);
            ``classifier``: a fresh scalar head on a backbone. The log-ratio form reads answers
            token by token through an LM head, which is what tells a valid answer from an invalid
            one here; a fresh head stayed at chance in the divergence lab. It costs one more
            model of the policy's size (weights, gradients, Adam state; with LoRA on the policy,
            ``q`` is a frozen copy of the base with its own trainable adapter).
        disc_warmup_steps: The first N training batches train only the discriminator, on the
            start policy's samples (the policy does not move, its lr schedule does not advance).
            ``trainer.max_steps`` counts them. The warm-up state is ``global_step``: checkpoints
            and resume carry it.
        disc_warmup_fit: ``mle`` (log-ratio form): during the warm-up ``q`` is fitted by maximum
            likelihood on the demonstrations only (weight ``disc_mle_weight``) and ``a``, ``b`` by
            the BCE; ``bce``: everything by the BCE (+ the likelihood term) from the start.
        disc_mle_weight: Adds this × the demonstrations' mean token NLL under ``q`` to the
            discriminator loss (log-ratio form), keeping ``q`` a language model of the expert.
        disc_bias_lr: Learning rate of ``a`` and ``b`` (log-ratio form): two scalars that must
            calibrate fast while ``q`` moves slowly.
        divergence: Row of the reward table: ``reverse_kl`` (AIRL, ``r = h``), ``js`` (GAIL,
            ``r = softplus(h) = −log(1 − D)``), ``forward_kl`` (``e^h``), ``chi2`` (``e^{2h}``),
            ``squared_hellinger`` (``e^{h/2}``).
        discriminator_level: ``sequence`` (one logit per response, reward at its end) or ``token``
            (a logit per prefix, per-token rewards ``g(h_t) − g(h_{t−1})``, reward-to-go).
        log_ratio_clip: Clamp ``h`` to ``[−c, c]`` before the reward (bounds ``e^h`` rewards and
            keeps extreme logits from dominating a batch). None = no clamp.
        num_samples: k responses sampled per prompt (leave-one-out baselines need k ≥ 2). It
            overrides ``sampling.num_samples`` for training rollouts.
        disc_optimizer: Optimizer and schedule of the discriminator.
        disc_steps: Discriminator optimizer steps per training batch (on the same batch).
        label_smoothing: Two-sided label smoothing ε of the discriminator targets (1−ε / ε).
        r1_gamma: Weight γ of the R1 penalty ``γ/2 · E_E‖∇_emb h‖²`` on demonstrations' input
            embeddings (sequence logit); 0 = off.
        kl_coef: β of ``E[r] − β KL(π ‖ π_ref)``; the reference is a frozen copy of the initial
            policy.
        kl_estimator: ``k1``, ``k2`` or ``k3`` (``objectives/kl.py``).
        kl_in: ``reward`` (subtract β·kl per token from the reward) or ``loss`` (add β·KL to the
            policy loss; use ``k2``).
        policy_loss: ``rloo`` (one REINFORCE step with the leave-one-out baseline) or ``ppo``.
        ppo_epochs: Passes over each rollout batch (PPO).
        ppo_minibatches: Minibatches per pass, one optimizer step each (PPO).
        clip_eps: PPO clip range ε.
        ppo_level: ``token`` (per-token ratios) or ``sequence`` (one ratio per response).
        whiten_advantages: Normalise advantages to unit variance over the batch's tokens.
        sft_weight: Add this × the SFT loss (NLL of the demonstrations) to every policy step.
        export_discriminator: Also save the discriminator when ``fit`` ends.
        **kwargs: ``IRLModule`` arguments (``optimizer`` of the policy, ``micro_batch_size``,
            ``max_grad_norm`` (both models), ``sampling``, ``export_dir``, ...).
    """

    def __init__(
        self,
        policy: ModelSpec,
        discriminator: Optional[ModelSpec] = None,
        divergence: str = "reverse_kl",
        discriminator_level: str = "sequence",
        discriminator_form: str = "classifier",
        disc_warmup_steps: int = 0,
        disc_mle_weight: float = 0.0,
        disc_bias_lr: float = 1e-2,
        disc_warmup_fit: str = "bce",
        log_ratio_clip: Optional[float] = 5.0,
        num_samples: int = 4,
        disc_optimizer: OptimizerSpec = OptimizerSpec(),
        disc_steps: int = 1,
        label_smoothing: float = 0.0,
        r1_gamma: float = 0.0,
        kl_coef: float = 0.05,
        kl_estimator: str = "k1",
        kl_in: str = "reward",
        policy_loss: str = "rloo",
        ppo_epochs: int = 2,
        ppo_minibatches: int = 2,
        clip_eps: float = 0.2,
        ppo_level: str = "token",
        whiten_advantages: bool = False,
        sft_weight: float = 0.0,
        export_discriminator: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, **kwargs)
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
        choices = {"discriminator_level": (discriminator_level, ("sequence", "token")),
                   "discriminator_form": (discriminator_form, ("classifier", "log_ratio")),
                   "disc_warmup_fit": (disc_warmup_fit, ("bce", "mle")),
                   "kl_estimator": (kl_estimator, ("k1", "k2", "k3")), "kl_in": (kl_in, ("reward", "loss")),
                   "policy_loss": (policy_loss, ("rloo", "ppo")), "ppo_level": (ppo_level, ("token", "sequence"))}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (leave-one-out baselines), got {num_samples}")
        for name, value in (("disc_steps", disc_steps), ("ppo_epochs", ppo_epochs), ("ppo_minibatches", ppo_minibatches)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if log_ratio_clip is not None and log_ratio_clip <= 0:
            raise ValueError(f"log_ratio_clip must be positive or null, got {log_ratio_clip}")
        for name, value in (("kl_coef", kl_coef), ("r1_gamma", r1_gamma), ("sft_weight", sft_weight),
                            ("disc_warmup_steps", disc_warmup_steps), ("disc_mle_weight", disc_mle_weight),
                            ("disc_bias_lr", disc_bias_lr)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if policy_loss == "ppo" and ppo_level == "sequence" and discriminator_level == "token":
            raise ValueError("ppo_level=sequence takes one advantage per response; with a token-level "
                             "discriminator use ppo_level=token (per-token reward-to-go)")
        if discriminator_form == "log_ratio" and r1_gamma > 0:
            raise ValueError("r1_gamma applies to the classifier discriminator only (the log-ratio form reads "
                             "token log-probs, not a head on embeddings); set r1_gamma: 0")
        if discriminator_form == "classifier" and (disc_mle_weight > 0 or disc_warmup_fit == "mle"):
            # one flag switches a log-ratio config to the classifier: its q-only settings go quiet
            log.warning("discriminator_form=classifier: disc_mle_weight and disc_warmup_fit=mle apply to the "
                        "log-ratio form only and are ignored (the warm-up trains the classifier by BCE)")
            disc_mle_weight, disc_warmup_fit = 0.0, "bce"
        if disc_warmup_fit == "mle" and disc_mle_weight <= 0:
            raise ValueError("disc_warmup_fit=mle fits q by maximum likelihood during the warm-up: it needs "
                             "disc_mle_weight > 0")
        if kl_in == "loss" and kl_estimator == "k1" and kl_coef > 0:
            log.warning("kl_in=loss with kl_estimator=k1: its gradient is zero in expectation; use k2")
        # log_ratio with no discriminator named: q starts as a copy of the policy (h = b = 0)
        self.discriminator_spec = discriminator if discriminator_form == "log_ratio" else (discriminator or policy)
        self.divergence = divergence
        self.discriminator_level = discriminator_level
        self.discriminator_form = discriminator_form
        self.disc_warmup_steps = disc_warmup_steps
        self.disc_mle_weight = disc_mle_weight
        self.disc_bias_lr = disc_bias_lr
        self.disc_warmup_fit = disc_warmup_fit
        self.log_ratio_clip = log_ratio_clip
        self.num_samples = num_samples
        self.disc_optimizer_spec = disc_optimizer
        self.disc_steps = disc_steps
        self.label_smoothing = label_smoothing
        self.r1_gamma = r1_gamma
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.kl_in = kl_in
        self.policy_loss = policy_loss
        self.ppo_epochs = ppo_epochs
        self.ppo_minibatches = ppo_minibatches
        self.clip_eps = clip_eps
        self.ppo_level = ppo_level
        self.whiten_advantages = whiten_advantages
        self.sft_weight = sft_weight
        self.export_discriminator = export_discriminator
        self.reference: Optional[torch.nn.Module] = None
        self.discriminator: Optional[torch.nn.Module] = None
        self.fidelity: Optional[DiscriminatorFidelity] = None  # built at the first evaluation on a known task

    # ---- building ----------------------------------------------------------------------
    needs_reference = True  # the base builds the frozen initial policy (or LoRA's adapter-off view)

    def configure_model(self) -> None:
        super().configure_model()
        if self.discriminator is None:
            if self.discriminator_form == "classifier":
                self.discriminator = build_discriminator(self.discriminator_spec, self.tokenizer)
            else:
                self.discriminator = LogRatioDiscriminator(self._build_q())

    def _build_q(self) -> torch.nn.Module:
        """The log-ratio discriminator's causal LM: a trainable copy of the policy's start (LoRA:
        the copy keeps its own adapter, only that trains), or the model ``discriminator`` names."""
        if self.discriminator_spec is not None:
            return self.discriminator_spec.build_causal_lm(self.tokenizer)
        import copy

        q = copy.deepcopy(self.policy)
        q.train()
        return q

    def configure_optimizers(self):
        total = self.total_steps()
        policy_opt, policy_sched = build_optimizer(self.policy, self.optimizer_spec, total)
        own = {"bias": self.disc_bias_lr, "scale": self.disc_bias_lr} if self.discriminator_form == "log_ratio" else None
        disc_opt, disc_sched = build_optimizer(self.discriminator, self.disc_optimizer_spec, total, own_lr=own)
        return [policy_opt, disc_opt], [policy_sched, disc_sched]

    def _world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    # ---- discriminator -----------------------------------------------------------------
    def _units(self, rows: Dict[str, torch.Tensor]) -> torch.Tensor:
        """What one side of the discriminator loss averages over: responses or response prefixes."""
        if self.discriminator_level == "token":
            return rows["loss_mask"].sum().float()
        return torch.tensor(float(rows["input_ids"].size(0)), device=rows["input_ids"].device)

    def _log_ratio_prefix(self, rows: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(prefix logits [B, T], q's shifted token log-probs [B, T−1]) of the log-ratio form;
        ``rows["policy_logps"]`` holds log π of the same tokens (shifted)."""
        calibrate_only = self.disc_warmup_fit == "mle" and self.training and self._trainer is not None \
            and self.in_warmup()
        return self.discriminator(rows["input_ids"], rows["attention_mask"], rows["policy_logps"], rows["loss_mask"],
                                  calibrate_only=calibrate_only)

    def _disc_logits(self, rows: Dict[str, torch.Tensor], inputs_embeds=None) -> torch.Tensor:
        """Flat logits of the units of ``rows``: [rows] (sequence) or [response tokens] (token)."""
        return self._disc_outputs(rows, inputs_embeds)[0]

    def _disc_outputs(self, rows: Dict[str, torch.Tensor], inputs_embeds=None):
        """(flat logits, q's token log-probs or None): the log-ratio form also returns what an MLE
        term on the demonstrations needs, from the same forward."""
        if self.discriminator_form == "log_ratio":
            h, q_logps = self._log_ratio_prefix(rows)
            if self.discriminator_level == "token":
                return h[rows["loss_mask"][:, : h.size(1)].bool()], q_logps
            return h[torch.arange(h.size(0), device=h.device), last_token_index(rows["attention_mask"])], q_logps
        return self._classifier_logits(rows, inputs_embeds), None

    def _classifier_logits(self, rows: Dict[str, torch.Tensor], inputs_embeds=None) -> torch.Tensor:
        if self.discriminator_level == "token":
            logits = prefix_logits(self.discriminator, rows["input_ids"], rows["attention_mask"], inputs_embeds)
            return logits[rows["loss_mask"].bool()]
        return sequence_logits(self.discriminator, rows["input_ids"], rows["attention_mask"], inputs_embeds)

    def _r1_term(self, rows: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(flat logits for the BCE, per-row R1 penalty mean) from one forward on embeddings."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        embeds = self.discriminator.get_input_embeddings()(rows["input_ids"]).detach().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
            if self.discriminator_level == "token":
                all_logits = prefix_logits(self.discriminator, None, rows["attention_mask"], embeds)
                last = all_logits[torch.arange(all_logits.size(0)), last_token_index(rows["attention_mask"])]
                flat = all_logits[rows["loss_mask"].bool()]
            else:
                last = flat = sequence_logits(self.discriminator, None, rows["attention_mask"], embeds)
            penalty = r1_penalty(last, embeds)
        return flat, penalty

    def discriminator_backward(self, expert: Dict[str, torch.Tensor], policy: Dict[str, torch.Tensor]):
        """Backward of the BCE discriminator loss (+ R1), globally normalised. Returns detached
        (loss, r1, expert logits, policy logits) of this rank."""
        world = self._world_size()
        n_expert = self.global_sum(self._units(expert)).clamp(min=1)
        n_policy = self.global_sum(self._units(policy)).clamp(min=1)
        n_rows = self.global_sum(torch.tensor(float(expert["input_ids"].size(0)), device=self.device)).clamp(min=1)
        n_tokens = None
        if self.disc_mle_weight > 0:
            n_tokens = self.global_sum(expert["loss_mask"][:, 1:].sum().float()).clamp(min=1)
        eps = self.label_smoothing
        loss_total = torch.zeros((), device=self.device)
        r1_total = torch.zeros((), device=self.device)
        expert_logits: List[torch.Tensor] = []
        policy_logits: List[torch.Tensor] = []
        for micro in row_chunks(expert, self.micro_batch_size):
            if self.r1_gamma > 0:
                logits, penalty = self._r1_term(micro)
                r1 = penalty * micro["input_ids"].size(0) * world / n_rows
            else:
                (logits, q_logps), r1 = self._disc_outputs(micro), torch.zeros((), device=self.device)
            loss = bce_sums(logits, 1.0 - eps) * world / n_expert
            extra = 0.5 * self.r1_gamma * r1
            if n_tokens is not None:  # q fitted as a language model of the demonstrations too
                extra = extra + self.disc_mle_weight * token_nll_sum(q_logps, micro["loss_mask"][:, 1:]) * world / n_tokens
            self.manual_backward(loss + extra)
            loss_total += loss.detach()
            r1_total += r1.detach()
            expert_logits.append(logits.detach())
        for micro in row_chunks(policy, self.micro_batch_size):
            logits = self._disc_logits(micro)
            loss = bce_sums(logits, eps) * world / n_policy
            self.manual_backward(loss)
            loss_total += loss.detach()
            policy_logits.append(logits.detach())
        return loss_total / world, r1_total / world, torch.cat(expert_logits), torch.cat(policy_logits)

    # ---- rewards -----------------------------------------------------------------------
    @torch.no_grad()
    def score_rollout(self, rows: Dict[str, torch.Tensor]) -> RolloutScores:
        """Rewards of rollout rows from the discriminator (before the KL), shifted alignment."""
        with eval_mode(self.discriminator):
            h = self._prefix_logits_full(rows)
        last = h[torch.arange(h.size(0), device=h.device), last_token_index(rows["attention_mask"])]
        sequence_reward = divergence_reward(self.divergence, last, self.log_ratio_clip)
        token_rewards = None
        if self.discriminator_level == "token":
            token_rewards = token_rewards_from_prefix_logits(h[:, 1:], rows["loss_mask"][:, 1:], self.divergence,
                                                             self.log_ratio_clip)
        return RolloutScores(sequence_reward, token_rewards, last)

    def _prefix_logits_full(self, rows: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Prefix logits of every row at the full width, computed micro-batch by micro-batch."""
        width = rows["attention_mask"].size(1)
        keys = ROW_KEYS + (("policy_logps",) if self.discriminator_form == "log_ratio" else ())
        out = []
        for micro in row_chunks({k: rows[k] for k in keys}, self.micro_batch_size):
            if self.discriminator_form == "log_ratio":
                logits = self._log_ratio_prefix(micro)[0]
            else:
                logits = prefix_logits(self.discriminator, micro["input_ids"], micro["attention_mask"])
            out.append(F.pad(logits, (0, width - logits.size(1))))
        return torch.cat(out)

    def advantages(self, scores: RolloutScores, kl_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token advantages [N, T−1] (see the module docstring, step 4)."""
        k = self.num_samples
        beta = self.kl_coef if self.kl_in == "reward" else 0.0
        maskf = mask.to(kl_tokens.dtype)
        if self.discriminator_level == "token":
            rewards = (scores.token_rewards - beta * kl_tokens) * maskf
            adv = positionwise_rloo(reward_to_go(rewards, mask), k)
        else:
            shaped = scores.sequence_reward - beta * masked_sum(kl_tokens, mask, dim=-1)
            adv = rloo_advantages(shaped, k).unsqueeze(-1).expand_as(kl_tokens)
        if self.whiten_advantages:
            adv = whiten(adv, mask)
        return (adv * maskf).detach()

    # ---- policy ------------------------------------------------------------------------
    def _policy_units(self, rows: Dict[str, torch.Tensor]) -> torch.Tensor:
        if self.policy_loss == "ppo" and self.ppo_level == "token":
            return rows["loss_mask"][:, 1:].sum().float()
        return torch.tensor(float(rows["input_ids"].size(0)), device=rows["input_ids"].device)

    def policy_backward(self, rows: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Backward of the policy loss on ``rows`` (input_ids, attention_mask, loss_mask,
        old_logps, ref_logps, advantages), normalised by the global unit count. Returns sums of
        this rank's detached statistics."""
        world = self._world_size()
        denominator = self.global_sum(self._policy_units(rows)).clamp(min=1) / world
        stats = {"loss": torch.zeros((), device=self.device), "clip_ratio": torch.zeros((), device=self.device),
                 "approx_kl": torch.zeros((), device=self.device), "kl_loss": torch.zeros((), device=self.device)}
        for micro in row_chunks(rows, self.micro_batch_size):
            mask = micro["loss_mask"][:, 1:]
            logps = token_logprobs(self.policy, micro["input_ids"], micro["attention_mask"])
            adv = micro["advantages"]
            if self.policy_loss == "ppo":
                ppo_adv = adv
                if self.ppo_level == "sequence":  # one advantage per response: read it at its first token
                    ppo_adv = adv.gather(1, mask.float().argmax(-1, keepdim=True)).squeeze(1)
                out = ppo_clip_loss(logps, micro["old_logps"], ppo_adv, mask, self.clip_eps, self.ppo_level,
                                    denominator=denominator)
                loss = out.loss
                share = self._policy_units(micro) / denominator
                stats["clip_ratio"] += out.clip_fraction * share
                stats["approx_kl"] += out.approx_kl * share
            elif self.discriminator_level == "sequence":
                seq_adv = adv.gather(1, mask.float().argmax(-1, keepdim=True)).squeeze(1)
                loss = policy_gradient_loss(logps, seq_adv, mask, denominator=denominator)
            else:  # per-token advantages: −Σ_t A_t log π(y_t|s_t), averaged over sequences
                loss = -masked_sum(adv.detach() * logps, mask) / denominator
            if self.kl_in == "loss" and self.kl_coef > 0:
                kl = masked_sum(kl_penalty(logps, micro["ref_logps"], self.kl_estimator), mask) / denominator
                loss = loss + self.kl_coef * kl
                stats["kl_loss"] += kl.detach()
            self.manual_backward(loss)
            stats["loss"] += loss.detach()
        return stats

    # ---- the training step -------------------------------------------------------------
    @torch.no_grad()
    def _shifted_logprobs(self, rows: Dict[str, torch.Tensor], score) -> torch.Tensor:
        """``score(input_ids, attention_mask)`` → shifted log-probs, [N, T−1] at the full width,
        micro-batch by micro-batch, without gradient."""
        width = rows["attention_mask"].size(1)
        out = []
        for micro in row_chunks({k: rows[k] for k in ROW_KEYS}, self.micro_batch_size):
            lp = score(micro["input_ids"], micro["attention_mask"])
            out.append(F.pad(lp, (0, width - 1 - lp.size(1))))
        return torch.cat(out)

    def _reference_logprobs(self, rows: Dict[str, torch.Tensor]) -> torch.Tensor:
        """log π_ref of the rows' tokens, [N, T−1]."""
        return self._shifted_logprobs(rows, self.reference_logprobs)

    def _policy_logprobs(self, rows: Dict[str, torch.Tensor]) -> torch.Tensor:
        """log π of the rows' tokens under the current policy, no gradient (the log-ratio
        discriminator's ``log π`` term for demonstrations), [N, T−1]."""
        return self._shifted_logprobs(rows, lambda ids, mask: token_logprobs(self.policy, ids, mask))

    def in_warmup(self) -> bool:
        """The first ``disc_warmup_steps`` training batches train only the discriminator, on the
        start policy's samples; the state is ``global_step``, so a resumed run continues it."""
        return self.trainer.global_step < self.disc_warmup_steps

    def sample_rollout(self, batch: Dict[str, Any]) -> Rollout:
        config = dataclasses.replace(self.sampling, num_samples=self.num_samples)
        return sample(self.policy, self.tokenizer, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                      config, compute_logprobs=True)

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        policy_opt, disc_opt = self.optimizers()
        policy_sched, disc_sched = self.lr_schedulers()
        self.count_tokens(batch)

        # 1. rollout
        start = time.perf_counter()
        rollout = self.sample_rollout(batch)
        elapsed = time.perf_counter() - start
        rows = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
                "loss_mask": rollout.loss_mask}
        mask = rollout.loss_mask[:, 1:]
        old_logps = rollout.logprobs.detach()
        expert = {k: batch[k] for k in ROW_KEYS}
        if self.discriminator_form == "log_ratio":
            rows["policy_logps"] = old_logps
            expert["policy_logps"] = self._policy_logprobs(expert)

        # 2. discriminator (alone during the warm-up: then its last step is the counted one)
        warmup = self.in_warmup()
        for step in range(self.disc_steps):
            disc_loss, r1, expert_logits, policy_logits = self.discriminator_backward(expert, rows)
            counted = warmup and step == self.disc_steps - 1
            with contextlib.nullcontext() if counted else uncounted(disc_opt):
                self.step_optimizer(disc_opt)
        accuracy = discriminator_accuracy(expert_logits, policy_logits)
        self._log_discriminator(disc_loss, r1, accuracy, expert_logits, policy_logits, warmup)
        if warmup:
            disc_sched.step()
            return
        with torch.no_grad():
            ref_logps = self._reference_logprobs(rows)

        # 3. rewards and 4. advantages
        scores = self.score_rollout(rows)
        kl_tokens = kl_penalty(old_logps, ref_logps, self.kl_estimator) * mask.to(old_logps.dtype)
        advantages = self.advantages(scores, kl_tokens, mask)

        # 5. policy
        policy_rows = {**rows, "old_logps": old_logps, "ref_logps": ref_logps, "advantages": advantages}
        n_rows = rows["input_ids"].size(0)
        epochs, minibatches = (self.ppo_epochs, self.ppo_minibatches) if self.policy_loss == "ppo" else (1, 1)
        minibatches = min(minibatches, n_rows)
        stats_sum: Dict[str, torch.Tensor] = {}
        nll = None
        updates = epochs * minibatches
        for epoch in range(epochs):
            order = torch.randperm(n_rows, device=self.device) if minibatches > 1 else torch.arange(n_rows, device=self.device)
            for i, chunk in enumerate(order.tensor_split(minibatches)):
                part = {k: v[chunk] for k, v in policy_rows.items()}
                stats = self.policy_backward(part)
                for name, value in stats.items():
                    stats_sum[name] = stats_sum.get(name, 0) + value / updates
                if self.sft_weight > 0:
                    nll = self.nll_backward(batch, scale=self.sft_weight)
                last = epoch == epochs - 1 and i == minibatches - 1
                with contextlib.nullcontext() if last else uncounted(policy_opt):
                    self.step_optimizer(policy_opt)
        policy_sched.step()
        disc_sched.step()

        # logging
        tokens = mask.sum().clamp(min=1)
        sync = dict(sync_dist=True)
        self.log("reward/mean", scores.sequence_reward.mean(), prog_bar=True, **sync)
        self.log("reward/std", scores.sequence_reward.std() if n_rows > 1 else torch.zeros(()), **sync)
        self.log("kl/ref", masked_sum(kl_tokens, mask) / n_rows, **sync)
        self.log("policy/loss", stats_sum["loss"], sync_dist=True, reduce_fx="sum")
        if self.policy_loss == "ppo":
            self.log("policy/clip_ratio", stats_sum["clip_ratio"], **sync)
            self.log("policy/approx_kl", stats_sum["approx_kl"], **sync)
        if self.kl_in == "loss" and self.kl_coef > 0:
            self.log("kl/loss_term", stats_sum["kl_loss"], sync_dist=True, reduce_fx="sum")
        if nll is not None:
            self.log("train/nll", nll, sync_dist=True, reduce_fx="sum")
        self.log("policy/entropy", -(masked_sum(old_logps, mask) / tokens), **sync)
        self.log("policy/response_length", mask.sum(-1).float().mean(), **sync)
        self.log("policy/finished", rollout.finished.float().mean(), **sync)
        if elapsed > 0:
            self.log("perf/rollout_tokens_per_sec", float(mask.sum()) / elapsed, on_step=True, on_epoch=False)
        self.log("train/lr", policy_sched.get_last_lr()[0], on_step=True, on_epoch=False)

    # ---- validation: the discriminator's fidelity against the exact log-ratio --------------
    def _sample_eval_start(self) -> None:
        super()._sample_eval_start()
        if self._eval_active and self.evaluator.task is not None:
            if self.fidelity is None:
                self.fidelity = DiscriminatorFidelity()
            self.fidelity.to(self.device).reset()

    @torch.no_grad()
    def _sequence_disc_logits(self, rows: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The discriminator's sequence logit of each row (its last real token), eval mode."""
        if self.discriminator_form == "log_ratio" and "policy_logps" not in rows:
            rows = {**rows, "policy_logps": self._policy_logprobs(rows)}
        with eval_mode(self.discriminator):
            h = self._prefix_logits_full(rows)
        return h[torch.arange(h.size(0), device=h.device), last_token_index(rows["attention_mask"])]

    def _sample_eval_step(self, batch: Dict[str, Any], logps: torch.Tensor, batch_idx: int):
        """Also grades the discriminator on this held-out batch and the evaluation's fresh samples
        (``disc/bce_heldout``, ``disc/bce_bayes``, ``disc/bayes_gap_closed``, ``disc/corr_exact``,
        ``disc/auroc_invalid``; ``metrics/discriminator.py``)."""
        sampled = super()._sample_eval_step(batch, logps, batch_idx)
        if not self._eval_active or self.evaluator.task is None:
            return sampled
        expert_exact = self.evaluator.demonstration_log_ratios(batch, logps, self.tokenizer.eos_token_id)
        keep = torch.isfinite(expert_exact)
        expert_rows = {k: batch[k][keep.to(batch[k].device)] for k in ROW_KEYS}
        expert_h = self._sequence_disc_logits(expert_rows) if int(keep.sum()) else torch.zeros(0)
        policy_h = policy_exact = torch.zeros(0)
        if sampled is not None:
            prompts, rollout, _ = sampled
            policy_rows = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
                           "loss_mask": rollout.loss_mask, "policy_logps": rollout.logprobs}
            policy_h = self._sequence_disc_logits(policy_rows)
            policy_exact = self.evaluator.rollout_log_ratios(prompts["prompt"], rollout, self.tokenizer)
        self.fidelity.update(expert_h, expert_exact[keep], policy_h, policy_exact)
        return sampled

    def _sample_eval_end(self) -> None:
        if self._eval_active and self.fidelity is not None and self.evaluator.task is not None:
            for name, value in self.fidelity.compute().items():  # already gathered over ranks
                if torch.isfinite(value):
                    self.log(f"disc/{name}", value.float(), sync_dist=False)
            self.fidelity.reset()
        super()._sample_eval_end()

    def _log_discriminator(self, disc_loss, r1, accuracy, expert_logits, policy_logits, warmup: bool) -> None:
        sync = dict(sync_dist=True)
        self.log("disc/loss", disc_loss, prog_bar=True, sync_dist=True, reduce_fx="sum")
        self.log("disc/acc_expert", accuracy.expert, **sync)
        self.log("disc/acc_policy", accuracy.policy, **sync)
        self.log("disc/logit_expert", expert_logits.mean(), **sync)
        self.log("disc/logit_policy", policy_logits.mean(), **sync)
        self.log("disc/warmup", float(warmup), on_step=True, on_epoch=False)
        if self.discriminator_form == "log_ratio":
            self.log("disc/bias", self.discriminator.bias_value(), on_step=True, on_epoch=False)
            self.log("disc/scale", self.discriminator.scale_value(), on_step=True, on_epoch=False)
        if self.r1_gamma > 0:
            self.log("disc/r1", r1, sync_dist=True, reduce_fx="sum")

    # ---- export ------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        super().on_fit_end()
        path = self.resolve_export_dir()
        if path is None or not self.export_discriminator:
            return
        path = path.rstrip("/") + "_discriminator"
        if self.discriminator_form == "classifier":
            self.export_from_all_ranks(self.discriminator, path, "discriminator")
            return
        description = self.discriminator.describe()  # collective under FSDP2 (the bias is sharded)
        self.export_from_all_ranks(self.discriminator.q, path, "log-ratio discriminator's q")
        if self.trainer.is_global_zero:
            with open(os.path.join(path, LOG_RATIO_FILE), "w") as f:
                json.dump(description, f, indent=1)


__all__ = ["Adversarial", "RolloutScores", "bce_sums", "positionwise_rloo", "reward_to_go", "row_chunks"]
