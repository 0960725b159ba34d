"""A character-level tokenizer built offline with ``tokenizers`` (no hub), for tests.

Ids: 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, 4 <|im_start|>, 5 <|im_end|>, then one id per
printable ASCII character and newline (vocab 101 < 128, fits the tiny test models).
"""

from __future__ import annotations

import string

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_tokenizer(*, chat: bool = False, pad: bool = True):
    """Return a PreTrainedTokenizerFast splitting text into single characters.

    ``chat`` installs a ChatML template (eos = <|im_end|>); ``pad=False`` leaves the pad
    token unset (pad handling tests).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                  eos_token="<|im_end|>" if chat else "</s>",
                                  pad_token="<pad>" if pad else None)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat:
        tok.chat_template = CHATML
    return tok


def ids(text: str) -> list[int]:
    """Ids of plain text (no special tokens) under :func:`char_tokenizer`."""
    return [len(SPECIALS) + CHARS.index(c) for c in text]
