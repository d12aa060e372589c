"""The non-finite guard (algorithms/engine.py): a NaN or infinite loss term, reward, KL, advantage
or gradient norm stops the run at that step, before the optimizer applies the update, with one
line naming the step, the component and the last good checkpoint (``on_nonfinite: stop``), or
skips that optimizer step and counts it (``skip``). No checkpoint ever holds a non-finite tensor:
every run below checkpoints at every step, and also on the exception."""

import dataclasses
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_irl.algorithms import SFT, Adversarial, OptimizerSpec
from lightning_irl.algorithms.adversarial import DiscriminatorTraining, PolicyUpdate
from lightning_irl.algorithms.base import NONFINITE_SKIPPED_KEY
from lightning_irl.algorithms.engine import NonFiniteError
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.metrics.evaluation import EvalConfig
from lightning_irl.rollout import SamplingConfig
from tests.algorithms.test_engine import _OneParameter

NAN = float("nan")


# ---- helpers ------------------------------------------------------------------------------------
def _fit(tmp_path, module, max_steps, callbacks=()):
    """Fit on the modes task, checkpointing every step (all kept) and on an exception. Returns
    (trainer, the error raised or None)."""
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=1, save_top_k=-1,
                                 save_last=True, save_on_exception=True)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[*callbacks, checkpoint])
    data = DemonstrationDataModule(task="modes", num_train=32, num_val=0, batch_size=4)
    try:
        trainer.fit(module, datamodule=data)
    except NonFiniteError as error:
        return trainer, error
    return trainer, None


def _last(tmp_path):
    return str(tmp_path / "ckpt" / "last.ckpt")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _assert_checkpoints_finite(tmp_path, expected_min=1):
    """Weights, optimizer states and schedules of every checkpoint are finite (everything but the
    callbacks' state: ModelCheckpoint keeps ``kth_value = inf`` by design)."""
    files = sorted((tmp_path / "ckpt").rglob("*.ckpt"))
    assert len(files) >= expected_min, files
    for path in files:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        assert checkpoint["state_dict"] and checkpoint["optimizer_states"]
        for key, value in checkpoint.items():
            if key == "callbacks":
                continue
            for tensor in _tensors(value):
                if tensor.is_floating_point():
                    assert torch.isfinite(tensor).all(), (path, key)


def _assert_weights_finite(module):
    for name, param in module.named_parameters():
        assert torch.isfinite(param).all(), name


def _assert_weights_equal_checkpoint(module, path):
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    for name, param in module.named_parameters():
        assert torch.equal(param.detach(), state[name]), name


def _sft(tiny_spec, lr=1e-3, **kwargs):
    L.seed_everything(0)
    module = SFT(policy=tiny_spec, optimizer=OptimizerSpec(lr=lr), export=False, **kwargs)
    module.configure_model()
    return module


def _nan_nll_at(module, steps):
    """The NLL sum becomes NaN at the given global steps."""
    nll_sum = module.nll_sum

    def patched(micro):
        value = nll_sum(micro)
        return value * NAN if module.trainer.global_step in steps else value

    module.nll_sum = patched


# ---- on_nonfinite: stop --------------------------------------------------------------------------
def test_sft_with_a_huge_learning_rate_stops_at_the_first_nonfinite_step(tmp_path, tiny_spec):
    """lr 1e6 (the issue's run): the first non-finite value stops the run within a few steps, the
    message names that step, and every weight and checkpoint is finite."""
    module = _sft(tiny_spec, lr=1e6)
    trainer, error = _fit(tmp_path, module, max_steps=12)
    assert error is not None
    assert error.step == trainer.global_step <= 3
    assert error.component in ("NLL", "gradient norm of the policy")
    kind = "NaN" if "(NaN)" in str(error) else "inf"
    assert str(error) == (f"non-finite {error.component} ({kind}) at step {trainer.global_step}: stopped before "
                          f"the update; last good checkpoint: {_last(tmp_path)}")
    _assert_weights_finite(module)
    _assert_weights_equal_checkpoint(module, _last(tmp_path))  # the failed step changed nothing
    _assert_checkpoints_finite(tmp_path)


