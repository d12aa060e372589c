"""The README's commands, run for real through the console script (a few steps each)."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_irl.cli import build_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(os.path.dirname(sys.executable), "lightning_irl")
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
SMALL = ["--data.init_args.num_train", "64", "--data.init_args.num_val", "16", "--data.init_args.num_test", "4",
         "--data.init_args.batch_size", "16"]


def _run(args, cwd, ok=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_fit_validate_predict_and_export_round_trip(tmp_path):
    _run([CLI, "fit", "--config", QUICKSTART, "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
          *SMALL], tmp_path)
    assert glob.glob(str(tmp_path / "logs/quickstart/version_0/events.out.tfevents.*"))
    ckpt = tmp_path / "checkpoints/quickstart/version_0/last.ckpt"
    export = tmp_path / "checkpoints/quickstart/version_0/export"
    assert ckpt.exists() and (export / "model.safetensors").exists()

    proc = _run([CLI, "validate", "--config", QUICKSTART, "--ckpt_path", str(ckpt), *SMALL], tmp_path)
    assert "val/loss" in proc.stdout

    out = tmp_path / "preds.jsonl"
    _run([sys.executable, "-m", "lightning_irl", "predict", "--config", QUICKSTART, "--ckpt_path", str(ckpt),
          "--predictions.output_path", str(out), *SMALL], tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all({"prompt", "response", "logprob"} <= set(r) for r in rows)
    assert all(r["logprob"] <= 0 for r in rows)

    # Export round trip: the plain HF folder gives the logits of the checkpointed policy.
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    policy_state = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
    cli = build_cli(["--config", QUICKSTART], run=False)
    reference = cli.model.policy_spec.build_causal_lm(cli.model.tokenizer).eval()
    reference.load_state_dict(policy_state)
    ids = tokenizer(["c a f b = f a", "b a ="], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reference(**ids).logits)


def _configs():
    methods = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")))
    strategies = sorted(glob.glob(os.path.join(REPO, "configs", "strategies", "*.yaml")))
    return [[m] for m in methods] + [[QUICKSTART, s] for s in strategies]


@pytest.mark.parametrize("configs", _configs(), ids=lambda c: os.path.relpath(c[-1], REPO))
def test_every_shipped_config_parses_and_instantiates(configs, capsys):
    args = [a for c in configs for a in ("--config", c)]
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "trainer:" in printed
    if configs[-1].endswith("deepspeed.yaml") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("parsed; instantiating DeepSpeedStrategy needs the optional `deepspeed` extra")
    cli = build_cli(args, run=False)  # instantiates module, data module and trainer
    assert cli.model.tokenizer is not None


@pytest.mark.slow
def test_bad_input_is_one_clear_line_and_nonzero_exit(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a =", "response": "a"}\n{"prompt": "b =" "response": "b"}\n')
    proc = _run([CLI, "fit", "--config", QUICKSTART, "--data.init_args.task", "null",
                 "--data.init_args.train_file", str(bad)], tmp_path, ok=False)
    assert proc.returncode == 2
    assert f"lightning_irl: error: {bad}:2: malformed JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run([CLI, "fit", "--config", QUICKSTART, "--data.init_args.task", "null",
                 "--data.init_args.train_file", str(tmp_path / "absent.jsonl")], tmp_path, ok=False)
    assert proc.returncode == 2 and "absent.jsonl: no such file" in proc.stderr
    proc = _run([CLI, "fit", "--config", QUICKSTART, "--data.init_args.bogus_key", "1"], tmp_path, ok=False)
    assert proc.returncode != 0 and "bogus_key" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
