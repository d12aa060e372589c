"""Bad input ends a run with one line on stderr, ``lightning_irl: error: <where>: <what>``, exit
code 2 and no traceback; what can be checked before the run (options, paths, model folders,
checkpoints) is checked before anything is built or written, and a run that fails later but
before its loop starts (a bad data file) leaves no ``logs/<name>/version_<n>`` behind.

Most cases run ``main([...])`` in-process (the console script is that function); two run the
console script itself.
"""

import contextlib
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from lightning_irl.algorithms.policy import PolicyModule
from lightning_irl.cli import main
from lightning_irl.preflight import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(os.path.dirname(sys.executable), "lightning_irl")
CONFIGS = os.path.join(REPO, "configs")
TINY = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--data.init_args.num_train", "8",
        "--data.init_args.num_val", "0", "--data.init_args.batch_size", "4", "--model.init_args.export", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.callbacks", "[]"]
NO_TASK = ["--data.init_args.task", "null"]
HELP = "; see lightning_irl fit --help"


@contextlib.contextmanager
def _inside(folder):
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every bad (and two good) input file the cases name, written once."""
    root = tmp_path_factory.mktemp("inputs")
    with _inside(root), pytest.MonkeyPatch.context() as patch:  # two real checkpoints, one step each
        patch.setenv("LIGHTNING_IRL_LOG", "WARNING")
        for name, config in (("sft", "quickstart.yaml"), ("airl", "airl.yaml")):
            main(["fit", "--config", os.path.join(CONFIGS, config), *TINY, "--trainer.logger.init_args.name", name])
    paths = {"Q": os.path.join(CONFIGS, "quickstart.yaml"), "AIRL": os.path.join(CONFIGS, "airl.yaml"),
             "RM": os.path.join(CONFIGS, "reward_model.yaml"), "ROOT": str(root),
             "SFT_CKPT": str(root / "checkpoints/sft/version_0/last.ckpt"),
             "AIRL_CKPT": str(root / "checkpoints/airl/version_0/last.ckpt")}

    def write(name, data):
        path = root / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        paths[name.upper().replace(".", "_")] = str(path)

    write("trunc.ckpt", open(paths["SFT_CKPT"], "rb").read()[:20000])
    write("zero.ckpt", b"")
    torch.save({"weight": torch.zeros(2)}, root / "weights.ckpt")
    paths["WEIGHTS_CKPT"] = str(root / "weights.ckpt")
    write("afile", "not a folder\n")
    write("bad.jsonl", '{"prompt": "a =", "response": "a"}\n{"prompt": "b =" "response": "b"}\n')
    write("latin1.jsonl", b'{"prompt": "a =", "response": "a"}\n{"prompt": "caf\xe9 =", "response": "b"}\n')
    write("empty.jsonl", "")
    write("noresp.jsonl", '{"prompt": "a ="}\n')
    write("blank.jsonl", '{"prompt": "a =", "response": ""}\n{"prompt": "b =", "response": ""}\n')
    write("demos.txt", "a = a\n")
    write("broken.yaml", "trainer: {max_steps: 3\nmodel: [\n")
    write("list.yaml", "- 1\n- 2\n")
    (root / "notamodel").mkdir()
    paths["NOTAMODEL"] = str(root / "notamodel")
    return paths


def _fill(argv, files):
    return [files.get(a, a) if not a.startswith("{") else a.format(**files) for a in argv]


# (id, argv, the exact line after "lightning_irl: error: ", or a compiled regex for it)
CASES = [
    # ---- options (the parser) ----
    ("unknown-option", ["fit", "--config", "Q", "--data.init_args.bogus", "1"],
     "data.init_args.bogus: no such option" + HELP),
    ("option-typo", ["fit", "--config", "Q", "--data.init_args.batchsize", "4"],
     "data.init_args.batchsize: no such option (did you mean batch_size?)" + HELP),
    ("unknown-flag", ["fit", "--config", "Q", "--bogus", "1"], "--bogus: no such option" + HELP),
    ("not-an-integer", ["fit", "--config", "Q", "--data.init_args.batch_size", "abc"],
     "data.init_args.batch_size: expected an integer, got 'abc'" + HELP),
    ("trainer-not-an-integer", ["fit", "--config", "Q", "--trainer.max_steps", "abc"],
     "trainer.max_steps: expected an integer, got 'abc'" + HELP),
    ("not-a-choice", ["fit", "--config", "AIRL", "--model.init_args.policy_update.loss", "xyz"],
     "model.init_args.policy_update.loss: expected one of rloo, ppo, got 'xyz'" + HELP),
    ("unknown-class", ["fit", "--config", "Q", "--model.class_path", "lightning_irl.algorithms.Nope"],
     "model.class_path: cannot import lightning_irl.algorithms.Nope (module 'lightning_irl.algorithms' has no "
     "attribute 'Nope')" + HELP),
    ("no-subcommand", ["fitt"], "subcommand: invalid choice: 'fitt' (choose from 'fit', 'validate', 'test', "
                                "'predict'); see lightning_irl --help"),
    ("no-model", ["fit"], "command line: missing required options data, model (give them in a --config file or "
                          "as --model / --data)" + HELP),
    ("no-config-file", ["fit", "--config", "absent.yaml"],
     re.compile(r"/\S*/absent\.yaml: no such config file \(--config\)" + re.escape(HELP))),
    ("config-not-yaml", ["fit", "--config", "BROKEN_YAML"],
     re.compile(r"\S*broken\.yaml:2: not valid YAML \(expected ',' or '}', but got ':'\) \(--config\)")),
    ("config-not-a-mapping", ["fit", "--config", "LIST_YAML"],
     re.compile(r"\S*list\.yaml: a config file is a mapping of option: value, got a list \(--config\)")),
    # ---- option values out of range (pre-flight, the dataclasses' own checks) ----
    ("val-fraction", ["fit", "--config", "Q", "--data.init_args.val_fraction", "1.5"],
     "data.init_args.val_fraction: must be in [0, 1), got 1.5"),
    ("max-length-0", ["fit", "--config", "Q", "--data.init_args.max_length", "0"],
     "data.init_args.max_length: must be a number of tokens >= 1 (or null: no limit), got 0"),
    ("batch-size-0", ["fit", "--config", "Q", "--data.init_args.batch_size", "0"],
     "data.init_args.batch_size: must be >= 1, got 0"),
    ("micro-batch-0", ["fit", "--config", "Q", "--model.init_args.micro_batch_size", "0"],
     "model.init_args.micro_batch_size: must be >= 1 (or null: the whole batch), got 0"),
    ("num-samples-0", ["predict", "--config", "Q", "--model.init_args.sampling.num_samples", "0"],
     "model.init_args.sampling: num_samples must be >= 1, got 0"),
    ("top-p", ["fit", "--config", "Q", "--model.init_args.sampling.top_p", "1.5"],
     "model.init_args.sampling: top_p must be in (0, 1] (1: off), got 1.5"),
    ("eval-samples-0", ["fit", "--config", "Q", "--model.init_args.evaluation.num_samples", "0"],
     "model.init_args.evaluation: need num_prompts >= 0, num_samples >= 1, every_n_val >= 1"),
    ("dtype", ["fit", "--config", "Q", "--model.init_args.policy.dtype", "fp8"],
     "model.init_args.policy: dtype 'fp8' is not one of ['auto', 'bf16', 'bfloat16', 'float16', 'float32', "
     "'fp16', 'fp32']"),
    ("val-check-interval-0", ["fit", "--config", "Q", "--trainer.val_check_interval", "0"],
     "trainer.val_check_interval: must be > 0 (a fraction of an epoch in (0, 1], or a number of batches), got 0"),
    ("max-epochs", ["fit", "--config", "Q", "--trainer.max_epochs", "-5"],
     "trainer: `max_epochs` must be a non-negative integer or -1. You passed in -5."),
    ("unknown-task", ["fit", "--config", "Q", "--data.init_args.task", "nosuch"],
     "data: unknown built-in task 'nosuch'; choose one of ['grammar', 'modes']"),
    # ---- models and tokenizers ----
    ("model-folder-missing", ["fit", "--config", "Q", "--model.init_args.policy.model_name_or_path", "./nope"],
     "./nope: no such folder (a local path, so not looked up on the Hub) "
     "(model.init_args.policy.model_name_or_path)"),
    ("reward-model-before-quickstart", ["fit", "--config", "RM"],
     "checkpoints/quickstart/version_0/export: no such folder (a local path, so not looked up on the Hub); a fit "
     "run writes its export there when it ends (model.init_args.sft_policy.model_name_or_path)"),
    ("not-a-model-folder", ["fit", "--config", "Q", "--model.init_args.policy.model_name_or_path", "NOTAMODEL"],
     re.compile(r"\S*notamodel: not a Hugging Face model folder \(none of config\.json, adapter_config\.json\) "
                r"\(model\.init_args\.policy\.model_name_or_path\)")),
    ("hub-id-offline", ["fit", "--config", "Q", "--model.init_args.policy.model_name_or_path",
                        "lightning-irl-tests/no-such-model"],
     "lightning-irl-tests/no-such-model: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 keeps the Hub "
     "out of reach (model.init_args.policy.model_name_or_path)"),
    ("tokenizer-folder-missing", ["fit", "--config", "Q", "--model.init_args.policy.tokenizer", "./tok"],
     "./tok: no such folder (a local path, so not looked up on the Hub) (model.init_args.policy.tokenizer)"),
    # ---- checkpoints ----
    ("ckpt-missing", ["validate", "--config", "Q", "--ckpt_path", "gone.ckpt"],
     "gone.ckpt: no such checkpoint file (--ckpt_path)"),
    ("ckpt-truncated", ["validate", "--config", "Q", "--ckpt_path", "TRUNC_CKPT"],
     re.compile(r"\S*trunc\.ckpt: truncated or not a PyTorch checkpoint \(20000 bytes, no zip directory at the "
                r"end\) \(--ckpt_path\)")),
    ("ckpt-empty", ["validate", "--config", "Q", "--ckpt_path", "ZERO_CKPT"],
     re.compile(r"\S*zero\.ckpt: truncated or not a PyTorch checkpoint \(0 bytes, no zip directory at the end\) "
                r"\(--ckpt_path\)")),
    ("ckpt-not-lightning", ["validate", "--config", "Q", "--ckpt_path", "WEIGHTS_CKPT"],
     re.compile(r"\S*weights\.ckpt: not a Lightning checkpoint \(no state_dict; a Hugging Face folder goes in "
                r"model\.init_args\.policy\.model_name_or_path\) \(--ckpt_path\)")),
    ("ckpt-airl-into-sft", ["validate", "--config", "Q", "--ckpt_path", "AIRL_CKPT"],
     re.compile(r"\S*airl/version_0/last\.ckpt: checkpoint is from Adversarial \(AIRL / GAIL\) \(it holds "
                r"discriminator, policy, reference\), but the config trains SFT; .* \(--ckpt_path\)")),
    ("ckpt-sft-into-airl", ["fit", "--config", "AIRL", "--ckpt_path", "SFT_CKPT"],
     re.compile(r"\S*sft/version_0/last\.ckpt: checkpoint is from SFT or IQLearn \(a policy alone\) \(it holds "
                r"policy\), but the config trains Adversarial; .* \(--ckpt_path\)")),
    ("ckpt-other-architecture", ["validate", "--config", "Q", "--ckpt_path", "SFT_CKPT",
                                 "--model.init_args.policy.config.hidden_size", "32"],
     re.compile(r"\S*sft/version_0/last\.ckpt: checkpoint does not fit SFT: shape mismatch in policy\.\* "
                r"\(21 keys\) \(--ckpt_path\)")),
    # ---- folders the run writes ----
    ("logs-under-a-file", ["fit", "--config", "Q", "--trainer.logger.init_args.save_dir", "{ROOT}/afile/logs"],
     re.compile(r"\S*afile/logs: cannot be the logs folder: \S*afile is a file, not a folder "
                r"\(trainer\.logger\.init_args\.save_dir\)")),
    ("checkpoints-is-a-file", ["fit", "--config", "Q", "--checkpoint.root", "AFILE"],
     re.compile(r"\S*afile: cannot be the checkpoint folder: it is a file, not a folder \(checkpoint\.root\)")),
    ("export-under-a-file", ["fit", "--config", "Q", "--model.init_args.export_dir", "{ROOT}/afile/export"],
     re.compile(r"\S*afile/export: cannot be the export folder: \S*afile is a file, not a folder "
                r"\(model\.init_args\.export_dir\)")),
    ("predictions-in-a-file", ["predict", "--config", "Q", "--predictions.output_path", "{ROOT}/afile/p.jsonl"],
     re.compile(r"\S*afile: cannot be the predictions folder: it is a file, not a folder "
                r"\(predictions\.output_path\)")),
    ("predictions-is-a-folder", ["predict", "--config", "Q", "--predictions.output_path", "ROOT"],
     re.compile(r"\S+: is a folder; predictions go to a file \(predictions\.output_path\)")),
    # ---- data (found while the trainer sets up: the run's new log folder is removed) ----
    ("data-file-missing", ["fit", "--config", "Q", *NO_TASK, "--data.init_args.train_file", "absent.jsonl"],
     "absent.jsonl: no such file or folder (data.init_args.train_file)"),
    ("data-malformed-json", ["fit", "--config", "Q", *NO_TASK, "--data.init_args.train_file", "BAD_JSONL"],
     re.compile(r"\S*bad\.jsonl:2: malformed JSON \(Expecting ',' delimiter at column 18\)")),
    ("data-not-utf8", ["fit", "--config", "Q", *NO_TASK, "--data.init_args.train_file", "LATIN1_JSONL"],
     re.compile(r"\S*latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\); save the file as UTF-8")),
    ("data-empty-file", ["fit", "--config", "Q", *NO_TASK, "--data.init_args.train_file", "EMPTY_JSONL"],
     re.compile(r"\S*empty\.jsonl: no records \(the file is empty\)")),
    ("data-missing-field", ["fit", "--config", "Q", *NO_TASK, "--data.init_args.train_file", "NORESP_JSONL"],
     re.compile(r"\S*noresp\.jsonl:1: missing field 'completion' \(or 'response'\) next to 'prompt': .*")),
    ("data-all-dropped", ["fit", "--config", "Q", *NO_TASK, "--data.init_args.train_file", "BLANK_JSONL"],
     re.compile(r"\S*blank\.jsonl: every record was dropped \(2 with an empty response\)")),
    ("data-file-type", ["fit", "--config", "Q", *NO_TASK, "--data.init_args.train_file", "DEMOS_TXT"],
     re.compile(r"\S*demos\.txt: unsupported file type \(use \.jsonl, \.json, \.parquet, \.csv or a save_to_disk "
                r"folder\)")),
]


def _run(argv, capsys):
    """(exit code, non-empty stderr lines) of ``main(argv)``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    return exit_info.value.code, [line for line in err.splitlines() if line.strip()]


