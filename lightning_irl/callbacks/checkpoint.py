"""Checkpoints under ``checkpoints/<run name>/version_<n>``, beside ``logs/<run name>/version_<n>``."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from datetime import timedelta
from typing import Any, Dict, Iterator, Literal, Optional, Union
from weakref import proxy

import torch
from fsspec.utils import get_protocol
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose default folder mirrors the logger's run folder under ``root``:
    ``<root>/<logger name>/version_<n>`` beside ``logs/<logger name>/version_<n>``. The command
    line's ``--checkpoint.*`` options are its arguments (``--checkpoint.every_n_train_steps 50``
    for periodic checkpoints); the export goes to ``<its folder>/export`` whatever they are.

    Keeps ``last.ckpt`` by default so a crashed run resumes with ``--ckpt_path last`` (or
    ``.../last.ckpt``), and writes it once more when training ends between validations (e.g. at
    ``max_steps``), so the final weights are never only in memory. That final save goes through
    the public ``trainer.save_checkpoint`` (every rank calls it; the strategy decides who
    writes), so it holds the same state as ``ModelCheckpoint``'s own saves: weights, optimizers,
    loops and callbacks.

    Every checkpoint file is written atomically: to ``<name>.part``, then renamed (``os.replace``)
    over ``<name>``, so a kill during a save leaves the previous file intact (``AtomicCheckpointIO``,
    installed over the strategy's default ``TorchCheckpointIO`` at setup; sharded FSDP2
    checkpoints, which are folders written by the strategy, are not covered).

    With ``save_last="link"`` the final ``last.ckpt`` is a real file, not a link: the link would
    point at the newest top-k checkpoint, which is older than the final step.

    Args:
        root: Folder that holds ``<run name>/version_<n>`` (when ``dirpath`` is not given).
        dirpath: A fixed folder instead.
        every_n_train_steps: Save every this many training steps (periodic checkpoints;
            ``save_top_k: -1`` keeps them all, otherwise the newest ``last.ckpt`` and the
            ``save_top_k`` best by ``monitor``).
        train_time_interval: Save at this wall-time interval instead.
        every_n_epochs: Save every this many epochs instead.
        save_last: Keep ``last.ckpt`` (``link``: a link to the newest checkpoint while training).
        Other arguments: see ``lightning.pytorch.callbacks.ModelCheckpoint``.

    Attributes:
        last_global_step_written: ``trainer.global_step`` when this callback last wrote a
            checkpoint (0 before any), as seen by ``on_save_checkpoint``. Saves with
            ``save_weights_only=True`` skip that hook, so then ``last.ckpt`` is always rewritten
            at the end of training.
    """

    def __init__(
        self,
        root: str = "checkpoints",
        dirpath: Optional[str] = None,
        filename: Optional[str] = None,
        monitor: Optional[str] = None,
        save_last: Optional[Union[bool, Literal["link"]]] = True,
        save_top_k: int = 1,
        every_n_train_steps: Optional[int] = None,
        train_time_interval: Optional[timedelta] = None,
        every_n_epochs: Optional[int] = None,
        save_on_train_epoch_end: Optional[bool] = None,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        enable_version_counter: bool = True,
        verbose: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, save_last=save_last,
                         save_top_k=save_top_k, every_n_train_steps=every_n_train_steps,
                         train_time_interval=train_time_interval, every_n_epochs=every_n_epochs,
                         save_on_train_epoch_end=save_on_train_epoch_end, save_weights_only=save_weights_only,
                         mode=mode, auto_insert_metric_name=auto_insert_metric_name,
                         enable_version_counter=enable_version_counter, verbose=verbose, **kwargs)
        self.root = root
        self.enable_version_counter = enable_version_counter
        self.last_global_step_written = 0  # as ModelCheckpoint: nothing to save before any step
        self.saving_from_own_hook = False

    @property
    def state_key(self) -> str:
        """``ModelCheckpoint``'s key without the schedule (``every_n_*``): a run resumed with other
        checkpoint intervals still gets its state back (``last_model_path``, the top-k), so it
        keeps writing the same ``last.ckpt`` instead of a ``last-v1.ckpt`` beside it."""
        return f"{type(self).__qualname__}{({'monitor': self.monitor, 'mode': self.mode})!r}"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            if trainer.loggers:
                logger = trainer.loggers[0]
                version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
                self.dirpath = os.path.join(self.root, str(logger.name), version)
            else:
                self.dirpath = self.root
        io = trainer.strategy.checkpoint_io
        if type(io) is TorchCheckpointIO:  # not a user's plugin (an async one renames too early)
            trainer.strategy.checkpoint_io = AtomicCheckpointIO(io)
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module) -> None:
        """Resumed from a checkpoint in this folder: its ``last.ckpt`` is this run's, so keep
        writing it (``ModelCheckpoint`` only knows so when the checkpoint's own state says so; one
        written before the first ``last.ckpt`` would make it write ``last-v1.ckpt`` beside it)."""
        super().on_train_start(trainer, pl_module)
        name = self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION
        resumed = str(trainer.ckpt_path) if trainer.ckpt_path else None
        if self.last_model_path or not resumed or "{" in name or self.dirpath is None or "://" in resumed:
            return
        last = os.path.join(str(self.dirpath), name)
        if os.path.dirname(os.path.abspath(resumed)) == os.path.abspath(str(self.dirpath)) and os.path.isfile(last):
            self.last_model_path = last

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
        self.save_last_checkpoint(trainer)

    def save_last_checkpoint(self, trainer) -> str:
        """Write ``last.ckpt`` now (whatever ``save_last`` says; e.g. on preemption) and return its
        path. Collective: every rank calls it."""
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
        return filepath


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


