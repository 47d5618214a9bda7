"""Tokenizers with the special-token and seam behaviours of real model families, built in code (no downloads).

- ``llama2_like``: SentencePiece-style BPE (a Metaspace pre-tokenizer, "▁" for spaces, prepended to the first word of
  every encoded string) whose post-processor adds ``<s>``, like Llama-2 and Mistral; a ``[INST]`` chat template.
- ``smollm2_like``: ``bos_token`` is ``<|im_start|>``, the chat-turn marker, and the tokenizer adds nothing to a text
  (SmolLM2, ``add_bos_token`` false); a ChatML template.
- ``_chartok.char_tokenizer`` (bos added, or no bos at all) and ``tuneforge.models.tiny.char_tokenizer`` (a bos token
  that the tokenizer never adds, like GPT-2's) complete the set.
"""

from __future__ import annotations

import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Question: what is two plus two?\nAnswer: four",
    "Answer: yes. Answer: no. yes no yes",
    "the cat sat on the mat, hello world",
    "reverse abc: cba",
]
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
    "{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def llama2_like(prepend_scheme: str = "first") -> PreTrainedTokenizerFast:
    """BPE trained in code on ``CORPUS`` (deterministic), Metaspace with ``prepend_scheme`` first|always."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=True)
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=True)
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=list(string.printable))
    core.train_from_iterator(CORPUS * 10, trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", core.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>", clean_up_tokenization_spaces=False)
    tok.chat_template = LLAMA2_TEMPLATE
    return tok


def smollm2_like() -> PreTrainedTokenizerFast:
    """One token per printable character plus the ChatML specials; ``<|im_start|>`` is bos, nothing is added."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = CHATML_TEMPLATE
    return tok
