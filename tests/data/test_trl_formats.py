"""TRL's dataset formats load unchanged; real chat templates are masked as computed by hand.

Two byte-level BPE tokenizers are built offline with realistic chat templates: a ChatML one
(Qwen 2.5's template: a default system prompt, ``<|im_end|>`` then a newline) and a Llama 3 one
(the template writes ``<|begin_of_text|>``, which the tokenizer also adds as a BOS). The expected
ids and masks are built from literal text, never from the template.
"""

import json

import datasets
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lightning_irl.data import DataError, DemonstrationDataModule
from lightning_irl.data.encode import encode_records
from lightning_irl.data.records import load_records, validate_records

# Llama 3's / Qwen 2's pre-tokenizer split
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["You are a helpful assistant.", "What is 2+2? 2+2 is 4.", "And 3+3? 3+3 is 6.",
          "system user assistant", "You are Qwen, created by Alibaba Cloud."] * 3

CHATML_TEMPLATE = (  # Qwen 2.5's, without the tools branch
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def _byte_bpe(specials, template, bos=None, **names):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:  # like Llama 3's tokenizer.json: every encoding starts with BOS
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, **names)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def chatml():
    return _byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE,
                     eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def llama3():
    return _byte_bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"], LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos_token="<|eot_id|>",
                     pad_token="<|end_of_text|>")


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER_1 = {"role": "user", "content": "What is 2+2?"}
ANSWER_1 = {"role": "assistant", "content": "2+2 is 4."}
USER_2 = {"role": "user", "content": "And 3+3?"}
ANSWER_2 = {"role": "assistant", "content": "3+3 is 6."}
CONVERSATION = [SYSTEM, USER_1, ANSWER_1, USER_2, ANSWER_2]

