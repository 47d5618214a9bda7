"""P-tuning prompt templates: where a prompt's virtual tokens go (Liu et al. 2021, "GPT Understands, Too",
https://arxiv.org/abs/2103.10385, sec. 3).

A template is written with ``[P:k]`` markers (k virtual tokens) around exactly one ``{prompt}``::

    "[P:3] {prompt} [P:2]"     three virtual tokens before the prompt, two after it (before the answer)

Tokens in front of the prompt reach the model as a key/value prefix (``methods/_soft_prompt.py``); they are not in
the token ids. Tokens after the prompt depend on it, so they are real positions of the sequence: the encoder writes
*slot ids* there, ``SLOT_BASE + j`` for the j-th token after the prompt, and the P-tuning adapter replaces the
embeddings at those positions with its prompt encoder's outputs. The slots belong to the prompt: they carry no
loss, generation starts after them, and the logits an algorithm reads stay aligned with ``input_ids``.

Slot ids lie far above any real vocabulary (2^30), so they can never index an embedding row by accident, the
sampler (which draws from the model's own vocabulary) never emits one, and ``tokenizer.decode`` skips them.

Only ``[P:k]`` markers and ``{prompt}`` may appear: words of a template belong in the data, where the tokenizer
encodes them together with the prompt. Tokens after the answer are not offered: in a causal decoder nothing after
the answer can change it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SLOT_BASE = 1 << 30  # slot j of a template is the id SLOT_BASE + j
_MARK = re.compile(r"\[P:\s*(\d+)\s*\]|\{prompt\}")


@dataclass(frozen=True)
class PromptTemplate:
    """A parsed template: ``front`` virtual tokens before the prompt, ``back`` after it."""

    text: str
    front: int
    back: int

    @property
    def n(self) -> int:
        return self.front + self.back

    def slots(self) -> list[int]:
        """The ids that stand for the tokens after the prompt, in order."""
        return [SLOT_BASE + j for j in range(self.back)]

    @classmethod
    def parse(cls, text: str) -> "PromptTemplate":
        """Read a template; ``ValueError`` says what is wrong with it."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("an empty template; write e.g. '[P:3] {prompt} [P:2]'")
        counts, prompts, last = [0, 0], 0, 0
        for m in _MARK.finditer(text):
            _no_words(text[last:m.start()])
            last = m.end()
            if m.group(0) == "{prompt}":
                prompts += 1
                continue
            k = int(m.group(1))
            if k < 1:
                raise ValueError(f"[P:{k}] in template {text!r}: a marker adds at least one virtual token")
            counts[min(prompts, 1)] += k
        _no_words(text[last:])
        if prompts != 1:
            raise ValueError(f"template {text!r} has {prompts} {{prompt}}; it needs exactly one (where the input "
                             "goes)")
        if counts == [0, 0]:
            raise ValueError(f"template {text!r} has no [P:k] marker (k virtual tokens); e.g. '[P:3] {{prompt}} "
                             "[P:2]'")
        return cls(text, counts[0], counts[1])


def _no_words(between: str) -> None:
    if between.strip():
        raise ValueError(f"template text {between.strip()!r}: a template holds only [P:k] markers and one {{prompt}} "
                         "(put words in the data, where they are tokenized with the prompt)")


def is_slot(token: int) -> bool:
    return token >= SLOT_BASE


def without_slots(ids: list[int]) -> list[int]:
    """``ids`` with every template slot removed (the prompt as a model without the adapter reads it)."""
    return [t for t in ids if t < SLOT_BASE]


def insert_slots(ids: list[int], labels: list[int] | None, at: list[int], slots: list[int], ignore: int = -100
                 ) -> tuple[list[int], list[int] | None]:
    """``slots`` inserted before each index in ``at`` (indices into the original ``ids``); their labels are
    ``ignore`` (the slots are part of the prompt, never trained on)."""
    out, lab, prev = [], [] if labels is not None else None, 0
    for a in sorted(set(at)):
        out += ids[prev:a] + slots
        if lab is not None:
            lab += labels[prev:a] + [ignore] * len(slots)
        prev = a
    out += ids[prev:]
    if lab is not None:
        lab += labels[prev:]
    return out, lab
