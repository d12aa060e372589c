"""Other loggers than the default TensorBoard, swapped in by config: Lightning's CSVLogger from
command-line flags and an MLflow local store (sqlite, no server) from a second YAML file, each
for a real ``fit`` read back through the logger's own files or API; several loggers at once; the
sample text and ``--ckpt_path last`` with loggers that have no run folder (docs/loggers.md)."""

import csv
import glob
import importlib.util
import logging
import math
import os

import pytest
from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

from lightning_irl.callbacks.samples import COLUMNS, write_text
from lightning_irl.cli import IRLCLI, build_cli, main

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
# 20 steps of 16 rows (one epoch), train/loss logged every 10 steps (steps 9 and 19 in the
# loggers' 0-based count), one validation with the eval/ metrics at the end (step 19)
RUN = ["--trainer.max_steps", "20", "--trainer.val_check_interval", "1.0", "--data.init_args.num_train", "320",
       "--data.init_args.num_val", "16", "--data.init_args.batch_size", "16", "--model.init_args.export", "false",
       "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TRAIN_STEPS, VAL_STEPS = [9, 19], [19]
EVAL = ["eval/forward_kl", "eval/reverse_kl", "eval/invalid_mass", "eval/mode_coverage", "eval/entropy"]

HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None and importlib.util.find_spec("sqlalchemy") is not None
needs_mlflow = pytest.mark.skipif(not HAS_MLFLOW, reason="needs mlflow(-skinny) and sqlalchemy: pip install -e .[dev]")


def _fit(tmp_path, monkeypatch, *args):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_IRL_LOG", "WARNING")
    main(["fit", "--config", QUICKSTART, *args, *RUN])


@pytest.mark.slow
def test_csv_logger_from_command_line_flags(tmp_path, monkeypatch):
    _fit(tmp_path, monkeypatch, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
         "--trainer.logger.save_dir", "csv_logs")
    folder = tmp_path / "csv_logs" / "quickstart" / "version_0"  # `name` carries over from the YAML
    assert (folder / "config.yaml").exists() and (folder / "hparams.yaml").exists()
    assert not (tmp_path / "logs").exists() and not glob.glob(str(tmp_path / "**" / "events.out.*"), recursive=True)
    with open(folder / "metrics.csv") as f:
        rows = list(csv.DictReader(f))

    def history(name):
        return [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]

    train = history("train/loss")
    assert [step for step, _ in train] == TRAIN_STEPS and all(math.isfinite(v) and v > 0 for _, v in train)
    assert [step for step, _ in history("val/loss")] == VAL_STEPS
    for name in EVAL:
        assert [step for step, _ in history(name)] == VAL_STEPS, name
        assert all(math.isfinite(v) for _, v in history(name)), name
    assert 0.0 <= history("eval/invalid_mass")[0][1] <= 1.0


@pytest.mark.slow
@needs_mlflow
def test_mlflow_local_store_from_a_second_yaml_file(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    (tmp_path / "mlflow.yaml").write_text(
        "trainer:\n"
        "  logger:\n"
        "    class_path: lightning.pytorch.loggers.MLFlowLogger\n"
        "    init_args:\n"
        "      experiment_name: quickstart\n"
        "      tracking_uri: sqlite:///mlflow.db\n")
    _fit(tmp_path, monkeypatch, "--config", "mlflow.yaml", "--trainer.callbacks.init_args.every_n_steps", "10")
    assert not (tmp_path / "logs").exists()  # TensorBoard swapped out

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    run_id = run.info.run_id
    train = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in train] == TRAIN_STEPS and all(math.isfinite(m.value) and m.value > 0 for m in train)
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == VAL_STEPS
    for name in EVAL:
        history = client.get_metric_history(run_id, name)
        assert [m.step for m in history] == VAL_STEPS and all(math.isfinite(m.value) for m in history), name
    assert run.data.params["task"] == "modes"  # hyperparameters

    # the CLI's config and the SampleLogger's tables (every 10 steps) are run artifacts
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "samples"} <= artifacts
    assert sorted(a.path for a in client.list_artifacts(run_id, "samples")) == [
        "samples/step_0000010.md", "samples/step_0000020.md"]
    stored = tmp_path / "mlruns" / experiment.experiment_id / run_id / "artifacts"  # the default artifact root
    assert (stored / "samples" / "step_0000020.md").read_text().startswith("| prompt | response | log π | mode |")
    config = (stored / "config.yaml").read_text()
    assert "MLFlowLogger" in config and "max_steps: 20" in config
    # checkpoints: <checkpoint.root>/<experiment id>/<run id>
    assert (tmp_path / "checkpoints" / experiment.experiment_id / run_id / "last.ckpt").exists()