def test_a_nan_loss_stops_before_the_update(tmp_path, tiny_spec):
    module = _sft(tiny_spec)
    _nan_nll_at(module, {2})
    trainer, error = _fit(tmp_path, module, max_steps=6)
    assert str(error) == (f"non-finite NLL (NaN) at step 2: stopped before the update; "
                          f"last good checkpoint: {_last(tmp_path)}")
    assert (error.step, error.component) == (2, "NLL") and trainer.global_step == 2
    _assert_weights_finite(module)
    _assert_weights_equal_checkpoint(module, _last(tmp_path))
    _assert_checkpoints_finite(tmp_path, expected_min=3)


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_an_infinite_gradient_with_a_finite_loss_stops(tmp_path, tiny_spec, max_grad_norm):
    """Only a gradient is infinite (a hook adds inf to it at step 1): the gradient norm is checked
    whether or not it is clipped."""
    module = _sft(tiny_spec, max_grad_norm=max_grad_norm)
    param = next(module.policy.parameters())
    param.register_hook(lambda grad: grad + math.inf if module.trainer.global_step == 1 else grad)
    trainer, error = _fit(tmp_path, module, max_steps=4)
    assert str(error) == (f"non-finite gradient norm of the policy (inf) at step 1: stopped before the update; "
                          f"last good checkpoint: {_last(tmp_path)}")
    _assert_weights_finite(module)
    _assert_weights_equal_checkpoint(module, _last(tmp_path))
    _assert_checkpoints_finite(tmp_path)


def _adversarial(tiny_spec, **kwargs):
    L.seed_everything(0)
    module = Adversarial(policy=tiny_spec, discriminator=dataclasses.replace(tiny_spec, seed=1),
                         sampling=SamplingConfig(max_new_tokens=4, num_samples=2), export=False,
                         discriminator_training=DiscriminatorTraining(), policy_update=PolicyUpdate(),
                         evaluation=EvalConfig(enabled=False), **kwargs)
    module.configure_model()
    return module


def _poison_reward(module, at):
    score = module.score_rollout

    def patched(rows):
        scores = score(rows)
        if module.trainer.global_step == at:
            scores.sequence_reward = scores.sequence_reward * NAN
        return scores

    module.score_rollout = patched


def _poison_discriminator_logits(module, at):
    outputs = module._disc_outputs

    def patched(rows, inputs_embeds=None):
        logits, q_logps = outputs(rows, inputs_embeds)
        return (logits + NAN if module.trainer.global_step == at else logits), q_logps

    module._disc_outputs = patched


def _poison_reference(module, at):
    reference = module._reference_logprobs

    def patched(rows):
        logps = reference(rows)
        return logps * NAN if module.trainer.global_step == at else logps

    module._reference_logprobs = patched


def _poison_policy_loss(module, at):
    sums = module._policy_sums

    def patched(micro):
        out = sums(micro)
        if module.trainer.global_step == at:
            out["policy"] = out["policy"] + math.inf
        return out

    module._policy_sums = patched


@pytest.mark.parametrize("component, poison, at, kind", [
    ("reward", _poison_reward, 0, "NaN"),
    ("discriminator loss", _poison_discriminator_logits, 1, "NaN"),
    ("KL", _poison_reference, 1, "NaN"),
    ("policy loss", _poison_policy_loss, 1, "inf"),
])
def test_adversarial_stops_at_a_nonfinite_component(tmp_path, tiny_spec, component, poison, at, kind):
    module = _adversarial(tiny_spec)
    poison(module, at)
    trainer, error = _fit(tmp_path, module, max_steps=3)
    where = f"last good checkpoint: {_last(tmp_path)}" if at else "no checkpoint was written before it"
    assert str(error) == f"non-finite {component} ({kind}) at step {at}: stopped before the update; {where}"
    assert trainer.global_step == at
    _assert_weights_finite(module)
    if at:
        _assert_checkpoints_finite(tmp_path)
    else:
        assert not list((tmp_path / "ckpt").rglob("*.ckpt"))  # nothing to save before the first step


