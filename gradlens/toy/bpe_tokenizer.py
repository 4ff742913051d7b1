"""A subword BPE tokenizer for the ``toy:math`` world, trained in memory with ``tokenizers``.

Shaped like a real base model's (Qwen2.5's): byte-level BPE with digits split one per token, an end-of-text token the
base model stops at, and a ChatML chat template whose end-of-turn token ``<|im_end|>`` is *not* a stop token. So
``--prompt_format auto`` judges the toy a base model shipping a template and prompts it plainly, and
``--prompt_format chat`` renders real chat prompts. Training is deterministic for a given corpus.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, EOS, IM_START, IM_END]
VOCAB_SIZE = 768

# ChatML, as Qwen2.5 ships it (without the system turn): each turn closed by <|im_end|> and a newline.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on ``corpus`` (texts without special tokens) and wrap it for transformers."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS,
                                  additional_special_tokens=[IM_START, IM_END], padding_side="left",
                                  model_max_length=512)
    tok.chat_template = CHAT_TEMPLATE
    return tok
