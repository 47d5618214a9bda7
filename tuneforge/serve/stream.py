"""Streaming text out of a token stream: print each piece of a completion as soon as it is final.

Decoding token by token is wrong for byte-level BPE (a character may take several tokens, so a lone token decodes to
U+FFFD) and for SentencePiece (a token's leading space depends on what precedes it). ``TextStream`` therefore decodes
a short window that ends at the newest token and starts a few tokens back, and emits only the text beyond what the
window decoded before the newest token was added, holding back text that ends in an incomplete character. The
concatenation of everything emitted equals ``tokenizer.decode(all tokens)`` (tested), while each step costs a
window, not the whole completion.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class TextStream:
    """Feed token ids with ``push``; each call returns the newly final text (possibly ""). ``flush`` returns the
    rest."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens whose text has been emitted

    def _text(self, a: int, b: int) -> str:
        return self.tok.decode(self.ids[a:b], skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._text(self.prefix, self.read)
        now = self._text(self.prefix, len(self.ids))
        if len(now) > len(before) and not now.endswith(REPLACEMENT) and now.startswith(before):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self._text(self.prefix, self.read)
        now = self._text(self.prefix, len(self.ids))
        self.prefix = self.read = len(self.ids)
        return now[len(before):] if now.startswith(before) else ""


def stream_generate(model, tokenizer, prompt, write: Callable[[str], None], **sampling) -> str:
    """Complete one prompt (a string, or messages), writing text as it is produced; returns the completion (stop
    strings cut, as ``generate`` returns it)."""
    from tuneforge.train.rollout import (encode_prompt, eos_ids_of, generate, model_template, pad_id_of, request_seed,
                                         sample)

    if getattr(model.config, "is_encoder_decoder", False):  # T5 decodes through transformers' generate: whole text
        text = generate(model, tokenizer, [prompt], **sampling)[0]
        write(text)
        return text
    stream = TextStream(tokenizer)
    eos = eos_ids_of(model, tokenizer)
    seed = sampling.pop("seed", 0)
    shown: list[str] = []

    def on_token(row: int, token: int) -> None:
        if token in eos:
            return
        piece = stream.push(token)
        if piece:
            shown.append(piece)
            write(piece)

    ids = encode_prompt(tokenizer, prompt, model_template(model))  # a P-tuning template's slots end it
    r = sample(model, [ids], pad_id=pad_id_of(tokenizer), eos_ids=eos,
               seeds=None if seed is None else [request_seed(seed, 0)], tokenizer=tokenizer, on_token=on_token,
               **sampling)
    rest = stream.flush()
    if rest:
        write(rest)
    return r.texts[0]
