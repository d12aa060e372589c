"""The only place lightning_irl touches private (``_``-prefixed) names of Lightning, transformers
or torch objects — each one here because no public API does the job.

Every helper names the private attribute it relies on, why, and the versions it is known for;
``tests/test_compat.py`` fails loudly (naming the helper to update) as soon as an upgrade renames
or drops one of them. Everything else in the package uses public API only; keep it that way:
add a helper here (and its test) rather than reaching into a private name anywhere else.

This module imports nothing from ``lightning_irl``, so any module may import it.
"""

from __future__ import annotations

from typing import Set, Union

import torch


class PrivateAPIChanged(RuntimeError):
    """A private name a ``compat`` helper relies on is gone: the library was upgraded past the
    versions the helper is known for. Update the helper (and ``tests/test_compat.py``)."""


# ---- Lightning ---------------------------------------------------------------------------------

#: ``ModelParallelStrategy`` keeps its ``data_parallel_size`` constructor argument here and reads
#: it in ``setup_environment`` to build the device mesh.
MODEL_PARALLEL_DATA_PARALLEL_SIZE = "_data_parallel_size"


def set_data_parallel_size(strategy, size: Union[int, str]) -> None:
    """Set the data-parallel mesh dimension of a Lightning ``ModelParallelStrategy`` after
    construction (before its ``setup_environment`` builds the device mesh).

    Why private: the size is only a constructor argument, and ``"auto"`` resolves to the number of
    *nodes* (tensor parallelism within a node). FSDP2 needs data parallel over *every* process,
    which is only known once the trainer has assigned the devices, after construction; Lightning
    has no public property or setter for it.

    Known for: Lightning 2.6.x (checked against 2.6.6, ``lightning/pytorch/strategies/
    model_parallel.py``: ``__init__`` stores it, ``setup_environment`` reads it).
    """
    if not hasattr(strategy, MODEL_PARALLEL_DATA_PARALLEL_SIZE):
        raise PrivateAPIChanged(
            f"{type(strategy).__name__} has no {MODEL_PARALLEL_DATA_PARALLEL_SIZE!r} any more (Lightning renamed "
            "ModelParallelStrategy's private data-parallel size): update lightning_irl.compat.set_data_parallel_size"
        )
    setattr(strategy, MODEL_PARALLEL_DATA_PARALLEL_SIZE, size)


#: ``Trainer`` attribute holding its logger connector, whose ``should_update_logs`` property says
#: whether the metrics logged in this training step will be written.
LOGGER_CONNECTOR = "_logger_connector"


def logs_this_step(trainer) -> bool:
    """Whether the trainer writes the step metrics of the training step in progress (every
    ``log_every_n_steps``-th step, and when it is stopping).

    Why private: the decision lives only in the logger connector's ``should_update_logs`` (the
    trainer's ``_logger_connector``); Lightning's own callbacks (``LearningRateMonitor``,
    ``DeviceStatsMonitor``, ``ThroughputMonitor``) read it the same way, and there is no public
    property. Recomputing it from ``global_step`` would drift from Lightning's step counter
    (``_batches_that_stepped``) under manual optimization and on resume.

    Known for: Lightning 2.6.x (checked against 2.6.6, ``lightning/pytorch/trainer/connectors/
    logger_connector/logger_connector.py``: ``_LoggerConnector.should_update_logs``).
    """
    connector = getattr(trainer, LOGGER_CONNECTOR, None)
    if connector is None or not isinstance(getattr(type(connector), "should_update_logs", None), property):
        raise PrivateAPIChanged(
            f"lightning.pytorch.Trainer has no {LOGGER_CONNECTOR}.should_update_logs any more: update "
            "lightning_irl.compat.logs_this_step"
        )
    return bool(connector.should_update_logs)


# ---- transformers ------------------------------------------------------------------------------

#: ``PreTrainedModel`` class attribute: the module classes that must not be split across devices
#: (the transformer blocks), declared by every model architecture.
NO_SPLIT_MODULES = "_no_split_modules"


def no_split_module_names(model: torch.nn.Module) -> Set[str]:
    """Class names of the transformer blocks of a Hugging Face ``PreTrainedModel`` (e.g.
    ``{"LlamaDecoderLayer"}``): the FSDP unit boundaries. Empty when the model declares none.

    Why private: transformers publishes this only as the ``_no_split_modules`` class attribute
    (its own ``device_map``, FSDP and TPU integrations read it the same way); there is no public
    accessor.

    Known for: transformers 5.x (checked against 5.24.0, ``modeling_utils.py``:
    ``PreTrainedModel._no_split_modules``, merged over sub-models in ``post_init``).
    """
    from transformers import PreTrainedModel

    if not hasattr(PreTrainedModel, NO_SPLIT_MODULES):
        raise PrivateAPIChanged(
            f"transformers.PreTrainedModel has no {NO_SPLIT_MODULES!r} any more: update "
            "lightning_irl.compat.no_split_module_names"
        )
    return set(getattr(model, NO_SPLIT_MODULES, None) or ())


#: ``PretrainedConfig`` property: the attention implementation the model was built with, set by
#: ``PreTrainedModel.__init__`` after it resolved the requested one (or none) for the architecture.
ATTN_IMPLEMENTATION = "_attn_implementation"


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention implementation a Hugging Face model runs (``"sdpa"``, ``"eager"``,
    ``"flash_attention_2"``, ...): what transformers picked when none was requested (``sdpa``
    where the architecture supports it, else ``eager``), or the requested one. A peft wrapper is
    looked through (its ``config`` is the base model's).

    Why private: transformers stores the resolved choice only as ``config._attn_implementation``
    (its own attention dispatch reads it there: ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``);
    the public ``attn_implementation`` is a constructor / ``from_pretrained`` argument, with no
    getter.

    Known for: transformers 5.x (checked against 5.24.0, ``configuration_utils.py``: the
    ``_attn_implementation`` property over ``_attn_implementation_internal``;
    ``modeling_utils.py``: ``get_correct_attn_implementation`` falls back from ``sdpa`` to
    ``eager``).
    """
    from transformers import PretrainedConfig

    if not isinstance(getattr(PretrainedConfig, ATTN_IMPLEMENTATION, None), property):
        raise PrivateAPIChanged(
            f"transformers.PretrainedConfig has no {ATTN_IMPLEMENTATION!r} property any more: update "
            "lightning_irl.compat.attention_implementation"
        )
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"{type(model).__name__} is not a Hugging Face model (no PretrainedConfig `config`)")
    return getattr(config, ATTN_IMPLEMENTATION)


__all__ = ["PrivateAPIChanged", "attention_implementation", "logs_this_step", "no_split_module_names",
           "set_data_parallel_size"]
