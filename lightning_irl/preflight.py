"""Pre-flight: what can be checked before a run builds or writes anything — option ranges, model
and tokenizer folders, data files, ``--ckpt_path``, output folders — raising ``ConfigError``
(``<where>: <what>``); and the record that lets a run which fails before its loop leave no new
``logs/<name>/version_<n>`` folder and no ``.partial`` file (``FailedStartCleanup``).

``lightning_irl.cli`` runs ``preflight`` on every parsed ``fit|validate|test|predict`` command.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pickle
import re
import shutil
import tempfile
import typing
import zipfile
from typing import Any, Dict, List, Optional

import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lightning_irl.algorithms.base import IRLModule
from lightning_irl.callbacks import JsonlPredictionWriter, RunCheckpoint
from lightning_irl.callbacks.checkpoint import local_path
from lightning_irl.data import DemonstrationDataModule
from lightning_irl.models.spec import ModelSpec, SourceError

SUBCOMMANDS = ("fit", "validate", "test", "predict")

def one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ConfigError(ValueError):
    """Bad input found before the run: the message is ``<where>: <what>``, ``where`` a path or an
    option key (``data.init_args.batch_size``)."""

def config_files(argv: List[str]) -> List[str]:
    files = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg[len("--config="):])
    return files


def check_config_file(path: str) -> None:
    """A ``--config`` file that is not UTF-8, not YAML, or not a mapping: ``ConfigError`` with the
    file and line (jsonargparse's own report names neither)."""
    if not os.path.isfile(path):
        return  # jsonargparse says "does not exist"; it also takes inline YAML here
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (--config)") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem}) (--config)") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config file is a mapping of option: value, got a {type(loaded).__name__} "
                          "(--config)")


def import_class(class_path: Optional[str]):
    if not class_path or "." not in str(class_path):
        return None
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def type_hints(obj) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # an annotation that does not resolve: no hints, no checks
        return {}


def init_hints(cls) -> Dict[str, Any]:
    """Type hints of ``cls.__init__`` merged over its bases (jsonargparse follows ``**kwargs``)."""
    hints: Dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and klass is not object:
            params = inspect.signature(klass.__init__).parameters
            found = type_hints(klass.__init__)
            hints.update({k: found.get(k) for k in params if k != "self" and params[k].kind not in (
                inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)})
    return hints


def unwrap_optional(tp):
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return tp


def _build(tp, value, key: str):
    """``value`` (a parsed Namespace / dict) built into the dataclass ``tp``, nested dataclasses
    first, so a ``__post_init__`` error names its exact key; other values are returned as is."""
    tp = unwrap_optional(tp)
    if value is None or not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        return value
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if not isinstance(value, dict):
        return value
    hints = type_hints(tp)
    fields = {f.name for f in dataclasses.fields(tp) if f.init}
    kwargs = {k: (_build(hints.get(k), v, f"{key}.{k}") if k in fields else v)
              for k, v in value.items() if not str(k).startswith("__")}
    try:
        return tp(**kwargs)
    except (ValueError, TypeError) as err:
        message = one_line(str(err))
        parent, _, last = key.rpartition(".")
        if parent and re.match(rf"{re.escape(last)}[:.]", message):  # "evaluation: need ..." names itself
            raise ConfigError(f"{parent}.{message}") from err
        raise ConfigError(f"{key}: {message}") from err


