"""Checkpoints under ``checkpoints/<run name>/version_<n>``, beside ``logs/<run name>/version_<n>``."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator
from weakref import proxy

import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose default folder mirrors the logger's run folder under ``root``.

    Keeps ``last.ckpt`` by default so a crashed run resumes with ``--ckpt_path .../last.ckpt``,
    and writes it once more when training ends between validations (e.g. at ``max_steps``), so
    the final weights are never only in memory. That final save goes through the public
    ``trainer.save_checkpoint`` (every rank calls it; the strategy decides who writes), so it holds
    the same state as ``ModelCheckpoint``'s own saves: weights, optimizers, loops and callbacks.

    With ``save_last="link"`` the final ``last.ckpt`` is a real file, not a link: the link would
    point at the newest top-k checkpoint, which is older than the final step.

    Attributes:
        last_global_step_written: ``trainer.global_step`` when this callback last wrote a
            checkpoint (0 before any), as seen by ``on_save_checkpoint``. Saves with
            ``save_weights_only=True`` skip that hook, so then ``last.ckpt`` is always rewritten
            at the end of training.
    """

    def __init__(self, root: str = "checkpoints", save_last: bool = True, **kwargs) -> None:
        super().__init__(save_last=save_last, **kwargs)
        self.root = root
        self.enable_version_counter = kwargs.get("enable_version_counter", True)
        self.last_global_step_written = 0  # as ModelCheckpoint: nothing to save before any step
        self.saving_from_own_hook = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            if trainer.loggers:
                logger = trainer.loggers[0]
                version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
                self.dirpath = os.path.join(self.root, str(logger.name), version)
            else:
                self.dirpath = self.root
        super().setup(trainer, pl_module, stage)

    # ---- which step did *this* callback last save? -------------------------------------------
    # ModelCheckpoint saves only from these hooks. on_save_checkpoint runs for every save on every
    # rank (Trainer.save_checkpoint -> dump_checkpoint), whoever asked for it; counted only while
    # one of our own hooks runs, a save by another checkpoint callback or by user code at the
    # final step does not stand for an up-to-date last.ckpt.
    def on_train_batch_end(self, trainer, pl_module, *args: Any, **kwargs: Any) -> None:
        with _own_hook(self):
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        with _own_hook(self):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        with _own_hook(self):
            super().on_validation_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        with _own_hook(self):
            super().on_exception(trainer, pl_module, exception)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self.saving_from_own_hook:
            self.last_global_step_written = trainer.global_step

    # ---- the final last.ckpt ------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module) -> None:
        """Write ``last.ckpt`` unless this callback already saved at the final step.

        Replaces ``ModelCheckpoint.on_train_end`` (which only saves when nothing was saved at
        all). Collective: runs on every rank, and every branch is decided from state that is the
        same on every rank."""
        if not self.save_last or trainer.global_step == self.last_global_step_written:
            return
        filepath = _last_checkpoint_path(self, trainer)
        if self.save_last == "link":
            # last.ckpt may be a link to a top-k checkpoint: saving through it would overwrite
            # that (older) checkpoint. Replace the link with a file of its own.
            if trainer.is_global_zero and os.path.islink(filepath):
                os.remove(filepath)
            trainer.strategy.barrier("RunCheckpoint.unlink_last")
        # As ModelCheckpoint: the path is set before saving, since it is part of the saved state.
        previous, self.last_model_path = self.last_model_path, filepath
        trainer.save_checkpoint(filepath, self.save_weights_only)
        self.last_global_step_written = trainer.global_step
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
        if previous and previous != filepath and _removable(self, trainer, previous):
            trainer.strategy.remove_checkpoint(previous)  # a templated last name moved on


@contextlib.contextmanager
def _own_hook(callback: RunCheckpoint) -> Iterator[None]:
    callback.saving_from_own_hook = True
    try:
        yield
    finally:
        callback.saving_from_own_hook = False


def _last_checkpoint_path(callback: RunCheckpoint, trainer) -> str:
    """``<dirpath>/<CHECKPOINT_NAME_LAST><FILE_EXTENSION>`` (``last.ckpt``), formatted and
    versioned (``last-v1.ckpt`` next to a foreign ``last.ckpt``) as ``ModelCheckpoint`` does."""
    metrics: Dict[str, Any] = dict(trainer.callback_metrics)
    metrics["epoch"] = torch.tensor(trainer.current_epoch)
    metrics["step"] = torch.tensor(trainer.global_step)
    name = callback.CHECKPOINT_NAME_LAST
    filepath = callback.format_checkpoint_name(metrics, name)
    if callback.enable_version_counter:
        version = callback.STARTING_VERSION
        # file_exists is collective (rank 0 looks, every rank gets the answer): call it first,
        # on every rank, exactly as ModelCheckpoint does.
        while callback.file_exists(filepath, trainer) and filepath != callback.last_model_path:
            filepath = callback.format_checkpoint_name(metrics, name, ver=version)
            version += 1
    return filepath


def _removable(callback: RunCheckpoint, trainer, previous: str) -> bool:
    """ModelCheckpoint's rule for an outdated ``last`` file: remote files go; local ones only
    inside ``dirpath`` and never the checkpoint this run resumed from."""
    if "://" in previous and not previous.startswith("file://"):
        return True
    previous = os.path.abspath(previous.removeprefix("file://"))
    if trainer.ckpt_path is not None and previous == os.path.abspath(str(trainer.ckpt_path)):
        return False
    return previous.startswith(os.path.abspath(str(callback.dirpath)) + os.sep)
