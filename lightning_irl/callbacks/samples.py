"""Logs a few prompts with sampled responses as text (TensorBoard, MLflow, W&B) every N training steps."""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger

from lightning_irl.metrics.evaluation import take_prompts
from lightning_irl.rollout import SamplingConfig

log = logging.getLogger(__name__)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "∅"


COLUMNS = ["prompt", "response", "log π", "mode"]


def write_text(logger: Logger, text: str, cells: List[List[str]], step: int) -> bool:
    """Write the samples table with what ``logger`` has for text; False when it has nothing.

    TensorBoard: ``add_text`` under the tag ``samples`` (the TEXT tab). MLflow: the artifact
    ``samples/step_<step>.md`` of the run. W&B: the table ``samples`` (``log_text``). Anything
    else with an ``experiment.add_text``: that. CSV and other loggers: nothing (False)."""
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_text(logger.run_id, text, f"samples/step_{step:07d}.md")
        return True
    if isinstance(logger, WandbLogger):
        logger.log_text(key="samples", columns=COLUMNS, data=cells, step=step)
        return True
    experiment = getattr(logger, "experiment", None)
    if experiment is not None and hasattr(experiment, "add_text"):
        experiment.add_text("samples", text, global_step=step)
        return True
    return False


class SampleLogger(Callback):
    """Every ``every_n_steps`` optimizer steps, sample ``num_samples`` responses for the first
    ``num_prompts`` validation prompts (the same prompts each time; the training batch when there
    is no validation data) and write them as a Markdown table to every logger that takes text:
    TensorBoard's TEXT tab (tag ``samples``), an MLflow run's artifact ``samples/step_<n>.md``, a
    W&B table ``samples`` (see ``write_text``). Each row shows the response's policy
    log-probability and, for a built-in task, the expert mode it belongs to (``invalid`` when none).
    With no such logger (CSV only, or none) the table goes to the Python log instead.

    Every rank samples (sharded models generate collectively); rank 0 writes. It samples from a
    copy of the random streams (``torch.random.fork_rng``), so logging samples never changes the
    training trajectory, and checkpoints keep its schedule (a resumed run logs where the
    uninterrupted one would).

    Args:
        every_n_steps: Interval in ``trainer.global_step``.
        num_prompts: Prompts shown.
        num_samples: Responses per prompt.
        max_new_tokens: Length cap (default: the module's ``sampling.max_new_tokens``).
        temperature: Sampling temperature (0 = greedy).
        on_train_end: Also log once when training ends.
    """

    def __init__(self, every_n_steps: int = 100, num_prompts: int = 4, num_samples: int = 2,
                 max_new_tokens: Optional[int] = None, temperature: float = 1.0, on_train_end: bool = True) -> None:
        if every_n_steps < 1 or num_prompts < 1 or num_samples < 1:
            raise ValueError("SampleLogger: every_n_steps, num_prompts and num_samples must be >= 1")
        self.every_n_steps = every_n_steps
        self.num_prompts = num_prompts
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.log_on_train_end = on_train_end
        self._prompts: Optional[Dict[str, Any]] = None
        self._last_bucket = 0
        self._last_step = -1

    def _fixed_prompts(self, trainer, fallback: Dict[str, Any]) -> Dict[str, Any]:
        if self._prompts is None:
            source = fallback
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
            if loader is not None and not isinstance(loader, (list, tuple)):
                try:
                    source = next(iter(loader))
                except StopIteration:
                    pass
            self._prompts = take_prompts(source, self.num_prompts)
        return self._prompts

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bucket = trainer.global_step // self.every_n_steps
        if bucket > self._last_bucket:
            self._last_bucket = bucket
            self.log_samples(trainer, pl_module, batch)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.log_on_train_end and self._prompts is not None:
            self.log_samples(trainer, pl_module, self._prompts)

    @property
    def state_key(self) -> str:
        settings = {"every_n_steps": self.every_n_steps, "num_prompts": self.num_prompts,
                    "num_samples": self.num_samples}
        return f"{type(self).__qualname__}{settings!r}"

    def state_dict(self) -> Dict[str, Any]:
        return {"last_bucket": self._last_bucket, "last_step": self._last_step}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._last_bucket = int(state_dict.get("last_bucket", self._last_bucket))
        self._last_step = int(state_dict.get("last_step", self._last_step))

    def log_samples(self, trainer, pl_module, fallback_batch: Dict[str, Any]) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        device = pl_module.device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            self._log_samples(trainer, pl_module, fallback_batch, step)

    def _log_samples(self, trainer, pl_module, fallback_batch: Dict[str, Any], step: int) -> None:
        prompts = self._fixed_prompts(trainer, fallback_batch)
        device = pl_module.device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in prompts.items()}
        base = getattr(pl_module, "sampling", SamplingConfig())
        config = SamplingConfig(max_new_tokens=self.max_new_tokens or base.max_new_tokens,
                                temperature=self.temperature, top_p=1.0, top_k=0,
                                do_sample=self.temperature > 0, num_samples=self.num_samples)
        with trainer.precision_plugin.forward_context():
            rollout = pl_module.rollout(batch, config)
        if not trainer.is_global_zero:
            return
        task = getattr(trainer.datamodule, "task", None)
        logps = rollout.sequence_logprobs.tolist()
        rows: List[str] = ["| " + " | ".join(COLUMNS) + " |", "|---|---|---|---|"]
        cells: List[List[str]] = []
        for i, response in enumerate(rollout.responses):
            prompt = batch["prompt"][i // self.num_samples]
            mode = ""
            if task is not None:
                try:
                    found = task.mode_of(prompt, response) if bool(rollout.finished[i]) else None
                except ValueError:
                    found = None
                mode = found or "invalid"
            ending = "" if bool(rollout.finished[i]) else " …(no EOS)"
            logp = f"{logps[i]:.2f}" if math.isfinite(logps[i]) else str(logps[i])
            rows.append(f"| {_cell(prompt)} | {_cell(response)}{ending} | {logp} | {mode} |")
            cells.append([prompt, response + ending, logp, mode])
        text = "\n".join(rows)
        written = False
        for logger in trainer.loggers:
            written = write_text(logger, text, cells, step) or written
        if not written:
            log.info("samples at step %d:\n%s", step, text)
