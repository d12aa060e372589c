"""``lightning_irl.compat``: every private library name it relies on still exists (these tests
fail loudly, naming the helper to update, when an upgrade renames one), and the helpers do their
job; plus the public-API replacements of former private uses (``RunCheckpoint``'s final
``last.ckpt``, ``require_supported_strategy``)."""

from __future__ import annotations

import inspect
import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from lightning_irl import compat
from lightning_irl.callbacks.checkpoint import RunCheckpoint
from lightning_irl.strategies import FSDP2Strategy, block_class_names, require_supported_strategy

from conftest import TINY_LLAMA


# ---- compat: Lightning ModelParallelStrategy._data_parallel_size ------------------------------

def test_model_parallel_strategy_still_keeps_its_data_parallel_size_privately():
    name = compat.MODEL_PARALLEL_DATA_PARALLEL_SIZE
    strategy = ModelParallelStrategy(data_parallel_size=3, tensor_parallel_size=1)
    assert getattr(strategy, name, None) == 3, (
        f"Lightning's ModelParallelStrategy no longer stores data_parallel_size as {name!r}: "
        "update lightning_irl.compat.set_data_parallel_size")
    # ... and it is what the device mesh is built from.
    source = inspect.getsource(ModelParallelStrategy.setup_environment)
    assert f"self.{name}" in source, (
        f"ModelParallelStrategy.setup_environment no longer reads {name!r}: "
        "update lightning_irl.compat.set_data_parallel_size")


def test_set_data_parallel_size_sets_it_and_refuses_an_object_without_it():
    strategy = ModelParallelStrategy()
    compat.set_data_parallel_size(strategy, 4)
    assert getattr(strategy, compat.MODEL_PARALLEL_DATA_PARALLEL_SIZE) == 4
    with pytest.raises(compat.PrivateAPIChanged, match="set_data_parallel_size"):
        compat.set_data_parallel_size(SimpleNamespace(), 4)


@pytest.mark.parametrize("size, expected", [("auto", 6), (2, 2)])
def test_fsdp2_strategy_hands_lightning_its_data_parallel_size(monkeypatch, size, expected):
    """``auto`` = every process (nodes × processes per node), not Lightning's nodes only; the
    mesh itself (Lightning's setup_environment, which starts processes) is stubbed out."""
    seen = {}

    def fake_setup_environment(self):
        seen["size"] = getattr(self, compat.MODEL_PARALLEL_DATA_PARALLEL_SIZE)

    monkeypatch.setattr(ModelParallelStrategy, "setup_environment", fake_setup_environment)
    strategy = FSDP2Strategy(data_parallel_size=size)
    strategy.parallel_devices = [torch.device("cpu")] * 3
    strategy.num_nodes = 2
    strategy.setup_environment()
    assert seen["size"] == expected
    assert strategy.data_parallel_size == size  # the user's setting stays as given


# ---- compat: transformers PreTrainedModel._no_split_modules -----------------------------------

def test_pretrained_model_still_declares_its_no_split_modules():
    from transformers import LlamaForCausalLM, PreTrainedModel

    name = compat.NO_SPLIT_MODULES
    assert hasattr(PreTrainedModel, name), (
        f"transformers.PreTrainedModel no longer has {name!r}: update lightning_irl.compat.no_split_module_names")
    assert "LlamaDecoderLayer" in set(getattr(LlamaForCausalLM, name) or ()), (
        f"LlamaForCausalLM.{name} no longer lists its decoder layer: update lightning_irl.compat.no_split_module_names")


def test_no_split_module_names_of_a_tiny_llama_and_of_a_plain_module():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, vocab_size=16))
    assert compat.no_split_module_names(model) == {"LlamaDecoderLayer"}
    assert compat.no_split_module_names(torch.nn.Linear(2, 2)) == set()
    holder = torch.nn.Module()
    holder.policy = model
    assert block_class_names(holder) == {"LlamaDecoderLayer"}


# ---- compat: transformers PretrainedConfig._attn_implementation --------------------------------

def test_pretrained_config_still_keeps_the_resolved_attention_implementation_privately():
    from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

    name = compat.ATTN_IMPLEMENTATION
    assert isinstance(getattr(PretrainedConfig, name, None), property), (
        f"transformers.PretrainedConfig no longer has a {name!r} property: "
        "update lightning_irl.compat.attention_implementation")
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"},
                                         vocab_size=16, attn_implementation="eager"))
    assert getattr(model.config, name) == "eager", (
        f"the requested attention implementation is no longer kept in config.{name}: "
        "update lightning_irl.compat.attention_implementation")


