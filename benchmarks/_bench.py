"""Side-by-side timing for the benchmarks: interleaved rounds, per-round ratios, min/median/max of
wall and process-CPU time, a printed table and a ``--json`` file. Not a benchmark itself.

Rules every comparison here follows (benchmarks/README.md): the contenders run one after another
inside one process, in an order that rotates every round; each run reports how many units of work
(tokens, generated tokens) it did and in how much wall and CPU time, after its warm-up; a ratio is
taken *within* a round (both contenders saw the same machine load) and summarised over rounds as
min / median / max. Absolute rates depend on the machine; the ratios are the result.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence


@dataclass
class Timing:
    """One contender's run: ``units`` of work done in ``wall`` seconds and ``cpu`` process-CPU
    seconds (both after warm-up)."""

    units: float
    wall: float
    cpu: float

    @property
    def per_wall_second(self) -> float:
        return self.units / self.wall

    @property
    def per_cpu_second(self) -> float:
        return self.units / self.cpu


class Clock:
    """Start/stop wall and process-CPU clocks: ``clock.start()`` after warm-up, ``clock.stop(units)``."""

    def __init__(self) -> None:
        self.wall0 = self.cpu0 = None

    def start(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def stop(self, units: float) -> Timing:
        assert self.wall0 is not None, "Clock.stop before Clock.start"
        return Timing(units, time.perf_counter() - self.wall0, time.process_time() - self.cpu0)


def spread(values: Sequence[float]) -> Dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run_rounds(runners: Dict[str, Callable[[], Timing]], rounds: int, log: bool = True) -> List[Dict[str, Timing]]:
    """``rounds`` rounds of every runner, the order rotating each round."""
    names = list(runners)
    results: List[Dict[str, Timing]] = []
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        result = {name: runners[name]() for name in order}
        results.append(result)
        if log:
            print(f"round {r}: " + ", ".join(f"{n} {result[n].per_wall_second:.1f}/s wall "
                                              f"({result[n].per_cpu_second:.1f}/CPU-s)" for n in names), flush=True)
    return results


def ratios(results: List[Dict[str, Timing]], ours: str, other: str) -> Dict[str, Dict[str, float]]:
    """Speed of ``ours`` over ``other`` (rate ratio, > 1 = ours faster) per round, summarised."""
    return {
        "wall": spread([r[ours].per_wall_second / r[other].per_wall_second for r in results]),
        "cpu": spread([r[ours].per_cpu_second / r[other].per_cpu_second for r in results]),
    }


def fmt(s: Dict[str, float]) -> str:
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def report(title: str, results: List[Dict[str, Timing]], ours: str, unit: str, settings: Dict,
           json_path: Optional[str] = None, targets: Optional[Dict[str, float]] = None) -> Dict:
    """Print rates and ratios of ``ours`` against every other runner; write them to ``json_path``."""
    names = list(results[0])
    print(f"\n{title}: {len(results)} rounds; {unit}; median (min-max)")
    rates = {}
    for name in names:
        rates[name] = {"wall": spread([r[name].per_wall_second for r in results]),
                       "cpu": spread([r[name].per_cpu_second for r in results])}
        print(f"  {name:18s} {fmt(rates[name]['wall'])} per wall-s, {fmt(rates[name]['cpu'])} per CPU-s")
    summary = {}
    for other in names:
        if other == ours:
            continue
        summary[other] = ratios(results, ours, other)
        target = "" if not targets or other not in targets else f"   target >= {targets[other]}"
        print(f"  {ours} / {other}: wall {fmt(summary[other]['wall'])}, CPU {fmt(summary[other]['cpu'])}{target}")
    out = {"title": title, "unit": unit, "settings": settings, "rates": rates, "ratios": summary,
           "rounds": [{n: asdict(t) for n, t in r.items()} for r in results]}
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(out, handle, indent=1)
        print(f"  -> {json_path}")
    return out
