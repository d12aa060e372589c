"""``lightning_irl fit|validate|test|predict --config X.yaml``: LightningCLI over every algorithm."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, List, Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from lightning_irl.algorithms.base import IRLModule
from lightning_irl.callbacks import CpuThreads, ExactResume, JsonlPredictionWriter, Preemption, RunCheckpoint
from lightning_irl.callbacks.checkpoint import find_last_checkpoint, find_run_versions
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.errors import OptionError, condense_option_error, describe_failure
from lightning_irl.preflight import (
    SUBCOMMANDS,
    FailedStartCleanup,
    check_config_file,
    config_files,
    current_run,
    forget_run,
    preflight,
)

TRAINER_DEFAULTS = {
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "logs", "name": "lightning_irl"}},
}


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` in the run's log folder; when the first logger is an
    ``MLFlowLogger`` (no run folder: LightningCLI's own callback fails on a database or server
    URI) it goes to the MLflow run instead, as its artifact ``config.yaml``, as it does for an
    ``MLFlowLogger`` further down the logger list."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.save_to_log_dir = not (trainer.loggers and isinstance(trainer.loggers[0], MLFlowLogger))
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                text = self.parser.dump(self.config, skip_none=False)
                logger.experiment.log_text(logger.run_id, text, self.config_filename)


class IRLCLI(LightningCLI):
    """LightningCLI with the package's groups: ``--predictions.*`` (``JsonlPredictionWriter``),
    ``--checkpoint.*`` (``RunCheckpoint``: folder, periodic checkpoints) and ``--preemption.*``
    (``Preemption``: SIGTERM / SIGUSR1 → ``last.ckpt``, exit 143 / 138), ``--threads.*``
    (``CpuThreads``: torch threads of a CPU run); ``ExactResume`` (random
    streams in checkpoints) is always on.

    Resuming: ``--ckpt_path last`` is the newest ``last*.ckpt`` of the newest
    ``<checkpoint root>/<run name>/version_<n>`` that has one (or of ``--checkpoint.dirpath``, or of
    the logger's ``version`` when set); none found: training starts from scratch, with a warning.
    ``fit`` resumed from ``last`` or from any file inside ``<root>/<run name>/version_<n>/`` keeps
    writing to ``logs/<run name>/version_<n>`` and that checkpoint folder (TensorBoard and CSV
    loggers, when their ``version`` is not set). With other loggers (MLflow, W&B), ``--ckpt_path last``
    needs ``--checkpoint.dirpath``.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(JsonlPredictionWriter, "predictions")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(Preemption, "preemption")
        parser.add_lightning_class_args(CpuThreads, "threads")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is not None and config.get("ckpt_path") is not None:
            self.resolve_resume(config, keep_version=self.subcommand == "fit")

    @staticmethod
    def resolve_resume(config, keep_version: bool) -> None:
        """Turn ``ckpt_path: last`` into a file and, with ``keep_version``, point the logger at the
        version folder the checkpoint belongs to (see the class docstring). Edits ``config``."""
        ckpt_path, checkpoint = config.get("ckpt_path"), config.get("checkpoint")
        logger = config.get("trainer.logger")
        logger = logger[0] if isinstance(logger, list) and logger else logger
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        folder_logger = init_args is not None and str(logger.get("class_path", "")).rsplit(".", 1)[-1] in (
            "TensorBoardLogger", "CSVLogger")
        name = init_args.get("name") if init_args is not None else None
        version = init_args.get("version") if init_args is not None else None
        dirpath = checkpoint.get("dirpath") if checkpoint is not None else None
        root = checkpoint.get("root") if checkpoint is not None else "checkpoints"
        run_folder = os.path.join(root, str(name)) if name and not dirpath and logger else None
        found_version = None
        if ckpt_path == "last":
            path = None
            if dirpath:
                path = find_last_checkpoint(dirpath)
            elif run_folder is not None and version is not None:
                path = find_last_checkpoint(os.path.join(run_folder, version if isinstance(version, str)
                                                         else f"version_{version}"))
            elif run_folder is not None:
                for number, folder in sorted(find_run_versions(run_folder).items(), reverse=True):
                    path = find_last_checkpoint(folder)
                    if path is not None:
                        found_version = number
                        break
            elif not logger:
                path = find_last_checkpoint(root)
            if path is None:
                # MLFlowLogger, WandbLogger, ...: the checkpoint folder is named after the logger's
                # experiment and run ids, which the next run does not know; a fixed dirpath resumes
                hint = ("" if dirpath or folder_logger or not logger else
                        " (only TensorBoardLogger and CSVLogger runs are found by name; with another "
                        "logger set --checkpoint.dirpath to resume with `last`)")
                logging.getLogger(__name__).warning(
                    "--ckpt_path last: no last checkpoint under %s%s; training starts from scratch",
                    dirpath or run_folder or root, hint)
                config.ckpt_path = None
                return
            logging.getLogger(__name__).info("--ckpt_path last: resuming from %s", path)
            config.ckpt_path = path
        elif run_folder is not None and os.path.exists(str(ckpt_path)):
            inside = os.path.relpath(os.path.abspath(str(ckpt_path)), os.path.abspath(run_folder)).split(os.sep)
            match = re.match(r"^version_(\d+)$", inside[0]) if len(inside) > 1 else None
            found_version = int(match.group(1)) if match else None
        if keep_version and found_version is not None and folder_logger and version is None:
            init_args.version = found_version


def build_cli(args: Optional[List[str]] = None, run: bool = True) -> IRLCLI:
    return IRLCLI(
        IRLModule,
        DemonstrationDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [ExactResume(), FailedStartCleanup()]},
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        parser_class=IRLArgumentParser,  # one-line errors, and preflight() before anything is built
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


class IRLArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors are one line (``OptionError``, no usage dump), and
    which runs ``preflight`` on a parsed ``fit|validate|test|predict`` command."""

    def error(self, message: str, ex: Optional[Exception] = None):  # type: ignore[override]
        if not self.exit_on_error:  # jsonargparse parsing internally: it expects ArgumentError
            return super().error(message, ex)
        raise OptionError(condense_option_error(message, self), message) from ex

    def parse_args(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        config = super().parse_args(*args, **kwargs)
        if config.get("subcommand") in SUBCOMMANDS:
            preflight(config)
        return config


def _quiet_lightning(level: str) -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(level)


def main(args: Optional[List[str]] = None) -> None:
    """The console script. Bad input (an option, a path, a data file, a checkpoint) ends the run
    with one line on stderr, ``lightning_irl: error: <where>: <what>``, and exit code 2 (a
    non-finite training value: exit 1); what can be checked before the run is checked before
    anything is written (``preflight``), and a run that fails before its loop starts leaves no
    new log or checkpoint folder. ``LIGHTNING_IRL_DEBUG=1`` shows the traceback instead;
    ``LIGHTNING_IRL_LOG`` sets the log level (Lightning's own messages too, when it is set)."""
    level = os.environ.get("LIGHTNING_IRL_LOG")
    logging.basicConfig(level=level or "INFO", format="%(levelname)s %(name)s: %(message)s")
    if level:
        _quiet_lightning(level)
    argv = list(sys.argv[1:] if args is None else args)
    forget_run()
    try:
        for path in config_files(argv):
            check_config_file(path)
        build_cli(args)
    except BaseException as err:
        record = current_run()
        if record is not None:  # an exit (preemption: 143, Ctrl-C) keeps its folders for a resume
            record.clean_up(folders=not isinstance(err, (SystemExit, KeyboardInterrupt)))
        report = None if isinstance(err, (SystemExit, KeyboardInterrupt)) else describe_failure(err, argv)
        if report is None or os.environ.get("LIGHTNING_IRL_DEBUG"):
            if isinstance(err, OptionError):
                print(err.report, file=sys.stderr)  # the parser's full report
            raise
        code, line = report
        print(f"lightning_irl: error: {line}", file=sys.stderr)
        sys.exit(code)
    finally:
        forget_run()
        _end_process_group()


def _end_process_group() -> None:
    """Tear down torch.distributed before the interpreter exits: leaving gloo's threads running
    at exit aborts the process now and then ("terminate called without an active exception",
    status -6 instead of the run's own exit code), seen after a DDP run stopped on an error."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group must not hide the run's own error
            pass


if __name__ == "__main__":
    main()