def test_attention_implementation_names_what_transformers_picked_or_was_asked_for():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    picked = AutoModelForCausalLM.from_config(LlamaConfig(**config, vocab_size=16))
    assert compat.attention_implementation(picked) == "sdpa"  # Llama supports SDPA: the default pick
    asked = AutoModelForCausalLM.from_config(LlamaConfig(**config, vocab_size=16), attn_implementation="eager")
    assert compat.attention_implementation(asked) == "eager"
    wrapped = get_peft_model(asked, LoraConfig(r=2, target_modules=["q_proj"]))
    assert compat.attention_implementation(wrapped) == "eager"  # peft's config is the base model's
    with pytest.raises(TypeError, match="not a Hugging Face model"):
        compat.attention_implementation(torch.nn.Linear(2, 2))


# ---- require_supported_strategy: LightningModule.trainer (public) instead of _trainer ----------

def test_require_supported_strategy_without_and_with_a_trainer():
    module = L.LightningModule()
    require_supported_strategy(module)  # no trainer attached: nothing to check
    module.trainer = SimpleNamespace(strategy=ModelParallelStrategy())
    with pytest.raises(ValueError, match="FSDP2Strategy"):
        require_supported_strategy(module)
    module.trainer = SimpleNamespace(strategy=FSDP2Strategy())
    require_supported_strategy(module)
    # FSDP1: fine for a module that does not say otherwise, refused for one that does
    from lightning.pytorch.strategies import FSDPStrategy as LightningFSDP

    module.trainer = SimpleNamespace(strategy=LightningFSDP())
    require_supported_strategy(module)
    module.supports_fsdp1 = False
    with pytest.raises(ValueError, match="FSDP2Strategy"):
        require_supported_strategy(module)


# ---- RunCheckpoint: the final last.ckpt through public API -------------------------------------

class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.layer(batch).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1)


class _Saves(L.Callback):
    """Every checkpoint written (global step at the time) and the step training (re)starts at."""

    def __init__(self):
        self.steps = []
        self.start_step = None
        self.start_weights = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.steps.append(trainer.global_step)

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        self.start_weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


def _fit(tmp_path, max_steps, module=None, ckpt_path=None, **checkpoint_kwargs):
    module = module or _Tiny()
    checkpoint = RunCheckpoint(root=str(tmp_path / "checkpoints"), **checkpoint_kwargs)
    saves = _Saves()
    trainer = L.Trainer(max_steps=max_steps, val_check_interval=2, limit_val_batches=1, accelerator="cpu",
                        devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[checkpoint, saves], default_root_dir=str(tmp_path))
    data = DataLoader(torch.randn(64, 4), batch_size=4)
    trainer.fit(module, data, DataLoader(torch.randn(8, 4), batch_size=4), ckpt_path=ckpt_path)
    return trainer, module, checkpoint, saves


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_holds_final_state(path, trainer, module):
    state = _load(path)
    assert state["global_step"] == trainer.global_step
    for name, value in module.state_dict().items():
        torch.testing.assert_close(state["state_dict"][name], value, rtol=0, atol=0, msg=name)
    return state


def test_training_stopping_between_validations_still_leaves_the_final_state_in_last_ckpt(tmp_path):
    trainer, module, checkpoint, saves = _fit(tmp_path, max_steps=5)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert trainer.global_step == 5
    assert saves.steps == [2, 2, 4, 4, 5]  # top-k + last at each validation, then last once more
    assert checkpoint.last_model_path == str(last) and checkpoint.last_global_step_written == 5
    state = _assert_holds_final_state(last, trainer, module)
    # A full training checkpoint like ModelCheckpoint's own: callbacks, optimizer, loops.
    own = state["callbacks"][checkpoint.state_key]
    assert own["last_model_path"] == str(last) and own["dirpath"] == checkpoint.dirpath
    assert state["optimizer_states"] and state["loops"]["fit_loop"]
    torch.testing.assert_close(state["optimizer_states"][0]["state"][0]["exp_avg"],
                               trainer.optimizers[0].state[module.layer.weight]["exp_avg"])

    # Resuming from it starts at the final step with the final weights.
    resumed, _, _, resumed_saves = _fit(tmp_path / "resume", max_steps=7, ckpt_path=str(last))
    assert resumed_saves.start_step == 5 and resumed.global_step == 7
    for name, value in state["state_dict"].items():
        torch.testing.assert_close(resumed_saves.start_weights[name], value, rtol=0, atol=0, msg=name)


