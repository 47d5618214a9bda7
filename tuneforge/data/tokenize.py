"""Validated rows -> ``input_ids`` and UNshifted ``labels`` (-100 = no loss), plus truncation.

Loss spans are computed from our own knowledge of where each part of a row lives, never from the tokenizer's pad or
special-token masks: a tokenizer with ``pad == eos`` would otherwise silently stop the model learning to stop.

Special tokens follow the tokenizer. A sequence starts with whatever the tokenizer itself puts in front of a single
text (``tok(text)["input_ids"]``): ``[bos]`` for Llama-2/3 and Mistral, nothing for GPT-2, Qwen2 or SmolLM2 (whose
``bos_token`` is the chat marker ``<|im_start|>``: prepending it would start every row with a role-less turn the model
never saw in pre-training). Chat rows get exactly what the chat template renders. eos is appended to text rows and to
completions by us, whatever the tokenizer does, so the model learns to stop.

Seams: a row is tokenized as one text (prompt + completion, or the whole rendered conversation), so its ids are exactly
the tokenizer's encoding of that text. Encoding the pieces apart and concatenating is not the same: SentencePiece-style
tokenizers (Llama-2, Mistral; a Metaspace pre-tokenizer) prepend "▁" to every string they encode, so a completion
encoded alone gains a space that is not in the data (``"...?\\n" + "yes"`` would train as ``"\\n▁yes"``). The
supervised boundary is where the encoding of the text before it stops agreeing with the encoding of the whole. In the
usual case they agree all the way, so the prompt's ids are exactly what generation from that prompt starts from
(``train/rollout.py`` encodes prompts with the same functions). When the tokenizer merges across the seam (a prompt
ending in a space: ``"Answer: " + "yes"`` -> ``"▁yes"``) the merged token goes to the part after it, so no
character of a response is left unsupervised.

P-tuning templates (``data/template.py``): with a template that puts virtual tokens after the prompt, its slot ids go
between the prompt and what follows it, at the same seam: ``head + slots + tail``, the joint encoding otherwise
unchanged; generation prompts get the same slots at their end (``encode_prompt_text``, ``encode_chat_prompt``). In a
conversation ``{prompt}`` is everything the model reads before an assistant answer, the chat template's generation
prompt included (``<|im_start|>assistant\\n``), so the slots open every assistant turn, before its content, in
training rows and in the history of a prompt alike. Every chat template has that place, and the data already cuts
each answer's loss span there (the seam rule above); around a user turn's content the slots would sit inside the
template's own markup.

The slots always follow a real token: a row without the adapter reads each slot as a copy of the token before it.
An empty prompt with no start token (no bos) is therefore a bad row, and left truncation that would keep slots
without a prompt token before them drops the row instead (``SlotsCut``; counted in the report). Slots inside a
response (a later assistant turn of a multi-turn response) carry no loss either (``response_labels``).
"""

from __future__ import annotations

from typing import Any

from tuneforge.data.report import DataError
from tuneforge.data.schema import RowError
from tuneforge.data.template import PromptTemplate, insert_slots, is_slot

IGNORE = -100
TRUNCATIONS = ("right", "left", "drop", "error")


def n_supervised(labels: list[int]) -> int:
    """Tokens that carry loss: position 0 is never predicted (logits[:, :-1] predict labels[:, 1:])."""
    return sum(1 for t in labels[1:] if t != IGNORE)


