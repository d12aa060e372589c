"""SFT throughput: ``lightning_irl`` SFT vs a plain PyTorch loop vs TRL's SFTTrainer, side by side.

    HF_HUB_OFFLINE=1 python benchmarks/sft_throughput.py                        # 5M, fp32, 128 tokens
    HF_HUB_OFFLINE=1 python benchmarks/sft_throughput.py --precision bf16-mixed --json sft_5M_bf16.json
    HF_HUB_OFFLINE=1 python benchmarks/sft_throughput.py --size 30M --max-length 128
    HF_HUB_OFFLINE=1 python benchmarks/sft_throughput.py --skip-trl             # without the bench extra
    python benchmarks/sft_throughput.py --rounds 1 --steps 3 --warmup 1         # smoke run (< 1 min)

Run times on 2 shared CPU cores, defaults (5 rounds x 3 contenders x 33 steps): 84K ~1 min, 1M
~3 min, 5M ~6 min, 30M ~15 min (fp32; bf16-mixed on CPU is slower per step). The real numbers:
see benchmarks/README.md.

TRL is benchmark-only: ``pip install -e ".[bench]"`` (pins ``trl==1.16.0``).

The same for all three:

- model: a Llama of ``--size`` (``_scale_common.SIZES``: 84K = the quickstart's shape, 1M, 5M,
  30M), built from its config with seed 0, the same attention kernel (``ModelSpec.build_causal_lm``);
- data: a synthetic prompt/response JSONL (word-level vocabulary of the size's ``vocab`` ids,
  lengths log-uniform in [``--max-length``/4, ``--max-length``] tokens, 30 % prompt), in file
  order (no shuffling: every contender sees the same batches), dynamic padding to the longest
  example of each batch, truncation at ``--max-length``;
- loss on response tokens only (TRL: ``completion_only_loss=True``), mean over the batch's
  response tokens;
- torch's fused AdamW (the default of lightning_irl and of transformers' Trainer with torch >=
  2.8; the plain loop asks for it), lr 1e-4 constant, weight decay 0, gradient clipping at 1.0, ``--precision``
  (``32-true`` or ``bf16-mixed``: autocast to bfloat16, fp32 weights), batch ``--batch-size``;
- no evaluation, no checkpoint, no logger, no progress bar.

TRL is configured as a user who wants speed would run it: ``gradient_checkpointing=False``
(SFTConfig's default is True, which recomputes every activation in backward: ~30 % slower and
not what the other two do), ``bf16`` set explicitly (its default is True), ``save_strategy`` /
``eval_strategy`` / ``logging_strategy`` "no", ``report_to`` none, no tqdm. What TRL 1.16 always
does in its step (its fused LM head, the entropy / token-accuracy metrics) stays: that is its
shipped training step. Only its sampler is replaced, by the file order.

Timing: each contender's clock starts at the end of its last warm-up step (``--warmup`` >= 3:
compilation, allocator, first-batch effects) and stops at the end of its last timed step
(``--steps`` >= 30), so it includes data loading, the optimizer and every hook; units are the
non-pad tokens of the timed batches (the JSON lists each contender's count: they match). Wall and
process-CPU time (steadier on a shared machine: time descheduled does not count). The three run
one after another in this process, ``--rounds`` >= 5 rounds in rotating order; the ratio of
``lightning_irl`` to each other contender is taken within a round and printed as median
(min-max) over rounds (``_bench.py``). Absolute numbers depend on the machine; the ratios are the
result. One torch thread by default (``--threads``): see ``_scale_common.set_threads``.

Targets (issue "[speed]"): lightning_irl / plain PyTorch >= 0.98; lightning_irl / TRL >= 1.3,
at every size, fp32 and bf16-mixed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench import Clock, Timing, report, run_rounds  # noqa: E402
from _scale_common import (  # noqa: E402
    SIZES,
    StepTimer,
    batch_size_for,
    count_params,
    make_dataset,
    min_length_for,
    quiet_trainer,
    set_threads,
    size_config,
    thread_info,
)

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_irl.algorithms import SFT, OptimizerSpec  # noqa: E402
from lightning_irl.data import DemonstrationDataModule  # noqa: E402
from lightning_irl.data.collate import DemonstrationCollator  # noqa: E402
from lightning_irl.models.spec import ModelSpec  # noqa: E402

LR = 1e-4
TARGETS = {"plain_pytorch": 0.98, "trl_sfttrainer": 1.3}
TRL_VERSION = "1.16.0"


@dataclass
class Settings:
    size: str = "5M"
    max_length: int = 128
    batch_size: int = 8
    precision: str = "32-true"
    warmup: int = 3
    steps: int = 30

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


def prepare(settings: Settings, folder: Optional[str] = None) -> Dict:
    """The synthetic data of ``settings`` (enough examples for every step, no epoch boundary)."""
    folder = folder or tempfile.mkdtemp(prefix="sft_bench_")
    n = settings.batch_size * (settings.total_steps + 2)
    return make_dataset(folder, n=n, min_len=min_length_for(settings.max_length), max_len=settings.max_length,
                        vocab=SIZES[settings.size]["vocab"])


def spec_for(ds: Dict, settings: Settings) -> ModelSpec:
    return ModelSpec(config=size_config(settings.size, settings.max_length), tokenizer=ds["tokenizer"], seed=0)


def data_module(ds: Dict, settings: Settings) -> DemonstrationDataModule:
    return DemonstrationDataModule(train_file=ds["train_file"], batch_size=settings.batch_size,
                                   max_length=settings.max_length, shuffle=False)


def run_lightning_irl(ds: Dict, settings: Settings) -> Timing:
    L.seed_everything(0, verbose=False)
    module = SFT(policy=spec_for(ds, settings), optimizer=OptimizerSpec(lr=LR, schedule="constant"),
                 max_grad_norm=1.0, export=False)
    timer = StepTimer(settings.warmup)
    trainer = quiet_trainer(max_steps=settings.total_steps, precision=settings.precision, callbacks=[timer])
    trainer.fit(module, datamodule=data_module(ds, settings))
    assert timer.steps == settings.steps, f"lightning_irl ran {timer.steps} timed steps, not {settings.steps}"
    return Timing(timer.tokens, timer.end - timer.start, timer.cpu_end - timer.cpu_start)


def run_plain(ds: Dict, settings: Settings) -> Timing:
    """The loop one would write by hand: HF model, DataLoader, masked CE, AdamW, clip, step."""
    torch.manual_seed(0)
    spec = spec_for(ds, settings)
    tokenizer = spec.load_tokenizer()
    model = spec.build_causal_lm(tokenizer).train()
    data = data_module(ds, settings)
    data.set_tokenizer(tokenizer)
    data.setup("fit")
    loader = torch.utils.data.DataLoader(data.datasets["train"], batch_size=settings.batch_size, shuffle=False,
                                         collate_fn=DemonstrationCollator(tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.precision == "bf16-mixed")
    clock = Clock()
    tokens = steps = 0
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
        if step + 1 == settings.warmup:
            clock.start()
        elif step + 1 > settings.warmup:
            tokens += int(batch["attention_mask"].sum())
            steps += 1
        if step + 1 == settings.total_steps:
            break
    timing = clock.stop(tokens)
    assert steps == settings.steps, f"plain loop ran {steps} timed steps, not {settings.steps}"
    return timing


def run_trl(ds: Dict, settings: Settings) -> Timing:
    import dataclasses

    import datasets
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name is a
    # deprecated alias, mirrored from the new one): turn off the one this version reads
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    no_checkpointing = ({"activation_checkpointing": False} if "activation_checkpointing" in fields
                        else {"gradient_checkpointing": False})

    torch.manual_seed(0)
    spec = spec_for(ds, settings)
    tokenizer = spec.load_tokenizer()
    model = spec.build_causal_lm(tokenizer)
    with open(ds["train_file"]) as handle:
        rows = [json.loads(line) for line in handle]
    # TRL tokenizes prompt + completion as one text: the leading space keeps the word boundary.
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": " " + r["response"]} for r in rows])
    out = tempfile.mkdtemp(prefix="trl_bench_")
    config = SFTConfig(
        output_dir=out, per_device_train_batch_size=settings.batch_size, max_steps=settings.total_steps,
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused",
        bf16=settings.precision == "bf16-mixed", fp16=False, use_cpu=True,
        **no_checkpointing,  # SFTConfig's default is True; the other two do not recompute activations
        save_strategy="no", eval_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, seed=0, max_length=settings.max_length, packing=False, padding_free=False,
        completion_only_loss=True,
    )
    counts: List[int] = []
    clock = Clock()
    state: Dict[str, Timing] = {}
    steps_done = [0]

    class Count:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, features):
            batch = self.inner(features)
            counts.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch
                          else int((batch["input_ids"] != tokenizer.pad_token_id).sum()))
            return batch

    class StepClock(TrainerCallback):
        def on_step_end(self, args_, trainer_state, control, **kwargs):
            steps_done[0] += 1
            if steps_done[0] == settings.warmup:
                clock.start()
            elif steps_done[0] == settings.total_steps:
                # step i consumed batch i (no accumulation); the loader may collate one batch ahead
                state["timing"] = clock.stop(sum(counts[settings.warmup:settings.total_steps]))

    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[StepClock()])
    trainer.remove_callback(PrinterCallback)  # the end-of-training metrics line (after the clock stops)
    assert not trainer.args.gradient_checkpointing
    # the same batches as the other two: file order instead of the Trainer's random sampler
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.data_collator = Count(trainer.data_collator)
    trainer.train()
    checkpointing = ("is_activation_checkpointing" if hasattr(type(trainer.model), "is_activation_checkpointing")
                     else "is_gradient_checkpointing")
    assert not getattr(trainer.model, checkpointing, False), "TRL turned activation checkpointing on"
    assert "timing" in state, f"TRL ran {steps_done[0]} steps, not {settings.total_steps}"
    return state["timing"]


RUNNERS: Dict[str, Callable[[Dict, Settings], Timing]] = {
    "lightning_irl": run_lightning_irl,
    "plain_pytorch": run_plain,
    "trl_sfttrainer": run_trl,
}


def check_trl() -> None:
    import trl

    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"the benchmark pins trl=={TRL_VERSION} (pip install -e '.[bench]'), found {trl.__version__}")


def compare(settings: Settings, rounds: int = 5, trl: bool = True, json_path: Optional[str] = None,
            log: bool = True) -> Dict:
    """``rounds`` interleaved rounds of the three (two without ``trl``) on ``settings``; prints the
    report and returns ``_bench.report``'s dict (plus ``params`` and ``threads`` in its settings)."""
    if trl:
        check_trl()
    ds = prepare(settings)
    names = [n for n in RUNNERS if trl or n != "trl_sfttrainer"]
    threads = torch.get_num_threads()

    def runner(name: str) -> Callable[[], Timing]:
        def run() -> Timing:
            timing = RUNNERS[name](ds, settings)
            if torch.get_num_threads() != threads:  # a library changed it: put it back, say so
                print(f"  note: {name} left torch at {torch.get_num_threads()} threads; reset to {threads}")
                torch.set_num_threads(threads)
            return timing
        return run

    params = count_params(SIZES[settings.size]["config"], SIZES[settings.size]["vocab"])
    if log:
        print(f"SFT {settings.size} ({params / 1e6:.2f}M parameters), max_length {settings.max_length}, "
              f"batch {settings.batch_size}, {settings.precision}, {settings.steps} timed steps after "
              f"{settings.warmup} warm-up, {rounds} rounds, {thread_info()}", flush=True)
    results = run_rounds({name: runner(name) for name in names}, rounds, log=log)
    units = {name: {r[name].units for r in results} for name in names}
    if len({u for s in units.values() for u in s}) > 1:
        print(f"  WARNING: the contenders counted different token totals: {units}")
    title = f"SFT {settings.size} L{settings.max_length} {settings.precision}"
    return report(title, results, "lightning_irl", "non-pad tokens",
                  {**asdict(settings), "rounds": rounds, "params": params, "threads": threads,
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
                  json_path=json_path, targets={k: v for k, v in TARGETS.items() if k in names})


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="5M", choices=list(SIZES))
    parser.add_argument("--max-length", type=int, default=128, help="sequence length (examples: [L/4, L] tokens)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the size's batch at 128 tokens x 128 / max-length (_scale_common.SIZES)")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)  # the old name of --rounds
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see _scale_common.set_threads)")
    parser.add_argument("--json", default=None, help="write the rounds, rates and ratios to this file")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the clock starts at the end of the last warm-up step)")
    settings = Settings(size=args.size, max_length=args.max_length,
                        batch_size=args.batch_size or batch_size_for(args.size, args.max_length),
                        precision=args.precision, warmup=args.warmup, steps=args.steps)
    rounds = args.repeats if args.repeats is not None else args.rounds
    if args.warmup < 3 or args.steps < 30 or rounds < 5:
        print(f"note: {args.warmup} warm-up / {args.steps} steps / {rounds} rounds is below the benchmark rules "
              "(>= 3 / >= 30 / >= 5): a smoke run, not a result")
    started = time.perf_counter()
    compare(settings, rounds=rounds, trl=not args.skip_trl, json_path=args.json)
    print(f"  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