def test_training_ending_at_a_validation_is_not_saved_twice(tmp_path):
    trainer, module, checkpoint, saves = _fit(tmp_path, max_steps=4)
    assert saves.steps == [2, 2, 4, 4] and checkpoint.last_global_step_written == 4
    _assert_holds_final_state(tmp_path / "checkpoints" / "last.ckpt", trainer, module)


def test_a_save_by_someone_else_at_the_final_step_does_not_count(tmp_path):
    """Another checkpoint at the final step (here: user code) is not last.ckpt: write it anyway."""

    class SaveAtEnd(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:
                trainer.save_checkpoint(str(tmp_path / "other.ckpt"))

    module = _Tiny()
    checkpoint = RunCheckpoint(root=str(tmp_path / "checkpoints"))
    trainer = L.Trainer(max_steps=5, val_check_interval=2, limit_val_batches=1, accelerator="cpu", devices=1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[checkpoint, SaveAtEnd()])
    trainer.fit(module, DataLoader(torch.randn(64, 4), batch_size=4), DataLoader(torch.randn(8, 4), batch_size=4))
    _assert_holds_final_state(tmp_path / "checkpoints" / "last.ckpt", trainer, module)


def test_save_last_false_writes_no_last_ckpt(tmp_path):
    _, _, checkpoint, saves = _fit(tmp_path, max_steps=5, save_last=False)
    assert saves.steps == [2, 4]  # top-k only
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists() and checkpoint.last_model_path == ""


def test_weights_only_last_ckpt_holds_the_final_weights(tmp_path):
    trainer, module, _, _ = _fit(tmp_path, max_steps=5, save_weights_only=True)
    state = _assert_holds_final_state(tmp_path / "checkpoints" / "last.ckpt", trainer, module)
    assert "optimizer_states" not in state


def test_link_mode_writes_a_real_final_last_ckpt_and_leaves_the_linked_checkpoint_alone(tmp_path):
    trainer, module, checkpoint, _ = _fit(tmp_path, max_steps=5, save_last="link")
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert not os.path.islink(last)
    _assert_holds_final_state(last, trainer, module)
    best = _load(checkpoint.best_model_path)  # the top-k file last.ckpt linked to until now
    assert best["global_step"] == 4


def test_link_mode_ending_at_a_validation_keeps_the_link(tmp_path):
    trainer, module, checkpoint, _ = _fit(tmp_path, max_steps=4, save_last="link")
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert os.path.islink(last) and os.path.realpath(last) == os.path.realpath(checkpoint.best_model_path)
    _assert_holds_final_state(last, trainer, module)


# ---- nothing outside compat.py reaches into a library's private names ---------------------------

def test_no_module_but_compat_reads_or_writes_a_private_library_name():
    """An ``obj._name`` access or ``getattr(obj, "_name")`` anywhere in the package except
    ``compat.py`` must name something the package defines itself (its own helpers and state);
    anything else is a private name of Lightning, transformers or torch."""
    import ast

    package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lightning_irl")
    trees = {}
    for folder, _, files in os.walk(package):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    trees[os.path.relpath(path, package)] = ast.parse(f.read())
    own = set()  # private names the package itself defines: defs, class attributes, assignments
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and getattr(node.value, "id", None) in ("self", "cls"):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)

    def private(name):
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and name not in own

    found = []
    for path, tree in trees.items():
        if path == "compat.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and private(node.attr):
                found.append(f"{path}:{node.lineno} .{node.attr}")
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "setattr", "hasattr") \
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) \
                    and isinstance(node.args[1].value, str) and private(node.args[1].value):
                found.append(f"{path}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
    assert not found, "private library names used outside lightning_irl/compat.py:\n" + "\n".join(found)


# ---- compat: Lightning Trainer._logger_connector.should_update_logs -----------------------------

def test_logs_this_step_follows_log_every_n_steps_in_a_manual_optimization_loop():
    import lightning as L

    seen = []

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            seen.append(compat.logs_this_step(self.trainer))
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward((self.weight - batch[0]).square().sum())
            optimizer.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 1)))

    trainer = L.Trainer(max_steps=7, accelerator="cpu", logger=False, log_every_n_steps=3, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Probe())
    assert seen == [False, False, True, False, False, True, False], (
        "Trainer._logger_connector.should_update_logs changed meaning: update lightning_irl.compat.logs_this_step")
    with pytest.raises(compat.PrivateAPIChanged):
        compat.logs_this_step(object())
