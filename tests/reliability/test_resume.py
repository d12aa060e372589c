"""Exact resume: a run interrupted at step k and resumed from its step-k checkpoint ends with the
weights, optimizer states and schedules, bit for bit (``torch.equal``), of the run that was never
interrupted, for SFT and the rollout methods (adversarial with a log-ratio discriminator and a
warm-up, SPIN, IQ-Learn, distillation, the reward model), at kill points mid-epoch (at a validation), at an epoch boundary and in
the next epoch, with 0 and 2 DataLoader workers; then the same through the console script with a
real SIGKILL, on one process and on two (DDP, gloo), and ``--ckpt_path last`` keeping the run's
version folders.

Each uninterrupted run writes a checkpoint after every step (``RunCheckpoint(every_n_train_steps=1,
save_top_k=-1)``); the step-k file is exactly what a run killed after step k left behind.
Validation draws from the global generator here (``evaluation.seed=None``), so a resumed run,
which skips the validation due at its kill point, would drift if validation consumed training
randomness (``ExactResume``)."""

from __future__ import annotations

import glob
import dataclasses
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from lightning_irl.algorithms import SFT, SPIN, Adversarial, Distill, IQLearn, OptimizerSpec, RewardModel
from lightning_irl.algorithms.adversarial import DiscriminatorTraining, PolicyUpdate
from lightning_irl.callbacks import ExactResume, RunCheckpoint
from lightning_irl.cli import build_cli
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.metrics.evaluation import EvalConfig
from lightning_irl.models.spec import ModelSpec
from lightning_irl.rollout import SamplingConfig
from tests.conftest import TINY_LLAMA

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(os.path.dirname(sys.executable), "lightning_irl")
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
DDP = os.path.join(REPO, "configs", "strategies", "ddp.yaml")

STEPS = 12  # 20 examples / batch 4 = 5 batches per epoch: epochs end at steps 5 and 10
KILL_POINTS = {3: "mid-epoch, at a validation", 5: "epoch boundary", 7: "mid-epoch, second epoch"}


def build_module(method: str):
    spec = ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes", seed=0)
    common = dict(optimizer=OptimizerSpec(lr=3e-3, warmup_steps=2), export=False,
                  sampling=SamplingConfig(max_new_tokens=6, num_samples=2),
                  evaluation=EvalConfig(num_prompts=4, num_samples=2, seed=None))
    if method == "sft":
        return SFT(policy=spec, **common)
    if method == "adversarial":
        return Adversarial(policy=spec, discriminator_training=DiscriminatorTraining(
            form="log_ratio", warmup_steps=2, warmup_fit="mle", mle_weight=1.0, steps=2),
            policy_update=PolicyUpdate(loss="ppo", ppo_epochs=1, ppo_minibatches=2), **common)
    if method == "spin":
        return SPIN(policy=spec, iterations=2, steps_per_iteration=6, **common)
    if method == "iq_learn":
        return IQLearn(policy=spec, policy_sample_weight=0.5, **common)
    if method == "distill":  # half the steps on the student's own samples (seeded draws)
        return Distill(policy=spec, teacher=dataclasses.replace(spec, seed=1), on_policy_fraction=0.5, **common)
    if method == "reward_model":  # demonstrations vs samples of an initial policy, drawn each step
        return RewardModel(classifier=dataclasses.replace(spec, seed=2), preset="init_demo",
                           initial_policy=dataclasses.replace(spec, seed=3), optimizer=common["optimizer"],
                           sampling=common["sampling"], export=False)
    raise ValueError(method)


