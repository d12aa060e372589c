"""Writes ``lightning_irl predict`` results as JSONL: one line per sampled response."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

from lightning.pytorch.callbacks import BasePredictionWriter


class JsonlPredictionWriter(BasePredictionWriter):
    """Each rank writes ``<output_path>`` (rank 0) or ``<output_path>.rank<k>``; lines hold
    ``prompt``, ``response``, ``logprob`` (policy log-probability of the response) and whatever
    else the algorithm's ``predict_step`` returns (e.g. a reward for Best-of-N).

    Args:
        output_path: The JSONL file to write (folders are created).
    """

    def __init__(self, output_path: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self._handle = None

    def _path(self, trainer) -> str:
        return self.output_path if trainer.global_rank == 0 else f"{self.output_path}.rank{trainer.global_rank}"

    def on_predict_start(self, trainer, pl_module) -> None:
        path = self._path(trainer)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._tmp = path + ".partial"
        self._handle = open(self._tmp, "w", encoding="utf-8")

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices: Optional[Sequence[int]],
                           batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        for row in prediction:
            self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._handle is not None:
            self._handle.close()
            os.replace(self._tmp, self._path(trainer))
            self._handle = None
