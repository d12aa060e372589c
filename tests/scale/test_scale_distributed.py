"""Two CPU processes (gloo) against one: DDP and FSDP2 give the one-process loss trajectory.

Each case runs ``scale_worker.py`` in a subprocess (Lightning relaunches it once per rank) and
compares what rank 0 saved. ``data.batch_size`` is per device, so 2 processes x 4 examples are
compared with 1 process x 8, in file order (``shuffle=False``: rank r takes examples r, r+2, ...,
so every global batch holds the same 8 examples as the one-process batch).
"""

import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "scale_worker.py")
STEPS = 3

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def run_worker(tmp_path, name, *args, timeout=90):
    out = tmp_path / f"{name}.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, WORKER, "--out", str(out), *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("single"), "single", "--devices", 1, "--batch-size", 8,
                      "--steps", STEPS)


def assert_same_run(run, reference):
    assert run["global_step"] == reference["global_step"] == STEPS
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-6)
    assert set(run["state"]) == set(reference["state"])
    for name, value in reference["state"].items():
        # 3 Adam steps at lr 1e-2 from identical gradients up to float summation order
        torch.testing.assert_close(run["state"][name].float(), value.float(), rtol=1e-4, atol=1e-4, msg=name)


def test_ddp_two_processes_follow_the_one_process_trajectory(tmp_path, one_process):
    run = run_worker(tmp_path, "ddp", "--strategy", "ddp", "--devices", 2, "--batch-size", 4, "--steps", STEPS)
    assert run["world_size"] == 2
    assert_same_run(run, one_process)


def test_fsdp2_two_processes_shard_and_follow_the_one_process_trajectory(tmp_path, one_process):
    run = run_worker(tmp_path, "fsdp2", "--strategy", "fsdp2", "--devices", 2, "--batch-size", 4,
                     "--steps", STEPS)
    assert run["world_size"] == 2 and run["param_types"] == ["DTensor"]  # every parameter sharded
    assert_same_run(run, one_process)


def test_fsdp2_micro_batches_bf16_and_gradient_checkpointing_run(tmp_path, one_process):
    run = run_worker(tmp_path, "fsdp2_bf16", "--strategy", "fsdp2", "--devices", 2, "--batch-size", 4,
                     "--micro-batch-size", 2, "--precision", "bf16-mixed", "--gradient-checkpointing",
                     "--steps", STEPS)
    assert run["param_types"] == ["DTensor"] and run["global_step"] == STEPS
    # bf16 autocast: close to, not equal to, the fp32 trajectory
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(one_process["losses"]), rtol=2e-2, atol=2e-2)


def test_fsdp2_adversarial_steps(tmp_path):
    """Policy, frozen reference and discriminator all sharded; rollout (generate with synced ranks),
    discriminator and policy updates run and the step counter counts training batches."""
    run = run_worker(tmp_path, "adv", "--algorithm", "adversarial", "--strategy", "fsdp2", "--devices", 2,
                     "--batch-size", 2, "--steps", 2)
    assert run["param_types"] == ["DTensor"] and run["global_step"] == 2
    assert all(torch.isfinite(torch.tensor(run["losses"])))


def test_fsdp2_log_ratio_discriminator_prefits_warms_up_trains_and_exports(tmp_path):
    """The log-ratio discriminator (q, a, b) sharded like the rest: a pre-fit step of q (its own
    optimizer), a warm-up step, a policy step, and the export of q with its calibration gathered
    from the shards."""
    import json

    from transformers import AutoModelForCausalLM

    run = run_worker(tmp_path, "adv_lr", "--algorithm", "adversarial", "--disc-form", "log_ratio", "--prefit", 1,
                     "--strategy", "fsdp2", "--devices", 2, "--batch-size", 2, "--steps", 3,
                     "--export", tmp_path / "export")
    assert run["param_types"] == ["DTensor"] and run["global_step"] == 3
    assert all(torch.isfinite(torch.tensor(run["losses"])))
    folder = tmp_path / "export_discriminator"
    described = json.loads((folder / "log_ratio_discriminator.json").read_text())
    torch.testing.assert_close(torch.tensor([described["bias"]]), run["disc_state"]["bias"].float())
    torch.testing.assert_close(torch.tensor([described["scale"]]), run["disc_state"]["scale"].float())
    q = AutoModelForCausalLM.from_pretrained(folder)
    for key, value in q.state_dict().items():
        torch.testing.assert_close(value, run["disc_state"]["q." + key].float(), rtol=0, atol=0)


def test_fsdp2_lora_sft_and_merged_export(tmp_path):
    """LoRA under FSDP2: only adapters train, and the gathered state dict merges into a plain HF
    folder (``merge_lora_state_dict``) whose logits equal a DDP run's merged export."""
    from transformers import AutoModelForCausalLM

    fsdp = run_worker(tmp_path, "lora_fsdp2", "--lora", "--strategy", "fsdp2", "--devices", 2, "--batch-size", 4,
                      "--steps", 2, "--export", tmp_path / "fsdp2")
    ddp = run_worker(tmp_path, "lora_ddp", "--lora", "--strategy", "ddp", "--devices", 2, "--batch-size", 4,
                     "--steps", 2, "--export", tmp_path / "ddp")
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"]), rtol=1e-5, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp2_merged").eval()
    assert not (tmp_path / "fsdp2_merged" / "adapter_config.json").exists()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp").eval()  # merge_and_unload export
    ids = torch.tensor([[1, 5, 6, 7, 3, 4], [1, 8, 9, 5, 3, 6]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_cli_fit_resume_and_export_under_fsdp2(tmp_path):
    """The shipped strategy config through the console script: a sharded checkpoint folder (one
    file per rank), resuming from it, and a gathered plain HF export."""
    from transformers import AutoModelForCausalLM

    cli = os.path.join(os.path.dirname(sys.executable), "lightning_irl")
    repo = os.path.dirname(os.path.dirname(HERE))
    args = [cli, "fit", "--config", os.path.join(repo, "configs", "quickstart.yaml"),
            "--config", os.path.join(repo, "configs", "strategies", "fsdp2.yaml"),
            "--trainer.val_check_interval", "2", "--data.init_args.num_train", "64",
            "--data.init_args.num_val", "16", "--data.init_args.batch_size", "8"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    run = lambda *extra: subprocess.run([*args, *extra], cwd=tmp_path, env=env, capture_output=True, text=True,
                                        timeout=90)
    first = run("--trainer.max_steps", "2")
    assert first.returncode == 0, first.stderr[-4000:]
    version = tmp_path / "checkpoints" / "quickstart" / "version_0"
    last = version / "last.ckpt"
    assert last.is_dir() and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    resumed = run("--trainer.max_steps", "4", "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr
    # the resumed run continues in the checkpoint's own version folder
    assert not (tmp_path / "checkpoints" / "quickstart" / "version_1").exists()
    model = AutoModelForCausalLM.from_pretrained(version / "export")
    assert sum(p.numel() for p in model.parameters()) > 0
