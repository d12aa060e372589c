"""``lightning_irl fit|validate|test|predict --config X.yaml``: LightningCLI over every algorithm."""

from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

from lightning.pytorch.cli import LightningCLI

from lightning_irl.algorithms.base import IRLModule
from lightning_irl.callbacks import JsonlPredictionWriter, RunCheckpoint
from lightning_irl.data import DataError, DemonstrationDataModule

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "logs", "name": "lightning_irl"}},
}


class IRLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(JsonlPredictionWriter, "predictions")


def build_cli(args: Optional[List[str]] = None, run: bool = True) -> IRLCLI:
    return IRLCLI(
        IRLModule,
        DemonstrationDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [RunCheckpoint()]},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(args: Optional[List[str]] = None) -> None:
    logging.basicConfig(level=os.environ.get("LIGHTNING_IRL_LOG", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    try:
        build_cli(args)
    except (DataError, FileNotFoundError, ValueError) as err:
        # Bad input deserves one line, not a traceback; LIGHTNING_IRL_DEBUG=1 shows the traceback.
        if os.environ.get("LIGHTNING_IRL_DEBUG"):
            raise
        print(f"lightning_irl: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
