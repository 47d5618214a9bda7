"""Validated rows -> ``input_ids`` and UNshifted ``labels`` (-100 = no loss), plus truncation.

Loss spans are computed from our own knowledge of where each part of a row lives, never from the tokenizer's pad or
special-token masks: a tokenizer with ``pad == eos`` would otherwise silently stop the model learning to stop.

Each part of a row (prompt, completion, each chat turn) is tokenized on its own and the ids concatenated. That makes
the supervised boundary exact, and it is also what happens at inference: the prompt is tokenized alone and the model
generates the rest token by token, so training on the same split avoids a train/serve mismatch at the seam.
"""

from __future__ import annotations

from typing import Any

from tuneforge.data.report import DataError
from tuneforge.data.schema import RowError

IGNORE = -100
TRUNCATIONS = ("right", "left", "drop", "error")


def n_supervised(labels: list[int]) -> int:
    """Tokens that carry loss: position 0 is never predicted (logits[:, :-1] predict labels[:, 1:])."""
    return sum(1 for t in labels[1:] if t != IGNORE)


class Encoder:
    """Encodes one file's payloads for one tokenizer; holds the special ids so each row does not look them up."""

    def __init__(self, tokenizer, fmt: str, path: str):
        self.tok = tokenizer
        self.fmt = fmt
        self.path = path
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{path}: rows are in 'messages' format but the tokenizer has no chat template, so turns cannot be "
                "rendered the way the model will see them.",
                hint="Set tokenizer.chat_template, or convert the file to prompt/completion rows "
                '({"prompt": ..., "completion": ...}) which need no template.',
            )

    def encode(self, payload: Any, line: int) -> tuple[list[int], list[int]]:
        """Return ``(input_ids, labels)`` of equal length; raises ``RowError`` for a row the template rejects."""
        if self.fmt == "text":
            return self._text(payload)
        if self.fmt == "prompt_completion":
            return self._prompt_completion(*payload)
        if self.fmt == "preference":
            raise TypeError("preference rows encode to two sequences: use encode_pair()")
        return self._messages(payload, line)

    def encode_pair(self, payload: tuple[str, str, str]) -> tuple[tuple[list[int], list[int]], ...]:
        """A preference row as two prompt/completion sequences (chosen, rejected) sharing the prompt's tokens."""
        prompt, chosen, rejected = payload
        return self._prompt_completion(prompt, chosen), self._prompt_completion(prompt, rejected)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Tokenize each piece alone, in one batched call (the Rust side is much cheaper per string in a batch)."""
        out: list[list[int]] = [[] for _ in texts]
        todo = [i for i, t in enumerate(texts) if t]
        if todo:
            enc = self.tok([texts[i] for i in todo], add_special_tokens=False)["input_ids"]
            for i, ids in zip(todo, enc):
                out[i] = list(ids)
        return out

    def _text(self, text: str) -> tuple[list[int], list[int]]:
        ids = self.bos + self._ids([text])[0] + self.eos
        return ids, list(ids)  # every token supervised; labels[0] is never predicted anyway

    def _prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        p, c = self._ids([prompt, completion])
        head = self.bos + p
        tail = c + self.eos
        return head + tail, [IGNORE] * len(head) + tail

    def _messages(self, turns: list[dict], line: int) -> tuple[list[int], list[int]]:
        full, cuts = self._turn_cuts(turns, line)
        bounds = [0] + [b for pair in cuts for b in pair] + [len(full)]
        pieces = [full[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        ids: list[int] = []
        labels: list[int] = []
        for k, piece in enumerate(self._ids(pieces)):
            ids += piece
            labels += piece if k % 2 == 1 else [IGNORE] * len(piece)  # odd pieces are assistant turns
        return ids, labels

    def _turn_cuts(self, turns: list[dict], line: int) -> tuple[str, list[tuple[int, int]]]:
        """The full rendering and the character offsets ``(start, end)`` of every assistant turn in it.

        start = len(render(turns[:i], add_generation_prompt=True)), end = len(render(turns[:i + 1])). Both renders
        must be prefixes of the full conversation, otherwise the template rewrites history (e.g. strips earlier
        reasoning) and no single sequence can supervise every assistant turn as the model will see it.
        """
        full = self._render(turns, False)
        cuts: list[tuple[int, int]] = []
        last = 0
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            prompt = self._render(turns[:i], True)
            upto = self._render(turns[: i + 1], False)
            if not (upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= last):
                raise self._unstable(line, i, prompt, upto, full)
            cuts.append((len(prompt), len(upto)))
            last = len(upto)
        return full, cuts

    def _render(self, turns: list[dict], gen: bool) -> str:
        try:
            return self.tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja2 TemplateError, raise_exception() in the template, ...
            raise RowError(f"messages: the chat template rejected this conversation ({type(e).__name__}: {e})")

    def _unstable(self, line: int, i: int, prompt: str, upto: str, full: str) -> DataError:
        if not upto.startswith(prompt):
            what = f"rendering messages[:{i}] with add_generation_prompt=True is not a prefix of messages[:{i + 1}]"
        else:
            what = f"rendering messages[:{i + 1}] is not a prefix of the whole conversation"
        return DataError(
            f"{self.path}:{line}: the tokenizer's chat template is not prefix-stable: {what}. Loss spans for "
            "assistant turns cannot be placed, because the template renders earlier turns differently once later "
            "turns follow (for example it drops past reasoning).",
            hint="Use a prefix-stable chat template, split conversations so each has one assistant turn at the end, "
            "or convert to prompt/completion rows.",
        )


def truncate(ids: list[int], labels: list[int], max_len: int, mode: str) -> tuple[list[int], list[int]]:
    """Cut to ``max_len`` tokens: ``right`` keeps the start, ``left`` keeps the end (``drop``/``error`` are decided
    by the caller, which needs to count and report them)."""
    if len(ids) <= max_len:
        return ids, labels
    if mode == "right":
        return ids[:max_len], labels[:max_len]
    if mode == "left":
        return ids[-max_len:], labels[-max_len:]
    raise ValueError(f"truncate() handles right|left, got {mode!r}")
