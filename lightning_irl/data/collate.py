"""Dynamic padding. Training sequences are right-padded; prompts for sampling are left-padded so
that every prompt ends at the same column and generation continues from there.

``PackedDemonstrationCollator`` packs the examples of a training batch into fewer rows instead
(padding-free packing): see its docstring for the contract with the model call.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch


def _width(rows: Sequence[Sequence[int]]) -> int:
    return max(max((len(r) for r in rows), default=0), 1)


def pad_rows(rows: Sequence[Sequence[int]], value: int, left: bool = False) -> torch.Tensor:
    """[len(rows), longest] long tensor (at least one column), rows right- or left-aligned."""
    width = _width(rows)
    # one tensor from one padded list: a tensor per row cost ~1.5 ms of a 32-row batch
    padded = [[value] * (width - len(r)) + list(r) if left else list(r) + [value] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long).reshape(len(rows), width)


def pad_sequences(rows: Sequence[Sequence[int]], pad_token_id: int, left: bool = False) -> Dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of token rows, right-padded (sequences) or left-padded
    (prompts to sample from)."""
    width = _width(rows)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long).unsqueeze(-1)
    columns = torch.arange(width)
    mask = columns >= width - lengths if left else columns < lengths
    return {"input_ids": pad_rows(rows, pad_token_id, left), "attention_mask": mask.long()}


class DemonstrationCollator:
    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        ids = [e["input_ids"] for e in examples]
        prompts = [e["input_ids"][: e["prompt_length"]] for e in examples]
        return {
            **pad_sequences(ids, self.pad_token_id),
            "loss_mask": pad_rows([e["loss_mask"] for e in examples], 0),
            **{f"prompt_{k}": v for k, v in pad_sequences(prompts, self.pad_token_id, left=True).items()},
            "prompt": [e["prompt"] for e in examples],
            "response": [e["response"] for e in examples],
        }


def pack_rows(lengths: List[int], capacity: int) -> List[List[int]]:
    """First-fit decreasing bin packing: lists of example indices, each list's total length
    ≤ ``capacity`` (an example longer than ``capacity`` gets a row of its own)."""
    rows: List[List[int]] = []
    room: List[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[index] <= free:
                rows[r].append(index)
                room[r] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(capacity - lengths[index])
    return rows


def pack_batch(lengths: List[int], max_capacity: int) -> List[List[int]]:
    """Rows for one batch with the fewest [rows × width] cells (padding included).

    Tries first-fit decreasing at the capacities ``ceil(total / r)`` for every row count ``r``
    (never above ``max_capacity``, never below the longest example) and keeps the layout with
    the fewest cells, fewer rows on a tie. One example per row (the unpadded-batch layout) is
    among the candidates, so packing never pads more than the plain batch.
    """
    longest, total = max(lengths), sum(lengths)
    best, best_cells = [[i] for i in range(len(lengths))], len(lengths) * longest
    tried = set()
    for rows in range(1, len(lengths) + 1):
        capacity = max(longest, -(-total // rows))
        if capacity > max_capacity or capacity in tried:
            continue
        tried.add(capacity)
        layout = pack_rows(lengths, capacity)
        cells = len(layout) * max(sum(lengths[i] for i in row) for row in layout)
        if cells < best_cells or (cells == best_cells and len(layout) < len(best)):
            best, best_cells = layout, cells
    return best


class PackedDemonstrationCollator(DemonstrationCollator):
    """Pack a training batch's examples end to end into rows of at most ``pack_length`` tokens,
    choosing the layout with the least padding (``pack_batch``).

    The same examples (so the same loss-token count and the same loss) in fewer, fuller rows.
    Extra key ``position_ids`` restarts at 0 at every example. The model must be called with
    ``input_ids`` and ``position_ids``, **no** ``attention_mask`` and ``use_cache=False``:
    transformers (≥ 4.53, ``masking_utils.find_packed_sequence_indices``) then builds a
    block-causal mask from the restarting positions, so examples never attend to each other.
    (With an attention mask, or with a KV cache, it silently attends across examples.)

    ``attention_mask`` is still returned, 1 on real tokens: it is for counting tokens and
    trimming micro-batches, not for the model. ``loss_mask`` is 0 on each example's first token
    (the unpacked batch never scores it either). Padding sits at the end of a row with
    ``position_ids`` 0, so each pad token is a sequence of its own. The ``prompt_*`` keys are
    per example (unpacked), as in ``DemonstrationCollator``.

    Args:
        pad_token_id: Padding token.
        pack_length: Row capacity in tokens. None (default) = the longest example of the batch:
            no row is wider than the unpacked batch, so attention work per row never grows.
    """

    def __init__(self, pad_token_id: int, pack_length: Optional[int] = None) -> None:
        super().__init__(pad_token_id)
        self.pack_length = pack_length

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        out = super().__call__(examples)
        lengths = [len(e["input_ids"]) for e in examples]
        capacity = max(self.pack_length or 0, max(lengths))
        ids, positions, losses = [], [], []
        for row in pack_batch(lengths, capacity):
            row_ids: List[int] = []
            row_pos: List[int] = []
            row_loss: List[int] = []
            for index in row:
                example = examples[index]
                row_ids += example["input_ids"]
                row_pos += range(len(example["input_ids"]))
                row_loss += [0] + list(example["loss_mask"][1:])
            ids.append(row_ids)
            positions.append(row_pos)
            losses.append(row_loss)
        out.update(
            input_ids=pad_rows(ids, self.pad_token_id),
            attention_mask=pad_rows([[1] * len(r) for r in ids], 0),
            loss_mask=pad_rows(losses, 0),
            position_ids=pad_rows(positions, 0),
        )
        return out


def padding_share(batch: Dict[str, Any]) -> float:
    """Share of the batch's [rows × width] cells that are padding."""
    mask = batch["attention_mask"]
    return 1.0 - float(mask.sum()) / mask.numel()
