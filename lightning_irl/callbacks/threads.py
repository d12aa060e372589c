"""How many threads torch uses for a CPU run: chosen from the model's size and the free cores."""

from __future__ import annotations

import logging
import math
import os
from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

# Below this many parameters a training step is too short to split over threads: on the
# quickstart's 84K-parameter model two threads took the same wall time as one and twice the CPU on
# an idle 2-core machine, and up to 3.6x the wall time while another job ran
# (benchmarks/threads.py).
SMALL_MODEL_PARAMETERS = 1_000_000


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or SLURM's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def busy_cores() -> int:
    """Cores other programs keep busy now: the 1-minute load average, rounded (0 where unknown)."""
    try:
        return int(math.floor(os.getloadavg()[0] + 0.5))
    except (AttributeError, OSError):
        return 0


def choose_threads(parameters: int, processes: int = 1, cores: Optional[int] = None,
                   busy: Optional[int] = None) -> int:
    """Threads for one of ``processes`` training processes on this machine: 1 for a model under
    ``SMALL_MODEL_PARAMETERS``; otherwise this process's share of the cores that are free
    (``cores`` minus ``busy``, at least 1). Threads waiting on a core another job holds stall
    every step of a small model (a run 6x slower was seen), so the busy ones are left out."""
    if parameters < SMALL_MODEL_PARAMETERS:
        return 1
    cores = available_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    free = max(1, cores - max(0, busy))
    return max(1, free // max(1, processes))


class CpuThreads(Callback):
    """Set torch's intra-op threads when a run starts on the CPU (``--threads.*`` in the CLI).

    By default (``num_threads: null``) the number comes from ``choose_threads``: one thread for a
    model under a million parameters, else the process's share of the free cores, and the choice
    is logged. ``OMP_NUM_THREADS`` in the environment wins over the default (torch already read
    it), and ``num_threads: N`` wins over both. On a GPU the callback does nothing.

    Args:
        num_threads: Threads per process; None chooses as above.
    """

    def __init__(self, num_threads: Optional[int] = None) -> None:
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"threads.num_threads must be at least 1, got {num_threads}")
        self.num_threads = num_threads

    def _apply(self, trainer, pl_module) -> None:
        if trainer.strategy.root_device.type != "cpu":
            return
        if self.num_threads is not None:
            threads, why = self.num_threads, "threads.num_threads"
        elif os.environ.get("OMP_NUM_THREADS"):
            return
        else:
            parameters = sum(p.numel() for p in pl_module.parameters())
            cores, busy = available_cores(), busy_cores()
            threads = choose_threads(parameters, processes=trainer.num_devices, cores=cores, busy=busy)
            why = (f"{parameters / 1e6:.2g}M parameters, {trainer.num_devices} process(es) on {cores} cores "
                   f"with ~{busy} busy; set --threads.num_threads or OMP_NUM_THREADS to choose")
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        if trainer.is_global_zero:
            log.info("torch threads per process: %d (%s)", threads, why)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._apply(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._apply(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._apply(trainer, pl_module)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._apply(trainer, pl_module)
