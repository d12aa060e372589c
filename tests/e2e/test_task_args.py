"""Task options through the CLI: ``--data.init_args.task_args`` / ``task_args:`` in YAML, the
matching ``task:modes?alphabet=...`` tokenizer, and bad values as one line with a non-zero exit."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from lightning_irl.cli import build_cli
from lightning_irl.data.tasks import get_task

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(os.path.dirname(sys.executable), "lightning_irl")
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
OPTIONS = {"alphabet": "abcdefghij", "weights": [1, 1, 2], "min_length": 4, "max_length": 6}
OPTIONS_ARG = "{alphabet: abcdefghij, weights: [1, 1, 2], min_length: 4, max_length: 6}"
TOKENIZER = ["--model.init_args.policy.tokenizer", "task:modes?alphabet=abcdefghij"]
SHORT = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--data.init_args.num_train", "64",
         "--data.init_args.num_val", "16", "--data.init_args.batch_size", "16"]


def _run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([CLI, "fit", "--config", QUICKSTART, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_print_config_shows_the_task_args(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", QUICKSTART, "--data.init_args.task_args", OPTIONS_ARG, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["init_args"]["task"] == "modes"
    assert printed["data"]["init_args"]["task_args"] == OPTIONS


def test_yaml_task_args_reach_the_task(tmp_path):
    extra = tmp_path / "options.yaml"
    extra.write_text(yaml.safe_dump({
        "model": {"init_args": {"policy": {"tokenizer": "task:modes?alphabet=abcdefghij"}}},
        "data": {"init_args": {"task_args": OPTIONS}},
    }))
    cli = build_cli(["--config", QUICKSTART, "--config", str(extra)], run=False)
    task = cli.datamodule.task
    assert (task.alphabet, task.min_length, task.max_length) == ("abcdefghij", 4, 6)
    assert task.weights == {"copy": 0.25, "reverse": 0.25, "sort": 0.5}
    assert cli.model.tokenizer.get_vocab() == get_task("modes", **OPTIONS).build_tokenizer().get_vocab()


@pytest.mark.slow
def test_a_short_run_trains_on_the_configured_task(tmp_path):
    proc = _run([*TOKENIZER, "--data.init_args.task_args", OPTIONS_ARG, *SHORT], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the training data are the configured task's records: count their loss tokens independently
    # (response symbols + EOS); default prompts (3-5 letters) would give another count
    records = get_task("modes", **OPTIONS).records(64, seed=0)
    loss_tokens = sum(len(r["response"].split()) + 1 for r in records)
    assert re.search(rf"data train: records=64, kept=64, .*loss_tokens={loss_tokens}\b", proc.stderr), proc.stderr[-3000:]
    version = tmp_path / "checkpoints/quickstart/version_0"
    hparams = torch.load(version / "last.ckpt", map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    assert hparams["task_args"] == OPTIONS
    saved = yaml.safe_load((tmp_path / "logs/quickstart/version_0/config.yaml").read_text())
    assert saved["data"]["init_args"]["task_args"] == OPTIONS
    vocab = json.loads((version / "export/tokenizer.json").read_text())["model"]["vocab"]
    assert {"i", "j"} <= set(vocab) and json.loads((version / "export/config.json").read_text())["vocab_size"] == 14


@pytest.mark.slow
def test_bad_task_args_exit_nonzero_with_the_reason_on_one_line(tmp_path):
    proc = _run(["--data.init_args.task_args", "{weights: [0.2, -0.3, 0.5]}", *SHORT], tmp_path)
    assert proc.returncode == 2
    reason = "modes: weights must be three positive numbers for copy, reverse, sort, got [0.2, -0.3, 0.5]"
    # LightningCLI reports a data-module constructor error inside jsonargparse's summary of the
    # data class union; the reason itself is one of its lines
    assert any(line.strip().lstrip("- ").endswith(reason) for line in proc.stderr.splitlines()), proc.stderr
    assert "Traceback" not in proc.stderr

    # a wider alphabet with the default tokenizer: stopped before training, one line
    proc = _run(["--data.init_args.task_args", "{alphabet: abcdefghij}", *SHORT], tmp_path)
    assert proc.returncode == 2
    assert ('lightning_irl: error: data.task modes: the tokenizer cannot encode task symbol(s) i j (they would '
            'become <unk>); give the model the task\'s tokenizer: tokenizer: "task:modes?alphabet=abcdefghij"\n'
            ) in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = _run(["--model.init_args.policy.tokenizer", "task:modes?weights=[1,1,1]", *SHORT], tmp_path)
    assert proc.returncode == 2 and "'weights' does not choose the modes vocabulary" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
