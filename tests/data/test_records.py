"""Record parsing and validation: every source format, every bad-input message, the mask."""

import json

import datasets
import pandas as pd
import pytest

from lightning_irl.data import DataError, DemonstrationDataModule
from lightning_irl.data.collate import DemonstrationCollator
from lightning_irl.data.encode import encode_records
from lightning_irl.data.records import load_records, validate_records
from lightning_irl.tokenizers import word_level_tokenizer

FIELDS = dict(prompt_field="prompt", response_field="response", messages_field="messages")
ROWS = [{"prompt": "a b =", "response": "b a"}, {"prompt": "c a b =", "response": "c a b"}]


def _write_all_formats(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps(ROWS))
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    return [jsonl, as_json, tmp_path / "d.parquet", tmp_path / "d.csv", tmp_path / "saved"]


def test_every_file_format_gives_the_same_records(tmp_path):
    for path in _write_all_formats(tmp_path):
        records = validate_records(load_records(str(path)), **FIELDS)
        assert [(r["prompt"], r["response"]) for r in records] == [(r["prompt"], r["response"]) for r in ROWS], path


def test_custom_field_names(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "a b =", "answer": "a b"}) + "\n")
    records = validate_records(load_records(str(path)), prompt_field="question", response_field="answer",
                               messages_field="messages")
    assert records[0]["prompt"] == "a b =" and records[0]["response"] == "a b"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "resp'], r"d\.jsonl:2: malformed JSON"),
        (['{"prompt": "a", "response": "b"}', "", '{"response": "b"}'], r"d\.jsonl:3: missing field 'prompt'"),
        (['{"prompt": "a"}'], r"d\.jsonl:1: missing field 'response'"),
        (['{"prompt": 3, "response": "b"}'],
         r"d\.jsonl:1: field 'prompt' must be a string \(or a list of messages\), got int"),
        (['{"prompt": "a", "response": ["b"]}'], r"d\.jsonl:1: field 'response' is a list but 'prompt' is text"),
        (['[1, 2]'], r"d\.jsonl:1: expected a JSON object"),
        (['{"messages": [{"role": "user"}]}'], r"d\.jsonl:1: messages\[0\] must be an object"),
        (['{"messages": [{"role": "user", "content": "x"}]}'], r"d\.jsonl:1: messages has no assistant turn"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        validate_records(load_records(str(path)), **FIELDS)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "absent.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(str(tmp_path / "d.txt"))


def test_response_mask_covers_exactly_the_response_and_eos():
    tok = word_level_tokenizer(list("abc") + ["="])
    records = [{"prompt": "a b =", "response": "b a"}, {"prompt": "c =", "response": "c c c"}]
    examples, stats = encode_records(records, tok)
    for record, ex in zip(records, examples):
        prompt_ids = tok(record["prompt"], add_special_tokens=False).input_ids
        response_ids = tok(record["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert ex["input_ids"] == prompt_ids + response_ids
        assert ex["loss_mask"] == [0] * len(prompt_ids) + [1] * len(response_ids)
    assert stats.loss_tokens == 3 + 4


def test_length_policy_and_empty_responses_are_counted():
    tok = word_level_tokenizer(list("abc") + ["="])
    records = [
        {"prompt": "a b c a b =", "response": "a"},   # prompt 6 tokens
        {"prompt": "a =", "response": "a b c a b c"},  # 2 + 7 tokens
        {"prompt": "a =", "response": "   "},          # empty
        {"prompt": "a =", "response": "b"},
    ]
    examples, stats = encode_records(records, tok, max_length=6, max_prompt_length=4, overlong="truncate")
    assert stats.dropped_empty_response == 1 and stats.truncated_prompt == 1 and stats.truncated_response == 1
    assert stats.kept == 3 and all(len(e["input_ids"]) <= 6 for e in examples)
    # the prompt keeps its *last* tokens, the ones next to the answer
    assert examples[0]["input_ids"][:4] == tok("c a b =", add_special_tokens=False).input_ids
    # a truncated response loses its EOS: the model is not taught to stop at the cut
    assert tok.eos_token_id not in examples[1]["input_ids"]
    _, dropped = encode_records(records, tok, max_length=6, max_prompt_length=4, overlong="drop")
    assert dropped.dropped_overlong == 1 and dropped.kept == 2


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def test_chat_records_train_only_on_assistant_turns():
    tok = word_level_tokenizer(["<user>", "<assistant>", "<end>", "hi", "yo", "ok", "bye"])
    tok.chat_template = CHAT_TEMPLATE
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                           {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ok"}]}
    [clean] = validate_records([record], **FIELDS)
    [ex], _ = encode_records([clean], tok)
    tokens = tok.convert_ids_to_tokens(ex["input_ids"])
    assert tokens == "<user> hi <end> <assistant> yo <end> <user> bye <end> <assistant> ok <end>".split()
    trained = [t for t, m in zip(tokens, ex["loss_mask"]) if m]
    assert trained == ["yo", "<end>", "ok", "<end>"]


def test_collator_pads_training_right_and_prompts_left():
    examples = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1], "prompt_length": 2, "prompt": "p", "response": "r"},
                {"input_ids": [5, 6, 7, 8, 9, 3], "loss_mask": [0, 0, 0, 1, 1, 1], "prompt_length": 3,
                 "prompt": "q", "response": "s"}]
    batch = DemonstrationCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert batch["prompt_input_ids"].tolist() == [[0, 5, 6], [5, 6, 7]]
    assert batch["prompt_attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]


def test_datamodule_validation_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{c} =", "response": c * 1}) for c in "abcdefgh" * 5) + "\n")

    def split(seed):
        dm = DemonstrationDataModule(train_file=str(path), val_fraction=0.25, split_seed=seed)
        dm.set_tokenizer(tokenizer)
        dm.setup("fit")
        return dm

    a, b, c = split(0), split(0), split(1)
    assert len(a.datasets["val"]) == 10 and len(a.datasets["train"]) == 30
    assert [e["input_ids"] for e in a.datasets["val"]] == [e["input_ids"] for e in b.datasets["val"]]
    assert [e["prompt"] for e in a.datasets["val"]] != [e["prompt"] for e in c.datasets["val"]]
    batch = next(iter(a.train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "loss_mask", "prompt_input_ids"}


def test_length_grouping_cuts_padding(tokenizer):
    dm_plain = DemonstrationDataModule(task="modes", num_train=512, batch_size=16)
    dm_grouped = DemonstrationDataModule(task="modes", num_train=512, batch_size=16, group_by_length=True)
    pads = []
    for dm in (dm_plain, dm_grouped):
        dm.set_tokenizer(tokenizer)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        assert sum(b["input_ids"].size(0) for b in batches) == 512
        pads.append(sum(int((b["attention_mask"] == 0).sum()) for b in batches))
    assert pads[1] < 0.5 * pads[0]


def test_dataset_name_goes_through_datasets_load_dataset(tmp_path, tokenizer):
    """A Hub id is fetched by ``datasets.load_dataset``; a local folder name takes the same path offline."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS * 4) + "\n")
    dm = DemonstrationDataModule(dataset_name=str(folder), val_split=None, val_fraction=0.25)
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["val"]) == 2
    assert dm.stats["train"].loss_tokens == sum(sum(e["loss_mask"]) for e in dm.datasets["train"])
