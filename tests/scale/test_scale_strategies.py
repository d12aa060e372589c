"""Strategy configs and sharding rules (the multi-process runs are in test_scale_distributed.py)."""

import glob
import os

import lightning as L
import pytest
import torch

from lightning_irl.algorithms import SFT
from lightning_irl.cli import build_cli
from lightning_irl.models.spec import LoraSpec, ModelSpec
from lightning_irl.strategies import FSDP2Strategy, FSDPStrategy, block_class_names, block_classes

from conftest import REPO, TINY_LLAMA

QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
STRATEGIES = sorted(glob.glob(os.path.join(REPO, "configs", "strategies", "*.yaml")))


def test_the_four_strategy_configs_are_shipped():
    assert {os.path.basename(p) for p in STRATEGIES} == {"ddp.yaml", "fsdp.yaml", "fsdp2.yaml", "deepspeed.yaml"}


@pytest.mark.parametrize("path", STRATEGIES, ids=os.path.basename)
def test_strategy_config_combines_with_a_method_config(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", QUICKSTART, "--config", path, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "strategy:" in printed and "model:" in printed


@pytest.mark.parametrize("name, expected", [("ddp.yaml", "DDPStrategy"), ("fsdp2.yaml", "FSDP2Strategy")])
def test_cpu_strategy_configs_instantiate(name, expected):
    cli = build_cli(["--config", QUICKSTART, "--config", os.path.join(REPO, "configs", "strategies", name)], run=False)
    assert type(cli.trainer.strategy).__name__ == expected
    assert cli.trainer.num_devices == 2


def test_plain_model_parallel_strategy_is_refused_with_a_pointer_to_fsdp2():
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = SFT(policy=ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes"))
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), logger=False)
    module.trainer = trainer
    with pytest.raises(ValueError, match="FSDP2Strategy"):
        module.configure_model()


def test_sharding_units_are_the_transformer_blocks_of_every_model():
    spec = ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes", lora=LoraSpec(r=2))
    tokenizer = spec.load_tokenizer()
    holder = torch.nn.Module()
    holder.policy = spec.build_causal_lm(tokenizer)  # a PeftModel
    holder.discriminator = spec.build_sequence_classifier(tokenizer)
    assert block_class_names(holder) == {"LlamaDecoderLayer"}
    assert {c.__name__ for c in block_classes(holder)} == {"LlamaDecoderLayer"}


def test_fsdp2_strategy_uses_every_process_for_data_parallel():
    strategy = FSDP2Strategy()
    assert strategy._tensor_parallel_size == 1 and strategy._data_parallel_size == "auto"
    assert isinstance(FSDPStrategy(), L.pytorch.strategies.FSDPStrategy)