def local_path(path) -> Optional[str]:
    """``path`` as a local file-system path (a ``file://`` prefix removed), or None for a remote
    URL (``s3://``, ``gs://``, ...: fsspec's protocol is not ``file``)."""
    path = str(path)
    return path.removeprefix("file://") if get_protocol(path) == "file" else None


def _removable(callback: RunCheckpoint, trainer, previous: str) -> bool:
    """ModelCheckpoint's rule for an outdated ``last`` file: remote files go; local ones only
    inside ``dirpath`` and never the checkpoint this run resumed from."""
    local = local_path(previous)
    if local is None:
        return True
    previous = os.path.abspath(local)
    if trainer.ckpt_path is not None and previous == os.path.abspath(str(trainer.ckpt_path)):
        return False
    return previous.startswith(os.path.abspath(str(callback.dirpath)) + os.sep)


class AtomicCheckpointIO(CheckpointIO):
    """Wraps a ``CheckpointIO``: a local checkpoint is written to ``<path>.part`` and renamed over
    ``<path>`` (``os.replace``, atomic on POSIX), so a process killed during a save leaves the
    previous file intact (and at most a stray ``.part`` that nothing reads). Remote paths go
    straight to the wrapped plugin."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        local = local_path(path)
        if local is None:
            self.inner.save_checkpoint(checkpoint, str(path), storage_options=storage_options)
            return
        path = local
        partial = path + ".part"
        self.inner.save_checkpoint(checkpoint, partial, storage_options=storage_options)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)

    def load_checkpoint(self, path, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        return self.inner.load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


_VERSION = re.compile(r"^version_(\d+)$")


def find_last_checkpoint(folder: str) -> Optional[str]:
    """The newest ``last*.ckpt`` file in ``folder`` (``last.ckpt``, ``last-v1.ckpt``, ...), or None."""
    if not os.path.isdir(folder):
        return None
    found = [os.path.join(folder, name) for name in os.listdir(folder)
             if re.match(r"^last(-v\d+)?\.ckpt$", name) and os.path.exists(os.path.join(folder, name))]
    return max(found, key=os.path.getmtime) if found else None


def find_run_versions(run_folder: str) -> Dict[int, str]:
    """``{n: <run_folder>/version_<n>}`` for the version folders of a run."""
    if not os.path.isdir(run_folder):
        return {}
    out = {}
    for name in os.listdir(run_folder):
        match = _VERSION.match(name)
        if match and os.path.isdir(os.path.join(run_folder, name)):
            out[int(match.group(1))] = os.path.join(run_folder, name)
    return out
