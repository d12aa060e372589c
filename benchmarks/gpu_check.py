"""GPU check: short bf16 runs of SFT and AIRL on one CUDA GPU, plain and under the FSDP1, DeepSpeed
and FSDP2 strategy configs, with tokens/s and peak GPU memory in one summary table.

    bash benchmarks/gpu_check.sh                        # everything, <= 8 min on one H200
    bash benchmarks/gpu_check.sh --json gpu_check.json  # and the table as JSON
    bash benchmarks/gpu_check.sh --dry-run              # print the commands, run nothing (works without a GPU)
    bash benchmarks/gpu_check.sh --only sft,fsdp2       # some rows

Without CUDA (``torch.cuda.is_available()`` is False) it stops at once: one line on stderr, exit 3.

Rows (each its own subprocess, under ``--row-timeout`` seconds; rows that would start after the
``--budget`` is spent are skipped):

- ``sft``:       ``configs/quickstart.yaml`` (SFT), bf16-mixed, 1 GPU, no strategy config;
- ``airl``:      ``configs/airl.yaml`` (AIRL, log-ratio discriminator, RLOO), bf16-mixed, 1 GPU,
                 discriminator warm-up cut to 2 batches so the timed steps are full AIRL steps;
- ``fsdp1``:     SFT + ``configs/strategies/fsdp.yaml`` (FSDP1, FULL_SHARD) on 1 GPU;
- ``deepspeed``: SFT + ``configs/strategies/deepspeed.yaml`` (ZeRO-2) on 1 GPU, when
                 ``import deepspeed`` works (else the row says "not installed");
- ``fsdp2``:     SFT + ``configs/strategies/fsdp2.yaml`` (FSDP2) on 1 GPU.

Every row goes through the ``lightning_irl`` command line's own parser (``cli.build_cli``: the
YAML files above plus overrides, exactly what ``lightning_irl fit --config ...`` builds; ``--dry-run``
prints that command) with the model and data swapped for the ``--size`` Llama (default 30M,
``_scale_common.SIZES``) and a synthetic prompt/response file (``make_dataset``: vocabulary of the
size, lengths log-uniform in [``--max-length``/4, ``--max-length``]), ``--steps`` timed steps after
``--warmup``; no logger, no validation; the run's final checkpoint and export are written (to a
temporary folder), so a strategy's save path is exercised too (not timed).

Columns: status; steps timed; tokens/s = non-pad tokens of the training batches per second from
the end of the last warm-up step to the end of the last step (``torch.cuda.synchronize`` at both
ends; for AIRL the demonstration batch's tokens, as ``perf/tokens_per_sec`` logs them); s/step;
peak MiB = ``torch.cuda.max_memory_allocated``; wall s = the whole subprocess (imports, build,
steps, save).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

ROWS = ["sft", "airl", "fsdp1", "deepspeed", "fsdp2"]
NO_CUDA_EXIT = 3


def cuda_or_exit() -> None:
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU (torch {torch.__version__}: torch.cuda.is_available() is False); "
              "run it on a GPU machine", file=sys.stderr)
        sys.exit(NO_CUDA_EXIT)


def deepspeed_missing() -> Optional[str]:
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # ImportError, or a broken install (CUDA toolkit mismatch, ...)
        return f"not installed ({type(err).__name__})"
    return None


# ---- the rows -------------------------------------------------------------------------------------------
def cli_args(row: str, args, data: Dict, folder: str) -> List[str]:
    """The ``lightning_irl fit`` arguments of ``row`` (without ``fit``)."""
    from _scale_common import size_config

    sft = ["--config", "configs/quickstart.yaml"]
    strategy = {"fsdp1": "configs/strategies/fsdp.yaml", "deepspeed": "configs/strategies/deepspeed.yaml",
                "fsdp2": "configs/strategies/fsdp2.yaml"}
    base = ["--config", "configs/airl.yaml"] if row == "airl" else sft
    if row in strategy:
        base += ["--config", strategy[row]]
    config = size_config(args.size, args.max_length)
    batch = args.airl_batch_size if row == "airl" else args.batch_size
    overrides = [
        "--trainer.accelerator", args.accelerator, "--trainer.devices", "1",
        "--trainer.precision", args.precision,
        "--trainer.max_steps", str(args.warmup + args.steps), "--trainer.max_epochs", "-1",
        "--trainer.logger", "false", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.init_args.policy.config", json.dumps(config),
        "--model.init_args.policy.tokenizer", data["tokenizer"],
        "--data.init_args.task", "null", "--data.init_args.train_file", data["train_file"],
        "--data.init_args.max_length", str(args.max_length), "--data.init_args.batch_size", str(batch),
        "--data.init_args.shuffle", "false",
        "--checkpoint.dirpath", os.path.join(folder, "checkpoints"),
        "--trainer.default_root_dir", folder,  # config.yaml (no logger) goes here, not into the repository
    ]
    if row == "airl":
        overrides += ["--model.init_args.discriminator_training.warmup_steps", "2",
                      "--model.init_args.sampling.max_new_tokens", str(args.max_new_tokens)]
    return base + overrides


def shell_line(row: str, argv: List[str]) -> str:
    return "lightning_irl fit " + " ".join(shlex.quote(a) for a in argv)


def parse_check(argv: List[str], env: Dict[str, str]) -> str:
    """``lightning_irl fit <argv> --print_config`` in a subprocess: the YAML files and overrides
    parse (nothing is built, so it works without a GPU)."""
    code = "import sys; from lightning_irl.cli import main; main(sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, "fit", *argv, "--print_config"], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    if proc.returncode == 0:
        return "ok"
    return f"FAIL (exit {proc.returncode}): {(proc.stderr.strip().splitlines() or [''])[-1][:200]}"


# ---- the worker (one row, in its own process) ------------------------------------------------------------
def worker(spec: Dict) -> Dict:
    import lightning as L
    import torch

    from lightning_irl.cli import build_cli

    cuda = spec["accelerator"] != "cpu"

    class Timer(L.Callback):
        def __init__(self, warmup: int) -> None:
            self.warmup, self.tokens, self.steps = warmup, 0, 0
            self.start = self.end = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            tokens = int(batch["attention_mask"].sum())  # a sync on GPU, like count_tokens'
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            if batch_idx + 1 == self.warmup:
                self.start = now
            elif batch_idx + 1 > self.warmup:
                self.tokens += tokens
                self.steps += 1
                self.end = now

    started = time.perf_counter()
    result: Dict = {"status": "ok"}
    timer = Timer(spec["warmup"])
    try:
        cli = build_cli(args=spec["argv"], run=False)
        cli.trainer.callbacks.append(timer)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except BaseException as err:  # noqa: BLE001 — reported in the table
        traceback.print_exc()
        where = "after the timed steps (save/export)" if timer.steps == spec["steps"] else "during the run"
        result["status"] = f"FAIL {where}: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    result["steps"] = timer.steps
    if timer.steps and timer.end is not None and timer.start is not None:
        elapsed = timer.end - timer.start
        result["tokens_per_sec"] = timer.tokens / elapsed
        result["sec_per_step"] = elapsed / timer.steps
    if cuda:
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["device"] = torch.cuda.get_device_name(0)
    result["run_s"] = time.perf_counter() - started  # build + steps + save, without the imports
    if result["status"] == "ok" and timer.steps != spec["steps"]:
        result["status"] = f"FAIL: {timer.steps} timed steps, not {spec['steps']}"
    return result


# ---- the driver ------------------------------------------------------------------------------------------
def fmt_row(name: str, r: Dict) -> List[str]:
    def num(key: str, pattern: str) -> str:
        return pattern.format(r[key]) if r.get(key) is not None else "-"

    return [name, r.get("status", "?"), str(r.get("steps", "-")), num("tokens_per_sec", "{:.0f}"),
            num("sec_per_step", "{:.3f}"), num("peak_mib", "{:.0f}"), num("wall_s", "{:.1f}")]


def print_table(results: Dict[str, Dict]) -> None:
    head = ["name", "status", "steps", "tokens/s", "s/step", "peak MiB", "wall s"]
    rows = [head] + [fmt_row(name, r) for name, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    widths[1] = min(widths[1], 60)
    for k, row in enumerate(rows):
        print("  ".join(cell[:60].ljust(w) if i == 1 else cell.rjust(w) if i > 1 else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--size", default="30M", help="model size (_scale_common.SIZES)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="SFT batch")
    parser.add_argument("--airl-batch-size", type=int, default=16, help="AIRL prompts per batch (x num_samples 4)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="AIRL rollout length")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--row-timeout", type=float, default=120.0, help="seconds per row")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all rows; later rows are skipped")
    parser.add_argument("--out-dir", default=None, help="data, checkpoints and one log per row (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the table as JSON here")
    parser.add_argument("--dry-run", action="store_true", help="print each row's command; run nothing")
    parser.add_argument("--cpu-test", action="store_true",
                        help="test the assembly on CPU: 84K model, 3 steps, the rows CPU can run (not a GPU check)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one row, in its own process: RESULT <json> on the last line
        with open(args.worker) as handle:
            spec = json.load(handle)
        os.chdir(ROOT)
        print("RESULT " + json.dumps(worker(spec)), flush=True)
        return 0

    rows = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"--only: unknown rows {unknown}; choose from {ROWS}")
    if args.cpu_test:
        args.accelerator, args.size, args.warmup, args.steps, args.max_length = "cpu", "84K", 1, 3, 64
        args.batch_size, args.airl_batch_size, args.max_new_tokens, args.precision = 4, 2, 4, "bf16-mixed"
    else:
        args.accelerator = "gpu"
        if not args.dry_run:
            cuda_or_exit()

    from _scale_common import SIZES, count_params, make_dataset, min_length_for

    if args.size not in SIZES:
        parser.error(f"--size: choose from {list(SIZES)}")
    folder = os.path.abspath(args.out_dir or tempfile.mkdtemp(prefix="gpu_check_"))
    os.makedirs(folder, exist_ok=True)
    n = max(args.batch_size, args.airl_batch_size) * (args.warmup + args.steps + 2)
    data = make_dataset(os.path.join(folder, "data"), n=n, min_len=min_length_for(args.max_length),
                        max_len=args.max_length, vocab=SIZES[args.size]["vocab"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "LIGHTNING_IRL_LOG": os.environ.get("LIGHTNING_IRL_LOG", "WARNING")}
    params = count_params(SIZES[args.size]["config"], SIZES[args.size]["vocab"])

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    print(f"gpu_check: {device}; torch {torch.__version__} (CUDA {torch.version.cuda}); model {args.size} "
          f"({params / 1e6:.1f}M parameters), max_length {args.max_length}, {args.precision}, "
          f"{args.warmup} warm-up + {args.steps} timed steps per row; logs in {folder}", flush=True)

    results: Dict[str, Dict] = {}
    started = time.perf_counter()
    for row in rows:
        row_dir = os.path.join(folder, row)
        argv_row = cli_args(row, args, data, row_dir)
        if args.dry_run:
            print(f"\n[{row}]\n  {shell_line(row, argv_row)}\n  parses: {parse_check(argv_row, env)}", flush=True)
            continue
        if row == "deepspeed" and (missing := deepspeed_missing()):
            results[row] = {"status": missing}
            continue
        if args.cpu_test and row in ("fsdp1", "deepspeed"):
            results[row] = {"status": "skipped (GPU only)"}
            continue
        left = args.budget - (time.perf_counter() - started)
        if left < 30:
            results[row] = {"status": f"skipped (time budget {args.budget:.0f} s spent)"}
            continue
        timeout = min(args.row_timeout, left)
        os.makedirs(row_dir, exist_ok=True)
        spec_path = os.path.join(row_dir, "spec.json")
        with open(spec_path, "w") as handle:
            json.dump({"argv": argv_row, "warmup": args.warmup, "steps": args.steps,
                       "accelerator": args.accelerator}, handle)
        log_path = os.path.join(row_dir, "log.txt")
        print(f"[{row}] running (timeout {timeout:.0f} s) ...", flush=True)
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec_path],
                                      stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
        with open(log_path) as log:
            lines = log.read().splitlines()
        found = [line for line in lines if line.startswith("RESULT ")]
        if code is None:
            result = {"status": f"TIMEOUT after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
        elif found:
            result = json.loads(found[-1][len("RESULT "):])
            result["wall_s"] = time.perf_counter() - t0  # the whole subprocess, imports included
        else:
            result = {"status": f"FAIL: exit {code}, no result", "wall_s": time.perf_counter() - t0}
        results[row] = result
        print(f"[{row}] {result['status']}" + (f": {result['tokens_per_sec']:.0f} tokens/s"
                                               if result.get("tokens_per_sec") else ""), flush=True)
        if result["status"] != "ok":
            print("    " + "\n    ".join(lines[-15:]) + f"\n    (full log: {log_path})", flush=True)
    if args.dry_run:
        print(f"\n(dry run: data in {folder}; each row runs as "
              f"`python {os.path.relpath(__file__, ROOT)} --worker <row>/spec.json`)")
        return 0

    print(f"\nGPU check summary ({device}, {args.size} model, {args.precision}, "
          f"{time.perf_counter() - started:.0f} s):\n")
    print_table(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device, "torch": torch.__version__, "size": args.size, "params": params,
                       "settings": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": results},
                      handle, indent=1)
        print(f"-> {args.json}")
    failed = [name for name, r in results.items()
              if r["status"].startswith(("FAIL", "TIMEOUT"))]
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
