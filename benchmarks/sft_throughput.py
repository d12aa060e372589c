"""SFT throughput: ``lightning_irl`` SFT vs a plain PyTorch loop vs TRL's SFTTrainer, side by side.

    HF_HUB_OFFLINE=1 python benchmarks/sft_throughput.py                         # ~5 min, 2 CPU cores
    HF_HUB_OFFLINE=1 python benchmarks/sft_throughput.py --precision bf16-mixed   # the reported runs used --repeats 5 (fp32) / 3 (bf16)
    HF_HUB_OFFLINE=1 python benchmarks/sft_throughput.py --skip-trl              # without the bench extra

TRL is benchmark-only: ``pip install -e ".[bench]"`` (pins ``trl==1.16.0``).

Same model (a ~5M-parameter Llama from ``_scale_common.SMALL_LLAMA``, seed 0), same data (a
synthetic prompt/response JSONL with a 4096-word vocabulary and log-uniform lengths 16-128
tokens), same batch size, learning rate, AdamW, gradient clipping at 1.0, precision, and dynamic
padding to the longest example of each batch; loss on response tokens only in all three.

Measured: non-pad tokens per second over ``--steps`` steps after ``--warmup`` steps, wall time
including data loading, optimizer and every hook; and the same per second of the process's CPU
time (steadier on a shared machine: time spent descheduled does not count). The three run one after another inside one
process, ``--repeats`` rounds in rotating order; each ratio is the median over rounds of the
ratio within a round. Absolute numbers depend on the machine; only the ratios are the result.

Targets: lightning_irl / plain PyTorch >= 0.95; lightning_irl / TRL >= 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _scale_common import set_threads, SMALL_LLAMA, StepTimer, make_dataset, median, quiet_trainer  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_irl.algorithms import SFT, OptimizerSpec  # noqa: E402
from lightning_irl.data import DemonstrationDataModule  # noqa: E402
from lightning_irl.data.collate import DemonstrationCollator  # noqa: E402
from lightning_irl.models.spec import ModelSpec  # noqa: E402

LR = 1e-4


def spec_for(ds) -> ModelSpec:
    return ModelSpec(config=dict(SMALL_LLAMA), tokenizer=ds["tokenizer"], seed=0)


def data_module(ds, args) -> DemonstrationDataModule:
    return DemonstrationDataModule(train_file=ds["train_file"], batch_size=args.batch_size, max_length=args.max_length,
                                   shuffle=False)


def run_lightning_irl(ds, args) -> Dict[str, float]:
    L.seed_everything(0)
    module = SFT(policy=spec_for(ds), optimizer=OptimizerSpec(lr=LR, schedule="constant_with_warmup"),
                 max_grad_norm=1.0, export=False)
    timer = StepTimer(args.warmup)
    trainer = quiet_trainer(max_steps=args.warmup + args.steps, precision=args.precision, callbacks=[timer])
    trainer.fit(module, datamodule=data_module(ds, args))
    return {"tokens_per_sec": timer.tokens_per_sec, "tokens_per_cpu_sec": timer.tokens_per_cpu_sec}


def run_plain(ds, args) -> Dict[str, float]:
    """The loop one would write by hand: HF model, DataLoader, masked CE, AdamW, clip, step."""
    torch.manual_seed(0)
    spec = spec_for(ds)
    tokenizer = spec.load_tokenizer()
    model = spec.build_causal_lm(tokenizer).train()
    data = data_module(ds, args)
    data.set_tokenizer(tokenizer)
    data.setup("fit")
    loader = torch.utils.data.DataLoader(data.datasets["train"], batch_size=args.batch_size, shuffle=False,
                                         collate_fn=DemonstrationCollator(tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    tokens = 0
    start = cpu_start = None
    for step, batch in enumerate(loader):
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        targets = batch["input_ids"][:, 1:].masked_fill(batch["loss_mask"][:, 1:] == 0, -100)
        n_tokens = (targets != -100).sum().clamp(min=1)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100, reduction="sum") / n_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step + 1 == args.warmup:
            start, cpu_start = time.perf_counter(), time.process_time()
        elif step + 1 > args.warmup:
            tokens += int(batch["attention_mask"].sum())
        if step + 1 == args.warmup + args.steps:
            break
    return {"tokens_per_sec": tokens / (time.perf_counter() - start),
            "tokens_per_cpu_sec": tokens / (time.process_time() - cpu_start)}


def run_trl(ds, args) -> Dict[str, float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    spec = spec_for(ds)
    tokenizer = spec.load_tokenizer()
    model = spec.build_causal_lm(tokenizer)
    rows = [json.loads(line) for line in open(ds["train_file"])]
    # TRL tokenizes prompt + completion as one text: the leading space keeps the word boundary.
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": " " + r["response"]} for r in rows])
    out = tempfile.mkdtemp(prefix="trl_bench_")
    config = SFTConfig(
        output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", bf16=args.precision == "bf16-mixed", use_cpu=True, save_strategy="no",
        logging_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=0,
        max_length=args.max_length, packing=False, padding_free=False, completion_only_loss=True,
    )
    counts: List[int] = []
    times: List[float] = []
    cpu_times: List[float] = []

    class Count:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, features):
            batch = self.inner(features)
            counts.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch
                          else int((batch["input_ids"] != tokenizer.pad_token_id).sum()))
            return batch

    class Clock(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs):
            times.append(time.perf_counter())
            cpu_times.append(time.process_time())

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Clock()])
    # the same batches as the other two: file order instead of the Trainer's random sampler
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.data_collator = Count(trainer.data_collator)
    trainer.train()
    # step i consumed batch i (no accumulation); the loader may have collated one batch ahead
    measured = sum(counts[args.warmup : args.warmup + args.steps])
    last, first = args.warmup + args.steps - 1, args.warmup - 1
    return {"tokens_per_sec": measured / (times[last] - times[first]),
            "tokens_per_cpu_sec": measured / (cpu_times[last] - cpu_times[first])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see _scale_common.set_threads)")
    args = parser.parse_args()
    set_threads(args.threads)

    ds = make_dataset(tempfile.mkdtemp(prefix="sft_bench_"), n=args.batch_size * (args.warmup + args.steps) + 8,
                      max_len=args.max_length)
    runners = {"lightning_irl": run_lightning_irl, "plain_pytorch": run_plain}
    if not args.skip_trl:
        import trl

        assert trl.__version__ == "1.16.0", f"the benchmark pins trl==1.16.0, found {trl.__version__}"
        runners["trl_sfttrainer"] = run_trl
    names = list(runners)
    rounds: List[Dict[str, Dict[str, float]]] = []
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        result = {}
        for name in order:
            result[name] = runners[name](ds, args)
        rounds.append(result)
        print(f"round {r}: " + ", ".join(f"{n} {result[n]['tokens_per_sec']:.0f} tok/s "
                                          f"({result[n]['tokens_per_cpu_sec']:.0f} per CPU-s)" for n in names), flush=True)
    print(f"\nSFT non-pad tokens/s, precision {args.precision}, batch {args.batch_size}, "
          f"{args.steps} steps after {args.warmup} warmup, {args.repeats} rounds, torch threads {torch.get_num_threads()}")
    for name in names:
        print(f"  {name:16s} median {median([r[name]['tokens_per_sec'] for r in rounds]):8.0f} tok/s wall, "
              f"{median([r[name]['tokens_per_cpu_sec'] for r in rounds]):8.0f} tok/CPU-s")
    targets = {"plain_pytorch": 0.95, "trl_sfttrainer": 1.2}
    for other in names[1:]:
        wall = median([r["lightning_irl"]["tokens_per_sec"] / r[other]["tokens_per_sec"] for r in rounds])
        cpu = median([r["lightning_irl"]["tokens_per_cpu_sec"] / r[other]["tokens_per_cpu_sec"] for r in rounds])
        print(f"  lightning_irl / {other} = {wall:.3f} (wall), {cpu:.3f} (CPU time)   target >= {targets[other]}")


if __name__ == "__main__":
    main()
