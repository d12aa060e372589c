"""Adversarial imitation: a discriminator tells demonstrations from the policy's samples, and its
logit, turned into a reward by the divergence table, trains the policy by RL (docs/theory.md §2–3).

``divergence: reverse_kl`` is AIRL (reward ``h``), ``js`` is GAIL (reward ``softplus(h) =
−log(1 − D)``); ``forward_kl``, ``chi2`` and ``squared_hellinger`` are the other rows of
``objectives.divergences.DIVERGENCES``. All of them are minimised from policy rollouts, unlike SFT.

One training step (one batch of demonstrations; ``trainer.global_step`` grows by 1, see below).
Settings of the discriminator are under ``discriminator_training`` (``DiscriminatorTraining``),
those of the RL step under ``policy_update`` (``PolicyUpdate``).

1. **Rollout.** ``sampling.num_samples`` (k) responses per prompt of the batch, sampled from the
   policy with the ``sampling`` settings (k samples of a prompt are contiguous rows); their
   per-token log-probs at temperature 1 are kept as the "old" log-probs (by default from the
   sampling pass itself, recomputed for PPO under reduced precision: ``SamplingConfig.
   logprobs_from``), the frozen reference scores them.
2. **Discriminator** (``steps`` optimizer steps on this batch): binary cross-entropy with logits,
   demonstrations labelled 1 and rollouts 0 (``label_smoothing`` ε gives targets 1−ε / ε), each
   side a mean over its units. Optional R1 penalty ``r1_gamma/2 · E_E‖∇_emb h‖²`` on the
   demonstrations' input embeddings (computed with the math attention kernel, the only one with a
   double backward). At the optimum ``h = log d_E − log d_π``.

   With ``form: log_ratio`` the logit is ``h = a·(log q_φ − log π_θ) + b`` (``π_θ`` the current
   policy, without gradient; ``q_φ`` a causal LM; ``a``, ``b`` scalars), trained by the same BCE
   (+ ``mle_weight`` × the demonstrations' NLL under ``q_φ``). Before the policy moves: the first
   ``prefit_steps`` batches fit ``q_φ`` by maximum likelihood on the demonstrations alone (no
   rollouts: as cheap as SFT steps; see ``in_prefit``), the next ``warmup_steps`` batches run only
   this discriminator step (see ``in_warmup``).
3. **Rewards** from the *updated* discriminator on the rollouts, ``g = divergence_reward(divergence,
   h, logit_clip)``:

   - ``level: sequence``: one logit per (prompt, response), read at the last real token of the
     row (``models.discriminator``; padding side and pad == EOS do not matter). The reward
     ``R = g(h)`` is given at the end of the response.
   - ``level: token``: a logit ``h_t`` for every response prefix ``y_≤t``. *Training target:*
     every prefix of a demonstration's response is labelled 1 and every prefix of a rollout 0,
     each side averaged over all its prefixes (tokens); prompt and padding positions are not
     scored. The optimum is ``h_t = log d_E(y_≤t|x) − log d_π(y_≤t|x) + c`` with
     ``c = log(E_π[T] / E_E[T])`` (the prefix pools are normalised by their token counts), a
     constant that cancels in every advantage below. Per-token rewards are the differences
     ``r_t = g(h_t) − g(h_{t−1})`` (``token_rewards_from_prefix_logits``), so ``Σ_t r_t = g(h_T)``,
     exactly the sequence-level read of the same network.

   KL to the reference: per-token ``kl_t = kl_penalty(log π_old, log π_ref, kl_estimator)``.
   ``kl_in: reward`` subtracts ``kl_coef · kl_t`` from the reward (per token; summed for a sequence
   reward: ``objectives.policy_gradient.shape_rewards``), ``kl_in: loss`` adds
   ``kl_coef · Σ kl_penalty(log π_θ, log π_ref)`` to the policy loss with the policy loss's
   normalisation (use ``k2`` there: ``objectives/kl.py`` shows k1 has no gradient in expectation
   and k3 has the forward KL's).
4. **Advantages**, always leave-one-out over the k samples of a prompt (so k ≥ 2):

   - sequence level: RLOO, ``A_i = R_i − mean_{j≠i} R_j`` with ``R`` the (KL-shaped) sequence
     reward, the same advantage on every token of the response;
   - token level: the per-token reward-to-go ``G_{i,t} = Σ_{t'≥t} r_{i,t'}`` minus the mean
     reward-to-go of the other k−1 samples of the prompt at the same position (0 past their end;
     ``objectives.policy_gradient.reward_to_go`` / ``positionwise_rloo``). ``G_{i,1}`` is the
     whole sequence reward, so the first token gets exactly RLOO's advantage; later tokens lose
     the part of the return earned before them (``g(h_{t−1})`` is a function of the state, a
     baseline), which lowers the variance without biasing the gradient.
   - ``whiten_advantages`` optionally rescales them over the batch's response tokens.
5. **Policy.** ``loss: rloo``: one optimizer step on ``−Σ_t A_t log π_θ(y_t|s_t)``, averaged over
   sequences (REINFORCE with the RLOO baseline; ``policy_gradient_loss`` for sequence-level
   advantages). ``loss: ppo``: ``ppo_epochs`` passes over the rollouts in ``ppo_minibatches``
   shuffled minibatches, one optimizer step each, PPO-clip with ratio ``π_θ / π_old`` per token
   (``ppo_level: token``, loss averaged over tokens) or per sequence (``ppo_level: sequence``,
   sequence-level discriminator only) clipped at ``1 ± clip_eps``. ``sft_weight > 0`` adds
   ``sft_weight ×`` the SFT loss of the demonstrations to every policy step.

Normalisation: every loss is divided by its unit count over the *global* step (all micro-batches,
all ranks: ``algorithms/engine.py``), so ``micro_batch_size`` and data parallelism give the
gradient of one large batch.

Cost: every model pass over rows reads them through ``models.scoring``: causal LMs (policy,
reference, the log-ratio form's ``q``) project onto the vocabulary only from the first response
column on (``response_token_logprobs``); the k samples of a prompt run the prompt once, over a
shared KV cache (rollouts; ``shared_prefix_plan``), and so does their sampling pass
(``shared_prompt_cache``); rows of different lengths otherwise run in a few length buckets, each
trimmed to its attended columns (``length_buckets``), instead of one batch padded to the longest
prompt. Measured on 16 prompts × 4 samples × 8 new tokens, ~5M-parameter Llama, 1 CPU thread
(``benchmarks/adversarial_split.py``), CPU-s per step, log-ratio / classifier form (two runs
each): 2.4-2.8 / 2.1 before; 2.2-2.3 / 1.9-2.1 with the rollout's log-probs from the sampling
pass; 1.9-2.2 / 1.7-1.9 with the LM head on response columns only; 1.6-1.8 / 1.5 with length
buckets; 1.2-1.3 / 1.0-1.05 with shared prompts. Under bf16 autocast on the CPU, SDPA's math
kernel for these short rows (``models.scoring.attention_kernel``) took the log-ratio step from
1.05 to 0.94 CPU-s.

Steps and schedules: only the *last* policy step of a training step is counted (the engine steps
the others uncounted): ``global_step`` = number of training batches (warm-up + policy
iterations), so ``trainer.max_steps: 200`` means 200 rollout batches whatever the discriminator
``steps`` and ``ppo_epochs`` are. Both learning-rate schedules step once per training batch too,
over ``trainer.estimated_stepping_batches``.

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
import copy
import dataclasses
import logging
import time
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple

import torch

from lightning_irl.algorithms.base import OptimizerSpec, build_optimizer, check_choices, check_fields
from lightning_irl.algorithms.engine import (
    ROW_KEYS,
    attached_trainer,
    map_micro_batches,
    response_tokens,
    rollout_rows,
    sequence_rows,
    sequences,
)
from lightning_irl.algorithms.export import Export
from lightning_irl.algorithms.policy import PolicyModule
from lightning_irl.metrics.discriminator import DiscriminatorFidelity
from lightning_irl.models.discriminator import (
    LOG_RATIO_FILE,
    LogRatioDiscriminator,
    build_discriminator,
    last_token_index,
    prefix_logits,
    sequence_logits,
)
from lightning_irl.models.scoring import first_scored_column, response_token_logprobs
from lightning_irl.models.spec import ModelSpec
from lightning_irl.objectives.divergences import (
    DivergenceName,
    bce_sum,
    discriminator_accuracy,
    divergence_reward,
    r1_penalty,
    token_rewards_from_prefix_logits,
)
from lightning_irl.objectives.kl import KLEstimator, kl_penalty
from lightning_irl.objectives.logprobs import masked_sum, token_nll_sum
from lightning_irl.objectives.policy_gradient import (
    policy_gradient_loss,
    positionwise_rloo,
    ppo_clip_loss,
    reward_to_go,
    rloo_advantages,
    shape_rewards,
    whiten,
)
from lightning_irl.rollout import Rollout, SamplingConfig, sample

log = logging.getLogger(__name__)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclasses.dataclass
class DiscriminatorTraining:
    """How the discriminator is built, trained and read (``Adversarial.discriminator_training``).

    Args:
        form: ``log_ratio``: ``h = a·(log q_φ(y|x) − log π(y|x)) + b`` with ``q_φ`` a causal LM and
            ``a``, ``b`` scalars (``models.discriminator.LogRatioDiscriminator``); ``classifier``: a
            fresh scalar head on a backbone. The log-ratio form reads answers token by token
            through an LM head, which is what tells a valid answer from an invalid one on the
            known-expert tasks; a fresh head stayed at chance in the divergence lab. It costs one
            more model of the policy's size (weights, gradients, Adam state; with LoRA on the
            policy, ``q`` is a frozen copy of the base with its own trainable adapter).
        level: ``sequence`` (one logit per response, reward at its end) or ``token`` (a logit per
            prefix, per-token rewards ``g(h_t) − g(h_{t−1})``, reward-to-go).
        steps: Discriminator optimizer steps per training batch (on the same batch).
        optimizer: Optimizer and schedule of the discriminator.
        prefit_steps: Log-ratio form: the first N training batches fit ``q`` by maximum likelihood
            on the demonstrations alone, one ``prefit_optimizer`` step per batch, with no rollouts
            (the policy does not move). Then ``q`` is a better language model of the expert than
            the start policy, and ``log q − log π`` already points where the BCE's optimum
            ``log d_E − log π`` does, so the warm-up only has to calibrate and sharpen it; started
            from ``q = π``, the BCE alone stays near chance on held-out data (README, divergence
            lab). ``trainer.max_steps`` counts these batches; the state is ``global_step``. The
            pre-fit optimizer's state is freed when the pre-fit ends.
        prefit_optimizer: Optimizer and schedule of the pre-fit (its schedule spans
            ``prefit_steps``): SFT-like, a decaying learning rate, so ``q`` ends converged
            rather than noisy.
        warmup_steps: The next N training batches (after the pre-fit) train only the
            discriminator, on the start policy's samples (the policy does not move, its lr
            schedule does not advance). ``trainer.max_steps`` counts them. The warm-up state is
            ``global_step``: checkpoints and resume carry it.
        warmup_fit: ``mle`` (log-ratio form): during the warm-up ``q`` is fitted by maximum
            likelihood on the demonstrations only (weight ``mle_weight``) and ``a``, ``b`` by the
            BCE; ``bce``: everything by the BCE (+ the likelihood term) from the start.
        mle_weight: Adds this × the demonstrations' mean token NLL under ``q`` to the
            discriminator loss (log-ratio form), keeping ``q`` a language model of the expert.
        bias_lr: Learning rate of ``a`` and ``b`` (log-ratio form): two scalars that must calibrate
            fast while ``q`` moves slowly.
        label_smoothing: Two-sided label smoothing ε of the targets (1−ε / ε).
        r1_gamma: Weight γ of the R1 penalty ``γ/2 · E_E‖∇_emb h‖²`` on demonstrations' input
            embeddings (classifier form, sequence logit); 0 = off.
        logit_clip: Clamp ``h`` to ``[−c, c]`` before the reward (bounds ``e^h`` rewards and keeps
            extreme logits from dominating a batch). None = no clamp.
        export: Also save the discriminator when ``fit`` ends (``<export>_discriminator``).
    """

    form: Literal["classifier", "log_ratio"] = "classifier"
    level: Literal["sequence", "token"] = "sequence"
    steps: int = 1
    optimizer: OptimizerSpec = dataclasses.field(default_factory=OptimizerSpec)
    prefit_steps: int = 0
    prefit_optimizer: OptimizerSpec = dataclasses.field(
        default_factory=lambda: OptimizerSpec(lr=3e-3, weight_decay=0.01, warmup_steps=20, schedule="cosine"))
    warmup_steps: int = 0
    warmup_fit: Literal["bce", "mle"] = "bce"
    mle_weight: float = 0.0
    bias_lr: float = 1e-2
    label_smoothing: float = 0.0
    r1_gamma: float = 0.0
    logit_clip: Optional[float] = 5.0
    export: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        if self.steps < 1:
            raise ValueError(f"discriminator_training.steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.logit_clip is not None and self.logit_clip <= 0:
            raise ValueError(f"logit_clip must be positive or null, got {self.logit_clip}")
        for name in ("prefit_steps", "warmup_steps", "mle_weight", "bias_lr", "r1_gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"discriminator_training.{name} must be >= 0, got {getattr(self, name)}")
        if self.form == "log_ratio" and self.r1_gamma > 0:
            raise ValueError("r1_gamma applies to the classifier discriminator only (the log-ratio form reads "
                             "token log-probs, not a head on embeddings); set r1_gamma: 0")
        if self.form == "classifier" and (self.mle_weight > 0 or self.warmup_fit == "mle" or self.prefit_steps > 0):
            # one flag switches a log-ratio config to the classifier: its q-only settings go quiet
            log.warning("discriminator_training.form=classifier: mle_weight, warmup_fit=mle and prefit_steps apply "
                        "to the log-ratio form only and are ignored (the warm-up trains the classifier by BCE; "
                        "without a pre-fit, trainer.max_steps leaves %d more policy batches)", self.prefit_steps)
            self.mle_weight, self.warmup_fit, self.prefit_steps = 0.0, "bce", 0
        if self.warmup_fit == "mle" and self.mle_weight <= 0:
            raise ValueError("warmup_fit=mle fits q by maximum likelihood during the warm-up: it needs "
                             "mle_weight > 0")


@dataclasses.dataclass
class PolicyUpdate:
    """The RL step of the policy on its rollouts (``Adversarial.policy_update``).

    Args:
        loss: ``rloo`` (one REINFORCE step with the leave-one-out baseline) or ``ppo``.
        kl_coef: β of ``E[r] − β KL(π ‖ π_ref)``; the reference is a frozen copy of the initial
            policy.
        kl_estimator: ``k1``, ``k2`` or ``k3`` (``objectives/kl.py``).
        kl_in: ``reward`` (subtract β·kl per token from the reward) or ``loss`` (add β·KL to the
            policy loss; use ``k2``).
        ppo_epochs: Passes over each rollout batch (PPO).
        ppo_minibatches: Minibatches per pass, one optimizer step each (PPO).
        clip_eps: PPO clip range ε.
        ppo_level: ``token`` (per-token ratios) or ``sequence`` (one ratio per response).
        whiten_advantages: Normalise advantages to unit variance over the batch's tokens.
        sft_weight: Add this × the SFT loss (NLL of the demonstrations) to every policy step.
    """

    loss: Literal["rloo", "ppo"] = "rloo"
    kl_coef: float = 0.05
    kl_estimator: KLEstimator = "k1"
    kl_in: Literal["reward", "loss"] = "reward"
    ppo_epochs: int = 2
    ppo_minibatches: int = 2
    clip_eps: float = 0.2
    ppo_level: Literal["token", "sequence"] = "token"
    whiten_advantages: bool = False
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("ppo_epochs", "ppo_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"policy_update.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kl_coef", "sft_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"policy_update.{name} must be >= 0, got {getattr(self, name)}")
        if self.kl_in == "loss" and self.kl_estimator == "k1" and self.kl_coef > 0:
            log.warning("kl_in=loss with kl_estimator=k1: its gradient is zero in expectation; use k2")


@dataclasses.dataclass
class RolloutScores:
    """What the reward stage produces for a rollout of N rows (shifted [N, T−1] alignment)."""

    sequence_reward: torch.Tensor  # [N]  g(h_T), before the KL
    token_rewards: Optional[torch.Tensor]  # [N, T−1] differences of g(h_t) (token level), before the KL
    logits: torch.Tensor  # [N] sequence logits h_T


class Adversarial(PolicyModule):
    """Adversarial IRL from demonstrations: AIRL (reverse KL), GAIL (JS) and other f-divergences.

    Args:
        policy: The model being trained; start from an SFT export (``model_name_or_path``).
        discriminator: The discriminator network (Hub id / folder / inline config); it reads the
            policy tokenizer's ids. ``classifier`` form: built as a one-logit
            ``AutoModelForSequenceClassification``; None = the policy's spec (from a folder, the
            same backbone weights with a fresh head). ``log_ratio`` form: the causal LM ``q``;
            None = a copy of the policy as it starts (so ``h = b`` at step 0).
        divergence: Row of the reward table: ``reverse_kl`` (AIRL, ``r = h``), ``js`` (GAIL,
            ``r = softplus(h) = −log(1 − D)``), ``forward_kl`` (``e^h``), ``chi2`` (``e^{2h}``),
            ``squared_hellinger`` (``e^{h/2}``).
        discriminator_training: Form, level, optimizer, steps, warm-up, ... (``DiscriminatorTraining``).
        policy_update: RLOO or PPO, the KL to the reference, ... (``PolicyUpdate``).
        sampling: Rollouts: ``num_samples`` responses per prompt (k ≥ 2: leave-one-out baselines),
            at ``temperature`` etc.; ``predict`` uses the same settings.
        **kwargs: ``PolicyModule`` arguments (``optimizer`` of the policy, ``micro_batch_size``,
            ``max_grad_norm`` (both models), ``export_dir``, ``evaluation``, ...).
    """

    def __init__(
        self,
        policy: ModelSpec,
        discriminator: Optional[ModelSpec] = None,
        divergence: DivergenceName = "reverse_kl",
        discriminator_training: DiscriminatorTraining = DiscriminatorTraining(),
        policy_update: PolicyUpdate = PolicyUpdate(),
        sampling: SamplingConfig = SamplingConfig(num_samples=4),
        **kwargs: Any,
    ) -> None:
        super().__init__(policy, sampling=sampling, **kwargs)
        check_choices(Adversarial.__init__, divergence=divergence)
        if sampling.num_samples < 2:
            raise ValueError(f"sampling.num_samples must be >= 2 (leave-one-out baselines), got {sampling.num_samples}")
        disc, update = discriminator_training, policy_update
        if update.loss == "ppo" and update.ppo_level == "sequence" and disc.level == "token":
            raise ValueError("ppo_level=sequence takes one advantage per response; with a token-level "
                             "discriminator use ppo_level=token (per-token reward-to-go)")
        # log_ratio with no discriminator named: q starts as a copy of the policy (h = b = 0)
        self.discriminator_spec = discriminator if disc.form == "log_ratio" else (discriminator or policy)
        self.divergence = divergence
        self.disc = disc
        self.update = update
        self.reference: Optional[torch.nn.Module] = None
        self.discriminator: Optional[torch.nn.Module] = None
        self.fidelity: Optional[DiscriminatorFidelity] = None  # built at the first sampling evaluation

    # ---- building ----------------------------------------------------------------------
    supports_fsdp1 = False  # measured on one GPU: stalls under FSDP1 (see strategies.py); FSDP2 is tested
    needs_reference = True  # the base builds the frozen initial policy (or LoRA's adapter-off view)

    def configure_model(self) -> None:
        super().configure_model()
        if self.discriminator is None:
            if self.disc.form == "classifier":
                self.discriminator = build_discriminator(self.discriminator_spec, self.tokenizer)
            else:
                self.discriminator = LogRatioDiscriminator(self._build_q())

    def _build_q(self) -> torch.nn.Module:
        """The log-ratio discriminator's causal LM: a trainable copy of the policy's start (LoRA:
        the copy keeps its own adapter, only that trains), or the model ``discriminator`` names."""
        if self.discriminator_spec is not None:
            return self.discriminator_spec.build_causal_lm(self.tokenizer)
        q = copy.deepcopy(self.policy)
        q.train()
        return q

    def rollout(self, batch: Dict[str, Any], config: Optional[SamplingConfig] = None,
                compute_logprobs: bool = True) -> Rollout:
        """``PolicyModule.rollout``; in training with ``loss: ppo`` the log-probs are PPO's old
        log-probs, compared with the training forward's (``for_ratio``: ``logprobs_from: auto``
        then recomputes them under reduced precision, ``rollout.SamplingConfig``)."""
        return sample(self.policy, self.tokenizer, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                      config or self.sampling, compute_logprobs=compute_logprobs,
                      for_ratio=self.update.loss == "ppo" and self.training)

    def configure_optimizers(self):
        total = self.total_steps()
        precision = self.trainer.precision  # decides fused AdamW (base.build_optimizer)
        policy_opt, policy_sched = build_optimizer(self.policy, self.optimizer_spec, total, precision=precision)
        own = {"bias": self.disc.bias_lr, "scale": self.disc.bias_lr} if self.disc.form == "log_ratio" else None
        disc_opt, disc_sched = build_optimizer(self.discriminator, self.disc.optimizer, total, own_lr=own,
                                               precision=precision)
        if self.disc.prefit_steps == 0:
            return [policy_opt, disc_opt], [policy_sched, disc_sched]
        # q alone (not a, b: the likelihood does not involve them), its schedule over the pre-fit
        prefit_opt, prefit_sched = build_optimizer(self.discriminator.q, self.disc.prefit_optimizer,
                                                   self.disc.prefit_steps, precision=precision)
        return [policy_opt, disc_opt, prefit_opt], [policy_sched, disc_sched, prefit_sched]

    # ---- discriminator -----------------------------------------------------------------
    def _units(self, rows: Dict[str, torch.Tensor]) -> torch.Tensor:
        """What one side of the discriminator loss averages over: responses or response prefixes."""
        if self.disc.level == "token":
            return rows["loss_mask"].sum().float()
        return torch.tensor(float(rows["input_ids"].size(0)), device=rows["input_ids"].device)

    def _log_ratio_prefix(self, rows: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(prefix logits [B, T], q's shifted token log-probs [B, T−1]) of the log-ratio form;
        ``rows["policy_logps"]`` holds log π of the same tokens (shifted)."""
        calibrate_only = self.disc.warmup_fit == "mle" and self.training and attached_trainer(self) is not None \
            and self.in_warmup() and not self.in_prefit()
        return self.discriminator(rows["input_ids"], rows["attention_mask"], rows["policy_logps"], rows["loss_mask"],
                                  calibrate_only=calibrate_only)

    def _disc_outputs(self, rows: Dict[str, torch.Tensor], inputs_embeds=None):
        """(flat logits, q's token log-probs or None): the log-ratio form also returns what an MLE
        term on the demonstrations needs, from the same forward."""
        if self.disc.form == "log_ratio":
            h, q_logps = self._log_ratio_prefix(rows)
            if self.disc.level == "token":
                return h[rows["loss_mask"][:, : h.size(1)].bool()], q_logps
            return h[torch.arange(h.size(0), device=h.device), last_token_index(rows["attention_mask"])], q_logps
        return self._classifier_logits(rows, inputs_embeds), None

    def _classifier_logits(self, rows: Dict[str, torch.Tensor], inputs_embeds=None) -> torch.Tensor:
        start = first_scored_column(rows["loss_mask"]) if inputs_embeds is None else None  # read from there on
        if self.disc.level == "token":
            logits = prefix_logits(self.discriminator, rows["input_ids"], rows["attention_mask"], inputs_embeds,
                                   bucketed=True, start=start)
            return logits[rows["loss_mask"].bool()]
        return sequence_logits(self.discriminator, rows["input_ids"], rows["attention_mask"], inputs_embeds,
                               bucketed=True, start=start)

    def _r1_term(self, rows: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(flat logits for the BCE, per-row R1 penalty mean) from one forward on embeddings."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        embeds = self.discriminator.get_input_embeddings()(rows["input_ids"]).detach().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
            if self.disc.level == "token":
                all_logits = prefix_logits(self.discriminator, None, rows["attention_mask"], embeds)
                last = all_logits[torch.arange(all_logits.size(0)), last_token_index(rows["attention_mask"])]
                flat = all_logits[rows["loss_mask"].bool()]
            else:
                last = flat = sequence_logits(self.discriminator, None, rows["attention_mask"], embeds)
            penalty = r1_penalty(last, embeds)
        return flat, penalty

    def discriminator_backward(self, expert: Dict[str, torch.Tensor], policy: Dict[str, torch.Tensor]):
        """Backward of the BCE discriminator loss (+ R1, + the MLE term), globally normalised.
        Returns detached (loss, r1, expert logits, policy logits) of this rank: loss and r1 are
        shares of the global means (sum over ranks = the mean)."""
        eps = self.disc.label_smoothing
        expert_logits: List[torch.Tensor] = []
        policy_logits: List[torch.Tensor] = []

        def expert_sums(micro):
            sums = {}
            if self.disc.r1_gamma > 0:
                logits, penalty = self._r1_term(micro)
                sums["r1"] = penalty * micro["input_ids"].size(0)  # a per-row mean → its sum
            else:
                logits, q_logps = self._disc_outputs(micro)
                if self.disc.mle_weight > 0:  # q fitted as a language model of the demonstrations too
                    sums["mle"] = token_nll_sum(q_logps, micro["loss_mask"][:, 1:])
            expert_logits.append(logits.detach())
            return {"bce": bce_sum(logits, 1.0 - eps), **sums}

        def policy_sums(micro):
            logits = self._disc_outputs(micro)[0]
            policy_logits.append(logits.detach())
            return {"bce": bce_sum(logits, eps)}

        units = {"bce": self._units}
        if self.disc.r1_gamma > 0:
            units["r1"] = sequences
        elif self.disc.mle_weight > 0:
            units["mle"] = response_tokens
        weights = {"r1": 0.5 * self.disc.r1_gamma, "mle": self.disc.mle_weight}
        expert_shares = self.engine.backward(expert, expert_sums, units, self.micro_batch_size, weights)
        policy_shares = self.engine.backward(policy, policy_sums, {"bce": self._units}, self.micro_batch_size)
        r1 = expert_shares.get("r1", torch.zeros((), device=self.device))
        return (expert_shares["bce"] + policy_shares["bce"], r1, torch.cat(expert_logits),
                torch.cat(policy_logits))

    # ---- rewards -----------------------------------------------------------------------
    @torch.no_grad()
    def score_rollout(self, rows: Dict[str, torch.Tensor]) -> RolloutScores:
        """Rewards of rollout rows from the discriminator (before the KL), shifted alignment."""
        with eval_mode(self.discriminator):
            h = self._prefix_logits_full(rows)
        last = h[torch.arange(h.size(0), device=h.device), last_token_index(rows["attention_mask"])]
        sequence_reward = divergence_reward(self.divergence, last, self.disc.logit_clip)
        token_rewards = None
        if self.disc.level == "token":
            token_rewards = token_rewards_from_prefix_logits(h[:, 1:], rows["loss_mask"][:, 1:], self.divergence,
                                                             self.disc.logit_clip)
        return RolloutScores(sequence_reward, token_rewards, last)

    def _prefix_logits_full(self, rows: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Prefix logits of every row at the full width, computed micro-batch by micro-batch."""
        keys = ROW_KEYS + (("policy_logps",) if self.disc.form == "log_ratio" else ())

        def logits(micro):
            if self.disc.form == "log_ratio":
                return self._log_ratio_prefix(micro)[0]
            return prefix_logits(self.discriminator, micro["input_ids"], micro["attention_mask"], bucketed=True,
                                 start=first_scored_column(micro["loss_mask"]))

        return map_micro_batches({k: rows[k] for k in keys if k in rows}, logits, self.micro_batch_size)

    def advantages(self, scores: RolloutScores, kl_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-token advantages [N, T−1] (see the module docstring, step 4)."""
        k = self.sampling.num_samples
        beta = self.update.kl_coef if self.update.kl_in == "reward" else 0.0
        maskf = mask.to(kl_tokens.dtype)
        if self.disc.level == "token":
            rewards = (scores.token_rewards - beta * kl_tokens) * maskf
            adv = positionwise_rloo(reward_to_go(rewards, mask), k)
        else:
            shaped = shape_rewards(scores.sequence_reward, kl_tokens, mask, beta)
            adv = rloo_advantages(shaped, k).unsqueeze(-1).expand_as(kl_tokens)
        if self.update.whiten_advantages:
            adv = whiten(adv, mask)
        return (adv * maskf).detach()

    # ---- policy ------------------------------------------------------------------------
    def _policy_units(self, rows: Dict[str, torch.Tensor]):
        """What the policy loss averages over: response tokens (token-level PPO) or responses."""
        if self.update.loss == "ppo" and self.update.ppo_level == "token":
            return response_tokens(rows)
        return sequences(rows)

    def _policy_sums(self, micro: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Sums over ``micro``'s units of the policy loss (and the KL-in-loss term), plus PPO's
        clip fraction and approximate KL summed over the same units."""
        mask = micro["loss_mask"][:, 1:]
        logps = response_token_logprobs(self.policy, micro["input_ids"], micro["attention_mask"], micro["loss_mask"])
        adv = micro["advantages"]
        sums: Dict[str, torch.Tensor] = {}
        if self.update.loss == "ppo":
            ppo_adv = adv
            if self.update.ppo_level == "sequence":  # one advantage per response: read it at its first token
                ppo_adv = adv.gather(1, mask.float().argmax(-1, keepdim=True)).squeeze(1)
            out = ppo_clip_loss(logps, micro["old_logps"], ppo_adv, mask, self.update.clip_eps, self.update.ppo_level,
                                denominator=1.0)
            units = self._policy_units(micro)
            sums.update(policy=out.loss, clip_ratio=out.clip_fraction * units, approx_kl=out.approx_kl * units)
        elif self.disc.level == "sequence":
            seq_adv = adv.gather(1, mask.float().argmax(-1, keepdim=True)).squeeze(1)
            sums["policy"] = policy_gradient_loss(logps, seq_adv, mask, denominator=1.0)
        else:  # per-token advantages: −Σ_t A_t log π(y_t|s_t), averaged over sequences
            sums["policy"] = -masked_sum(adv.detach() * logps, mask)
        if self.update.kl_in == "loss" and self.update.kl_coef > 0:
            sums["kl"] = masked_sum(kl_penalty(logps, micro["ref_logps"], self.update.kl_estimator), mask)
        return sums

    def policy_backward(self, rows: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Backward of the policy loss on ``rows`` (input_ids, attention_mask, loss_mask,
        old_logps, ref_logps, advantages), globally normalised. Returns this rank's shares of
        the global means (``policy``, and ``kl``, ``clip_ratio``, ``approx_kl`` when used)."""
        units = {"policy": self._policy_units}
        if self.update.kl_in == "loss" and self.update.kl_coef > 0:
            units["kl"] = self._policy_units
        return self.engine.backward(rows, self._policy_sums, units, self.micro_batch_size,
                                    weights={"kl": self.update.kl_coef}, stat_units="policy")

    # ---- the training step -------------------------------------------------------------
    @torch.no_grad()
    def _shifted_logprobs(self, rows: Dict[str, torch.Tensor], model) -> torch.Tensor:
        """``model``'s shifted log-probs of the rows' response tokens, [N, T−1] at the full width
        (0 on prompt positions), micro-batch by micro-batch, without gradient."""
        return map_micro_batches({k: rows[k] for k in ROW_KEYS if k in rows},
                                 lambda micro: response_token_logprobs(model, micro["input_ids"],
                                                                       micro["attention_mask"], micro["loss_mask"]),
                                 self.micro_batch_size)

    def _reference_logprobs(self, rows: Dict[str, torch.Tensor]) -> torch.Tensor:
        """log π_ref of the rows' response tokens, [N, T−1] (``reference_mode``)."""
        with self.reference_mode() as reference:
            return self._shifted_logprobs(rows, reference)

    def _policy_logprobs(self, rows: Dict[str, torch.Tensor]) -> torch.Tensor:
        """log π of the rows' response tokens under the current policy, no gradient (the log-ratio
        discriminator's ``log π`` term for demonstrations), [N, T−1]."""
        return self._shifted_logprobs(rows, self.policy)

    def in_prefit(self) -> bool:
        """The first ``prefit_steps`` training batches fit ``q`` by maximum likelihood only."""
        return self.trainer.global_step < self.disc.prefit_steps

    def in_warmup(self) -> bool:
        """The first ``prefit_steps + warmup_steps`` training batches train only the discriminator
        (the pre-fit, then the warm-up on the start policy's samples); the state is
        ``global_step``, so a resumed run continues it."""
        return self.trainer.global_step < self.disc.prefit_steps + self.disc.warmup_steps

    def prefit_step(self, batch: Dict[str, Any]) -> None:
        """One maximum-likelihood step of ``q`` on the batch's demonstrations (no rollout)."""
        prefit_opt, prefit_sched = self.optimizers()[2], self.lr_schedulers()[2]

        def nll(micro):
            # through the discriminator's own forward (FSDP2 gathers its parameters there); the
            # policy log-probs only shape h, which this step does not use
            no_policy = micro["input_ids"].new_zeros(micro["input_ids"].shape, dtype=torch.float32)[:, 1:]
            q_logps = self.discriminator(micro["input_ids"], micro["attention_mask"], no_policy, micro["loss_mask"],
                                         calibrate_only=True)[1]
            return {"nll": token_nll_sum(q_logps, micro["loss_mask"][:, 1:])}

        shares = self.engine.backward(sequence_rows(batch), nll, {"nll": response_tokens}, self.micro_batch_size)
        self.step(prefit_opt, prefit_sched, counted=True)
        self.log("disc/prefit_nll", shares["nll"], prog_bar=True, sync_dist=True, reduce_fx="sum")
        if self.trainer.global_step == self.disc.prefit_steps:  # done: its Adam moments are dead weight
            prefit_opt.optimizer.state.clear()

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        policy_opt, disc_opt = self.optimizers()[:2]
        policy_sched, disc_sched = self.lr_schedulers()[:2]
        self.count_tokens(batch)
        if self.in_prefit():
            self.prefit_step(batch)
            return

        # 1. rollout
        start = time.perf_counter()
        rollout = self.rollout(batch)
        elapsed = time.perf_counter() - start
        rows = rollout_rows(rollout)
        mask = rollout.loss_mask[:, 1:]
        old_logps = rollout.logprobs.detach()
        expert = sequence_rows(batch)
        if self.disc.form == "log_ratio":
            rows["policy_logps"] = old_logps
            expert["policy_logps"] = self._policy_logprobs(expert)

        # 2. discriminator (alone during the warm-up: then its last step is the counted one)
        warmup = self.in_warmup()
        for step in range(self.disc.steps):
            disc_loss, r1, expert_logits, policy_logits = self.discriminator_backward(expert, rows)
            self.step(disc_opt, counted=warmup and step == self.disc.steps - 1)
        accuracy = discriminator_accuracy(expert_logits, policy_logits)
        self._log_discriminator(disc_loss, r1, accuracy, expert_logits, policy_logits, warmup)
        if warmup:
            disc_sched.step()
            return
        with torch.no_grad():
            ref_logps = self._reference_logprobs(rows)

        # 3. rewards and 4. advantages (checked by the engine's non-finite guard at the next step)
        scores = self.score_rollout(rows)
        kl_tokens = kl_penalty(old_logps, ref_logps, self.update.kl_estimator) * mask.to(old_logps.dtype)
        self.engine.check_finite("reward", scores.sequence_reward)
        if scores.token_rewards is not None:
            self.engine.check_finite("reward", scores.token_rewards)
        self.engine.check_finite("KL", kl_tokens)
        advantages = self.advantages(scores, kl_tokens, mask)
        self.engine.check_finite("advantage", advantages)

        # 5. policy
        policy_rows = {**rows, "old_logps": old_logps, "ref_logps": ref_logps, "advantages": advantages}
        n_rows = rows["input_ids"].size(0)
        epochs, minibatches = (self.update.ppo_epochs, self.update.ppo_minibatches) if self.update.loss == "ppo" else (1, 1)
        minibatches = min(minibatches, n_rows)
        stats_sum: Dict[str, torch.Tensor] = {}
        nll = None
        updates = epochs * minibatches
        for epoch in range(epochs):
            order = torch.randperm(n_rows, device=self.device) if minibatches > 1 else torch.arange(n_rows, device=self.device)
            for i, chunk in enumerate(order.tensor_split(minibatches)):
                part = {k: v[chunk] for k, v in policy_rows.items()}
                for name, value in self.policy_backward(part).items():
                    stats_sum[name] = stats_sum.get(name, 0) + value / updates
                if self.update.sft_weight > 0:
                    nll = self.nll_backward(batch, weight=self.update.sft_weight)
                self.step(policy_opt, counted=epoch == epochs - 1 and i == minibatches - 1)
        policy_sched.step()
        disc_sched.step()

        # logging
        tokens = mask.sum().clamp(min=1)
        sync = dict(sync_dist=True)
        self.log("reward/mean", scores.sequence_reward.mean(), prog_bar=True, **sync)
        self.log("reward/std", scores.sequence_reward.std() if n_rows > 1 else torch.zeros(()), **sync)
        self.log("kl/ref", masked_sum(kl_tokens, mask) / n_rows, **sync)
        summed = dict(sync_dist=True, reduce_fx="sum")  # shares of global means (engine)
        self.log("policy/loss", stats_sum["policy"], **summed)
        if self.update.loss == "ppo":
            self.log("policy/clip_ratio", stats_sum["clip_ratio"], **summed)
            self.log("policy/approx_kl", stats_sum["approx_kl"], **summed)
        if self.update.kl_in == "loss" and self.update.kl_coef > 0:
            self.log("kl/loss_term", stats_sum["kl"], **summed)
        if nll is not None:
            self.log("train/nll", nll, sync_dist=True, reduce_fx="sum")
        self.log("policy/entropy", -(masked_sum(old_logps, mask) / tokens), **sync)
        self.log("policy/response_length", mask.sum(-1).float().mean(), **sync)
        self.log("policy/finished", rollout.finished.float().mean(), **sync)
        if elapsed > 0:  # a device tensor: no host sync at the steps that do not log it
            self.log("perf/rollout_tokens_per_sec", mask.sum().float() / elapsed, on_step=True, on_epoch=False)
        self.log("train/lr", policy_sched.get_last_lr()[0], on_step=True, on_epoch=False)

    # ---- validation: the discriminator's fidelity against the exact log-ratio --------------
    def _sample_eval_start(self) -> None:
        super()._sample_eval_start()
        if self._eval_active:
            if self.fidelity is None:
                self.fidelity = DiscriminatorFidelity()
            self.fidelity.to(self.device).reset()

    @torch.no_grad()
    def _sequence_disc_logits(self, rows: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The discriminator's sequence logit of each row (its last real token), eval mode."""
        if self.disc.form == "log_ratio" and "policy_logps" not in rows:
            rows = {**rows, "policy_logps": self._policy_logprobs(rows)}
        with eval_mode(self.discriminator):
            h = self._prefix_logits_full(rows)
        return h[torch.arange(h.size(0), device=h.device), last_token_index(rows["attention_mask"])]

    def _sample_eval_step(self, batch: Dict[str, Any], logps: torch.Tensor, batch_idx: int):
        """Also grades the discriminator on this held-out batch and the evaluation's fresh samples
        (``disc/bce_heldout``, ``disc/bce_bayes``, ``disc/bayes_gap_closed``, ``disc/corr_exact``,
        ``disc/auroc_invalid``; ``metrics/discriminator.py``). On data without a known expert only
        ``disc/bce_heldout`` exists (its exact answers are NaN): set against the training
        ``disc/loss`` it shows a discriminator that over-fits the demonstrations."""
        sampled = super()._sample_eval_step(batch, logps, batch_idx)
        if not self._eval_active:
            return sampled
        known = self.evaluator.task is not None
        if known:
            expert_exact = self.evaluator.demonstration_log_ratios(batch, logps, self.tokenizer.eos_token_id)
            keep = torch.isfinite(expert_exact)
        else:
            expert_exact = torch.full((len(batch["prompt"]),), float("nan"))
            keep = torch.ones_like(expert_exact, dtype=torch.bool)
        expert_rows = {k: v[keep.to(v.device)] for k, v in sequence_rows(batch).items()}
        expert_h = self._sequence_disc_logits(expert_rows) if int(keep.sum()) else torch.zeros(0)
        policy_h = policy_exact = torch.zeros(0)
        if sampled is not None:
            prompts, rollout, _ = sampled
            policy_rows = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
                           "loss_mask": rollout.loss_mask, "policy_logps": rollout.logprobs}
            policy_h = self._sequence_disc_logits(policy_rows)
            policy_exact = (self.evaluator.rollout_log_ratios(prompts["prompt"], rollout, self.tokenizer) if known
                            else torch.full((rollout.input_ids.size(0),), float("nan")))
        self.fidelity.update(expert_h, expert_exact[keep], policy_h, policy_exact)
        return sampled

    def _sample_eval_end(self) -> None:
        if self._eval_active and self.fidelity is not None:
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
        if self.disc.form == "log_ratio":
            self.log("disc/bias", self.discriminator.bias_value(), on_step=True, on_epoch=False)
            self.log("disc/scale", self.discriminator.scale_value(), on_step=True, on_epoch=False)
        if self.disc.r1_gamma > 0:
            self.log("disc/r1", r1, sync_dist=True, reduce_fx="sum")

    # ---- export ------------------------------------------------------------------------
    def exports(self) -> List[Export]:
        """The policy, and the discriminator to ``<export>_discriminator``: a classifier folder, or
        the log-ratio form's ``q`` with its ``a``, ``b`` in ``log_ratio_discriminator.json``."""
        exports = super().exports()
        if not self.disc.export:
            return exports
        if self.disc.form == "classifier":
            return exports + [Export(self.discriminator, "discriminator", "_discriminator")]
        # describe() is collective under FSDP2 (a and b are sharded): called on every rank
        return exports + [Export(self.discriminator.q, "log-ratio discriminator's q", "_discriminator",
                                 side_files=lambda: {LOG_RATIO_FILE: self.discriminator.describe()})]


__all__ = ["Adversarial", "DiscriminatorTraining", "PolicyUpdate", "RolloutScores"]
