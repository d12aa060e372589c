"""Under DDP (2 gloo processes, each with half the samples) every metric computes the value of one
process that saw everything: the states are sums."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent(
    """
    import json, math, os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp


    def feed(evaluator, part, parts):
        from lightning_irl.data.tasks import ModesTask

        task = evaluator.task
        prompts = task.prompts(40, seed=3)[part::parts]
        gen = torch.Generator().manual_seed(100 + part)
        responses, logps = [], []
        for prompt in prompts:
            answers = list(task.answers(prompt).values()) + [prompt.replace(" =", " x")]
            for _ in range(3):
                i = int(torch.randint(len(answers), (1,), generator=gen))
                responses.append(answers[i])
                logps.append(-1.0 - i)
        evaluator.update_samples(prompts, responses, logps, num_samples=3, vocab_size=12)
        expert = [task.sample_response(p, __import__("random").Random(7)) for p in prompts]
        evaluator.forward_kl.update([task.log_prob(p, y) for p, y in zip(prompts, expert)],
                                    [-0.5 * len(y) for y in expert])
        return prompts, responses, logps


    def run(rank, world, out):
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", os.environ["PORT"]
        dist.init_process_group("gloo", rank=rank, world_size=world)
        evaluator = SampleEvaluator(ModesTask())
        feed(evaluator, rank, world)
        values = {k: float(v) for k, v in evaluator.compute().items()}
        if rank == 0:
            json.dump(values, open(out, "w"))
        dist.destroy_process_group()


    if __name__ == "__main__":
        torch.set_num_threads(1)
        out = sys.argv[1]
        from lightning_irl.data.tasks import ModesTask
        from lightning_irl.metrics import SampleEvaluator

        # the same samples in one process, without torch.distributed
        single = SampleEvaluator(ModesTask())
        for part in range(2):  # the ranks' draws
            feed(single, part, 2)
        json.dump({k: float(v) for k, v in single.compute().items()}, open(out + ".single", "w"))
        alone = SampleEvaluator(ModesTask())
        feed(alone, 0, 2)  # what rank 0 would report without the reduction
        json.dump({k: float(v) for k, v in alone.compute().items()}, open(out + ".rank0", "w"))
        # fork, not spawn: the ranks inherit the imports (seconds each on a busy 2-core machine)
        mp.start_processes(run, args=(2, out), nprocs=2, start_method="fork")
    """
)


@pytest.mark.distributed
def test_metrics_reduce_exactly_over_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "ddp.json"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PORT=str(port), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(script), str(out)], check=True, env=env, timeout=240)
    ddp = json.loads(out.read_text())
    single = json.loads((tmp_path / "ddp.json.single").read_text())
    assert set(ddp) == set(single) and len(ddp) >= 10
    for name, value in single.items():
        assert ddp[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert 0 < ddp["invalid_mass"] < 1 and ddp["mode_coverage"] > 0 and ddp["reverse_kl_se"] > 0
    rank0 = json.loads((tmp_path / "ddp.json.rank0").read_text())
    assert any(rank0[name] != pytest.approx(value) for name, value in single.items())  # the test can fail
