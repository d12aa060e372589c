"""CpuThreads: the torch thread count a CPU run gets, by model size, free cores and overrides."""

import lightning as L
import pytest
import torch

from lightning_irl.callbacks.threads import SMALL_MODEL_PARAMETERS, CpuThreads, choose_threads


@pytest.mark.parametrize("parameters,processes,cores,busy,expected", [
    (84_000, 1, 16, 0, 1),                        # the quickstart's model: one thread even on an idle box
    (SMALL_MODEL_PARAMETERS, 1, 2, 0, 2),         # at the threshold: the free cores
    (30_000_000, 1, 2, 1, 1),                     # another job holds one of two cores
    (30_000_000, 2, 16, 0, 8),                    # two processes share the cores
    (30_000_000, 2, 16, 12, 2),
    (30_000_000, 4, 2, 5, 1),                     # overloaded: never below one
])
def test_choose_threads(parameters, processes, cores, busy, expected):
    assert choose_threads(parameters, processes=processes, cores=cores, busy=busy) == expected


class _Sized(L.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(width, width)
        self.threads_in_step = None

    def training_step(self, batch, batch_idx):
        self.threads_in_step = torch.get_num_threads()
        return self.layer(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, self.layer.in_features)))


def _fit(module, callback):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(module)
    return module.threads_in_step


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_small_model_trains_on_one_thread_and_the_option_and_environment_win(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    assert _fit(_Sized(8), CpuThreads()) == 1                   # 72 parameters
    torch.set_num_threads(2)
    assert _fit(_Sized(8), CpuThreads(num_threads=3)) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")                  # the user's setting is left alone
    torch.set_num_threads(2)
    assert _fit(_Sized(8), CpuThreads()) == 2
    with pytest.raises(ValueError, match="at least 1"):
        CpuThreads(num_threads=0)
