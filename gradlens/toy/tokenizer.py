"""A character-level tokenizer built in memory, so the toy world needs no download.

Every character of the vocabulary is one token; the decoder fuses tokens back without separators, so any string
over the vocabulary round-trips exactly through ``encode``/``decode``.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, EOS, UNK, USER, ASSISTANT]
CHARACTERS = string.digits + "+-*=()?.,:# \n" + string.ascii_lowercase + string.ascii_uppercase

# A minimal chat template: user turns after <|user|>, assistant turns after <|assistant|>, each closed by <eos>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + '<eos>' }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer(characters: str = CHARACTERS) -> PreTrainedTokenizerFast:
    """Build the toy tokenizer: one id per special token, then one id per character, in a fixed order."""
    if len(set(characters)) != len(characters):
        raise ValueError("build_char_tokenizer: characters must be unique")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(characters))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        padding_side="left",  # generation pads on the left so every prompt ends right before its completion
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
