"""Tiny models and a character tokenizer built entirely in code.

Tests, the demo and the benchmarks must run offline and fast, so nothing here touches a hub: the tokenizer is
assembled from ``tokenizers`` primitives and models come from ``AutoModelForCausalLM.from_config``. The result is
a genuine Hugging Face model/tokenizer pair (``save_tiny`` writes an ordinary model directory), so every code path
that handles real checkpoints -- loading, LoRA injection, saving, merging, serving -- is exercised by the same
objects a user would pass in.

A character-level vocabulary keeps the embedding table small and makes the generated tasks in
:mod:`tuneforge.tasks` learnable by a model with a few hundred thousand parameters in about a minute of CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          GenerationConfig, PreTrainedTokenizerFast)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CLS, SEP = "[CLS]", "[SEP]"  # the encoder presets' sentence markers (appended after CHARS: other ids unchanged)
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Printable ASCII (space..tilde) plus the two whitespace controls that appear in real text.
CHARS = tuple(chr(c) for c in range(32, 127)) + ("\n", "\t")

# Each message is "<|role|>content</s>"; the generation prompt is the bare "<|assistant|>" opener. Nothing depends
# on later messages, so rendering messages[:i] is a prefix of rendering messages[:i+1] -- the property the data
# code relies on to mask everything but assistant turns by rendering growing prefixes.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


PRESETS: dict[str, dict] = {
    "llama": {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    },
    "gpt2": {
        "model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "n_positions": 512,
    },
    "gpt_neox": {
        "model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 512, "tie_word_embeddings": False,
    },
    # The demo model: large enough to learn the generated tasks in a minute or two of CPU, small enough that a
    # laptop does that without a GPU.
    "llama-demo": {
        "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 352, "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    },
    # The benchmark shape: a real-sized vocabulary and context so that throughput and memory numbers mean
    # something, while the char tokenizer's ids (< 104) stay valid inside the 32000-row embedding.
    "llama-bench": {
        "model_type": "llama", "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
        "num_key_value_heads": 4, "intermediate_size": 1376, "max_position_embeddings": 4096,
        "vocab_size": 32000, "tie_word_embeddings": False,
    },
    # An encoder (BERT): classification tests build ``BertForSequenceClassification`` on it; its tokenizer adds
    # [CLS] A [SEP] (B [SEP]) with segment ids, as BERT's does.
    "bert": {
        "model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 512, "type_vocab_size": 2,
    },
    # An encoder-decoder (T5): seq2seq SFT, DPO and ORPO tests; its decoder starts from the pad token, as T5's does.
    "t5": {
        "model_type": "t5", "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2, "num_decoder_layers": 2,
        "num_heads": 4, "decoder_start_token_id": 0, "feed_forward_proj": "relu",
    },
}
ENCODERS = ("bert",)  # presets that are encoders: no causal LM head, a sequence-classification head instead
SEQ2SEQ = ("t5",)  # encoder-decoder presets: ``AutoModelForSeq2SeqLM``


def char_tokenizer(encoder: bool = False) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer shared by every tiny preset.

    Specials get the low ids (pad=0, bos=1, eos=2, unk=3) so that a zero-initialised or padded tensor is
    unambiguous. Role markers are added tokens, so ``<|user|>`` in rendered chat text becomes one id instead of
    eight characters. Encoding adds no bos/eos, like GPT-2's tokenizer (a bos token it never adds itself): the
    data pipeline keeps whatever start tokens a tokenizer adds (none here), appends eos to completions, and uses
    bos only to give an empty prompt a first token.

    ``encoder``: BERT's conventions instead: [CLS] and [SEP] (after every other id), ``[CLS] A [SEP]`` for one text
    and ``[CLS] A [SEP] B [SEP]`` with token type ids 0/1 for a pair (the tokenizer's pair template).
    """
    extra = (CLS, SEP) if encoder else ()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ROLE_TOKENS + CHARS + extra)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Isolate every character (the class also matches newline, unlike ".").
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in SPECIAL_TOKENS + ROLE_TOKENS + extra])
    if encoder:
        cls, sep = vocab[CLS], vocab[SEP]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{CLS}:0 $A:0 {SEP}:0", pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
            special_tokens=[(CLS, cls), (SEP, sep)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        # (an encoder keeps its pair template: these two would rebuild the post-processor without it)
        **({} if encoder else {"add_bos_token": False, "add_eos_token": False}),
        padding_side="right",
        clean_up_tokenization_spaces=False,  # would turn "a ." into "a." and break decode(encode(s)) == s
        model_max_length=4096,
        **({"cls_token": CLS, "sep_token": SEP, "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
           if encoder else {}),
    )
    if not encoder:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _make_config(preset: str, vocab_size: int | None, tokenizer: PreTrainedTokenizerFast):
    """Turn a preset into a transformers config whose special-token ids agree with the tokenizer."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {sorted(PRESETS)}")
    kwargs = dict(PRESETS[preset])
    model_type = kwargs.pop("model_type")
    fixed_vocab = kwargs.pop("vocab_size", None)
    vocab = vocab_size or fixed_vocab or len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    return AutoConfig.for_model(
        model_type, vocab_size=vocab,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **kwargs,
    )


def build_tiny(preset: str, seed: int = 0, dtype=torch.float32, vocab_size: int | None = None,
               *, attn_implementation: str | None = None, labels: list[str] | None = None):
    """Build a randomly initialised tiny model and its tokenizer, reproducibly from ``seed``.

    Initialisation runs under a forked RNG so building a model never perturbs the caller's random stream (tests
    that seed once and build several models would otherwise depend on construction order). ``labels``: a
    sequence classifier with those classes (``*ForSequenceClassification``; an encoder preset is always one).
    """
    encoder = preset in ENCODERS
    tokenizer = char_tokenizer(encoder=encoder)
    config = _make_config(preset, vocab_size, tokenizer)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if encoder or labels is not None:
        labels = list(labels or ("0", "1"))
        config.num_labels = len(labels)
        config.id2label, config.label2id = dict(enumerate(labels)), {name: i for i, name in enumerate(labels)}
    auto = (AutoModelForSequenceClassification if labels is not None
            else AutoModelForSeq2SeqLM if preset in SEQ2SEQ else AutoModelForCausalLM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=dtype, **extra)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **({"decoder_start_token_id": config.decoder_start_token_id} if preset in SEQ2SEQ else {}),
    )
    model.eval()
    return model, tokenizer


def save_tiny(preset: str, path: str | os.PathLike, seed: int = 0) -> None:
    """Write a tiny model as an ordinary Hugging Face directory (safetensors weights + tokenizer files).

    Tests use this to exercise the real ``from_pretrained`` path without any download.
    """
    model, tokenizer = build_tiny(preset, seed=seed)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