def test_a_checkpoint_with_nonfinite_weights_is_never_written(tmp_path, tiny_spec):
    """Weights made non-finite outside the optimizer (here: by hand, after step 2's update) are
    refused when the checkpoint is about to be written, on the exception too."""

    class Poison(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 2:
                with torch.no_grad():
                    next(pl_module.policy.parameters())[0, 0] = NAN

    module = _sft(tiny_spec)
    trainer, error = _fit(tmp_path, module, max_steps=4, callbacks=[Poison()])
    assert str(error) == (f"non-finite weights of the policy (NaN) at step 2: not writing this checkpoint; "
                          f"last good checkpoint: {_last(tmp_path)}")
    _assert_checkpoints_finite(tmp_path)
    assert torch.load(_last(tmp_path), weights_only=False)["global_step"] == 1


# ---- on_nonfinite: skip --------------------------------------------------------------------------
class _Snapshots(L.Callback):
    """A model's weights before and after each training batch, by global step."""

    def __init__(self, model="policy"):
        self.model, self.before, self.after = model, {}, {}

    def _copy(self, module):
        return {name: p.detach().clone() for name, p in getattr(module, self.model).named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.before[trainer.global_step] = self._copy(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.after[trainer.global_step - 1] = self._copy(pl_module)


def _changed(a, b):
    return any(not torch.equal(a[name], b[name]) for name in a)


def test_skip_leaves_the_weights_unchanged_counts_and_goes_on(tmp_path, tiny_spec):
    module = _sft(tiny_spec, on_nonfinite="skip")
    _nan_nll_at(module, {2})
    snapshots = _Snapshots()
    trainer, error = _fit(tmp_path, module, max_steps=5, callbacks=[snapshots])
    assert error is None and trainer.global_step == 5
    assert not _changed(snapshots.before[2], snapshots.after[2])  # the skipped step
    assert all(_changed(snapshots.before[s], snapshots.after[s]) for s in (0, 1, 3, 4))
    assert module.engine.nonfinite_skipped == 1
    assert float(trainer.callback_metrics["train/nonfinite_skipped"]) == 1.0
    assert torch.load(_last(tmp_path), weights_only=False)[NONFINITE_SKIPPED_KEY] == 1
    _assert_weights_finite(module)
    _assert_checkpoints_finite(tmp_path, expected_min=5)


def test_skip_still_stops_past_max_nonfinite_skips(tmp_path, tiny_spec):
    module = _sft(tiny_spec, on_nonfinite="skip", max_nonfinite_skips=2)
    initial = {name: p.detach().clone() for name, p in module.named_parameters()}
    _nan_nll_at(module, set(range(10)))
    trainer, error = _fit(tmp_path, module, max_steps=6)
    assert str(error) == (f"non-finite NLL (NaN) at step 2: 3 optimizer steps skipped, more than "
                          f"max_nonfinite_skips=2; stopped before the update; last good checkpoint: {_last(tmp_path)}")
    assert all(torch.equal(p, initial[name]) for name, p in module.named_parameters())  # nothing was applied
    _assert_checkpoints_finite(tmp_path)


def test_adversarial_skip_drops_only_the_poisoned_optimizer_step(tmp_path, tiny_spec):
    """A NaN discriminator loss at step 1 skips the discriminator's step; the policy still steps."""
    module = _adversarial(tiny_spec, on_nonfinite="skip")
    _poison_discriminator_logits(module, 1)
    policy, discriminator = _Snapshots("policy"), _Snapshots("discriminator")
    trainer, error = _fit(tmp_path, module, max_steps=3, callbacks=[policy, discriminator])
    assert error is None and trainer.global_step == 3
    assert not _changed(discriminator.before[1], discriminator.after[1])  # its step was skipped
    assert _changed(discriminator.before[2], discriminator.after[2])
    assert all(_changed(policy.before[s], policy.after[s]) for s in (0, 1, 2))
    assert module.engine.nonfinite_skipped == 1
    assert float(trainer.callback_metrics["train/nonfinite_skipped"]) == 1.0
    _assert_weights_finite(module)
    _assert_checkpoints_finite(tmp_path, expected_min=2)


def test_on_nonfinite_refuses_other_values(tiny_spec):
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        SFT(policy=tiny_spec, on_nonfinite="ignore")


# ---- 16-mixed: infinite gradients are the GradScaler's business ------------------------------------
class _ScaledOneParameter(_OneParameter):
    """loss = w · (3, 4); a hook makes the gradient infinite at step 0; the weights after each step."""

    def __init__(self):
        super().__init__(gradient=(3.0, 4.0))
        self.weight.register_hook(lambda grad: grad + math.inf if self.trainer.global_step == 0 else grad)
        self.weights = []

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        self.weights.append(self.weight.detach().clone())


def test_under_a_grad_scaler_infinite_gradients_are_skipped_by_the_scaler(tmp_path):
    """16-mixed's GradScaler makes and skips infinite gradients routinely (its scale search): the
    guard leaves them to it and the run goes on; without a scaler the same gradient stops it."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    def fit(plugins):
        module = _ScaledOneParameter()
        trainer = L.Trainer(max_steps=2, plugins=plugins, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module)
        return module

    module = fit([MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    assert torch.equal(module.weights[0], torch.zeros(2))  # the scaler skipped step 0
    torch.testing.assert_close(module.weights[1], torch.tensor([-0.6, -0.8]))  # step 1 applied, clipped
    with pytest.raises(NonFiniteError, match=r"^non-finite gradient norm of the model \(inf\) at step 0: "):
        fit(None)


# ---- data parallel: the ranks decide together -----------------------------------------------------
_DDP_WORKER = '''
import json, sys
import lightning as L
import torch
sys.path.insert(0, sys.argv[1])
from tests.conftest import TINY_LLAMA
from lightning_irl.algorithms import SFT, OptimizerSpec
from lightning_irl.algorithms.engine import NonFiniteError
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.metrics.evaluation import EvalConfig
from lightning_irl.models.spec import ModelSpec

torch.set_num_threads(1)
L.seed_everything(0)
module = SFT(policy=ModelSpec(config=dict(TINY_LLAMA), tokenizer="task:modes", seed=0), export=False,
             optimizer=OptimizerSpec(lr=1e-3), evaluation=EvalConfig(enabled=False))
nll_sum = module.nll_sum
module.nll_sum = lambda micro: nll_sum(micro) * (float("nan") if module.global_rank == 1
                                                  and module.trainer.global_step == 1 else 1.0)
trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, num_sanity_val_steps=0)
try:
    trainer.fit(module, datamodule=DemonstrationDataModule(task="modes", num_train=32, num_val=0, batch_size=4))
    message = None
except NonFiniteError as error:
    message = str(error)
finite = all(bool(torch.isfinite(p).all()) for p in module.parameters())
json.dump({"message": message, "step": trainer.global_step, "finite": finite},
          open(f"rank{trainer.global_rank}.json", "w"))
# as lightning_irl.cli.main does: an exit with gloo's threads still up aborts now and then
# ("terminate called without an active exception", status -6)
torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_ranks_stop_together_naming_the_rank(tmp_path):
    """Only rank 1's loss is NaN (at step 1): both ranks stop at step 1 with the same line, which
    names the loss (not the gradient norm the all-reduce made NaN on rank 0 too) and rank 1."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    (tmp_path / "worker.py").write_text(_DDP_WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "worker.py", repo], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    expected = ("non-finite NLL (NaN on rank 1) at step 1: stopped before the update; "
                "no checkpoint was written before it")
    assert ranks[0] == ranks[1] == {"message": expected, "step": 1, "finite": True}
