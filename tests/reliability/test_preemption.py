"""Preemption: SIGTERM / SIGUSR1 finish the optimizer step, write ``last.ckpt`` (atomically) and
exit 143 / 138; resuming from that checkpoint ends bitwise equal to the uninterrupted run. In
process (the signal sent at an exact point: during a step, during validation) and through the
console script (SIGTERM from outside, after a few steps)."""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from lightning_irl.algorithms import Adversarial, OptimizerSpec
from lightning_irl.algorithms.adversarial import DiscriminatorTraining, PolicyUpdate
from lightning_irl.callbacks import AtomicCheckpointIO, ExactResume, Preemption, RunCheckpoint
from lightning_irl.callbacks.checkpoint import find_last_checkpoint
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.metrics.evaluation import EvalConfig
from lightning_irl.models.spec import ModelSpec
from lightning_irl.rollout import SamplingConfig
from lightning.fabric.plugins import TorchCheckpointIO
from tests.conftest import TINY_LLAMA

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(os.path.dirname(sys.executable), "lightning_irl")
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
STEPS = 9  # 20 examples / batch 4: 5 batches per epoch; validation after steps 3 and 8


class SendSignal(L.Callback):
    """Send ``signum`` to this process while step ``step`` runs (``phase="step"``: at the start of
    its training batch) or during the validation after it (``phase="validation"``)."""

    def __init__(self, signum: int, step: int, phase: str) -> None:
        self.signum, self.step, self.phase, self.sent = signum, step, phase, False

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.phase == "step" and trainer.global_step == self.step - 1:
            self._send()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.phase == "validation" and not trainer.sanity_checking and trainer.global_step == self.step:
            self._send()