def leading_specials(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a single text on its own (``add_special_tokens=True``), found by encoding a
    probe both ways; ``[]`` when it adds none (or only trailing ones, such as an eos we add ourselves anyway)."""
    probe = "a"
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i]
    return []


def with_start(specials: list[int], ids: list[int], bos_id: int | None) -> list[int]:
    """``specials + ids``, except that an empty context becomes ``[bos]``: a first token needs something to be
    predicted from, and ``transformers``' ``generate`` likewise starts from ``bos_token_id`` when given no input."""
    head = list(specials) + list(ids)
    return head if head or bos_id is None else [bos_id]


def _slots(template: PromptTemplate | None) -> list[int]:
    return template.slots() if template is not None else []


class SlotsCut(ValueError):
    """Left truncation would keep a P-tuning template's slots without a prompt token before them (the caller drops
    the row and counts it, ``report.SLOTS_CUT``)."""


def _check_lead(ids: list[int], where: str) -> None:
    """A sequence holding template slots must not start with one: a row without the adapter reads a slot as a copy
    of the token before it, and the adapter's tokens after the prompt are meant to follow the prompt."""
    if not ids or is_slot(ids[0]):
        raise RowError(f"{where}: nothing comes before the P-tuning template's tokens after the prompt (an empty "
                       "prompt, and no start token such as bos in front of it): the template's tokens after the "
                       "prompt need a token before them; give the row a prompt")


def response_labels(tail: list[int]) -> list[int]:
    """A response's labels: its own ids, except the template slots inside it (those that open a later assistant turn
    of a multi-turn response), which are part of that turn's prompt and carry no loss."""
    return [IGNORE if is_slot(t) else t for t in tail]


def encode_prompt_text(tokenizer, prompt: str, specials: list[int] | None = None,
                       template: PromptTemplate | None = None) -> list[int]:
    """A prompt string as generation sees it, and as a prompt/completion row whose prompt is that string starts
    (with a P-tuning template's slots after it)."""
    specials = leading_specials(tokenizer) if specials is None else specials
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    out = with_start(specials, ids, tokenizer.bos_token_id) + _slots(template)
    if _slots(template):
        _check_lead(out, "prompt")
    return out


def encode_chat_prompt(tokenizer, turns: list[dict], template: PromptTemplate | None = None) -> list[int]:
    """A conversation rendered with the generation prompt, as generation sees it. With a template's slots they open
    the answer and every earlier assistant turn, where a messages row of the same conversation has them."""
    if not _slots(template):
        return list(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
    starts = assistant_starts(tokenizer, turns, text, ids)
    out = insert_slots(ids, None, starts, template.slots())[0] + template.slots()
    _check_lead(out, "messages")
    return out


def assistant_starts(tokenizer, turns: list[dict], text: str, ids: list[int], first: int = 0,
                     render=None) -> list[int]:
    """Token indices into ``ids`` (the encoding of ``text``, which begins with the rendering of ``turns``) where
    each assistant turn of ``turns[first:]`` begins: after the generation prompt that precedes it.

    Found turn by turn, so the history as a whole need not be prefix-stable. When ``turns[:i]`` rendered with the
    generation prompt begins ``text``, turn i begins where that rendering ends (where a messages row cuts its loss
    span). A template that renders a conversation's last user turn differently (Mistral's put the system prompt in
    front of it) breaks that for every earlier turn; then the turn's own rendering, ``turns[:i + 1]``, shows where
    its generation prompt ends: after the longest tail of the generation-prompt rendering that it holds, which must
    reach back into the turn before (its content) and begin ``text`` up to there. ``RowError`` when neither places
    the turn. ``render(turns, generation_prompt)`` renders text (default: the tokenizer's chat template)."""
    render = render or (lambda t, gen: tokenizer.apply_chat_template(t, tokenize=False, add_generation_prompt=gen))
    out, last, cut_last = [], 0, 0
    for i in range(first, len(turns)):
        if turns[i]["role"] != "assistant":
            continue
        before = render(turns[:i], True) if i else ""
        cut = len(before) if text.startswith(before) else _own_turn_cut(render, turns, i, before, text)
        if cut is None or cut < cut_last:
            raise RowError(f"messages[{i}]: the chat template renders the conversation before this assistant turn "
                           "differently once the turn follows (not prefix-stable), and the turn's own rendering does "
                           "not show where its generation prompt ends, so the P-tuning template's virtual tokens "
                           "cannot be placed before it")
        cut_last = cut
        enc = list(tokenizer(text[:cut], add_special_tokens=False)["input_ids"]) if cut else []
        last = max(last, common_prefix(enc, ids))
        out.append(last)
    return out


def _own_turn_cut(render, turns: list[dict], i: int, before: str, text: str) -> int | None:
    """Where assistant turn i's content begins in ``text``, read off the rendering of ``turns[:i + 1]`` (``before``:
    ``turns[:i]`` with the generation prompt, which does not begin ``text``); None when it cannot be told."""
    own = render(turns[: i + 1], False)
    lo, hi = 0, len(before)  # the longest tail of `before` found in `own` (each shorter tail is then found too)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if before[len(before) - mid:] in own:
            lo = mid
        else:
            hi = mid - 1
    tail = before[len(before) - lo:]
    prev = str(turns[i - 1].get("content") or "").strip()
    if not tail or (prev and prev not in tail):  # a few characters of markup would match anywhere
        return None
    end = own.rfind(tail) + len(tail)
    return end if text.startswith(own[:end]) else None


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists (one C-level comparison in the usual full match)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


class Encoder:
    """Encodes one file's payloads for one tokenizer; holds the special ids so each row does not look them up."""

    def __init__(self, tokenizer, fmt: str, path: str, template: PromptTemplate | None = None):
        self.tok = tokenizer
        self.fmt = fmt
        self.path = path
        self.slots = _slots(template)  # a P-tuning template's ids after each prompt ([] without one)
        if self.slots and fmt == "text":
            raise DataError(
                f"{path}: rows are plain text, but the P-tuning template {template.text!r} puts virtual tokens after "
                "a prompt, and a text row has none.",
                hint="Give prompt/completion or messages rows, or a template with tokens only in front of {prompt} "
                "(method.template: '[P:k] {prompt}').")
        self.start = leading_specials(tokenizer)
        self.bos_id = tokenizer.bos_token_id
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
            prompt, completion = payload
            head, (tail,) = self.encode_responses(prompt, [completion])
            return head + tail, [IGNORE] * len(head) + response_labels(tail)
        if self.fmt == "preference":
            raise TypeError("preference rows encode to several sequences: use encode_responses()")
        return self._messages(payload, line)

    def keep(self, ids: list[int]) -> int:
        """How many leading ids left truncation must keep: the tokenizer's own start specials (bos), when present."""
        n = len(self.start)
        return n if n and ids[:n] == self.start else 0

    def encode_responses(self, prompt: str, responses: list[str]) -> tuple[list[int], list[list[int]]]:
        """``(head, tails)``: one shared head (start specials + prompt ids) and, per response, the ids that follow it
        (+ eos), so that ``head + tails[k]`` is the tokenizer's encoding of ``prompt + responses[k]``.

        The head is the longest prefix of the prompt's own encoding that every joint encoding shares, so every response
        of a preference pair or ranking is scored after the very same prompt tokens.

        A conversational row (prompt and responses as messages) goes through the chat template instead
        (``_chat_responses``). A P-tuning template's slots end the head.
        """
        if isinstance(prompt, list):
            return self._chat_responses(prompt, responses)
        alone, *joint = self._ids([prompt] + [prompt + r for r in responses])
        m = min(common_prefix(alone, j) for j in joint)
        head = with_start(self.start, alone[:m], self.bos_id) + self.slots
        if self.slots:
            _check_lead(head, "prompt")
        return head, [j[m:] + self.eos for j in joint]

    def _chat_responses(self, prompt: list[dict], responses: list[list[dict]]) -> tuple[list[int], list[list[int]]]:
        """``(head, tails)`` of a conversational pair or ranking, as the model sees it at inference: the head is the
        prompt rendered with the generation prompt (``<|im_start|>assistant\n``), each tail what the template adds
        for that response, up to and including its end-of-turn marker (``_to_turn_end``; no extra eos). Both renders
        must agree on the prompt's text (a prefix-stable template)."""
        if not getattr(self.tok, "chat_template", None):
            raise DataError(f"{self.path}: preference rows in the conversational form need a chat template, and "
                            "the tokenizer has none", hint="Set tokenizer.chat_template, or give prompt, chosen and "
                            "rejected as strings.")
        head_text = self._render(prompt, True) if prompt else ""
        fulls = [self._render(prompt + r, False) for r in responses]
        for r, full in zip(responses, fulls):
            if not full.startswith(head_text):
                raise RowError("prompt: the chat template renders the prompt differently once a response follows "
                               "(not prefix-stable), so the responses cannot be scored after the same prompt")
        alone, *joint = self._ids([head_text] + fulls)
        m = min(common_prefix(alone, j) for j in joint)
        if not self.slots:
            return with_start([], alone[:m], self.bos_id), [self._to_turn_end(j[m:]) for j in joint]
        inner = [min(a, m) for a in assistant_starts(self.tok, prompt, head_text, alone, render=self._render)]
        head = with_start([], insert_slots(alone[:m], None, inner, self.slots)[0], self.bos_id) + self.slots
        _check_lead(head, "prompt")
        tails = []
        for r, full, j in zip(responses, fulls, joint):  # later assistant turns of a multi-turn response
            later = assistant_starts(self.tok, prompt + r, full, j, first=len(prompt) + 1, render=self._render)
            tail = insert_slots(j[m:], None, [max(a - m, 0) for a in later], self.slots)[0]
            tails.append(self._to_turn_end(tail))
        return head, tails

    def _to_turn_end(self, tail: list[int]) -> list[int]:
        """A response's tokens up to its end-of-turn marker (the eos, ``<|im_end|>`` for ChatML), dropping what a
        template writes after it (a newline): generation stops at that marker, so a sequence scored by DPO or a
        reward head ends where a sampled completion ends, and the reward head reads the same last token in
        training and on rollouts."""
        eos = self.eos[0] if self.eos else None
        if eos is not None and eos in tail:
            return tail[:len(tail) - tail[::-1].index(eos)]
        return tail

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Tokenize each text without added specials, in one batched call (the Rust side is much cheaper per string
        in a batch)."""
        out: list[list[int]] = [[] for _ in texts]
        todo = [i for i, t in enumerate(texts) if t]
        if todo:
            enc = self.tok([texts[i] for i in todo], add_special_tokens=False)["input_ids"]
            for i, ids in zip(todo, enc):
                out[i] = list(ids)
        return out

    def _text(self, text: str) -> tuple[list[int], list[int]]:
        ids = self.start + self._ids([text])[0] + self.eos
        return ids, list(ids)  # every token supervised; labels[0] is never predicted anyway

    def _messages(self, turns: list[dict], line: int) -> tuple[list[int], list[int]]:
        """The rendered conversation encoded as one text; each assistant turn's character span is mapped to tokens by
        comparing the encoding of the text before each cut with the encoding of the whole."""
        full, cuts = self._turn_cuts(turns, line)
        flat = [c for pair in cuts for c in pair]
        ids, *prefixes = self._ids([full] + [full[:c] for c in flat])
        bounds, last = [], 0
        for enc in prefixes:
            last = max(last, common_prefix(enc, ids))  # monotone even if a merge swallows a whole span
            bounds.append(last)
        labels = [IGNORE] * len(ids)
        for a, b in zip(bounds[0::2], bounds[1::2]):
            labels[a:b] = ids[a:b]
        if self.slots:  # a P-tuning template's slots open every assistant turn
            ids, labels = insert_slots(ids, labels, bounds[0::2], self.slots, IGNORE)
            _check_lead(ids, "messages")
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


def truncate(ids: list[int], labels: list[int], max_len: int, mode: str, keep: int = 0
             ) -> tuple[list[int], list[int]]:
    """Cut to ``max_len`` tokens: ``right`` keeps the start, ``left`` keeps the first ``keep`` tokens (the
    tokenizer's bos: the model never saw a sequence without it) and the end (``drop``/``error`` are decided by the
    caller, which needs to count and report them). ``SlotsCut`` when ``left`` would keep a P-tuning template's
    slots without a prompt token before them (the end starts on a slot)."""
    if len(ids) <= max_len:
        return ids, labels
    if mode == "right":
        return ids[:max_len], labels[:max_len]
    if mode == "left":
        keep = min(keep, max_len - 1)
        tail = max_len - keep
        if is_slot(ids[-tail]):
            raise SlotsCut(f"left truncation to {max_len} tokens starts on a P-tuning template slot")
        return ids[:keep] + ids[-tail:], labels[:keep] + labels[-tail:]
    raise ValueError(f"truncate() handles right|left, got {mode!r}")


def truncate_shared(head: list[int], tails: list[list[int]], max_len: int, mode: str, keep: int = 0
                    ) -> tuple[list[int], list[list[int]]]:
    """Cut a shared prompt and its responses (a preference pair or a ranking) so that ``head + tail <= max_len`` for
    every response, with the prompt cut once and identically for all of them: a pair whose two sides saw different
    prompts no longer compares two answers to one question.

    ``right`` keeps the start: the head as is, each response loses its end. ``left`` keeps the first ``keep`` head
    tokens (bos) and the end of the prompt, dropping its oldest tokens until the longest response fits; a response
    that does not fit even after an empty prompt loses its end. A head that leaves a response no room yields an
    empty tail, which the caller drops as having no supervised tokens. ``SlotsCut`` when ``left`` would keep a
    P-tuning template's slots (which end the head) without a prompt token before them.
    """
    longest = max(len(t) for t in tails)
    if len(head) + longest <= max_len:
        return head, tails
    if mode == "left":
        keep = min(keep, len(head), max_len - 1)
        room = max(max_len - keep - longest, 0)  # prompt tokens that still fit beside the longest response
        body = head[keep:]
        kept = body[len(body) - min(room, len(body)):]
        if kept and is_slot(kept[0]):
            raise SlotsCut(f"left truncation to {max_len} tokens keeps {len(kept)} prompt token(s), starting on a "
                           "P-tuning template slot")
        head = head[:keep] + kept
    elif mode != "right":
        raise ValueError(f"truncate_shared() handles right|left, got {mode!r}")
    head = head[:max_len]
    return head, [t[: max_len - len(head)] for t in tails]
