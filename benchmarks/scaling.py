"""Scaling table: ``lightning_irl`` tokens/s by model size and by sequence length, with the ratio to a
plain PyTorch loop and to TRL in every cell (SFT; AIRL columns when ``adversarial_vs_trl.py`` provides them).

    HF_HUB_OFFLINE=1 python benchmarks/scaling.py --json scaling_fp32.json      # ~45-60 min on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/scaling.py --precision bf16-mixed --json scaling_bf16.json
    python benchmarks/scaling.py --rounds 1 --steps 3 --warmup 1 --sizes 84K 1M --lengths 64 128  # smoke run, ~2 min

Two sweeps, each cell one ``sft_throughput.compare`` (same rules: same model, data, batches,
optimizer, clipping and precision for all three; TRL without gradient checkpointing; ``--warmup``
warm-up steps, ``--steps`` timed steps, ``--rounds`` interleaved rounds; ratios within a round,
median (min-max) over rounds, wall and process-CPU time):

- by size: ``--sizes`` (default 84K, 1M, 5M, 30M: ``_scale_common.SIZES``) at ``--length`` tokens
  (default 128);
- by sequence length: ``--lengths`` (default 64, 128, 256, 512) at the ``--length-size`` model
  (default 5M). The batch shrinks as the length grows (``_scale_common.batch_size_for``: about
  the same token cells per batch), so every cell's steps take a similar time; examples are
  log-uniform in [L/4, L] tokens. A cell both sweeps share (5M at 128) runs once.

Printed: one Markdown table per sweep, a cell per (sweep point, contender pair): lightning_irl's
non-pad tokens per wall-second (median), and ``lightning_irl / plain`` and ``lightning_irl / TRL``
as median (min-max) of wall time and median of CPU time; ``--json`` writes every cell's full
report (``_bench.report``: per-round timings, rates and ratios).

AIRL columns: ``benchmarks/adversarial_vs_trl.py`` (another script) may define
``compare(size=..., max_length=..., precision=..., warmup=..., steps=..., rounds=..., json_path=None,
log=True) -> dict`` returning a ``_bench.report`` dict whose ``ours`` runner is ``lightning_irl``
(only the keyword arguments its signature names are passed). When it exists and ``--skip-airl``
is not given, every cell also runs it and the table gains AIRL columns; otherwise they read
"not run" (see ``airl_hook``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _scale_common import SIZES, batch_size_for, count_params, set_threads, thread_info  # noqa: E402
from sft_throughput import Settings, check_trl, compare  # noqa: E402

OURS = "lightning_irl"


def airl_hook() -> Tuple[Optional[Callable[..., Dict]], str]:
    """``adversarial_vs_trl.compare`` if that script defines it, else ``(None, why)``.

    TODO(lead): if ``adversarial_vs_trl.py`` ends up with another entry point, adapt it here; the
    table needs a ``_bench.report``-shaped dict per (size, max_length) cell.
    """
    try:
        import adversarial_vs_trl  # noqa: F401  (benchmarks/ is on sys.path)
    except Exception as err:  # absent, or broken: the SFT tables still run
        return None, f"benchmarks/adversarial_vs_trl.py not importable ({type(err).__name__}: {err})"
    fn = getattr(adversarial_vs_trl, "compare", None)
    if not callable(fn):
        return None, "benchmarks/adversarial_vs_trl.py has no compare()"
    return fn, ""


def call_airl(fn: Callable[..., Dict], size: str, max_length: int, args) -> Dict:
    """Call ``fn`` with the keyword arguments its signature accepts."""
    offered = dict(size=size, max_length=max_length, precision=args.precision, warmup=args.warmup,
                   steps=args.airl_steps or args.steps, rounds=args.rounds, json_path=None, log=True)
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(**offered)
    return fn(**{k: v for k, v in offered.items() if k in params})


def ours_of(report: Dict) -> str:
    """The runner the report's ratios are of (the one name in ``rates`` without a ratio)."""
    names = [n for n in report["rates"] if n not in report["ratios"]]
    return names[0] if names else OURS


def ratio_cell(report: Optional[Dict], other: str) -> Tuple[str, str]:
    """(wall median (min-max), CPU median (min-max)) of ours / ``other`` in ``report``, or dashes."""
    if not report or other not in report.get("ratios", {}):
        return "-", "-"
    r = report["ratios"][other]
    wall, cpu = r["wall"], r["cpu"]
    return (f"{wall['median']:.2f} ({wall['min']:.2f}-{wall['max']:.2f})",
            f"{cpu['median']:.2f} ({cpu['min']:.2f}-{cpu['max']:.2f})")


