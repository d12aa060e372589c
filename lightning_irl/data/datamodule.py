"""The demonstration LightningDataModule: files, a saved dataset, a Hub dataset or a built-in task."""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, Iterator, List, Mapping, Optional

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from lightning_irl.data.collate import DemonstrationCollator, PackedDemonstrationCollator
from lightning_irl.data.encode import EncodeStats, encode_records
from lightning_irl.data.records import DataError, load_records, validate_records
from lightning_irl.data.tasks import KnownExpertTask, get_task

log = logging.getLogger(__name__)


class LengthGroupedSampler(Sampler[int]):
    """Shuffle, then sort by length inside windows of ``batch_size * window_batches`` examples,
    and shuffle the resulting batches: batches hold similar lengths (less padding) while the order
    of batches stays random. Reseeded every epoch."""

    def __init__(self, lengths: List[int], batch_size: int, window_batches: int = 50, seed: int = 0) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.window = batch_size * window_batches
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start : start + self.window], key=self.lengths.__getitem__, reverse=True)
            batches += [window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        rng.shuffle(batches)
        return iter([i for batch in batches for i in batch])


class DemonstrationDataModule(L.LightningDataModule):
    """Serves (prompt, expert response) demonstrations.

    Args:
        task: A built-in task with a known expert (``modes``, ...): demonstrations are drawn from
            it (``num_train``/``num_val``/``num_test`` records, seeded) and evaluation metrics
            can compare samples with the exact expert.
        task_args: Options of ``task`` (its constructor arguments), e.g. ``{weights: [0.2, 0.3,
            0.5], min_length: 4}`` for ``modes`` or ``{weights: {weather: [1, 1, 1]}}`` for
            ``grammar``; see ``lightning_irl.data.tasks``. The evaluation metrics score against
            the task as configured here. An option that changes the vocabulary (the ``modes``
            alphabet) needs the matching model tokenizer, ``task:modes?alphabet=...``: setup
            stops with an error when the tokenizer would turn a task symbol into ``<unk>``.
        train_file: JSONL / JSON / Parquet / CSV file or a ``datasets.save_to_disk`` folder.
        val_file: Validation records; without one, ``val_fraction`` of the training records
            (seeded split) are held out.
        test_file: Test records (``lightning_irl test``).
        predict_file: Prompts to answer (``lightning_irl predict``); responses are ignored.
        dataset_name: A Hub dataset id, used only when named (then ``train_split``/``val_split``).
        prompt_field: Field holding the prompt text.
        response_field: Field holding the expert response.
        messages_field: Field holding chat turns ``[{role, content}]``; rendered with the
            tokenizer's chat template, loss on assistant turns only.
        max_length: Longest prompt + response in tokens; see ``overlong``.
        max_prompt_length: Longest prompt; longer prompts keep their last tokens.
        overlong: ``truncate`` (cut the response) or ``drop`` records over ``max_length``.
        batch_size: Examples per optimizer step on each device (the algorithm may split it into
            micro-batches for gradient accumulation).
        eval_batch_size: Examples per validation / test / predict batch (default: batch_size).
        group_by_length: Batch examples of similar length together (less padding).
        shuffle: Shuffle the training examples every epoch (False: file / task order, e.g. to
            compare runs on different device counts example for example).
        packing: Pack each training batch's examples end to end into fewer rows (padding-free,
            block-causal: examples never attend to each other; see
            ``PackedDemonstrationCollator``). Same examples and loss per step, less padding.
            Training batches only, and only for algorithms that declare ``supports_packing``.
        pack_length: Row capacity for ``packing`` in tokens (default: ``max_length``, or the
            batch's longest example without one). Attention work per row grows with its square
            under the dense block-causal mask of ``sdpa``/``eager``; keep it near ``max_length``.
    """

    def __init__(
        self,
        task: Optional[str] = None,
        task_args: Optional[Dict[str, Any]] = None,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
        task_seed: int = 0,
        train_file: Optional[str] = None,
        val_file: Optional[str] = None,
        test_file: Optional[str] = None,
        predict_file: Optional[str] = None,
        dataset_name: Optional[str] = None,
        dataset_config: Optional[str] = None,
        train_split: str = "train",
        val_split: Optional[str] = None,
        prompt_field: str = "prompt",
        response_field: str = "response",
        messages_field: str = "messages",
        val_fraction: float = 0.0,
        split_seed: int = 0,
        max_length: Optional[int] = 1024,
        max_prompt_length: Optional[int] = None,
        overlong: str = "truncate",
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        group_by_length: bool = False,
        shuffle: bool = True,
        packing: bool = False,
        pack_length: Optional[int] = None,
    ) -> None:
        super().__init__()
        sources = [s for s in (task, train_file, dataset_name) if s is not None]
        if len(sources) > 1:
            raise ValueError("give one source of demonstrations: task, train_file or dataset_name")
        if overlong not in ("truncate", "drop"):
            raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")
        if pack_length is not None and pack_length < 1:
            raise ValueError("pack_length must be a positive number of tokens")
        if task_args is not None and not task:
            raise ValueError("data.task_args needs data.task: they are the options of a built-in task")
        if task_args is not None and not isinstance(task_args, Mapping):
            raise ValueError(f"data.task_args must be a mapping of option: value, got {task_args!r}")
        self.save_hyperparameters()
        self.task: Optional[KnownExpertTask] = get_task(task, **dict(task_args or {})) if task else None
        self.tokenizer = None
        self.datasets: Dict[str, List[Dict[str, Any]]] = {}
        self.stats: Dict[str, EncodeStats] = {}

    # ---- records -----------------------------------------------------------------------
    def _fields(self, require_response: bool = True) -> Dict[str, Any]:
        h = self.hparams
        return dict(prompt_field=h.prompt_field, response_field=h.response_field,
                    messages_field=h.messages_field, require_response=require_response)

    def _task_records(self, split: str) -> Optional[List[Dict[str, Any]]]:
        h = self.hparams
        n, offset = {"train": (h.num_train, 0), "val": (h.num_val, 1), "test": (h.num_test, 2),
                     "predict": (h.num_test, 2)}[split]
        if n == 0:
            return None
        return [{**r, "where": f"task {h.task} {split} record {i}"}
                for i, r in enumerate(self.task.records(n, seed=h.task_seed * 1000 + offset))]

    def raw_records(self, split: str) -> Optional[List[Dict[str, Any]]]:
        """Validated records for ``train``/``val``/``test``/``predict`` (None when absent)."""
        h = self.hparams
        if self.task is not None:
            return self._task_records(split)
        if split == "predict":
            return validate_records(load_records(h.predict_file), **self._fields(False)) if h.predict_file else None
        path = {"train": h.train_file, "val": h.val_file, "test": h.test_file}[split]
        if path is not None:
            return validate_records(load_records(path), **self._fields())
        if h.dataset_name is not None:
            hub_split = {"train": h.train_split, "val": h.val_split, "test": None}[split]
            if hub_split is not None:
                records = load_records(hub_name=h.dataset_name, hub_config=h.dataset_config, split=hub_split)
                return validate_records(records, **self._fields())
        return None

    def _split_train_val(self, records: List[Dict[str, Any]]):
        rng = random.Random(self.hparams.split_seed)
        order = list(range(len(records)))
        rng.shuffle(order)
        n_val = int(round(len(records) * self.hparams.val_fraction))
        val = set(order[:n_val])
        return [r for i, r in enumerate(records) if i not in val], [records[i] for i in sorted(val)]

    # ---- Lightning hooks ---------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
        if self.tokenizer is None:
            raise RuntimeError("DemonstrationDataModule needs a tokenizer: set_tokenizer() or a module with one")
        self._check_task_vocabulary()
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}[stage]
        if stage == "fit" and self.hparams.packing:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is not None and not getattr(module, "supports_packing", False):
                raise ValueError(f"data.packing: {type(module).__name__} does not support packed batches "
                                 "(its loss would attend across packed examples); turn packing off")
        raw: Dict[str, Optional[List[Dict[str, Any]]]] = {s: self.raw_records(s) for s in wanted}
        if stage == "fit" and raw["train"] is None:
            raise DataError("no training data: set data.task, data.train_file or data.dataset_name")
        if "val" in wanted and raw["val"] is None and self.hparams.val_fraction > 0:
            train = raw.get("train") or self.raw_records("train")
            train, raw["val"] = self._split_train_val(train)
            if stage == "fit":
                raw["train"] = train
        for split, records in raw.items():
            if records is None:
                if stage != "fit" or split != "val":
                    raise DataError(f"no {split} data: set the matching data.*_file (or data.task)")
                continue
            examples, stats = encode_records(records, self.tokenizer, self.hparams.max_length,
                                             self.hparams.max_prompt_length, self.hparams.overlong)
            if not examples:
                raise DataError(f"{split}: every record was dropped ({stats.as_dict()})")
            self.datasets[split], self.stats[split] = examples, stats
            self._report(split, stats)

    def set_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def _check_task_vocabulary(self) -> None:
        """Stop before encoding if the tokenizer cannot spell every task symbol.

        A symbol that becomes ``<unk>`` (e.g. a ``modes`` alphabet wider than the tokenizer's)
        would train on indistinguishable tokens and decode to text no metric can score.
        """
        tokenizer = self.tokenizer
        if self.task is None:
            return
        unk = tokenizer.unk_token_id
        missing = []
        for symbol in self.task.vocabulary():
            ids = tokenizer(symbol, add_special_tokens=False)["input_ids"]
            if not ids or (unk is not None and unk in ids):
                missing.append(symbol)
        if missing:
            shown = " ".join(missing[:12]) + (f" (+{len(missing) - 12} more)" if len(missing) > 12 else "")
            raise DataError(f"data.task {self.task.name}: the tokenizer cannot encode task symbol(s) {shown} "
                            f"(they would become {tokenizer.unk_token or 'no token'}); give the model the "
                            f"task's tokenizer: tokenizer: \"{self.task.tokenizer_spec()}\"")

    def _report(self, split: str, stats: EncodeStats) -> None:
        values = stats.as_dict()
        message = ", ".join(f"{k}={v}" for k, v in values.items())
        log.info("data %s: %s", split, message)
        dropped = stats.dropped_empty_response + stats.dropped_overlong
        if dropped or stats.truncated_prompt or stats.truncated_response:
            log.warning("data %s: dropped %d record(s), truncated %d prompt(s) and %d response(s) (%s)",
                        split, dropped, stats.truncated_prompt, stats.truncated_response, message)
        trainer = self.trainer
        if trainer is not None and trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({f"data/{split}_{k}": float(v) for k, v in values.items()}, step=0)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        examples = self.datasets[split]
        if split == "train" and self.hparams.packing:
            collate = PackedDemonstrationCollator(self.tokenizer.pad_token_id,
                                                  self.hparams.pack_length or self.hparams.max_length)
        else:
            collate = DemonstrationCollator(self.tokenizer.pad_token_id)
        sampler = None
        if shuffle and self.hparams.group_by_length:
            sampler = LengthGroupedSampler([len(e["input_ids"]) for e in examples], batch_size,
                                           seed=self.hparams.split_seed)
            shuffle = False
        elif split == "train" and not shuffle and self._distributed_kwargs():
            # Lightning would swap in a *shuffling* DistributedSampler for training; keep the order:
            # rank r takes examples r, r + N, ..., so a global batch is the same examples as on 1 device.
            sampler = DistributedSampler(examples, shuffle=False, **self._distributed_kwargs())
        return DataLoader(examples, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                          collate_fn=collate, num_workers=self.hparams.num_workers,
                          drop_last=False, persistent_workers=self.hparams.num_workers > 0)

    def _distributed_kwargs(self) -> Dict[str, int]:
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return {}
        kwargs = trainer.strategy.distributed_sampler_kwargs or {}
        return {k: kwargs[k] for k in ("num_replicas", "rank") if k in kwargs}

    @property
    def _eval_batch_size(self) -> int:
        return self.hparams.eval_batch_size or self.hparams.batch_size

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, shuffle=self.hparams.shuffle)

    def val_dataloader(self):
        if "val" not in self.datasets:
            return []
        return self._loader("val", self._eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self._eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self._eval_batch_size, shuffle=False)
