"""Bitwise-exact resume: every random stream of every rank in the checkpoint.

Lightning's checkpoints hold the weights, the optimizers, the schedulers and the loops; with the
data module's training position (``DemonstrationDataModule.state_dict``) and the random streams
saved here, a run killed at step ``k`` and resumed from its step-``k`` checkpoint ends with the
same weights, bit for bit, as the run that was never interrupted (on CPU; tested in
``tests/reliability``).
"""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def rng_states() -> Dict[str, Any]:
    """This process's random states: Python ``random``, NumPy's global generator, torch's CPU
    generator and, once CUDA is initialised, every CUDA device's generator. Only tensors, numbers
    and strings, so a checkpoint loads with ``torch.load(weights_only=True)``."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: Dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    """Set what ``rng_states`` returned."""
    py = states["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = states["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda = states["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("ExactResume: the checkpoint holds %d CUDA generator(s), this process sees %d: "
                        "CUDA streams not restored", len(cuda), torch.cuda.device_count())


class ExactResume(Callback):
    """Save every random stream with each checkpoint and restore it when training resumes.

    - **What**: per rank, Python ``random``, NumPy, torch CPU and CUDA (``rng_states``), gathered
      from every rank when a checkpoint is written (checkpoints are collective in Lightning) and
      stored as a list indexed by global rank.
    - **When restored**: at ``on_train_start`` of the resumed run, after Lightning restored the
      weights, optimizers and loops and built the training loader, before the first resumed batch
      draws anything (rollouts sample with torch's global generator). Work a resumed run does
      before that (model building, sanity validation) cannot shift the streams.
    - **Validation does not consume training randomness**: the streams are copied at
      ``on_validation_start`` and put back at ``on_validation_end`` (while fitting, sanity check
      included). A resumed run skips the validation that was due at the step it resumes from, so
      without this its rollouts would draw different numbers; it also means that how often a run
      validates no longer changes its training trajectory. A checkpoint written during
      validation holds the copied training streams.

    The training data position is the data module's (``DemonstrationDataModule.state_dict``).
    A checkpoint written on a different number of processes is restored rank ``r`` ← saved rank
    ``r mod n``, with a warning (the resume is then not exact). Added by default by the command
    line; with Python, pass it in ``Trainer(callbacks=[...])``.
    """

    def __init__(self) -> None:
        self._to_restore: Optional[Dict[str, Any]] = None
        self._training_streams: Optional[Dict[str, Any]] = None  # held during validation

    # ---- checkpoint ----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        own = self._training_streams if self._training_streams is not None else rng_states()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: List[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, own)
            return {"rng": gathered}
        return {"rng": [own]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._to_restore = state_dict if state_dict.get("rng") else None

    def on_train_start(self, trainer, pl_module) -> None:
        if self._to_restore is None:
            return
        saved, self._to_restore = self._to_restore["rng"], None
        rank = trainer.global_rank
        if len(saved) != trainer.world_size:
            log.warning("ExactResume: the checkpoint holds the random streams of %d process(es), this run has %d: "
                        "rank %d takes saved rank %d (the resume is not exact)", len(saved), trainer.world_size,
                        rank, rank % len(saved))
        set_rng_states(saved[rank % len(saved)])

    # ---- validation draws from a copy --------------------------------------------------------
    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._training_streams = rng_states()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._training_streams is not None:
            streams, self._training_streams = self._training_streams, None
            set_rng_states(streams)


__all__ = ["ExactResume", "rng_states", "set_rng_states"]
