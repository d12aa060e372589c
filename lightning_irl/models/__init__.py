from lightning_irl.models.spec import LoraSpec, ModelSpec
from lightning_irl.tokenizers import ensure_pad_token, word_level_tokenizer

__all__ = ["LoraSpec", "ModelSpec", "ensure_pad_token", "word_level_tokenizer"]
