"""Dynamic padding. Training sequences are right-padded; prompts for sampling are left-padded so
that every prompt ends at the same column and generation continues from there."""

from __future__ import annotations

from typing import Any, Dict, List

import torch


def _pad(rows: List[List[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row):] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
    return out


class DemonstrationCollator:
    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        ids = [e["input_ids"] for e in examples]
        prompts = [e["input_ids"][: e["prompt_length"]] for e in examples]
        return {
            "input_ids": _pad(ids, self.pad_token_id),
            "attention_mask": _pad([[1] * len(r) for r in ids], 0),
            "loss_mask": _pad([e["loss_mask"] for e in examples], 0),
            "prompt_input_ids": _pad(prompts, self.pad_token_id, left=True),
            "prompt_attention_mask": _pad([[1] * len(r) for r in prompts], 0, left=True),
            "prompt": [e["prompt"] for e in examples],
            "response": [e["response"] for e in examples],
        }