def run(method: str, folder, workers: int = 0, ckpt_path=None, exact: bool = True, callbacks=()):
    """Fit ``method`` for ``STEPS`` steps (from ``ckpt_path`` if given), a checkpoint after every
    step in ``folder``; returns the trainer."""
    L.seed_everything(0)
    module = build_module(method)
    data = DemonstrationDataModule(task="modes", num_train=20, num_val=8, batch_size=4, num_workers=workers)
    saves = RunCheckpoint(dirpath=str(folder), every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=3, num_sanity_val_steps=1,
                        default_root_dir=str(folder),
                        callbacks=[saves, *([ExactResume()] if exact else []), *callbacks])
    trainer.fit(module, datamodule=data, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    assert trainer.global_step == STEPS
    return trainer


def final_state(trainer) -> dict:
    return {"weights": {k: v.detach().clone() for k, v in trainer.lightning_module.state_dict().items()},
            "optimizers": [o.state_dict() for o in trainer.optimizers],
            "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]}


def checkpoint_state(path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return {"weights": ckpt["state_dict"], "optimizers": ckpt["optimizer_states"], "schedulers": ckpt["lr_schedulers"],
            "global_step": ckpt["global_step"]}


def max_weight_difference(a: dict, b: dict) -> float:
    return max((a["weights"][k].float() - b["weights"][k].float()).abs().max().item() for k in a["weights"])


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    different = [k for k in a["weights"] if not torch.equal(a["weights"][k], b["weights"][k])]
    assert not different, f"{len(different)} tensors differ, max |dw| {max_weight_difference(a, b):.3g}: {different[:5]}"
    assert len(a["optimizers"]) == len(b["optimizers"])
    for opt_a, opt_b in zip(a["optimizers"], b["optimizers"]):
        assert opt_a["param_groups"] == opt_b["param_groups"]
        assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
        for index, values in opt_a["state"].items():
            for key, value in values.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][index][key])), (index, key)
    assert a["schedulers"] == b["schedulers"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run per (method, workers), shared by the kill points."""
    cache = {}

    def get(method: str, workers: int = 0):
        if (method, workers) not in cache:
            folder = tmp_path_factory.mktemp(f"{method}_w{workers}")
            cache[method, workers] = folder, final_state(run(method, folder, workers))
        return cache[method, workers]

    return get


CASES = [("sft", 0), ("adversarial", 0), ("spin", 0), ("iq_learn", 0), ("distill", 0), ("reward_model", 0), ("sft", 2),
         ("adversarial", 2)]


@pytest.mark.parametrize("method,workers", CASES, ids=[f"{m}-workers{w}" for m, w in CASES])
def test_resume_from_any_step_ends_bitwise_equal(tmp_path, uninterrupted, method, workers):
    folder, reference = uninterrupted(method, workers)
    for kill in KILL_POINTS:
        resumed = run(method, tmp_path / f"from_{kill}", workers, ckpt_path=folder / f"step={kill}.ckpt")
        assert_bitwise_equal(final_state(resumed), reference)


def test_the_comparison_bites_without_the_random_streams(tmp_path, uninterrupted):
    """Resumed without ``ExactResume``, the adversarial run's rollouts draw other samples."""
    folder, reference = uninterrupted("adversarial")
    resumed = run("adversarial", tmp_path, ckpt_path=folder / "step=5.ckpt", exact=False)
    assert max_weight_difference(final_state(resumed), reference) > 1e-4


def test_mid_epoch_resume_continues_with_the_same_batches(tmp_path, uninterrupted):
    """The data position: after a resume at step 3 the batches are those of steps 4, 5, ... of the
    uninterrupted run (and Lightning does not warn about an unresumable loader)."""
    seen = {}

    class Record(L.Callback):
        def __init__(self, key):
            self.key = key

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(self.key, []).append((trainer.global_step, tuple(batch["prompt"])))

    run("sft", tmp_path / "full", callbacks=[Record("full")])
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run("sft", tmp_path / "resumed", ckpt_path=tmp_path / "full" / "step=3.ckpt", callbacks=[Record("resumed")])
    assert seen["resumed"] == seen["full"][3:]
    assert not [w for w in caught if "not resumable" in str(w.message)]


def test_resume_in_the_same_folder_keeps_writing_last_ckpt(tmp_path):
    """Resumed from the first periodic checkpoint (written before the first last.ckpt), the run
    goes on writing its folder's last.ckpt, not a last-v1.ckpt beside it."""
    run("sft", tmp_path)
    resumed = run("sft", tmp_path, ckpt_path=tmp_path / "step=1.ckpt")
    assert not glob.glob(str(tmp_path / "last-v*.ckpt"))
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == STEPS
    assert resumed.checkpoint_callback.last_model_path == str(tmp_path / "last.ckpt")


# ---- through the console script ------------------------------------------------------------
TINY_CLI = ["--data.init_args.num_train", "40", "--data.init_args.num_val", "8", "--data.init_args.batch_size", "8",
            "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--model.init_args.evaluation.num_prompts", "4",
            "--model.init_args.export", "false"]


def cli_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    return env


def cli(args, cwd, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run([CLI, "fit", "--config", QUICKSTART, *TINY_CLI, *map(str, args)], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def kill_after(args, cwd, path, timeout=120) -> None:
    """Start the console script, SIGKILL its whole process group (workers included) as soon as
    ``path`` exists, while it is still training."""
    proc = subprocess.Popen([CLI, "fit", "--config", QUICKSTART, *TINY_CLI, *map(str, args)], cwd=cwd,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"exited with {proc.returncode} before {path}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    still_training = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert still_training and proc.returncode == -signal.SIGKILL


def run_full_and_kill_a_twin(tmp_path, args, kill_at: int):
    """Start the uninterrupted run ``full/`` in the background and a twin ``killed/`` with a checkpoint
    after every step, SIGKILLed once ``step=<kill_at>.ckpt`` exists: (the full run's process, the
    killed run's checkpoint folder)."""
    periodic = ["--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1",
                "--checkpoint.filename", "{step}"]
    (tmp_path / "full").mkdir()
    (tmp_path / "killed").mkdir()
    full = subprocess.Popen([CLI, "fit", "--config", QUICKSTART, *TINY_CLI, *args], cwd=tmp_path / "full",
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "killed" / "checkpoints" / "quickstart" / "version_0"
    kill_after([*args, *periodic], tmp_path / "killed", run_dir / f"step={kill_at}.ckpt")
    return full, run_dir


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_through_the_console_script(tmp_path):
    """SFT on the quickstart config (bf16-mixed, 2 workers), killed with SIGKILL right after its
    step-7 checkpoint, resumed from it: the final last.ckpt equals the uninterrupted run's."""
    steps = ["--trainer.max_steps", "30", "--data.init_args.num_workers", "2"]
    full, run_dir = run_full_and_kill_a_twin(tmp_path, steps, kill_at=7)
    assert not (run_dir / "step=30.ckpt").exists()
    cli([*steps, "--ckpt_path", run_dir / "step=7.ckpt"], tmp_path / "killed")
    assert full.wait(timeout=120) == 0, full.stderr.read()[-3000:]
    # the resumed run kept writing into version_0 (the checkpoint's folder)
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints" / "quickstart")) == ["version_0"]
    assert sorted(os.listdir(tmp_path / "killed" / "logs" / "quickstart")) == ["version_0"]
    assert not glob.glob(str(run_dir / "last-v*.ckpt"))
    resumed = checkpoint_state(run_dir / "last.ckpt")
    reference = checkpoint_state(tmp_path / "full" / "checkpoints" / "quickstart" / "version_0" / "last.ckpt")
    assert resumed["global_step"] == reference["global_step"] == 30
    assert_bitwise_equal(resumed, reference)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_processes_resume_bitwise(tmp_path):
    """2 gloo processes, SIGKILLed after step 5 (mid-epoch), resumed with ``--ckpt_path last``: the final
    weights and optimizer states equal the uninterrupted 2-process run's."""
    args = ["--config", DDP, "--trainer.devices", "2", "--trainer.max_steps", "9", "--trainer.precision", "32-true",
            "--data.init_args.batch_size", "4", "--model.init_args.evaluation.enabled", "false"]
    full, run_dir = run_full_and_kill_a_twin(tmp_path, args, kill_at=5)
    assert 4 <= torch.load(run_dir / "last.ckpt", weights_only=False)["global_step"] < 9  # written after step=k
    cli([*args, "--ckpt_path", "last"], tmp_path / "killed", timeout=180)
    assert full.wait(timeout=180) == 0, full.stderr.read()[-3000:]
    resumed = checkpoint_state(run_dir / "last.ckpt")
    reference = checkpoint_state(tmp_path / "full" / "checkpoints" / "quickstart" / "version_0" / "last.ckpt")
    assert resumed["global_step"] == reference["global_step"] == 9
    assert_bitwise_equal(resumed, reference)


def test_ckpt_path_last_resumes_the_newest_version_in_its_folders(tmp_path, monkeypatch):
    """``--ckpt_path last``: the newest version folder with a last.ckpt, and the resumed run writes
    its logs, checkpoints and export there instead of opening a new version."""
    monkeypatch.chdir(tmp_path)
    tiny = [*TINY_CLI[:-2], "--model.init_args.evaluation.enabled", "false"]
    for steps in (2, 4):  # version_0 (step 2), version_1 (step 4)
        build_cli(["fit", "--config", QUICKSTART, *tiny, "--trainer.max_steps", str(steps)])
    cli_run = build_cli(["fit", "--config", QUICKSTART, *tiny, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert cli_run.trainer.global_step == 6
    assert os.path.abspath(cli_run.trainer.ckpt_path) == os.path.abspath("checkpoints/quickstart/version_1/last.ckpt")
    for root in ("checkpoints", "logs"):
        assert sorted(os.listdir(os.path.join(root, "quickstart"))) == ["version_0", "version_1"]
    assert torch.load("checkpoints/quickstart/version_1/last.ckpt", weights_only=False)["global_step"] == 6
    assert os.path.exists("checkpoints/quickstart/version_1/export/model.safetensors")
    assert len(glob.glob("logs/quickstart/version_1/events.out.tfevents.*")) == 2
    # a file inside a version folder: that version too
    build_cli(["fit", "--config", QUICKSTART, *tiny, "--trainer.max_steps", "3",
               "--ckpt_path", "checkpoints/quickstart/version_0/last.ckpt"])
    assert sorted(os.listdir("checkpoints/quickstart")) == ["version_0", "version_1"]
    assert torch.load("checkpoints/quickstart/version_0/last.ckpt", weights_only=False)["global_step"] == 3
    # nothing to resume: a fresh run, with a warning
    fresh = build_cli(["fit", "--config", QUICKSTART, *tiny, "--trainer.max_steps", "1", "--ckpt_path", "last",
                       "--trainer.logger.init_args.name", "other"])
    assert fresh.trainer.global_step == 1 and os.path.exists("checkpoints/other/version_0/last.ckpt")
