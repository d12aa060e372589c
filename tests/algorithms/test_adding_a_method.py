"""The worked example of docs/adding_a_method.md (docs/examples/anchored_sft.py): against SFT,
against torch.distributions' KL row by row, under micro-batching, and through the command line."""

import os
import subprocess
import sys

import pytest
import torch

from lightning_irl.algorithms import SFT
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.data.collate import DemonstrationCollator
from lightning_irl.objectives.logprobs import shifted_logits

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from docs.examples.anchored_sft import AnchoredSFT  # noqa: E402


def _batch(module, n=6):
    data = DemonstrationDataModule(task="modes", num_train=n, num_val=0, batch_size=n)
    data.set_tokenizer(module.tokenizer)
    data.setup("fit")
    return DemonstrationCollator(module.tokenizer.pad_token_id)(data.datasets["train"])


def _gradient(module, batch, **backward):
    module.manual_backward = lambda loss: loss.backward()  # no trainer attached
    module.policy.zero_grad()
    shares = module.engine.backward(batch["rows"], module.loss_sums, **backward)
    return shares, {n: p.grad.clone() for n, p in module.policy.named_parameters()}


def _perturbed(module):
    """Built, with the policy moved away from its frozen start so the KL is not zero."""
    module.configure_model()
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def test_kl_coef_zero_is_sft_and_the_kl_term_is_the_exact_vocabulary_kl(tiny_spec):
    from lightning_irl.algorithms.engine import response_tokens, sequence_rows

    anchored = _perturbed(AnchoredSFT(tiny_spec, kl_coef=0.0))
    batch = _batch(anchored)
    rows = sequence_rows(batch)
    units = {"nll": response_tokens, "kl": response_tokens}
    shares, grads = _gradient(anchored, {"rows": rows}, units=units, weights={"kl": 0.0})

    sft = SFT(tiny_spec)
    sft.configure_model()
    sft.policy.load_state_dict(anchored.policy.state_dict())
    sft.manual_backward = lambda loss: loss.backward()
    nll = sft.nll_backward(batch)
    torch.testing.assert_close(shares["nll"], nll)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(sft.policy.named_parameters())[name].grad, rtol=0, atol=0)

    # the KL share: Σ over response positions of KL(π ‖ π_ref), by torch.distributions, / token count
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, attention, loss_mask in zip(rows["input_ids"], rows["attention_mask"], rows["loss_mask"]):
            keep = attention.bool()
            ids, loss_mask = ids[keep][None], loss_mask[keep][None]
            ones = torch.ones_like(ids)
            policy = torch.distributions.Categorical(logits=shifted_logits(anchored.policy, ids, ones)[0])
            reference = torch.distributions.Categorical(logits=shifted_logits(anchored.reference, ids, ones)[0])
            kl = torch.distributions.kl_divergence(policy, reference)
            total += float(kl[loss_mask[0, 1:].bool()].sum())
            tokens += int(loss_mask[0, 1:].sum())
    assert total > 0
    assert float(shares["kl"]) == pytest.approx(total / tokens, rel=1e-4)


def test_one_row_per_micro_batch_gives_the_whole_batch_gradient(tiny_spec):
    from lightning_irl.algorithms.engine import response_tokens, sequence_rows

    module = _perturbed(AnchoredSFT(tiny_spec, kl_coef=0.7))
    rows = {"rows": sequence_rows(_batch(module))}
    units = {"nll": response_tokens, "kl": response_tokens}
    whole = _gradient(module, rows, units=units, weights={"kl": 0.7})[1]
    split = _gradient(module, rows, units=units, weights={"kl": 0.7}, micro_batch_size=1)[1]
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_the_documented_command_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cli = os.path.join(os.path.dirname(sys.executable), "lightning_irl")
    proc = subprocess.run([cli, "fit", "--config", os.path.join(REPO, "configs", "quickstart.yaml"),
                           "--model", "docs.examples.anchored_sft.AnchoredSFT", "--model.init_args.kl_coef", "0.5",
                           "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "quickstart" / "version_0" / "export" / "model.safetensors").exists()