def rate_cell(report: Optional[Dict]) -> str:
    if not report:
        return "-"
    return f"{report['rates'][ours_of(report)]['wall']['median']:.0f}"


def others(report: Optional[Dict]) -> List[str]:
    return [n for n in (report or {}).get("ratios", {})]


def table(title: str, key: str, rows: List[Tuple[str, Dict, Optional[Dict]]], airl_note: str) -> str:
    """One Markdown table: a row per sweep point."""
    head = [key, "params", "batch", "SFT tok/s", "SFT / plain wall", "SFT / plain CPU", "SFT / TRL wall",
            "SFT / TRL CPU"]
    airl_others = sorted({o for _, _, a in rows for o in others(a)})
    if airl_others:
        head += ["AIRL tok/s"] + [f"AIRL / {o} {c}" for o in airl_others for c in ("wall", "CPU")]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, sft, airl in rows:
        settings = sft["settings"]
        cells = [label, f"{settings['params'] / 1e6:.2f}M", str(settings["batch_size"]), rate_cell(sft),
                 *ratio_cell(sft, "plain_pytorch"), *ratio_cell(sft, "trl_sfttrainer")]
        if airl_others:
            cells += [rate_cell(airl)] + [c for o in airl_others for c in ratio_cell(airl, o)]
        lines.append("| " + " | ".join(cells) + " |")
    if not airl_others:
        lines += ["", f"AIRL columns: {airl_note}"]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["84K", "1M", "5M", "30M"], choices=list(SIZES))
    parser.add_argument("--length", type=int, default=128, help="sequence length of the size sweep")
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 128, 256, 512])
    parser.add_argument("--length-size", default="5M", choices=list(SIZES), help="model of the length sweep")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--airl-steps", type=int, default=None, help="timed AIRL steps (default: --steps)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-airl", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see _scale_common.set_threads)")
    parser.add_argument("--json", default=None, help="write every cell's report to this file")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if not args.skip_trl:
        check_trl()
    airl, airl_why = (None, "--skip-airl") if args.skip_airl else airl_hook()
    airl_note = "not run" + (f": {airl_why}" if airl_why else "")
    if args.warmup < 3 or args.steps < 30 or args.rounds < 5:
        print(f"note: {args.warmup} warm-up / {args.steps} steps / {args.rounds} rounds is below the benchmark "
              "rules (>= 3 / >= 30 / >= 5): a smoke run, not a result")
    print(f"scaling: {args.precision}, {thread_info()}; AIRL: {'adversarial_vs_trl.compare' if airl else airl_note}",
          flush=True)

    cells: Dict[Tuple[str, int], Tuple[Dict, Optional[Dict]]] = {}
    started = time.perf_counter()

    def cell(size: str, length: int) -> Tuple[Dict, Optional[Dict]]:
        if (size, length) not in cells:
            t0 = time.perf_counter()
            settings = Settings(size=size, max_length=length, batch_size=batch_size_for(size, length),
                                precision=args.precision, warmup=args.warmup, steps=args.steps)
            print(f"\n=== {size} ({count_params(SIZES[size]['config'], SIZES[size]['vocab']) / 1e6:.2f}M), "
                  f"length {length}", flush=True)
            sft = compare(settings, rounds=args.rounds, trl=not args.skip_trl)
            airl_report = None
            if airl is not None:
                print(f"--- AIRL {size}, length {length}", flush=True)
                airl_report = call_airl(airl, size, length, args)
            cells[(size, length)] = (sft, airl_report)
            print(f"    cell {size}/{length}: {time.perf_counter() - t0:.0f} s", flush=True)
        return cells[(size, length)]

    by_size = [(size, *cell(size, args.length)) for size in args.sizes]
    by_length = [(str(length), *cell(args.length_size, length)) for length in args.lengths]

    header = (f"lightning_irl non-pad tokens per wall-second (median over {args.rounds} rounds; "
              f"{args.warmup} warm-up + {args.steps} timed steps; {args.precision}; {thread_info()}); "
              "ratios lightning_irl / other, > 1 = lightning_irl faster: median (min-max) over rounds")
    print("\n" + header + "\n")
    print(table(f"By model size, sequence length {args.length}", "size", by_size, airl_note) + "\n")
    print(table(f"By sequence length, model {args.length_size}", "length", by_length, airl_note))
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.json:
        out = {"settings": vars(args), "threads": thread_info(), "airl": airl_note if airl is None else "run",
               "by_size": [{"size": s, "length": args.length, "sft": sft, "airl": a} for s, sft, a in by_size],
               "by_length": [{"size": args.length_size, "length": int(n), "sft": sft, "airl": a}
                             for n, sft, a in by_length]}
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)
        print(f"-> {args.json}")


if __name__ == "__main__":
    main()
