"""The demonstration LightningDataModule: files, a saved dataset, a Hub dataset or a built-in task."""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Dict, Iterator, List, Mapping, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from lightning_irl.data.collate import DemonstrationCollator, PackedDemonstrationCollator
from lightning_irl.data.encode import EncodeStats, encode_records
from lightning_irl.data.records import DataError, load_records, validate_records
from lightning_irl.data.tasks import KnownExpertTask, get_task

log = logging.getLogger(__name__)


def _run_seed() -> int:
    """The run's seed: ``seed_everything``'s (``PL_GLOBAL_SEED``, as Lightning's own distributed
    sampler takes it), else one drawn from torch's generator (kept in checkpoints)."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())


def length_grouped_order(lengths: List[int], batch_size: int, window_batches: int, seed: int) -> List[int]:
    """Shuffle (``random.Random(seed)``), sort by length inside windows of ``batch_size *
    window_batches`` examples, cut into batches of ``batch_size`` and shuffle the batches."""
    rng = random.Random(seed)
    window = batch_size * window_batches
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lengths.__getitem__, reverse=True)
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return [i for batch in batches for i in batch]


class LengthGroupedSampler(Sampler[int]):
    """Shuffle, then sort by length inside windows of ``batch_size * window_batches`` examples,
    and shuffle the resulting batches: batches hold similar lengths (less padding) while the order
    of batches stays random. Reseeded every epoch. (The data module's training loader uses
    ``ResumableSampler``, which gives the same order and can resume mid-epoch.)"""

    def __init__(self, lengths: List[int], batch_size: int, window_batches: int = 50, seed: int = 0) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.window_batches = window_batches
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = length_grouped_order(self.lengths, self.batch_size, self.window_batches, self.seed + self.epoch)
        self.epoch += 1
        return iter(order)


class ResumableSampler(DistributedSampler):
    """The training order, resumable mid-epoch: epoch ``e`` is a function of (``seed``, ``e``)
    only, and ``start`` examples of this rank's share of it can be skipped.

    - ``shuffle``: ``torch.randperm`` seeded with ``seed + epoch`` (``DistributedSampler``'s
      order, so under DDP the same as Lightning's default sampler); ``lengths`` given: the
      length-grouped order of ``length_grouped_order`` (seed ``seed + epoch``, batches of
      ``batch_size * num_replicas`` so that a global batch holds similar lengths); else the file
      order.
    - Rank ``r`` of ``num_replicas`` takes every ``num_replicas``-th example from ``r``
      (``DistributedSampler``: the order is padded by repeating its start to a multiple of the
      ranks), so a global batch holds the same examples as one device's batch would.
    - Lightning calls ``set_epoch`` at every epoch start; a new epoch starts at its beginning.
      ``start`` is consumed by the next ``__iter__``: a resumed run first finishes the
      interrupted epoch, then goes on with full epochs. ``__len__`` stays the full share (the
      epoch's length to Lightning, which counts the skipped batches as done).

    It draws nothing from the global random generators, so creating or resuming it never shifts
    the run's randomness. ``state_dict()`` / ``load_state_dict()`` hold ``seed``, ``epoch``,
    ``start``.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 lengths: Optional[List[int]] = None, batch_size: int = 1, window_batches: int = 50) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.lengths = lengths
        self.batch_size = batch_size
        self.window_batches = window_batches
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def order(self) -> List[int]:
        """This epoch's global order (every rank's examples, before padding)."""
        n = len(self.dataset)
        if self.lengths is not None:
            return length_grouped_order(self.lengths, self.batch_size * self.num_replicas, self.window_batches,
                                        self.seed + self.epoch)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            return torch.randperm(n, generator=generator).tolist()
        return list(range(n))

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        padding = self.total_size - len(order)
        if padding > 0:
            order += (order * (padding // len(order) + 1))[:padding]
        share = order[self.rank : self.total_size : self.num_replicas]
        start, self.start = self.start, 0
        return iter(share[start:])

    def state_dict(self) -> Dict[str, int]:
        return {"seed": int(self.seed), "epoch": int(self.epoch), "start": int(self.start)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed, self.epoch, self.start = int(state["seed"]), int(state["epoch"]), int(state["start"])


class TrainDataLoader(DataLoader):
    """The training ``DataLoader``. Lightning treats a loader with ``state_dict`` /
    ``load_state_dict`` as resumable mid-epoch; this one's position (its ``ResumableSampler``'s)
    is saved and restored by ``DemonstrationDataModule.state_dict`` / ``load_state_dict``, which
    know how many batches training consumed, so its own state is empty."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class DemonstrationDataModule(L.LightningDataModule):
    """Serves (prompt, expert response) demonstrations.

    Record formats: TRL's dataset formats load unchanged. Without field names, each file's
    (split's) format is detected from its first record and every record must have the same one;
    in order: a conversation (``messages``, TRL's conversational format, or ShareGPT's
    ``conversations``); ``prompt`` with ``completion`` (TRL's prompt-completion) or ``response``
    (ours), both text or both lists of messages (TRL's conversational prompt-completion). A
    field named in ``prompt_field``/``response_field``/``messages_field`` is the one looked for
    (naming only prompt/response fields skips the conversation fields; naming all three reads
    each record by its own fields). Conversations are rendered with the tokenizer's chat
    template; the loss is on the assistant turns (of a prompt/completion pair: the
    completion's), each up to and including its end-of-turn token
    (``lightning_irl.data.encode.encode_chat``). Preference data (``chosen``/``rejected``) and
    plain ``text`` records are refused with a hint.

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
        prompt_field: Field holding the prompt: text, or a list of messages ``[{role,
            content}]`` (then the response field holds messages too). Default (None): detected,
            see "Record formats" above.
        response_field: Field holding the expert response. Default (None): detected,
            ``completion`` then ``response``.
        messages_field: Field holding a whole conversation ``[{role, content}]`` (ShareGPT's
            ``{from, value}`` turns are read too). Default (None): detected, ``messages`` then
            ``conversations``.
        max_length: Longest prompt + response in tokens; see ``overlong``.
        max_prompt_length: Longest prompt; longer prompts keep their last tokens.
        overlong: ``truncate`` (cut the response) or ``drop`` records over ``max_length``.
        batch_size: Examples per optimizer step on each device (the algorithm may split it into
            micro-batches for gradient accumulation).
        eval_batch_size: Examples per validation / test / predict batch (default: batch_size).
        group_by_length: Batch examples of similar length together (less padding).
        shuffle: Shuffle the training examples every epoch (False: file / task order, e.g. to
            compare runs on different device counts example for example). The order of epoch
            ``e`` is seeded with ``seed + e`` where ``seed`` is the run's ``seed_everything``
            seed (``split_seed`` with ``group_by_length``); see ``ResumableSampler``.
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
        prompt_field: Optional[str] = None,
        response_field: Optional[str] = None,
        messages_field: Optional[str] = None,
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
        self.train_sampler: Optional[ResumableSampler] = None
        self._resume_position: Optional[Dict[str, int]] = None

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
        kwargs = dict(batch_size=batch_size, collate_fn=collate, num_workers=self.hparams.num_workers,
                      drop_last=False, persistent_workers=self.hparams.num_workers > 0)
        if split != "train":
            # the generator only seeds the workers; without one, every new iterator would draw
            # from torch's global generator and shift the run's randomness
            return DataLoader(examples, shuffle=False, generator=torch.Generator().manual_seed(0), **kwargs)
        sampler = self.train_sampler = self._train_sampler(examples, batch_size, shuffle)
        return TrainDataLoader(examples, sampler=sampler, generator=torch.Generator().manual_seed(sampler.seed),
                               **kwargs)

    def _train_sampler(self, examples: List[Dict[str, Any]], batch_size: int, shuffle: bool) -> "ResumableSampler":
        """The training order (``ResumableSampler``), at the position a checkpoint restored."""
        h = self.hparams
        replicas = self._distributed_kwargs() or {"num_replicas": 1, "rank": 0}
        grouped = shuffle and h.group_by_length
        position, self._resume_position = self._resume_position, None
        if position is not None:
            seed = int(position["seed"])
        elif grouped:
            seed = h.split_seed
        else:
            seed = _run_seed()
            if replicas.get("num_replicas", 1) > 1:
                # Drawn per process when there is no seed_everything seed: every rank must shard
                # one and the same order (else examples repeat or go missing), so rank 0's wins.
                seed = int(self.trainer.strategy.broadcast(seed))
        sampler = ResumableSampler(examples, shuffle=shuffle, seed=seed, batch_size=batch_size,
                                   lengths=[len(e["input_ids"]) for e in examples] if grouped else None, **replicas)
        trainer = self.trainer
        if position is not None:
            start = int(position["examples"])
            if int(position.get("num_replicas", 1)) != sampler.num_replicas:
                log.warning("resuming on %d process(es) from a checkpoint of %d: the rest of the interrupted "
                            "epoch is approximate", sampler.num_replicas, int(position.get("num_replicas", 1)))
                start = start * int(position.get("num_replicas", 1)) // sampler.num_replicas
            sampler.epoch, sampler.start = int(position["epoch"]), min(start, sampler.num_samples)
        elif trainer is not None:  # a reloaded loader starts at the current epoch
            sampler.epoch = trainer.fit_loop.epoch_progress.current.processed
        return sampler

    # ---- the data position in checkpoints ------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The training data position (``train_position``: the order's seed, the epoch and the
        examples of it this rank has trained on), so that a run resumed mid-epoch continues with
        the batches the interrupted run would have trained on next. Read from Lightning's batch
        progress (batches whose training step ran), not from the loader, which runs ahead
        (prefetching, workers)."""
        sampler, trainer = self.train_sampler, self.trainer
        if sampler is None or trainer is None:
            return {}
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        epoch = int(sampler.epoch)
        if done >= trainer.num_training_batches:
            epoch, done = epoch + 1, 0
        return {"train_position": {"seed": int(sampler.seed), "epoch": epoch, "batches": done,
                                   "examples": min(done * self.hparams.batch_size, sampler.num_samples),
                                   "num_replicas": int(sampler.num_replicas)}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``train_position``: the next training loader starts there."""
        self._resume_position = dict(state["train_position"]) if state.get("train_position") else None

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