def _versions(root):
    return sorted(glob.glob(os.path.join(root, "logs", "*", "version_*")) +
                  glob.glob(os.path.join(root, "checkpoints", "*", "version_*")))


@pytest.fixture
def run_here(tmp_path, monkeypatch, files):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIGHTNING_IRL_LOG", "WARNING")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LIGHTNING_IRL_DEBUG", raising=False)
    return tmp_path


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(argv, expected, files, run_here, capsys):
    code, lines = _run(_fill(argv, files), capsys)
    assert code == 2, lines
    assert len(lines) == 1, lines
    prefix = "lightning_irl: error: "
    assert lines[0].startswith(prefix), lines
    message = lines[0][len(prefix):]
    if isinstance(expected, str):
        assert message == expected
    else:
        assert expected.fullmatch(message), message
    assert "Traceback" not in lines[0]
    assert _versions(run_here) == []  # no logs/<name>/version_<n>, no checkpoints/<name>/version_<n>
    assert not glob.glob(str(run_here / "**" / "*.partial"), recursive=True)


def test_the_table_has_at_least_25_kinds_of_bad_input():
    assert len({c[0] for c in CASES}) == len(CASES) >= 25


def test_a_failed_run_never_touches_an_earlier_run(files, run_here, capsys):
    """An earlier run's folders stay byte for byte; the failed run's new version folders go."""
    earlier = run_here / "logs" / "quickstart" / "version_0"
    earlier.mkdir(parents=True)
    (earlier / "events.out.tfevents.1").write_text("earlier")
    ckpt = run_here / "checkpoints" / "quickstart" / "version_0"
    ckpt.mkdir(parents=True)
    (ckpt / "last.ckpt").write_text("earlier")
    before = {p: (os.path.getmtime(p), open(p).read()) for p in glob.glob(str(run_here / "**/*"), recursive=True)
              if os.path.isfile(p)}
    code, lines = _run(["fit", "--config", files["Q"], *NO_TASK, "--data.init_args.train_file", files["BAD_JSONL"]],
                       capsys)
    assert code == 2 and len(lines) == 1 and "bad.jsonl:2: malformed JSON" in lines[0]
    after = {p: (os.path.getmtime(p), open(p).read()) for p in glob.glob(str(run_here / "**/*"), recursive=True)
             if os.path.isfile(p)}
    assert after == before
    assert _versions(run_here) == [str(ckpt), str(earlier)]


