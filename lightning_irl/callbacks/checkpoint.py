"""Checkpoints under ``checkpoints/<run name>/version_<n>``, beside ``logs/<run name>/version_<n>``."""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` whose default folder mirrors the logger's run folder under ``root``.

    Keeps ``last.ckpt`` by default so a crashed run resumes with ``--ckpt_path .../last.ckpt``.
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
