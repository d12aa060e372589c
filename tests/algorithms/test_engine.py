"""The shared training engine: row slicing, the globally normalised backward against the
closed-form gradient of one large batch, and optimizer steps that do not count as training steps
under a real Trainer."""

import lightning as L
import pytest
import torch

from lightning_irl.algorithms.engine import (
    Engine,
    clip_sharded_grad_norm,
    map_micro_batches,
    micro_batches,
    response_tokens,
    sequences,
)


def test_micro_batches_keep_left_padded_rollouts_whole():
    ids = torch.tensor([[0, 0, 5, 6, 1, 0], [0, 4, 5, 6, 7, 1], [0, 0, 5, 1, 0, 0]])
    mask = (ids != 0).long()
    shifted = torch.arange(15.0).reshape(3, 5)
    per_row = torch.tensor([1.0, 2.0, 3.0])
    chunks = list(micro_batches({"input_ids": ids, "attention_mask": mask, "logps": shifted, "adv": per_row}, 2))
    assert [c["input_ids"].shape[1] for c in chunks] == [6, 4]
    assert [c["logps"].shape[1] for c in chunks] == [5, 3]
    assert torch.equal(chunks[1]["logps"], shifted[2:, :3])
    assert torch.equal(chunks[1]["adv"], per_row[2:])
    with pytest.raises(ValueError, match="not aligned"):
        next(micro_batches({"input_ids": ids, "attention_mask": mask, "prompt_ids": ids[:, :3]}, 2))