def fit(folder, callbacks=(), ckpt_path=None):
    L.seed_everything(0)
    spec = ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes", seed=0)
    module = Adversarial(policy=spec, optimizer=OptimizerSpec(lr=3e-3, warmup_steps=2), export=False,
                         sampling=SamplingConfig(max_new_tokens=6, num_samples=2),
                         evaluation=EvalConfig(num_prompts=4, num_samples=2, seed=None),
                         discriminator_training=DiscriminatorTraining(form="log_ratio", warmup_steps=1,
                                                                      warmup_fit="mle", mle_weight=1.0),
                         policy_update=PolicyUpdate(loss="rloo"))
    data = DemonstrationDataModule(task="modes", num_train=20, num_val=8, batch_size=4)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=3, num_sanity_val_steps=1,
                        callbacks=[RunCheckpoint(dirpath=str(folder)), ExactResume(), Preemption(), *callbacks])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def state(trainer) -> dict:
    return {"weights": {k: v.detach().clone() for k, v in trainer.lightning_module.state_dict().items()},
            "optimizers": [o.state_dict() for o in trainer.optimizers]}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    different = [k for k in a["weights"] if not torch.equal(a["weights"][k], b["weights"][k])]
    assert not different, different[:5]
    for opt_a, opt_b in zip(a["optimizers"], b["optimizers"], strict=True):
        assert opt_a["param_groups"] == opt_b["param_groups"]
        for index, values in opt_a["state"].items():
            for key, value in values.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][index][key])), (index, key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = fit(tmp_path_factory.mktemp("full"))
    assert trainer.global_step == STEPS
    return state(trainer)


CASES = [(signal.SIGTERM, 143, "step", 4), (signal.SIGUSR1, 138, "step", 4),
         (signal.SIGTERM, 143, "validation", 3), (signal.SIGUSR1, 138, "validation", 8)]


@pytest.mark.parametrize("signum,code,phase,step", CASES,
                         ids=[f"{signal.Signals(s).name}-during-{p}-{k}" for s, _, p, k in CASES])
def test_signal_saves_last_exits_and_resumes_bitwise(tmp_path, uninterrupted, signum, code, phase, step):
    sender = SendSignal(signum, step, phase)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with pytest.raises(SystemExit) as stopped:
        fit(tmp_path, callbacks=[sender])
    assert sender.sent and stopped.value.code == code
    last = tmp_path / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == step  # the step in progress finished, no other began
    assert not glob.glob(str(tmp_path / "*.part"))
    # the handlers are the previous ones again
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == handlers
    resumed = fit(tmp_path / "resumed", ckpt_path=str(last))
    assert resumed.global_step == STEPS
    assert_bitwise_equal(state(resumed), uninterrupted)


def test_checkpoint_writes_are_atomic(tmp_path):
    """A save killed half-way leaves the previous last.ckpt whole (and a stray .part nobody reads)."""
    io = AtomicCheckpointIO(TorchCheckpointIO())
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    class Dies(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            with open(path, "wb") as f:
                f.write(b"half a checkpoint")
            raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO(Dies()).save_checkpoint({"global_step": 2}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert os.path.exists(str(path) + ".part")
    assert find_last_checkpoint(str(tmp_path)) == str(path)
    # the trainer's checkpoint IO is wrapped once RunCheckpoint is set up
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[RunCheckpoint(dirpath=str(tmp_path))])
    trainer.checkpoint_callback.setup(trainer, None, "fit")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ---- through the console script ------------------------------------------------------------
TINY_CLI = ["--data.init_args.num_train", "40", "--data.init_args.num_val", "8", "--data.init_args.batch_size", "8",
            "--trainer.val_check_interval", "3", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--model.init_args.evaluation.num_prompts", "4",
            "--model.init_args.export", "false", "--trainer.max_steps", "24"]


def cli_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "LIGHTNING_IRL_LOG": "INFO"}
    env.pop("LOCAL_RANK", None)
    return env


def sigterm_after(args, cwd, pattern, timeout=120) -> str:
    """Run ``args`` (the console script), send SIGTERM once a file matching ``pattern`` exists,
    assert exit status 143 and return the run's output."""
    proc = subprocess.Popen(args, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while not glob.glob(str(pattern)):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 143, output[-3000:]
    return output


@pytest.mark.slow
def test_sigterm_through_the_console_script(tmp_path):
    """``lightning_irl fit`` on the quickstart config, SIGTERM once it wrote its step-3 periodic
    checkpoint: exit 143, a last.ckpt at the step it reached; ``--ckpt_path last`` then ends
    bitwise equal to an uninterrupted run (run side by side)."""
    (tmp_path / "full").mkdir()
    (tmp_path / "run").mkdir()
    args = [CLI, "fit", "--config", QUICKSTART, *TINY_CLI]
    full = subprocess.Popen(args, cwd=tmp_path / "full", env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "run" / "checkpoints" / "quickstart" / "version_0"
    output = sigterm_after([*args, "--checkpoint.every_n_train_steps", "3", "--checkpoint.save_top_k", "-1"],
                           tmp_path / "run", folder / "*step=3.ckpt")
    saved = re.search(r"Preemption: SIGTERM received; saved (\S+) at step (\d+), exiting with 143", output)
    assert saved, output[-3000:]
    step = int(saved.group(2))
    checkpoint = torch.load(folder / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == step and 3 <= step < 24
    assert os.path.samefile(tmp_path / "run" / saved.group(1), folder / "last.ckpt")

    resumed = subprocess.run([*args, "--ckpt_path", "last"], cwd=tmp_path / "run", env=cli_env(),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert full.wait(timeout=120) == 0, full.stderr.read()[-3000:]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints" / "quickstart")) == ["version_0"]
    ours = torch.load(folder / "last.ckpt", weights_only=False)
    reference = torch.load(tmp_path / "full" / "checkpoints" / "quickstart" / "version_0" / "last.ckpt",
                           weights_only=False)
    assert ours["global_step"] == reference["global_step"] == 24
    assert_bitwise_equal({"weights": ours["state_dict"], "optimizers": ours["optimizer_states"]},
                         {"weights": reference["state_dict"], "optimizers": reference["optimizer_states"]})


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_stops_both_ddp_ranks_after_the_same_step(tmp_path):
    """2 gloo processes, SIGTERM to rank 0 only (the launching process): both ranks save after
    the same step and exit 143 (Lightning's own handler broadcasts inside the signal handler and
    deadlocks here); ``--ckpt_path last`` then ends bitwise equal to the uninterrupted run."""
    ddp = ["--config", os.path.join(REPO, "configs", "strategies", "ddp.yaml"), "--trainer.devices", "2",
           "--trainer.precision", "32-true", "--data.init_args.batch_size", "4", "--trainer.max_steps", "12"]
    args = [CLI, "fit", "--config", QUICKSTART, *TINY_CLI, *ddp]
    (tmp_path / "full").mkdir()
    (tmp_path / "run").mkdir()
    full = subprocess.run(args, cwd=tmp_path / "full", env=cli_env(), capture_output=True, text=True, timeout=180)
    assert full.returncode == 0, full.stderr[-3000:]
    folder = tmp_path / "run" / "checkpoints" / "quickstart" / "version_0"
    output = sigterm_after([*args, "--checkpoint.every_n_train_steps", "2", "--checkpoint.save_top_k", "-1"],
                           tmp_path / "run", folder / "*step=2.ckpt")
    steps = re.findall(r"Preemption: SIGTERM received; saved \S+ at step (\d+), exiting with 143", output)
    assert len(steps) == 2 and steps[0] == steps[1], output[-3000:]  # both ranks, the same step
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == int(steps[0]) < 12
    resumed = subprocess.run([*args, "--ckpt_path", "last"], cwd=tmp_path / "run", env=cli_env(),
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours = torch.load(folder / "last.ckpt", weights_only=False)
    reference = torch.load(tmp_path / "full" / "checkpoints" / "quickstart" / "version_0" / "last.ckpt",
                           weights_only=False)
    assert ours["global_step"] == reference["global_step"] == 12
    assert_bitwise_equal({"weights": ours["state_dict"], "optimizers": ours["optimizer_states"]},
                         {"weights": reference["state_dict"], "optimizers": reference["optimizer_states"]})
