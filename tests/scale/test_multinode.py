"""Two nodes x one process on this machine give the one-process run: DDP and FSDP2, torchrun and
Lightning's own launch, through the console script and the shipped YAML (docs/multinode.md).

Each case starts two ``lightning_irl fit`` node processes at once on 127.0.0.1 (gloo on CPU):

- ``torchrun``: ``torchrun --nnodes 2 --nproc_per_node 1 --node_rank {0,1} --master_addr 127.0.0.1
  --master_port P -m lightning_irl fit ... --trainer.num_nodes 2 --trainer.devices 1``; Lightning
  must pick ``TorchElasticEnvironment``.
- ``lightning``: ``lightning_irl fit ... --trainer.num_nodes 2 --trainer.devices 1`` with
  ``NODE_RANK={0,1} MASTER_ADDR=127.0.0.1 MASTER_PORT=P``; Lightning's ``LightningEnvironment``.

and compares rank 0's TensorBoard ``train/loss`` and the exported weights with one process of the
same YAML at twice the per-device batch (``data.batch_size`` is per device; global batch =
batch_size x devices x num_nodes = 4 x 1 x 2 = 8 x 1 x 1).

Why the two runs train on the same examples at every step, shuffled: ``ResumableSampler`` draws
the epoch's order from ``seed_everything`` (``seed_everything: 0`` in the YAML, the same on every
node) and rank r takes positions r, r+2, r+4, ... of it. With 4 examples per rank, step k of rank
r holds positions 8k + r, 8k + r + 2, 8k + r + 4, 8k + r + 6, so the two ranks together hold
positions 8k .. 8k + 7 — the one-process batch k of 8. (The loss is normalised by the global
token count, so the summed gradient is that of the one large batch.) ``MultinodeProbe``
(scale_worker.py) records every rank's token rows, and the test checks this per step.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.dirname(sys.executable)
CLI = os.path.join(BIN, "lightning_irl")
TORCHRUN = os.path.join(BIN, "torchrun")
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
STRATEGY = {name: os.path.join(REPO, "configs", "strategies", f"{name}.yaml") for name in ("ddp", "fsdp2")}
STEPS = 3
PER_DEVICE_BATCH = 4
TIMEOUT = 150  # one case takes 20-35 s here (2 shared cores); a hang must not stall the suite

# Overrides of the shipped YAML, and why:
TINY = [
    "--trainer.max_steps", str(STEPS),
    # fp32 instead of the YAML's bf16-mixed: under bf16 autocast two half-batch gradients summed
    # by the all-reduce round differently from one full-batch gradient (8-bit mantissa, ~4e-3
    # relative), so the comparison could only be loose; in fp32 only summation order differs.
    "--trainer.precision", "32-true",
    # The YAML warms up from lr 0 over 20 steps: 3 steps would hardly move the weights
    # (lr 0, 1.5e-4, 3e-4). Without warm-up they move by ~lr = 3e-3 per step.
    "--model.init_args.optimizer.warmup_steps", "0",
    "--trainer.log_every_n_steps", "1",  # every step's loss in TensorBoard
    "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--data.init_args.num_val", "0",
    "--trainer.enable_progress_bar", "false",
    # 8 global batches of 8 per epoch, shuffled (the YAML's shuffle), of which 3 train
    "--data.init_args.num_train", "64",
    "--trainer.callbacks+=scale_worker.MultinodeProbe",
]

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def node_env(**extra) -> dict:
    """This environment without anything that would tell Lightning it is already placed (a
    SLURM job, torchrun, an outer Lightning launch), plus ``extra``."""
    placement = ("LOCAL_RANK", "RANK", "GROUP_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")
    env = {k: v for k, v in os.environ.items()
           if k not in placement and not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_", "LSB_", "JSM_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    """A port nobody listens on now. Another process may take it before the run binds it: the
    caller retries on "address already in use"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list:
    """Child processes of ``pid``, recursively (Linux /proc), so that the workers torchrun starts
    in sessions of their own are stopped too."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def stop(procs) -> None:
    """Kill what these launches started (each launch and its descendants, by process id)."""
    for proc in procs:
        if proc.poll() is None:
            for pid in [*_descendants(proc.pid), proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def run_nodes(commands, cwd, timeout=TIMEOUT) -> list:
    """Start one process per node at once; wait for all of them. A node that fails or a run past
    ``timeout`` stops every node (the others would wait for the failed one forever). Returns
    each node's output; asserts that every node exited 0."""
    logs = [cwd / f"node{rank}.log" for rank in range(len(commands))]
    procs, timed_out = [], False
    try:
        for (args, env), log in zip(commands, logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            timed_out = time.monotonic() > deadline
            if timed_out or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        stop(procs)
    outputs = [log.read_text() for log in logs]
    codes = [p.returncode for p in procs]
    if codes != [0] * len(procs):
        raise NodeFailure(codes, outputs, f"killed after {timeout} s; " if timed_out else "")
    return outputs


class NodeFailure(AssertionError):
    def __init__(self, codes, outputs, note: str = "") -> None:
        self.outputs = outputs
        tails = "\n".join(f"--- node {r} (exit {c}):\n{o[-3000:]}" for r, (c, o) in enumerate(zip(codes, outputs)))
        super().__init__(f"{note}exit codes {codes}\n{tails}")

    @property
    def port_taken(self) -> bool:
        text = "\n".join(self.outputs).lower()
        return "address already in use" in text or "eaddrinuse" in text


def node_commands(launcher: str, strategy: str, port: int, extra=()) -> list:
    fit = ["fit", "--config", QUICKSTART, "--config", STRATEGY[strategy], *TINY,
           "--data.init_args.batch_size", str(PER_DEVICE_BATCH), "--trainer.num_nodes", "2",
           "--trainer.devices", "1", *extra]
    if launcher == "torchrun":
        return [([TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                  "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "lightning_irl", *fit],
                 node_env()) for rank in range(2)]
    return [([CLI, *fit], node_env(NODE_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for rank in range(2)]


def two_nodes(tmp_path, launcher: str, strategy: str, extra=()) -> dict:
    """Run the two nodes; on a failed launch try again with a new port, up to 3 attempts.

    The port is free when chosen but other processes on the machine (other test runs) may take
    it first, and a node that then connects to a foreign listener fails in ways other than
    "address already in use". A failed attempt's output is printed and its logs stay in
    ``attempt<n>/``; a real bug fails all three. The results themselves are never retried."""
    for attempt in range(3):
        cwd = tmp_path / f"attempt{attempt}"
        cwd.mkdir()
        try:
            started = time.monotonic()
            run_nodes(node_commands(launcher, strategy, free_port(), extra), cwd)
            return collect(cwd, seconds=time.monotonic() - started)
        except NodeFailure as failure:
            print(f"\n{cwd}: attempt {attempt} failed (port taken: {failure.port_taken}):\n{failure}")
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def collect(cwd, seconds: float) -> dict:
    """What a run wrote: TensorBoard ``train/loss`` per step, the exported weights, the probes."""
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = sorted((cwd / "logs" / "quickstart").iterdir())
    assert [p.name for p in logs] == ["version_0"]  # both nodes' rank 0 agreed on one run folder
    events = EventAccumulator(str(logs[0]), size_guidance={"scalars": 0})
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    folder = cwd / "checkpoints" / "quickstart" / "version_0"
    probes = [json.loads(p.read_text()) for p in sorted(cwd.glob("probe_rank*.json"))]
    return {"cwd": cwd, "seconds": seconds, "losses": [losses[s] for s in sorted(losses)],
            "weights": load_file(folder / "export" / "model.safetensors"), "checkpoint": folder / "last.ckpt",
            "probes": probes}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same YAML, one process (no strategy config), twice the per-device batch."""
    cwd = tmp_path_factory.mktemp("one_process")
    started = time.monotonic()
    run_nodes([([CLI, "fit", "--config", QUICKSTART, *TINY, "--data.init_args.batch_size",
                 str(2 * PER_DEVICE_BATCH)], node_env())], cwd)
    return collect(cwd, seconds=time.monotonic() - started)


def assert_same_run(run, reference, environment: str, strategy: str) -> None:
    print(f"\n{run['cwd'].parent.name}: two nodes {run['seconds']:.1f} s, one process {reference['seconds']:.1f} s")
    probes = run["probes"]
    assert [p["global_rank"] for p in probes] == [0, 1]
    for rank, probe in enumerate(probes):
        assert probe["cluster_environment"] == environment
        assert (probe["node_rank"], probe["local_rank"], probe["world_size"], probe["num_nodes"]) == (rank, 0, 2, 2)
        assert probe["strategy"] == strategy and probe["global_step"] == STEPS
    if strategy == "FSDP2Strategy":
        assert all(p["param_types"] == ["DTensor"] for p in probes)  # sharded over the two nodes
    (single,) = reference["probes"]
    # one shuffled order (seed_everything: 0), rank r of 2 takes every other position of it
    assert [p["sampler"] for p in probes] == [{"seed": 0, "rank": r, "num_replicas": 2} for r in range(2)]
    assert single["sampler"] == {"seed": 0, "rank": 0, "num_replicas": 1}
    # Same examples at every step: the two nodes' batches of 4 together are the batch of 8.
    for step in range(STEPS):
        assert len(probes[0]["rows"][step]) == len(probes[1]["rows"][step]) == PER_DEVICE_BATCH
        assert sorted(probes[0]["rows"][step] + probes[1]["rows"][step]) == sorted(single["rows"][step]), step
    # Losses (what rank 0 logged to TensorBoard): same global batch, same gradient; in fp32 only
    # the summation order differs (the all-reduce adds two half-batch sums). Measured: at most
    # 2.4e-7 apart (of 2.3-2.5); a step on other examples differs by ~1e-2. Steps 2 and 3 also
    # check the first updates.
    assert len(run["losses"]) == len(reference["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(probes[0]["losses"]), torch.tensor(reference["losses"]),
                               rtol=1e-5, atol=1e-6)
    # Exported weights (gathered from the shards under FSDP2): 3 AdamW steps at lr <= 3e-3 from
    # gradients equal up to float summation order. Adam's first steps move a weight by ~lr *
    # g / (|g| + eps), ~3e-3 each; entries whose gradient is near eps (1e-8) carry a larger
    # relative rounding error, which Adam does not damp. Measured: at most 2.7e-6 apart; atol
    # 1e-5 is still ~300x below one step's movement.
    weights, expected = run["weights"], reference["weights"]
    assert set(weights) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-5, msg=name)


def check_checkpoint(run, strategy: str) -> None:
    last = run["checkpoint"]
    if strategy == "fsdp2":  # one shard per node, both written into the one shared folder
        assert last.is_dir() and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    else:
        assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == STEPS


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("launcher,environment", [("torchrun", "TorchElasticEnvironment"),
                                                  ("lightning", "LightningEnvironment")])
def test_two_nodes_follow_one_process(tmp_path, one_process, launcher, environment, strategy):
    run = two_nodes(tmp_path, launcher, strategy)
    assert_same_run(run, one_process, environment, {"ddp": "DDPStrategy", "fsdp2": "FSDP2Strategy"}[strategy])
    check_checkpoint(run, strategy)


def test_without_a_seed_the_nodes_still_share_one_data_order(tmp_path):
    """``seed_everything: false``: each process would draw its own shuffling seed (measured: the
    two nodes drew different ones and trained on overlapping examples); rank 0's seed is
    broadcast, so the nodes shard one order and never train on the same example in an epoch."""
    run = two_nodes(tmp_path, "torchrun", "ddp", extra=["--seed_everything", "false"])
    print(f"\n{tmp_path.name}: two nodes {run['seconds']:.1f} s")
    first, second = run["probes"]
    assert first["sampler"]["seed"] == second["sampler"]["seed"]
    # shares r = 0, 1 of 2 of one seeded permutation: disjoint, together the whole epoch
    assert [(p["sampler"]["rank"], p["sampler"]["num_replicas"]) for p in (first, second)] == [(0, 2), (1, 2)]
