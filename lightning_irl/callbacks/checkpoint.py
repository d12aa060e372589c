"""Checkpoints under ``checkpoints/<run name>/version_<n>``, beside ``logs/<run name>/version_<n>``."""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose default folder mirrors the logger's run folder under ``root``.

    Keeps ``last.ckpt`` by default so a crashed run resumes with ``--ckpt_path .../last.ckpt``,
    and writes it once more when training ends between validations (e.g. at ``max_steps``), so
    the final weights are never only in memory.
    """

    def __init__(self, root: str = "checkpoints", save_last: bool = True, **kwargs) -> None:
        super().__init__(save_last=save_last, **kwargs)
        self.root = root

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            if trainer.loggers:
                logger = trainer.loggers[0]
                version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
                self.dirpath = os.path.join(self.root, str(logger.name), version)
            else:
                self.dirpath = self.root
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
