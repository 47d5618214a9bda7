"""``tuneforge chat``: a terminal conversation with a model (and adapter), its history kept and re-rendered through
the chat template at every turn, each reply streamed as it is generated.

Lines starting with ``/`` are commands: ``/reset`` forgets the history, ``/exit`` (or end of input) leaves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from tuneforge.serve.stream import stream_generate


def chat_loop(model, tokenizer, *, system: str | None = None, read: Callable[[str], str] = input,
              write: Callable[[str], None] | None = None, **sampling) -> list[dict]:
    """Run until ``/exit`` or end of input; returns the conversation (for tests)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template, so there is no conversation format to chat in; use "
                         "tuneforge generate --raw")
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return history
        if line.strip() in ("/exit", "/quit"):
            return history
        if line.strip() == "/reset":
            history = list(opening)
            write("(history cleared)\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = stream_generate(model, tokenizer, history, write, **sampling)
        write("\n")
        history.append({"role": "assistant", "content": reply})