# The conversation written out by hand, as (text, trained) pieces: trained = an assistant's words
# and its end-of-turn token (so the model learns to stop); the newline ChatML writes after the
# last <|im_end|> is not part of the example.
CHATML_PIECES = [
    ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
     "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", 0),
    ("2+2 is 4.", 1), ("<|im_end|>", 1),
    ("\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n", 0),
    ("3+3 is 6.", 1), ("<|im_end|>", 1),
]
LLAMA3_PIECES = [
    ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
    ("2+2 is 4.", 1), ("<|eot_id|>", 1),
    ("<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
    ("3+3 is 6.", 1), ("<|eot_id|>", 1),
]
PIECES = {"chatml": CHATML_PIECES, "llama3": LLAMA3_PIECES}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def _hand(tokenizer, pieces):
    """Ids and mask from literal pieces, each tokenized alone (no special tokens added)."""
    ids, mask = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        mask += [trained] * len(piece)
    # the pieces meet at token boundaries: the same ids as the whole text tokenized at once
    assert ids == tokenizer("".join(text for text, _ in pieces), add_special_tokens=False).input_ids
    return ids, mask


def _encode(tokenizer, rows, **fields):
    examples, _ = encode_records(validate_records(rows, **fields), tokenizer)
    return examples


@pytest.fixture(params=["chatml", "llama3"])
def chat(request):
    return request.param, request.getfixturevalue(request.param)


def test_messages_mask_equals_the_hand_computed_one(chat):
    name, tokenizer = chat
    ids, mask = _hand(tokenizer, PIECES[name])
    [example] = _encode(tokenizer, [{"messages": CONVERSATION}])
    assert example["input_ids"] == ids
    assert example["loss_mask"] == mask
    trained = tokenizer.convert_ids_to_tokens([i for i, m in zip(ids, mask) if m])
    assert trained.count(END_OF_TURN[name]) == 2 and trained[-1] == END_OF_TURN[name]
    # one BOS, the template's: the tokenizer's own BOS is not added on top (Llama 3)
    if tokenizer.bos_token_id is not None:
        assert example["input_ids"][0] == tokenizer.bos_token_id
        assert example["input_ids"].count(tokenizer.bos_token_id) == 1
    prompt_length = len(tokenizer(PIECES[name][0][0], add_special_tokens=False).input_ids)
    assert example["prompt_length"] == prompt_length and example["prompt"] == PIECES[name][0][0]


def test_conversational_prompt_completion_trains_on_the_completion_only(chat):
    name, tokenizer = chat
    pieces = [(text, trained if i >= 4 else 0) for i, (text, trained) in enumerate(PIECES[name])]
    ids, mask = _hand(tokenizer, pieces)
    [example] = _encode(tokenizer, [{"prompt": CONVERSATION[:4], "completion": [ANSWER_2]}])
    assert example["input_ids"] == ids and example["loss_mask"] == mask
    # the prompt to sample from is the whole prompt conversation and the assistant's header
    assert example["prompt_length"] == len(tokenizer("".join(t for t, _ in PIECES[name][:4]),
                                                     add_special_tokens=False).input_ids)
    # a one-turn pair is the same example as the conversation in `messages`
    [pair] = _encode(tokenizer, [{"prompt": CONVERSATION[:2], "completion": [ANSWER_1]}])
    [messages] = _encode(tokenizer, [{"messages": CONVERSATION[:3]}])
    assert pair == messages
    assert (pair["input_ids"], pair["loss_mask"]) == _hand(tokenizer, PIECES[name][:3])


def test_chatml_default_system_prompt_is_context():
    tokenizer = _byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE,
                          eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids, mask = _hand(tokenizer, [
        ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
         "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("2+2 is 4.", 1), ("<|im_end|>", 1)])
    [example] = _encode(tokenizer, [{"messages": [USER_1, ANSWER_1]}])
    assert (example["input_ids"], example["loss_mask"]) == (ids, mask)


def test_llama3_template_trims_the_content(llama3):
    """The template's rendering is what is trained on (Llama 3 trims each message)."""
    ids, mask = _hand(llama3, LLAMA3_PIECES)
    padded = CONVERSATION[:4] + [{"role": "assistant", "content": " 3+3 is 6.\n"}]
    [example] = _encode(llama3, [{"messages": padded}])
    assert (example["input_ids"], example["loss_mask"]) == (ids, mask)


def test_conversational_prompts_to_answer_end_with_the_assistant_header(chat):
    name, tokenizer = chat
    header = "".join(t for t, _ in PIECES[name][:4])
    ids, _ = _hand(tokenizer, PIECES[name][:4])
    rows = [{"prompt": CONVERSATION[:4]}, {"messages": CONVERSATION},
            {"prompt": CONVERSATION[:4], "completion": [ANSWER_2]}]
    for row in rows:
        [example] = _encode(tokenizer, [row], require_response=False)
        assert example["input_ids"] == ids and example["loss_mask"] == [0] * len(ids), row
        assert example["prompt"] == header and example["prompt_length"] == len(ids)


# ---- field detection ---------------------------------------------------------------------
TEXT = [("2+2 =", " 4"), ("3+3 =", " 6"), ("What is 2+2?", " 4")]
CHATS = [[SYSTEM, USER_1, ANSWER_1], [USER_2, ANSWER_2]]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _train(tokenizer, path, **kwargs):
    dm = DemonstrationDataModule(train_file=path, **kwargs)
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    return dm.datasets["train"]


def test_every_trl_format_loads_like_ours_without_a_flag(tmp_path, chatml):
    ours = dict(prompt_field="prompt", response_field="response", messages_field="messages")
    text_ours = _train(chatml, _jsonl(tmp_path / "ours.jsonl", [{"prompt": p, "response": r} for p, r in TEXT]),
                       **ours)
    assert [sum(e["loss_mask"]) for e in text_ours] == [  # the response and EOS
        len(chatml(r, add_special_tokens=False).input_ids) + 1 for _, r in TEXT]
    trl_text = [{"prompt": p, "completion": r} for p, r in TEXT]
    datasets.Dataset.from_list(trl_text).save_to_disk(str(tmp_path / "saved_text"))
    for path in (_jsonl(tmp_path / "standard.jsonl", trl_text), str(tmp_path / "saved_text"),
                 _jsonl(tmp_path / "ours_undeclared.jsonl", [{"prompt": p, "response": r} for p, r in TEXT])):
        assert _train(chatml, path) == text_ours, path

    chat_ours = _train(chatml, _jsonl(tmp_path / "ours_chat.jsonl", [{"messages": m} for m in CHATS]), **ours)
    assert [sum(e["loss_mask"]) for e in chat_ours] == [
        len(chatml(m[-1]["content"] + "<|im_end|>", add_special_tokens=False).input_ids) for m in CHATS]
    pairs = [{"prompt": m[:-1], "completion": m[-1:]} for m in CHATS]
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "saved_pairs"))
    sharegpt = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(t["role"], t["role"]),
                                    "value": t["content"]} for t in m]} for m in CHATS]
    for path in (_jsonl(tmp_path / "conversational.jsonl", [{"messages": m} for m in CHATS]),
                 _jsonl(tmp_path / "pairs.jsonl", pairs), str(tmp_path / "saved_pairs"),
                 _jsonl(tmp_path / "sharegpt.jsonl", sharegpt)):
        assert _train(chatml, path) == chat_ours, path


def test_parquet_keeps_conversations_as_lists(tmp_path, chatml):
    pairs = [{"prompt": m[:-1], "completion": m[-1:]} for m in CHATS]
    datasets.Dataset.from_list(pairs).to_parquet(str(tmp_path / "pairs.parquet"))
    expected = _train(chatml, _jsonl(tmp_path / "pairs.jsonl", pairs))
    assert _train(chatml, str(tmp_path / "pairs.parquet")) == expected