def test_several_loggers_at_once_from_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loggers.yaml").write_text(
        "trainer:\n"
        "  logger:\n"
        "    - class_path: lightning.pytorch.loggers.TensorBoardLogger\n"
        "      init_args: {save_dir: logs, name: quickstart}\n"
        "    - class_path: lightning.pytorch.loggers.CSVLogger\n"
        "      init_args: {save_dir: logs, name: quickstart_csv}\n"
        + ("    - class_path: lightning.pytorch.loggers.MLFlowLogger\n"
           "      init_args: {experiment_name: quickstart, tracking_uri: 'sqlite:///mlflow.db'}\n"
           if HAS_MLFLOW else ""))
    cli = build_cli(["--config", QUICKSTART, "--config", "loggers.yaml"], run=False)
    kinds = [type(logger) for logger in cli.trainer.loggers]
    assert kinds == [TensorBoardLogger, CSVLogger] + ([MLFlowLogger] if HAS_MLFLOW else [])
    assert not (tmp_path / "mlflow.db").exists()  # nothing written before a run starts


def test_sample_text_goes_to_every_logger_that_takes_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    text = "| prompt | response | log π | mode |\n|---|---|---|---|\n| a = | a | -0.10 | copy |"
    cells = [["a =", "a", "-0.10", "copy"]]
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb")
    assert write_text(tensorboard, text, cells, step=7)
    tensorboard.finalize("success")
    acc = EventAccumulator(glob.glob(str(tmp_path / "tb" / "**" / "events.out.*"), recursive=True)[0])
    acc.Reload()
    (tag,) = [t for t in acc.Tags()["tensors"] if t.startswith("samples")]
    (event,) = acc.Tensors(tag)
    assert event.step == 7 and event.tensor_proto.string_val[0].decode() == text

    assert not write_text(CSVLogger(str(tmp_path), name="csv"), text, cells, step=7)  # CSV: no text

    calls = []
    wandb = WandbLogger.__new__(WandbLogger)  # W&B (not installed here): its log_text table API
    wandb.log_text = lambda **kwargs: calls.append(kwargs)
    assert write_text(wandb, text, cells, step=7)
    assert calls == [{"key": "samples", "columns": COLUMNS, "data": cells, "step": 7}]


@pytest.mark.parametrize("dirpath", [False, True])
def test_resume_last_with_a_logger_without_run_folders(tmp_path, caplog, dirpath):
    """MLflow / W&B: checkpoints sit under their run ids, unknown to the next run; `last` needs
    --checkpoint.dirpath, and says so when it is not set."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")
    logger = Namespace(class_path="lightning.pytorch.loggers.MLFlowLogger",
                       init_args=Namespace(experiment_name="quickstart", tracking_uri="sqlite:///mlflow.db"))
    config = Namespace(ckpt_path="last", trainer=Namespace(logger=logger),
                       checkpoint=Namespace(dirpath=str(folder) if dirpath else None, root=str(tmp_path / "c")))
    with caplog.at_level(logging.WARNING, logger="lightning_irl.cli"):
        IRLCLI.resolve_resume(config, keep_version=True)
    if dirpath:
        assert config.ckpt_path == str(folder / "last.ckpt")
    else:
        assert config.ckpt_path is None and "--checkpoint.dirpath" in caplog.text
    assert "version" not in config.trainer.logger.init_args  # a run id is not a version number