def test_grouped_rows_are_sliced_in_lockstep_each_by_its_own_width():
    long = {"input_ids": torch.ones(4, 7, dtype=torch.long), "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    short_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]])
    short = {"input_ids": short_mask.clone(), "attention_mask": short_mask}
    parts = list(micro_batches({"chosen": long, "rejected": short}, 2))
    assert [(p["chosen"]["input_ids"].shape, p["rejected"]["input_ids"].shape) for p in parts] == \
        [((2, 7), (2, 2)), ((2, 7), (2, 3))]
    with pytest.raises(ValueError, match="different sizes"):
        next(micro_batches({"chosen": long, "rejected": {k: v[:3] for k, v in short.items()}}, 2))


class _Linear(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(3))
        self.engine = Engine(self)

    def manual_backward(self, loss, *args, **kwargs):  # no trainer attached in the unit test
        loss.backward()


def test_backward_is_the_gradient_of_the_global_means_whatever_the_micro_batches():
    """Two terms with their own units (response tokens, rows) and weights, plus a statistic: the
    accumulated gradient and the returned shares equal the closed form on the whole batch."""
    g = torch.Generator().manual_seed(1)
    rows = {"input_ids": torch.randint(0, 9, (5, 6), generator=g),
            "attention_mask": torch.ones(5, 6, dtype=torch.long),
            "loss_mask": (torch.rand(5, 6, generator=g) > 0.4).long(),
            "x": torch.randn(5, 6, generator=g)}  # a [B, T] feature, cut with the rows

    def sums(module, micro):
        per_row = (micro["x"] * module.weight[0]).sum(-1) + module.weight[1] ** 2
        tokens = (micro["loss_mask"][:, 1:] * module.weight[2]).sum()
        return {"rows": per_row.sum(), "tokens": tokens * 3.0, "stat": per_row.detach().sum()}

    def run(size):
        module = _Linear()
        shares = module.engine.backward(rows, lambda micro: sums(module, micro),
                                        {"rows": sequences, "tokens": response_tokens}, size, weights={"tokens": 0.5})
        return module.weight.grad.clone(), shares

    reference = _Linear()
    n_tokens = rows["loss_mask"][:, 1:].sum()
    whole = sums(reference, rows)
    objective = whole["rows"] / 5 + 0.5 * whole["tokens"] / n_tokens
    objective.backward()
    for size in (None, 1, 2, 4):
        grad, shares = run(size)
        torch.testing.assert_close(grad, reference.weight.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(shares["rows"], whole["rows"].detach() / 5)
        torch.testing.assert_close(shares["tokens"], whole["tokens"].detach() / n_tokens)  # unweighted
        torch.testing.assert_close(shares["stat"], whole["stat"] / 5)  # by the first term's units


class _ThreeStepsPerBatch(L.LightningModule):
    """Steps its optimizer three times per training batch; only the last step is counted."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.layer = torch.nn.Linear(2, 1)
        self.engine = Engine(self)
        self.optimizer_steps = 0

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        for inner in range(3):
            self.manual_backward(self.layer(batch[0]).pow(2).mean())
            self.engine.step(optimizer, max_grad_norm=1.0, counted=inner == 2)

    def on_before_optimizer_step(self, optimizer):
        self.engine.clip_before_step(optimizer)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        optimizer.register_step_post_hook(lambda *args: setattr(self, "optimizer_steps", self.optimizer_steps + 1))
        return optimizer

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 2)), batch_size=2)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_uncounted_steps_update_the_weights_without_advancing_global_step(precision, tmp_path):
    module = _ThreeStepsPerBatch()
    steps = []
    module.on_train_batch_end = lambda *args: steps.append(module.trainer.global_step)
    trainer = L.Trainer(max_steps=4, precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module)
    assert trainer.global_step == 4 and steps == [1, 2, 3, 4]
    assert module.optimizer_steps == 12  # every inner step was applied


def test_map_micro_batches_pads_each_output_back_to_the_full_width():
    ids = torch.tensor([[0, 0, 5, 6, 1, 0], [0, 4, 5, 6, 7, 1], [0, 0, 5, 1, 0, 0]])
    rows = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    shifted = map_micro_batches(rows, lambda m: m["input_ids"][:, 1:].float(), 2)  # [b, W-1] outputs
    expected = torch.tensor([[0, 5, 6, 1, 0], [4, 5, 6, 7, 1], [0, 5, 1, 0, 0]]).float()
    assert torch.equal(shifted, expected)  # the last row's slice is 4 wide, padded back to 6 - 1
    per_row = map_micro_batches(rows, lambda m: m["attention_mask"].sum(-1), 2)
    assert per_row.tolist() == [3, 5, 2]


class _OneParameter(L.LightningModule):
    """loss = w · g: the gradient is g (default (30, 40), norm 50) at every step; one SGD step of
    lr 1 with clipping to norm 1 per batch."""

    def __init__(self, counted=True, gradient=(30.0, 40.0)):
        super().__init__()
        self.automatic_optimization = False
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.engine = Engine(self)
        self.counted = counted
        self.gradient = gradient

    def training_step(self, batch, batch_idx):
        self.manual_backward((self.weight * torch.tensor(self.gradient)).sum())
        self.engine.step(self.optimizers(), max_grad_norm=1.0, counted=self.counted)

    def on_before_optimizer_step(self, optimizer):
        self.engine.clip_before_step(optimizer)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1)), batch_size=1)


@pytest.mark.parametrize("counted", [True, False])
@pytest.mark.parametrize("scaled", [False, True])
def test_clipping_acts_on_unscaled_gradients(scaled, counted, tmp_path):
    """One SGD step of lr 1 with the gradient (30, 40) clipped to norm 1 moves w by exactly
    −(0.6, 0.8), also under a GradScaler (16-mixed), which scales the backward by 65536 and
    unscales before on_before_optimizer_step. Clipping before optimizer.step() instead moves w
    by (0.6, 0.8) / 65536 there."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = _OneParameter(counted)
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))] if scaled else None
    trainer = L.Trainer(max_steps=1 if counted else -1, max_epochs=1, limit_train_batches=1, plugins=plugins,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module)
    torch.testing.assert_close(module.weight.detach(), torch.tensor([-0.6, -0.8]), rtol=0, atol=1e-6)


def test_a_module_without_the_clip_hook_is_told_so(tmp_path):
    module = _OneParameter(True)
    module.on_before_optimizer_step = lambda optimizer: None
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="clip_before_step"):
        trainer.fit(module)


def test_sharded_clip_sums_the_shards_of_every_rank():
    """Two ranks each holding half of the gradient (3, 4, 12): the global norm is 13 whichever
    rank computes it; replicated gradients (NO_SHARD) are not summed twice."""
    class Strategy:
        world_size, root_device = 2, torch.device("cpu")

        def __init__(self, sharding, other):
            self.sharding_strategy, self.other = sharding, other

        def reduce(self, value, reduce_op):
            return value + self.other

    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])
    optimizer = torch.optim.SGD([param], lr=1.0)
    total = clip_sharded_grad_norm(optimizer, 1.0, Strategy("ShardingStrategy.FULL_SHARD", torch.tensor(144.0)))
    assert float(total) == pytest.approx(13.0)
    torch.testing.assert_close(param.grad, torch.tensor([3.0, 4.0]) / 13, rtol=1e-5, atol=0)
    param.grad = torch.tensor([3.0, 4.0])
    total = clip_sharded_grad_norm(optimizer, 1.0, Strategy("ShardingStrategy.NO_SHARD", torch.tensor(144.0)))
    assert float(total) == pytest.approx(5.0)
