"""Tokenizers built offline with the ``tokenizers`` library, for built-in tasks and tests.

A bottom-layer module (it imports nothing from the package): the built-in tasks in ``data`` build
their tokenizers from it and ``models.spec`` pads with it, so ``data`` never imports ``models``.
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def word_level_tokenizer(symbols: Sequence[str]) -> PreTrainedTokenizerFast:
    """One id per whitespace-separated symbol; ``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2."""
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK
    )


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token one, without growing the vocabulary.

    Padding positions are always masked out of attention and losses, so reusing EOS (or UNK)
    as the pad id is safe; response ends are found from the masks, never by searching for pad.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise ValueError("tokenizer has no pad, eos or unk token to pad with")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token: responses could never end")
    return tokenizer