def _model_specs(obj, key: str):
    if isinstance(obj, ModelSpec):
        yield key, obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _model_specs(getattr(obj, f.name), f"{key}.{f.name}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _model_specs(item, f"{key}[{i}]")


def _is_count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


#: Ranges of DemonstrationDataModule / IRLModule arguments: name -> (test, rule), None always allowed.
_DATA_RANGES = {
    "batch_size": (lambda v: _is_count(v, 1), ">= 1"),
    "eval_batch_size": (lambda v: _is_count(v, 1), ">= 1 (or null: batch_size)"),
    "max_length": (lambda v: _is_count(v, 1), "a number of tokens >= 1 (or null: no limit)"),
    "max_prompt_length": (lambda v: _is_count(v, 1), "a number of tokens >= 1 (or null: no limit)"),
    "pack_length": (lambda v: _is_count(v, 1), "a number of tokens >= 1 (or null: max_length)"),
    "num_train": (lambda v: _is_count(v, 0), ">= 0"),
    "num_val": (lambda v: _is_count(v, 0), ">= 0"),
    "num_test": (lambda v: _is_count(v, 0), ">= 0"),
    "num_workers": (lambda v: _is_count(v, 0), ">= 0"),
    "val_fraction": (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "in [0, 1)"),
}
_MODULE_RANGES = {
    "micro_batch_size": (lambda v: _is_count(v, 1), ">= 1 (or null: the whole batch)"),
    "max_grad_norm": (lambda v: isinstance(v, (int, float)) and v > 0, "> 0 (or null: no clipping)"),
}


_TRAINER_RANGES = {
    "val_check_interval": (lambda v: isinstance(v, (int, float)) and v > 0,
                           "> 0 (a fraction of an epoch in (0, 1], or a number of batches)"),
}


def _check_ranges(args, ranges, prefix: str) -> None:
    for name, (test, rule) in ranges.items():
        value = args.get(name) if args is not None else None
        if value is not None and not test(value):
            raise ConfigError(f"{prefix}.{name}: must be {rule}, got {value!r}")


def _check_model(config) -> Any:
    """Model arguments: ranges, every dataclass argument built (its own checks), every named model
    or tokenizer folder there. Returns the model class (or None)."""
    model_cls = import_class(config.get("model.class_path"))
    args = config.get("model.init_args")
    if model_cls is None or args is None:
        return model_cls
    if issubclass(model_cls, IRLModule):
        _check_ranges(args, _MODULE_RANGES, "model.init_args")
    hints = init_hints(model_cls)
    specs = []
    for name, value in vars(args).items():
        built = _build(hints.get(name), value, f"model.init_args.{name}")
        specs += list(_model_specs(built, f"model.init_args.{name}"))
    for key, spec in specs:
        try:
            spec.check_sources()
        except SourceError as err:
            raise ConfigError(f"{err.path}: {err.reason} ({key}.{err.field})") from None
    return model_cls


def _check_data(config, subcommand: str) -> None:
    data_cls = import_class(config.get("data.class_path"))
    args = config.get("data.init_args")
    if data_cls is None or args is None or not issubclass(data_cls, DemonstrationDataModule):
        return
    _check_ranges(args, _DATA_RANGES, "data.init_args")
    if args.get("task"):
        return
    needed = {"fit": ("train_file", "val_file"), "test": ("test_file",), "predict": ("predict_file",),
              "validate": ("val_file",) if args.get("val_file") else ("train_file",)}[subcommand]
    for name in needed:
        path = args.get(name)
        if path is not None and not os.path.exists(os.path.expanduser(str(path))):
            raise ConfigError(f"{path}: no such file or folder (data.init_args.{name})")


#: State-dict parts only one method has (a checkpoint's top-level keys say who wrote it).
_METHOD_PARTS = (("discriminator", "Adversarial"), ("opponent", "SPIN"), ("teacher", "Distill"),
                 ("source_policies", "RewardModel"))


def _method_of_checkpoint(parts: set) -> Optional[str]:
    for part, method in _METHOD_PARTS:
        if part in parts:
            return method
    if "reward_model" in parts:
        return "BestOfN" if "policy" in parts else "RewardModel"
    if "policy" in parts and parts <= {"policy", "reference"}:
        return "SFT"
    return None


def _method_of_class(cls) -> Optional[str]:
    names = [klass.__name__ for klass in cls.__mro__ if klass.__module__.startswith("lightning_irl.")]
    for method in ("Adversarial", "SPIN", "Distill", "BestOfN", "RewardModel"):
        if method in names:
            return method
    return "SFT" if "PolicyModule" in names else None


_METHOD_NAMES = {"SFT": "SFT or IQLearn (a policy alone)", "Adversarial": "Adversarial (AIRL / GAIL)"}


def check_checkpoint(path: str, model_cls=None, key: str = "--ckpt_path") -> None:
    """``ConfigError`` unless ``path`` is a readable Lightning checkpoint file written by the same
    kind of method as ``model_cls`` (judged by its state-dict parts: ``discriminator`` →
    Adversarial, ``opponent`` → SPIN, ...). A folder (a sharded checkpoint) or a remote URL is
    left to the strategy. Cheap: the file is memory-mapped, not read."""
    name = local_path(os.path.expanduser(str(path)))
    if name is None:
        return
    if not os.path.exists(name):
        raise ConfigError(f"{path}: no such checkpoint file ({key})")
    if os.path.isdir(name):
        return
    if name.endswith((".safetensors", ".bin")):
        raise ConfigError(f"{path}: model weights, not a Lightning checkpoint; to start from a Hugging Face "
                          f"folder, name it in model.init_args.policy.model_name_or_path ({key})")
    zipped = zipfile.is_zipfile(name)
    if not zipped:
        with open(name, "rb") as handle:
            legacy = handle.read(1) == b"\x80"  # torch.save's pre-1.6 pickle format
        if not legacy:
            size = os.path.getsize(name)
            raise ConfigError(f"{path}: truncated or not a PyTorch checkpoint ({size} bytes, no zip directory at the "
                              f"end) ({key})")
    try:
        checkpoint = torch.load(name, map_location="cpu", mmap=zipped, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            return  # objects a plain weights-only load refuses: Lightning's own load decides
        raise ConfigError(f"{path}: not a PyTorch checkpoint ({one_line(str(err))}) ({key})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        reason = one_line(str(err)) or type(err).__name__
        raise ConfigError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({reason}) "
                          f"({key})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"{path}: not a Lightning checkpoint (no state_dict; a Hugging Face folder goes in "
                          f"model.init_args.policy.model_name_or_path) ({key})")
    if model_cls is None:
        return
    parts = {k.split(".", 1)[0] for k in checkpoint["state_dict"]}
    written, wanted = _method_of_checkpoint(parts), _method_of_class(model_cls)
    if written is not None and wanted is not None and written != wanted:
        raise ConfigError(f"{path}: checkpoint is from {_METHOD_NAMES.get(written, written)} (it holds "
                          f"{', '.join(sorted(parts))}), but the config trains {model_cls.__name__}; give a "
                          f"checkpoint of that method, or start from the other run's export with "
                          f"model_name_or_path ({key})")


def _check_writable(path: str, what: str, key: str) -> None:
    """``path`` (a folder this run writes) exists as a writable folder or can be created."""
    full = os.path.abspath(os.path.expanduser(str(path)))
    probe = full
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        blocker = "it" if probe == full else os.path.relpath(probe) if not os.path.isabs(path) else probe
        raise ConfigError(f"{path}: cannot be the {what}: {blocker} is a file, not a folder ({key})")
    try:
        handle, tmp = tempfile.mkstemp(dir=probe, prefix=".lightning_irl-write-check-")
        os.close(handle)
        os.remove(tmp)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConfigError(f"{path}: cannot write the {what} there ({reason} in {probe}) ({key})") from None


def _output_folders(config, subcommand: str) -> List[tuple]:
    """(folder, what, option key) of every folder the run writes into."""
    out = []
    trainer = config.get("trainer")
    root = trainer.get("default_root_dir") if trainer is not None else None
    loggers = trainer.get("logger") if trainer is not None else None
    for i, logger in enumerate(loggers if isinstance(loggers, list) else [loggers]):
        label = "trainer.logger" + (f"[{i}]" if isinstance(loggers, list) else "")
        if logger is True:
            out.append((os.path.join(root or ".", "lightning_logs"), "logs folder", "trainer.default_root_dir"))
        elif hasattr(logger, "get") and logger.get("init_args") is not None:
            for attr in ("save_dir", "root_dir"):
                if logger.get(f"init_args.{attr}"):
                    out.append((logger.get(f"init_args.{attr}"), "logs folder", f"{label}.init_args.{attr}"))
    if root:
        out.append((root, "run folder", "trainer.default_root_dir"))
    if subcommand == "fit":
        checkpoint = config.get("checkpoint")
        dirpath = checkpoint.get("dirpath") if checkpoint is not None else None
        if dirpath:
            out.append((dirpath, "checkpoint folder", "checkpoint.dirpath"))
        else:
            default = inspect.signature(RunCheckpoint.__init__).parameters["root"].default
            ckpt_root = checkpoint.get("root", default) if checkpoint is not None else default
            out.append((ckpt_root or default, "checkpoint folder", "checkpoint.root"))
        callbacks = trainer.get("callbacks") if trainer is not None else None
        for callback in callbacks if isinstance(callbacks, list) else []:
            if hasattr(callback, "get") and callback.get("init_args.dirpath"):
                out.append((callback.get("init_args.dirpath"), "checkpoint folder", "trainer.callbacks"))
        if config.get("model.init_args.export") is not False and config.get("model.init_args.export_dir"):
            out.append((config.get("model.init_args.export_dir"), "export folder", "model.init_args.export_dir"))
    if subcommand == "predict" and config.get("predictions.output_path"):
        output = str(config.get("predictions.output_path"))
        if os.path.isdir(os.path.expanduser(output)):
            raise ConfigError(f"{output}: is a folder; predictions go to a file (predictions.output_path)")
        out.append((os.path.dirname(output) or ".", "predictions folder", "predictions.output_path"))
    return out


def preflight(config) -> None:
    """Check a parsed ``fit|validate|test|predict`` command before anything is built, loaded or
    written; raise ``ConfigError`` naming the first bad option or path:

    - option ranges (data batch sizes and lengths, ``val_fraction``, ``micro_batch_size``, ...)
      and every dataclass argument of the model (``SamplingConfig``, ``ModelSpec``, ...) built,
      so its own checks report with the exact key;
    - every model / tokenizer folder named exists (a local-looking name is never sent to the Hub),
      and, offline, every Hub id is in the cache;
    - the data files the command reads exist;
    - ``--ckpt_path`` is a readable checkpoint of the same kind of method (``check_checkpoint``);
    - every folder the run writes (logs, checkpoints, export, predictions) is writable or can
      be created.

    Then notes what exists in those folders, so that ``main`` can remove what a run that fails
    before its loop starts created (``FailedStartCleanup``)."""
    global _RUN
    subcommand = config["subcommand"]
    command = config[subcommand]
    _RUN = None
    _check_ranges(command.get("trainer"), _TRAINER_RANGES, "trainer")
    model_cls = _check_model(command)
    _check_data(command, subcommand)
    ckpt_path = command.get("ckpt_path")
    if ckpt_path is not None and str(ckpt_path) not in ("last", "best", "hpc") and not str(ckpt_path).startswith(
            "registry"):
        check_checkpoint(str(ckpt_path), model_cls)
    folders = _output_folders(command, subcommand)
    for folder, what, key in folders:
        _check_writable(folder, what, key)
    # the folders that get a new version_<n> (or export) folder per run
    _RUN = RunRecord([folder for folder, what, _ in folders if what != "predictions folder"], model_cls)


# ---- a run that fails before its loop leaves nothing behind -------------------------------------
class RunRecord:
    """What existed in the run's output folders at pre-flight (three levels down), so that the
    folders a failed run created (``logs/<name>/version_<n>``, its checkpoint folder) can be told
    from an earlier run's and removed."""

    def __init__(self, folders: List[str], model_cls=None) -> None:
        self.existing: set = set()
        self.anchors: List[str] = []
        for folder in folders:
            base = anchor = os.path.abspath(os.path.expanduser(str(folder)))
            while not os.path.isdir(anchor) and os.path.dirname(anchor) != anchor:
                anchor = os.path.dirname(anchor)  # the nearest folder that exists
            self.anchors.append(anchor)
            self.existing.add(anchor)
            if anchor == base:  # otherwise nothing exists below the anchor on the way to the folder
                self._walk(anchor, depth=3)
        self.model_cls = model_cls
        self.started = False
        self.outputs: List[str] = []
        self.partials: List[str] = []
        self.ckpt_path: Optional[str] = None

    def _walk(self, folder: str, depth: int) -> None:
        if depth <= 0 or len(self.existing) > 100_000:
            return
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            self.existing.add(os.path.abspath(entry.path))
            if entry.is_dir(follow_symlinks=False):
                self._walk(entry.path, depth - 1)

    def clean_up(self, folders: bool = True) -> None:
        """Remove the ``.partial`` predictions file of the failed run (the finished file, and an
        earlier run's, stay as they were), and, with ``folders`` and when it failed before its
        loop started, the output folders it created: never one that existed before it, nor one
        that holds a checkpoint."""
        for partial in self.partials:
            if os.path.isfile(partial):
                os.remove(partial)
        if self.started or not folders:
            return
        for output in self.outputs:
            path = os.path.abspath(output)
            anchor = next((a for a in self.anchors if path == a or path.startswith(a + os.sep)), None)
            if anchor is None or path in self.existing or not os.path.exists(path) or any(
                    name.endswith(".ckpt") for _, _, names in os.walk(path) for name in names):
                continue
            shutil.rmtree(path, ignore_errors=True)
            parent = os.path.dirname(path)
            while parent != anchor and parent.startswith(anchor + os.sep) and parent not in self.existing:
                try:
                    os.rmdir(parent)  # only if empty: another run may be writing next to it
                except OSError:
                    break
                parent = os.path.dirname(parent)


_RUN: Optional[RunRecord] = None


class FailedStartCleanup(Callback):
    """Tells ``main`` when the run's loop started and, on an exception, which folders and files
    the run writes (its loggers' folders, checkpoint folders, ``.partial`` predictions), so that
    a run that fails before its loop (bad data, a checkpoint that does not load, ...) leaves no
    ``logs/<name>/version_<n>`` behind and no run leaves a ``.partial`` file."""

    def on_train_start(self, trainer, pl_module) -> None:
        self._started()

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._started()

    def on_test_start(self, trainer, pl_module) -> None:
        self._started()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._started()

    @staticmethod
    def _started() -> None:
        if _RUN is not None:
            _RUN.started = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        record = _RUN
        if record is None:
            return
        for logger in trainer.loggers:
            try:
                log_dir = logger.log_dir
            except Exception:  # a logger without a local folder
                log_dir = None
            if log_dir:
                record.outputs.append(str(log_dir))
        record.outputs += [str(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        for callback in trainer.callbacks:
            if isinstance(callback, JsonlPredictionWriter):
                record.partials.append(getattr(callback, "_tmp", None) or str(callback.output_path) + ".partial")
        record.ckpt_path = str(trainer.ckpt_path) if trainer.ckpt_path else None


def current_run() -> Optional[RunRecord]:
    """The record ``preflight`` made for the command being run (None before or without one)."""
    return _RUN


def forget_run() -> None:
    global _RUN
    _RUN = None
