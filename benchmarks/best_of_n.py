"""Best-of-N on the `modes` task with learned reward models, next to oracle rewards.

    HF_HUB_OFFLINE=1 python benchmarks/best_of_n.py --seed 0 --json s0.json   # ~5.5 min on 2 CPU cores
    python benchmarks/best_of_n.py --aggregate s0.json s1.json s2.json         # mean ± sd over seeds

1. Train two tiny Llamas with SFT on the task's demonstrations: the *initial* policy, a weaker
   one (``--init-steps`` steps), and the *SFT* policy, quickstart-like (``--sft-steps`` steps).
   Export both.
2. Train a reward model per ``--pairings`` entry with ``RewardModel(preset=...)`` (the classifier
   form: a fresh tiny Llama with a score head, ``--rm-init``), and one per ``--log-ratio-pairings``
   entry in the log-ratio form (``h = a·(log q − log p_neg) + b`` over response tokens, ``q``
   started as a copy of the positive policy, else of the negative one; ``--log-ratio-lr``), plus
   one per ``--mle-pairings`` entry in the log-ratio form with ``--mle-weight`` × the positive
   rows' NLL under ``q`` (the demonstrations' for ``sft_demo``) when that is > 0. Every one samples the exported policies on the fly on the training prompts:
   - ``init_sft``: SFT samples (positive) vs initial samples (negative); target
     ``log π_SFT(y|x) − log π_init(y|x)`` (the paper's recommended pairing; the log-ratio form
     *starts* there: q = π_SFT, p_neg = π_init);
   - ``sft_demo``: demonstrations (positive) vs SFT samples (negative); target
     ``log p_E(y|x) − log π_SFT(y|x)`` (the log-ratio form starts at 0: q = p_neg = π_SFT).
   No reward model ever sees the expert's probabilities.
3. On ``--prompts`` held-out prompts, sample 16 responses per prompt from the SFT policy
   (``BestOfN.rollout``, temperature 1) and score each with
   - ``learned <pairing>[ log-ratio[ +mle]]``: the reward model (``BestOfN.score_rollout``, which
     reads the form from the exported folder);
   - ``oracle log p_E``: the task's exact expert log-probability (−inf outside its support, for a
     response cut by the length cap and for one with a special token inside);
   - ``exact <pairing> target``: the pairing's optimum computed exactly from the sampled tokens
     (``log π_SFT − log π_init``; ``log p_E − log π_SFT``).
4. For each N ∈ {1, 2, 4, 8, 16}: split each prompt's 16 samples into 16/N disjoint groups of N,
   keep each group's highest-reward sample (first on ties), and report over all kept samples:
   - ``reverse KL ≤``: an upper bound on KL(π_N ‖ p̃_E), the reverse KL of the Best-of-N policy π_N
     to the smoothed expert of ``eval/reverse_kl`` (p̃_E = (1 − ε)·p_E + ε·V^(−L), a random typist
     mixed in; ``lightning_irl.metrics.functional``), ± the standard error of its sampled part.
     KL(π_N‖p̃_E) = KL(π_N‖π_SFT) + E_{π_N}[log π_SFT − log p̃_E]; the first term is at most
     log N − (N − 1)/N (Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment
     policy"), the second is the mean over the kept samples. Exact at N = 1 (the SFT policy);
   - ``log p̃_E``: mean log-likelihood of the kept samples under the smoothed expert;
   - ``valid log p_E``: the mean over the kept samples that are valid (no floor involved);
   - ``invalid``: share of the kept samples outside the support: the invalid mass of the
     Best-of-N policy (N = 1 is the SFT policy's own invalid mass);
   - ``copy/rev/sort``: share of the kept samples in each expert mode (expert: 0.6/0.3/0.1);
   - ``coverage``: share of the three modes whose share ≥ 0.5 × the expert's weight.
   Also printed: each reward's AUROC at ranking the SFT's valid samples above its invalid ones,
   and the correlation of each learned reward with its exact target.

Numbers come from ``task.log_prob`` / ``task.mode_of`` and ``lightning_irl.metrics.functional``
(``rollout_expert_logps``, ``smoothed_expert_logp``: the definitions behind ``eval/reverse_kl``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from typing import Dict, List, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import binary_auroc  # noqa: E402

from lightning_irl.algorithms import SFT, BestOfN, OptimizerSpec, RewardModel  # noqa: E402
from lightning_irl.algorithms.reward_sources import left_pad_prompts  # noqa: E402
from lightning_irl.data import DemonstrationDataModule  # noqa: E402
from lightning_irl.data.tasks import get_task  # noqa: E402
from lightning_irl.metrics import SMOOTHING  # noqa: E402
from lightning_irl.metrics.functional import estimate, rollout_expert_logps, smoothed_expert_logp  # noqa: E402
from lightning_irl.models.spec import ModelSpec  # noqa: E402
from lightning_irl.objectives.logprobs import token_logprobs  # noqa: E402
from lightning_irl.rollout import SamplingConfig  # noqa: E402

MODES = ("copy", "reverse", "sort")
NS = (1, 2, 4, 8, 16)
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 32}


def trainer(steps: int, val_every: int = 0) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision="32-true", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, val_check_interval=val_every or None,
                     check_val_every_n_epoch=None if val_every else 1, limit_val_batches=1.0 if val_every else 0)


def train_policy(steps: int, export: str, args) -> float:
    L.seed_everything(args.seed)
    module = SFT(policy=ModelSpec(config=dict(TINY), tokenizer="task:modes", seed=args.seed),
                 optimizer=OptimizerSpec(lr=3e-3, weight_decay=0.01, warmup_steps=min(20, steps // 2),
                                         schedule="cosine"),
                 export_dir=export)
    data = DemonstrationDataModule(task="modes", num_train=4000, num_val=8, batch_size=32, max_length=32)
    start = time.perf_counter()
    trainer(steps).fit(module, datamodule=data)
    return time.perf_counter() - start


def train_reward_model(variant: "Variant", init: str, sft: str, export: str, args) -> Dict[str, float]:
    L.seed_everything(args.seed)
    folder = lambda path: ModelSpec(model_name_or_path=path)  # noqa: E731  (the export holds its tokenizer)
    common = dict(preset=variant.preset, initial_policy=folder(init), sft_policy=folder(sft), export_dir=export,
                  sampling=SamplingConfig(max_new_tokens=8, num_samples=args.rm_samples))
    if variant.form == "log_ratio":  # q starts as a trained policy: no weight decay pulling it off its start
        module = RewardModel(form="log_ratio", mle_weight=variant.mle_weight, bias_lr=args.bias_lr,
                             optimizer=OptimizerSpec(lr=args.log_ratio_lr, warmup_steps=20, schedule="cosine"),
                             **common)
    else:
        classifier = folder(sft) if args.rm_init == "sft" else ModelSpec(config=dict(TINY), tokenizer="task:modes",
                                                                         seed=args.seed)
        module = RewardModel(classifier=classifier,
                             optimizer=OptimizerSpec(lr=args.rm_lr, weight_decay=0.01, warmup_steps=20,
                                                     schedule="cosine"), **common)
    data = DemonstrationDataModule(task="modes", num_train=4000, num_val=128, batch_size=32, max_length=32)
    start = time.perf_counter()
    fit = trainer(args.rm_steps, val_every=args.rm_steps)
    fit.fit(module, datamodule=data)
    out = {k: float(v) for k, v in fit.callback_metrics.items() if k.startswith("val/")}
    if variant.form == "log_ratio":
        out.update(scale=float(module.reward_model.scale_value()), bias=float(module.reward_model.bias_value()))
    out["seconds"] = time.perf_counter() - start
    return out


class Variant(NamedTuple):
    """One learned reward model: its preset, form and likelihood weight; ``name`` labels its rows."""

    preset: str
    form: str = "classifier"
    mle_weight: float = 0.0

    @property
    def name(self) -> str:
        if self.form == "classifier":
            return self.preset  # the labels of the earlier tables
        return f"{self.preset} log-ratio" + (" +mle" if self.mle_weight > 0 else "")


def variants(args) -> List[Variant]:
    out = [Variant(p) for p in args.pairings.split(",") if p]
    out += [Variant(p, "log_ratio") for p in args.log_ratio_pairings.split(",") if p]
    if args.mle_weight > 0:
        out += [Variant(p, "log_ratio", args.mle_weight) for p in args.mle_pairings.split(",") if p]
    return out


@torch.no_grad()
def candidates(init: str, sft: str, reward_models: Dict[str, str], args) -> List[Dict]:
    """16 SFT samples per held-out prompt with every reward."""
    task = get_task("modes")
    n = max(NS)
    folder = lambda path: ModelSpec(model_name_or_path=path)  # noqa: E731  (the export holds its tokenizer)
    scorers = {}
    for pairing, path in reward_models.items():
        scorers[pairing] = BestOfN(policy=folder(sft), reward_model=folder(path),
                                   sampling=SamplingConfig(max_new_tokens=8, num_samples=n))
        scorers[pairing].configure_model()
        scorers[pairing].eval()
    best = next(iter(scorers.values()))  # its policy samples; every module scores
    initial = folder(init).build_causal_lm(best.tokenizer).eval()
    vocab_size = best.policy.get_output_embeddings().weight.shape[0]
    prompts = task.prompts(args.prompts, seed=10_000 + args.seed)  # not among the training prompts' seeds
    torch.manual_seed(args.seed)
    rows = []
    for start in range(0, len(prompts), 32):
        chunk = prompts[start : start + 32]
        encoded = left_pad_prompts(best.tokenizer, chunk)
        batch = {"prompt": chunk, "prompt_input_ids": encoded["input_ids"],
                 "prompt_attention_mask": encoded["attention_mask"]}
        rollout = best.rollout(batch, SamplingConfig(max_new_tokens=8, num_samples=n))
        texts = [p for p in chunk for _ in range(n)]
        learned = {k: m.score_rollout(rollout, texts).tolist() for k, m in scorers.items()}
        mask = rollout.loss_mask[:, 1:].float()
        log_sft = rollout.sequence_logprobs.tolist()
        log_init = (token_logprobs(initial, rollout.input_ids, rollout.attention_mask) * mask).sum(-1).tolist()
        string_logp, token_logp, lengths = rollout_expert_logps(task, best.tokenizer, chunk, rollout, n)
        smoothed = smoothed_expert_logp(token_logp, lengths, vocab_size, SMOOTHING).tolist()
        string_logp = string_logp.tolist()
        for i, prompt in enumerate(chunk):
            group = []
            for j in range(i * n, (i + 1) * n):
                response, finished, log_pe = rollout.responses[j], bool(rollout.finished[j]), string_logp[j]
                scores = {"oracle": log_pe, "exact init_sft": log_sft[j] - log_init[j],
                          "exact sft_demo": log_pe - log_sft[j]}
                scores.update({f"learned {k}": v[j] for k, v in learned.items()})
                group.append({"response": response, "finished": finished, "log_pe": log_pe, "scores": scores,
                              "log_sft": log_sft[j], "log_pe_smoothed": smoothed[j],
                              "mode": task.mode_of(prompt, response) if math.isfinite(log_pe) else None})
            rows.append({"prompt": prompt, "candidates": group})
    return rows


def select(rows: List[Dict], n: int, key: str) -> List[Dict]:
    chosen = []
    for row in rows:
        cands = row["candidates"]
        for g in range(0, len(cands), n):
            group = cands[g : g + n]
            chosen.append(max(group, key=lambda c: c["scores"][key]))  # max keeps the first on ties
    return chosen


def summarise(chosen: List[Dict], weights: Dict[str, float], n: int) -> Dict[str, float]:
    valid = [c for c in chosen if math.isfinite(c["log_pe"])]
    sampled, sampled_se = estimate(torch.tensor([c["log_sft"] - c["log_pe_smoothed"] for c in chosen]))
    out = {
        "reverse_kl_bound": math.log(n) - (n - 1) / n + sampled,
        "reverse_kl_se": sampled_se,
        "log_pe_smoothed": sum(c["log_pe_smoothed"] for c in chosen) / len(chosen),
        "valid_log_pe": sum(c["log_pe"] for c in valid) / len(valid) if valid else float("nan"),
        "invalid": 1 - len(valid) / len(chosen),
    }
    for mode in MODES:
        out[mode] = sum(c["mode"] == mode for c in chosen) / len(chosen)
    out["coverage"] = sum(out[m] >= 0.5 * weights[m] for m in MODES) / len(MODES)
    return out


def pearson(xs: List[float], ys: List[float]) -> float:
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def ranks(values: List[float]) -> List[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    for r, i in enumerate(order):
        out[i] = float(r)
    return out


def aggregate(paths: List[str]) -> None:
    """Mean ± sd over seeds (``--json`` files of single runs) of the compact table and the
    learned-vs-exact correlations. Files of one seed are merged (runs of other ``--pairings`` on
    the same seed share the policies and the candidates: everything is seeded)."""
    by_seed: Dict[int, Dict] = {}
    for path in paths:
        with open(path) as handle:
            run = json.load(handle)
        merged = by_seed.setdefault(run["args"]["seed"], {"table": {}, "correlation": {}, "valid_vs_invalid_auroc": {}})
        for part in merged:
            merged[part].update(run[part])
    runs = list(by_seed.values())
    seeds = list(by_seed)
    print(f"{len(runs)} runs (seeds {seeds}); mean ± sd over them")

    def stat(values: List[float], digits: int) -> str:
        mean = sum(values) / len(values)
        sd = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5
        return f"{mean:.{digits}f} ± {sd:.{digits}f}"

    for name in runs[0]["correlation"]:
        print(f"{name}: learned vs exact Pearson {stat([r['correlation'][name]['pearson'] for r in runs], 3)}; "
              f"valid-vs-invalid AUROC {stat([r['valid_vs_invalid_auroc']['learned ' + name] for r in runs], 3)}")
    print("\ninvalid / reverse KL ≤ of the Best-of-N policy:")
    print("| reward | " + " | ".join(f"N={n}" for n in NS) + " |")
    print("|---|" + "---|" * len(NS))
    for key in runs[0]["table"]:
        cells = [f"{stat([r['table'][key][str(n)]['invalid'] for r in runs], 3)} / "
                 f"{stat([r['table'][key][str(n)]['reverse_kl_bound'] for r in runs], 2)}" for n in NS]
        print(f"| {key} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-steps", type=int, default=750, help="SFT policy steps (quickstart: 750)")
    parser.add_argument("--init-steps", type=int, default=30, help="initial (weaker) policy steps")
    parser.add_argument("--rm-steps", type=int, default=400, help="reward model steps")
    parser.add_argument("--pairings", default="init_sft,sft_demo",
                        help="comma-separated reward-model presets to compare (init_sft, sft_demo)")
    parser.add_argument("--rm-init", choices=("scratch", "sft"), default="scratch",
                        help="classifier backbone: a fresh tiny Llama, or the SFT policy's (fresh score head)")
    parser.add_argument("--rm-lr", type=float, default=3e-3, help="reward model peak learning rate")
    parser.add_argument("--rm-samples", type=int, default=2, help="samples per prompt per policy per step")
    parser.add_argument("--log-ratio-pairings", default="init_sft,sft_demo",
                        help="comma-separated presets also trained in the log-ratio form ('' = none)")
    parser.add_argument("--log-ratio-lr", type=float, default=1e-3, help="peak learning rate of the log-ratio q")
    parser.add_argument("--bias-lr", type=float, default=1e-2, help="learning rate of the log-ratio a and b")
    parser.add_argument("--mle-weight", type=float, default=1.0,
                        help="also train the --mle-pairings in the log-ratio form with this x the positive rows' NLL "
                             "under q (0 = none)")
    parser.add_argument("--mle-pairings", default="init_sft,sft_demo",
                        help="comma-separated presets also trained log-ratio + mle ('' = none)")
    parser.add_argument("--prompts", type=int, default=256, help="held-out prompts (16 samples each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1)")
    parser.add_argument("--workdir", default=None, help="keep the exported models here (default: temporary)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--aggregate", nargs="+", default=None, metavar="JSON",
                        help="train nothing: print the mean ± sd over these --json files of earlier runs (seeds)")
    args = parser.parse_args()
    if args.aggregate:
        aggregate(args.aggregate)
        return
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    task = get_task("modes")
    weights = task.mode_weights("")
    workdir = args.workdir or tempfile.mkdtemp(prefix="best_of_n_")
    init, sft = os.path.join(workdir, "init"), os.path.join(workdir, "sft")
    start = time.perf_counter()
    timing = {"init": train_policy(args.init_steps, init, args), "sft": train_policy(args.sft_steps, sft, args)}
    learned = variants(args)
    reward_models, rm_metrics = {}, {}
    for variant in learned:
        name = variant.name
        reward_models[name] = os.path.join(workdir, "reward_model_" + name.replace(" ", "_").replace("+", ""))
        rm_metrics[name] = train_reward_model(variant, init, sft, reward_models[name], args)
        timing[f"rm {name}"] = rm_metrics[name].pop("seconds")
    rows = candidates(init, sft, reward_models, args)
    every = [c for r in rows for c in r["candidates"]]
    presets = sorted({v.preset for v in learned}, key=["init_sft", "sft_demo", "init_demo"].index)
    keys = [f"learned {v.name}" for v in learned] + ["oracle"] + [f"exact {p}" for p in presets]
    table = {key: {n: summarise(select(rows, n, key), weights, n) for n in NS} for key in keys}
    corr = {}
    for variant in learned:
        exact = f"exact {variant.preset}"
        pairs = [(c["scores"][f"learned {variant.name}"], c["scores"][exact]) for c in every
                 if math.isfinite(c["scores"][exact])]
        xs, ys = [a for a, _ in pairs], [b for _, b in pairs]
        corr[variant.name] = {"pearson": pearson(xs, ys), "spearman": pearson(ranks(xs), ranks(ys)), "count": len(xs)}
    valid = [c for c in every if math.isfinite(c["log_pe"])]
    is_valid = torch.tensor([int(math.isfinite(c["log_pe"])) for c in every])
    separation = {key: float(binary_auroc(torch.tensor([c["scores"][key] for c in every]).nan_to_num(
        neginf=-1e9), is_valid)) for key in keys}
    timing["total"] = time.perf_counter() - start

    print(f"\nmodes task, {args.prompts} held-out prompts x 16 SFT samples ({len(valid) / len(every):.3f} valid); "
          f"initial = SFT after {args.init_steps} steps, SFT = {args.sft_steps} steps; reward models: "
          f"{args.rm_steps} steps, classifier {args.rm_init} (lr {args.rm_lr:g}), log-ratio q lr "
          f"{args.log_ratio_lr:g}, a/b lr {args.bias_lr:g}; seed {args.seed}")
    for name, c in corr.items():
        print(f"{name}: held-out " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(rm_metrics[name].items()))
              + f"; learned vs exact target over {c['count']} candidates with a finite target: "
              f"Pearson {c['pearson']:.3f}, Spearman {c['spearman']:.3f}")
    print("how well each reward ranks the SFT's valid samples above its invalid ones (AUROC over all "
          "candidates): " + ", ".join(f"{k} {v:.3f}" for k, v in separation.items()))
    print(f"\nreverse KL ≤: bound on KL(π_N ‖ p̃_E), smoothing ε = {SMOOTHING:g} (exact at N = 1)")
    print("| reward | N | reverse KL ≤ | ± se | log p̃_E | valid log p_E | invalid | copy | rev | sort "
          "| coverage |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, by_n in table.items():
        for n, m in by_n.items():
            print(f"| {key} | {n} | {m['reverse_kl_bound']:.3f} | {m['reverse_kl_se']:.3f} | "
                  f"{m['log_pe_smoothed']:.3f} | {m['valid_log_pe']:.3f} | {m['invalid']:.3f} | "
                  f"{m['copy']:.3f} | {m['reverse']:.3f} | {m['sort']:.3f} | {m['coverage']:.2f} |")
    print("\ninvalid / reverse KL ≤ of the Best-of-N policy (the README's table):")
    print("| reward | " + " | ".join(f"N={n}" for n in NS) + " |")
    print("|---|" + "---|" * len(NS))
    for key, by_n in table.items():
        print(f"| {key} | " + " | ".join(f"{m['invalid']:.3f} / {m['reverse_kl_bound']:.2f}" for m in by_n.values())
              + " |")
    print(f"\nexpert mode weights: copy {weights['copy']:.1f}, reverse {weights['reverse']:.1f}, "
          f"sort {weights['sort']:.1f}; seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items()))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "reward_models": rm_metrics, "correlation": corr, "timing": timing,
                       "valid_vs_invalid_auroc": separation,
                       "table": {k: {str(n): m for n, m in v.items()} for k, v in table.items()}}, handle, indent=1)

if __name__ == "__main__":
    main()
