"""SFT: the loss is token NLL over the global batch, so accumulation gives one big batch's gradient."""

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_irl.algorithms import SFT, OptimizerSpec
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.data.collate import DemonstrationCollator


class GradCapture(L.Callback):
    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.policy.named_parameters()}


def _first_step_grads(tiny_spec, micro_batch_size):
    L.seed_everything(0)
    module = SFT(policy=tiny_spec, optimizer=OptimizerSpec(lr=1e-3), micro_batch_size=micro_batch_size,
                 max_grad_norm=None)
    data = DemonstrationDataModule(task="modes", num_train=8, num_val=0, batch_size=8)
    capture = GradCapture()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[capture],
                        num_sanity_val_steps=0, limit_val_batches=0)
    initial = None

    class KeepInitial(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal initial
            initial = copy.deepcopy(pl_module.policy)

    trainer.callbacks.append(KeepInitial())
    module.export = False
    trainer.fit(module, datamodule=data)
    # The gradient of a mean over all 8 examples does not depend on their order.
    batch = DemonstrationCollator(module.tokenizer.pad_token_id)(data.datasets["train"])
    return capture.grads, initial, batch


def _reference_grads(model, batch):
    """Plain PyTorch: mean NLL over every response token of the batch (no Lightning, no helpers)."""
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:].clone()
    targets[batch["loss_mask"][:, 1:] == 0] = -100
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _naive_mean_of_micro_means(model, batch, size):
    model.zero_grad()
    for start in range(0, batch["input_ids"].size(0), size):
        part = {k: batch[k][start:start + size] for k in ("input_ids", "attention_mask", "loss_mask")}
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits[:, :-1].float()
        targets = part["input_ids"][:, 1:].clone()
        targets[part["loss_mask"][:, 1:] == 0] = -100
        (F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1)) / (8 // size)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_one_batch_of_8_equals_2x4_accumulated_and_plain_pytorch(tiny_spec):
    full, initial, batch = _first_step_grads(tiny_spec, micro_batch_size=None)
    accumulated, _, _ = _first_step_grads(tiny_spec, micro_batch_size=4)
    reference = _reference_grads(copy.deepcopy(initial), batch)
    naive = _naive_mean_of_micro_means(copy.deepcopy(initial), batch, 4)
    lengths = batch["loss_mask"].sum(-1)
    assert lengths[:4].sum() != lengths[4:].sum(), "the halves must differ in token count for this test to bite"
    for name in full:
        torch.testing.assert_close(full[name], reference[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(accumulated[name], reference[name], rtol=1e-5, atol=1e-7)
    # the usual mean-of-micro-batch-means is *not* the same gradient: the test can tell them apart
    assert any(not torch.allclose(naive[n], reference[n], rtol=1e-4, atol=1e-6) for n in reference)


def test_tokens_per_sec_is_the_tokens_since_the_last_logged_step_over_their_time(tmp_path, tiny_spec, monkeypatch):
    """perf/tokens_per_sec at a logged step = non-pad tokens of the steps since the previous
    logged step / the time between their starts (a fake clock: 1 s per step)."""
    import pandas as pd
    from lightning.pytorch.loggers import CSVLogger

    import lightning_irl.algorithms.base as base

    ticks = iter(range(1000))
    monkeypatch.setattr(base, "perf_counter", lambda: float(next(ticks)))
    L.seed_everything(0)
    module = SFT(policy=tiny_spec, optimizer=OptimizerSpec(lr=1e-3), export=False)
    data = DemonstrationDataModule(task="modes", num_train=56, num_val=0, batch_size=8, shuffle=False)
    logger = CSVLogger(tmp_path, name="rate")
    trainer = L.Trainer(max_steps=7, accelerator="cpu", logger=logger, log_every_n_steps=3,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    frame = pd.read_csv(f"{logger.log_dir}/metrics.csv")
    logged = frame[["step", "perf/tokens_per_sec"]].dropna()
    collate = DemonstrationCollator(module.tokenizer.pad_token_id)
    examples = data.datasets["train"]
    tokens = [int(collate(examples[8 * i: 8 * i + 8])["attention_mask"].sum()) for i in range(7)]
    # step 3 (index 2): steps 0-1 over the 2 s since step 0 started; step 6: steps 2-4 over 3 s
    assert logged["step"].tolist() == [2, 5]
    assert logged["perf/tokens_per_sec"].tolist() == pytest.approx([sum(tokens[0:2]) / 2, sum(tokens[2:5]) / 3],
                                                                   rel=1e-6)  # logged as float32
