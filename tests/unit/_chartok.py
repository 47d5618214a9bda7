"""A character-level tokenizer built in code, so data tests run offline and fast.

Every printable ASCII character is one token, which makes token counts predictable (``len(text)``) and lets tests
reason about exact label spans. Variants cover the awkward tokenizers the pipeline must survive: no bos, pad == eos,
no chat template. With ``bos=True`` the tokenizer itself puts ``<s>`` before every text (as Llama's does), which is
what makes the pipeline start rows with it.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(*, bos: bool = True, pad_is_eos: bool = False, chat_template: str | None = CHAT_TEMPLATE):
    """Return a ``PreTrainedTokenizerFast`` with one id per printable ASCII char (vocab ~104)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # [\s\S] rather than "." so that "\n" is split into its own token too.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                            special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>" if bos else None,
        eos_token="</s>",
        pad_token="</s>" if pad_is_eos else "<pad>",
        unk_token="<unk>",
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