def test_a_crashed_predict_leaves_no_partial_file_and_the_old_predictions(files, run_here, capsys, monkeypatch):
    out = run_here / "preds.jsonl"
    out.write_text('{"old": true}\n')
    calls = []
    original = PolicyModule.predict_step

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise ValueError("model.init_args: boom in the second batch")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PolicyModule, "predict_step", failing)
    code, lines = _run(["predict", "--config", files["Q"], "--data.init_args.num_test", "4",
                        "--data.init_args.eval_batch_size", "2", "--predictions.output_path", str(out),
                        "--trainer.enable_progress_bar", "false"], capsys)
    assert code == 2 and lines == ["lightning_irl: error: model.init_args: boom in the second batch"]
    assert len(calls) == 2
    assert out.read_text() == '{"old": true}\n'
    assert not os.path.exists(str(out) + ".partial")


def test_debug_shows_the_traceback(files, run_here, monkeypatch):
    monkeypatch.setenv("LIGHTNING_IRL_DEBUG", "1")
    with pytest.raises(ConfigError, match=r"data\.init_args\.val_fraction: must be in \[0, 1\), got 1\.5"):
        main(["fit", "--config", files["Q"], "--data.init_args.val_fraction", "1.5"])


def _unwritable_folder(tmp_path):
    """A folder that cannot be created: under a read-only folder, or (root ignores permission
    bits) under /sys."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return str(locked / "logs")
    try:
        open("/sys/lightning_irl_probe", "w").close()
    except OSError:
        return "/sys/lightning_irl_test_logs"
    os.remove("/sys/lightning_irl_probe")
    pytest.skip("no unwritable folder to try")


def test_read_only_output_folder(files, run_here, capsys, tmp_path):
    folder = _unwritable_folder(tmp_path)
    code, lines = _run(["fit", "--config", files["Q"], "--trainer.logger.init_args.save_dir", folder], capsys)
    assert code == 2 and len(lines) == 1
    expected = (rf"lightning_irl: error: {re.escape(folder)}: cannot write the logs folder there "
                r"\((Permission denied|Read-only file system) in \S+\) \(trainer\.logger\.init_args\.save_dir\)")
    assert re.fullmatch(expected, lines[0]), lines
    assert not os.path.exists(folder)


@pytest.mark.parametrize("argv, expected", [
    (["fit", "--config", "Q", "--data.init_args.batch_size", "abc"],
     "lightning_irl: error: data.init_args.batch_size: expected an integer, got 'abc'" + HELP),
    (["fit", "--config", "Q", *NO_TASK, "--data.init_args.train_file", "BAD_JSONL"],
     re.compile(r"lightning_irl: error: \S*bad\.jsonl:2: malformed JSON \(Expecting ',' delimiter at column 18\)")),
], ids=["option", "data"])
def test_the_console_script(argv, expected, files, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "LIGHTNING_IRL_LOG": "WARNING",
           "OMP_NUM_THREADS": "1"}
    env.pop("LIGHTNING_IRL_DEBUG", None)
    proc = subprocess.run([CLI, *_fill(argv, files)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0] == expected if isinstance(expected, str) else expected.fullmatch(lines[0])
    assert _versions(tmp_path) == []


def test_predictions_still_written(files, run_here, capsys):
    """The checks let a good command through: predict writes its file (and no .partial)."""
    out = run_here / "preds.jsonl"
    main(["predict", "--config", files["Q"], "--ckpt_path", files["SFT_CKPT"], "--data.init_args.num_test", "2",
          "--predictions.output_path", str(out), "--trainer.enable_progress_bar", "false"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and not os.path.exists(str(out) + ".partial")


def test_a_non_finite_value_is_one_line_exit_1_and_keeps_the_run(files, run_here, capsys, monkeypatch):
    """Not bad input: a run that stopped in training keeps its folders (they say what happened)."""
    from lightning_irl.algorithms import SFT
    from lightning_irl.algorithms.engine import NonFiniteError

    message = "non-finite NLL (NaN) at step 0: stopped before the update; no checkpoint yet"

    def failing(self, batch, batch_idx):
        raise NonFiniteError(message, 0, "NLL")

    monkeypatch.setattr(SFT, "training_step", failing)
    code, lines = _run(["fit", "--config", files["Q"], *TINY], capsys)
    assert code == 1 and lines == [f"lightning_irl: error: {message}"]
    assert glob.glob(str(run_here / "logs" / "quickstart" / "version_0"))