def test_named_fields_take_precedence(tmp_path, chatml):
    row = {"question": "2+2 =", "answer": " 4", "prompt": "3+3 =", "completion": " 6", "response": " 7",
           "messages": CHATS[0]}
    path = _jsonl(tmp_path / "d.jsonl", [row])
    [detected] = validate_records(load_records(path))
    assert "messages" in detected  # a conversation first
    [named] = validate_records(load_records(path), prompt_field="question", response_field="answer")
    assert (named["prompt"], named["response"]) == ("2+2 =", " 4")
    [pair] = validate_records(load_records(path), response_field="response")  # prompt detected
    assert (pair["prompt"], pair["response"]) == ("3+3 =", " 7")
    del row["messages"]
    [completion] = validate_records(load_records(_jsonl(tmp_path / "e.jsonl", [row])))
    assert completion["response"] == " 6"  # TRL's completion before our response


def _error(tmp_path, rows, **fields):
    path = _jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as info:
        validate_records(load_records(path), **fields)
    message = str(info.value)
    assert "\n" not in message
    return message.replace(path, "train.jsonl")


def test_unknown_format_names_what_was_expected(tmp_path):
    assert _error(tmp_path, [{"question": "q", "answer": "a"}]) == (
        "train.jsonl:1: no known demonstration format: expected prompt+completion, prompt+response or messages "
        "(TRL's formats), got fields ['answer', 'question']; name yours with "
        "--data.init_args.prompt_field/response_field (or messages_field)")
    assert _error(tmp_path, [{"prompt": "q"}]).startswith(
        "train.jsonl:1: missing field 'completion' (or 'response') next to 'prompt': expected prompt+completion")


@pytest.mark.parametrize("row, hint", [
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "--data.init_args.response_field chosen"),
    ({"chosen": [USER_1, ANSWER_1], "rejected": [USER_1, ANSWER_2]}, "--data.init_args.messages_field chosen"),
    ({"chosen": "q a", "rejected": "q b"}, "split it into prompt and completion fields"),
])
def test_preference_data_gets_a_hint(tmp_path, row, hint):
    message = _error(tmp_path, [row])
    assert message.startswith("train.jsonl:1: a preference dataset (TRL's chosen/rejected format) holds no "
                              "demonstrations: expected prompt+completion, prompt+response or messages")
    assert message.endswith(hint)
    # and the hint works
    field = hint.split()[-2].split(".")[-1] if hint.startswith("--") else None
    if field:
        [record] = validate_records(load_records(str(tmp_path / "train.jsonl")), **{field: "chosen"})
        assert record.get("response") == "a" or record.get("messages") == [USER_1, ANSWER_1]


@pytest.mark.parametrize("rows, expected", [
    ([{"prompt": "a", "completion": "b"}, {"prompt": "c", "response": "d"}],
     "train.jsonl:2: missing field 'completion' (the records are 'prompt'+'completion' (text), as in "
     "train.jsonl:1); the record has ['prompt', 'response']"),
    ([{"messages": CHATS[0]}, {"prompt": "c", "completion": "d"}],
     "train.jsonl:2: missing field 'messages' (the records are 'messages' (a list of messages), as in "
     "train.jsonl:1); the record has ['completion', 'prompt']"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": [USER_1], "completion": [ANSWER_1]}],
     "train.jsonl:2: field 'prompt' must be a string (the records are 'prompt'+'completion' (text), as in "
     "train.jsonl:1), got list"),
    ([{"prompt": [USER_1], "completion": "4"}],
     "train.jsonl:1: field 'completion' is text but 'prompt' is a list: give both as text or both as lists "
     "of messages"),
    ([{"prompt": [USER_1], "completion": [USER_2]}], "train.jsonl:1: completion has no assistant turn to learn from"),
    ([{"prompt": "a", "completion": "b", "label": False}],
     "train.jsonl:1: prompt+completion+label is TRL's unpaired preference format (KTO): a completion labelled "
     "false is not an expert demonstration; keep the rows labelled true and drop the 'label' field"),
    ([{"text": "a b"}], "train.jsonl:1: TRL's language-modeling format ('text') has no prompt/response split to "
     "learn from: expected prompt+completion, prompt+response or messages (TRL's formats), got fields ['text']; "
     "split each text into prompt and completion fields"),
    ([{"conversations": [{"from": "bot", "value": "x"}]}],
     "train.jsonl:1: conversations[0] has speaker 'bot'; expected one of ['assistant', 'gpt', 'human', 'system', "
     "'user'] (ShareGPT's 'from')"),
])
def test_records_that_do_not_fit_are_named(tmp_path, rows, expected):
    assert _error(tmp_path, rows) == expected


def test_datamodule_error_is_one_line_from_setup(tmp_path, chatml):
    path = _jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"train\.jsonl:1: no known demonstration format: .* got fields "
                                        r"\['answer', 'question'\]; name yours with --data\.init_args\.prompt_field"):
        _train(chatml, path)
    assert _train(chatml, path, prompt_field="question", response_field="answer")[0]["response"] == "a"
