"""Row formats: detection and per-row validation with reasons that name the offending field.

Validation happens before any tokenization so that a broken file is rejected in seconds with every problem listed,
and so that the tokenizer only ever sees well-typed input (a ``None`` content or a lone surrogate would otherwise
surface as an opaque error from Rust or Jinja). Unknown top-level keys are ignored: exports routinely carry ids,
scores and metadata next to the fields we use.
"""

from __future__ import annotations

from typing import Any

from tuneforge.data.readers import json_type

FORMATS = ("text", "prompt_completion", "messages", "preference")
ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """One row does not match its format; ``str(err)`` is the reason shown to the user."""


def detect_format(value: dict) -> str | None:
    """``chosen``+``rejected`` (or a ``ranking``) > ``messages`` > ``prompt``+``completion`` > ``text``; None when
    none of them."""
    if ("chosen" in value and "rejected" in value) or "ranking" in value:
        return "preference"
    if "messages" in value:
        return "messages"
    if "prompt" in value and "completion" in value:
        return "prompt_completion"
    if "text" in value:
        return "text"
    return None


def validate(value: dict, fmt: str) -> Any:
    """Return the row's payload for ``fmt`` or raise ``RowError``.

    Payloads: ``text`` -> str; ``prompt_completion`` -> (prompt, completion); ``preference`` -> (prompt, responses
    best first: [chosen, rejected] or a ranking's K); ``messages`` -> list of ``{"role", "content"}`` dicts (other per-turn keys are dropped so rendering depends only on what we validated).
    """
    if fmt == "text":
        return _string(value, "text", allow_empty=False)
    if fmt == "prompt_completion":
        prompt = _string(value, "prompt", allow_empty=True)
        return prompt, _string(value, "completion", allow_empty=False)
    if fmt == "messages":
        return _messages(value)
    if fmt == "preference":
        return _preference(value)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _preference(value: dict) -> tuple[str, list[str]] | tuple[list[dict], list[list[dict]]]:
    """(prompt, [chosen, rejected]): two non-empty responses that differ (identical ones carry no preference and
    would give DPO a zero gradient while still counting in its mean). A ``ranking`` of K responses, best first, is
    (prompt, [best, ..., worst]) (InstructGPT's reward-model data); it stays one row, so the prompt is tokenized and
    truncated once for all K and its K-choose-2 comparisons train together.

    The conversational form TRL users have is read too (``_conversational``): a ``prompt`` that is a list of
    messages, and responses that are lists of assistant messages (or strings); or, with no ``prompt``, ``chosen`` and
    ``rejected`` as whole conversations that share their opening turns (Anthropic HH), the shared turns being the
    prompt. Its payload is (messages, [response messages, ...]), rendered through the chat template."""
    if _is_conversational(value):
        return _conversational(value)
    if "ranking" in value and not ("chosen" in value and "rejected" in value):
        return _ranking(value)
    prompt = _string(value, "prompt", allow_empty=True)
    chosen = _string(value, "chosen", allow_empty=False)
    rejected = _string(value, "rejected", allow_empty=False)
    if chosen == rejected:
        raise RowError("chosen, rejected: identical responses (no preference to learn)")
    return prompt, [chosen, rejected]


def _ranking(value: dict) -> tuple[str, list[str]]:
    prompt = _string(value, "prompt", allow_empty=True)
    ranking = value["ranking"]
    if not isinstance(ranking, list) or len(ranking) < 2:
        raise RowError(f"ranking: expected a list of at least 2 responses (best first), got {json_type(ranking)}"
                       + (f" of {len(ranking)}" if isinstance(ranking, list) else ""))
    responses = [_string({"r": r}, "r", allow_empty=False, where=f"ranking[{i}]") for i, r in enumerate(ranking)]
    if len(set(responses)) != len(responses):
        raise RowError("ranking: repeated responses (no preference between them)")
    return prompt, responses


def _is_conversational(value: dict) -> bool:
    keys = ("prompt", "chosen", "rejected")
    return any(isinstance(value.get(k), list) for k in keys) or (
        isinstance(value.get("ranking"), list) and any(isinstance(r, list) for r in value["ranking"]))


def _conversational(value: dict) -> tuple[list[dict], list[list[dict]]]:
    """(prompt messages, [response messages best first]) of a conversational pair or ranking."""
    pair = "chosen" in value and "rejected" in value
    names = ["chosen", "rejected"] if pair else [f"ranking[{i}]" for i in range(len(value.get("ranking") or []))]
    raw = [value["chosen"], value["rejected"]] if pair else list(value.get("ranking") or [])
    if not pair and len(raw) < 2:
        raise RowError("ranking: expected a list of at least 2 responses (best first)")
    if "prompt" in value:
        prompt = _turns(value["prompt"], "prompt", allow_empty=True)
        responses = [_response(r, where) for r, where in zip(raw, names)]
    else:  # whole conversations: the shared opening turns are the prompt
        convs = [_turns(r, where, allow_empty=False) for r, where in zip(raw, names)]
        for c, where in zip(convs, names):
            if c[-1]["role"] != "assistant":
                raise RowError(f"{where}: the conversation must end with the assistant turn being compared, got "
                               f"{c[-1]['role']!r}")
        n = 0
        while all(len(c) > n + 1 for c in convs) and all(c[n] == convs[0][n] for c in convs):
            n += 1
        prompt, responses = convs[0][:n], [c[n:] for c in convs]
        for r, where in zip(responses, names):
            _assistant_only(r, where)
    if not prompt:  # the template's system message and markup would be scored as the response
        raise RowError("prompt: no turn before the responses; a conversational pair needs the user turn(s) they "
                       "answer (give \"prompt\": [{\"role\": \"user\", ...}], or whole conversations that share it)")
    if prompt[-1]["role"] == "assistant":
        raise RowError("prompt: ends with an assistant turn; the responses are the assistant's next turn")
    if len({str(r) for r in responses}) != len(responses):
        raise RowError(f"{', '.join(names)}: identical responses (no preference to learn)")
    return prompt, responses


def _turns(raw: Any, where: str, *, allow_empty: bool) -> list[dict]:
    if not isinstance(raw, list):
        raise RowError(f"{where}: expected a list of {{role, content}} messages, got {json_type(raw)}")
    if not raw and not allow_empty:
        raise RowError(f"{where}: empty list")
    return [_turn(t, i, where) for i, t in enumerate(raw)]


def _response(raw: Any, where: str) -> list[dict]:
    """A response: assistant message(s), or a plain string (one assistant message)."""
    if isinstance(raw, str):
        raw = [{"role": "assistant", "content": _string({"r": raw}, "r", allow_empty=False, where=where)}]
    turns = _turns(raw, where, allow_empty=False)
    _assistant_only(turns, where)
    return turns


def _assistant_only(turns: list[dict], where: str) -> None:
    if not turns:
        raise RowError(f"{where}: no turn after the shared conversation (nothing to compare)")
    if turns[0]["role"] != "assistant":
        raise RowError(f"{where}[0].role: a response starts with the assistant's turn, got {turns[0]['role']!r}")
    if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
        raise RowError(f"{where}: empty assistant content (nothing to learn from)")


def _string(obj: dict, key: str, *, allow_empty: bool, where: str | None = None) -> str:
    where = where or key
    if key not in obj:
        raise RowError(f"{where}: missing required field")
    text = obj[key]
    if not isinstance(text, str):
        raise RowError(f"{where}: expected a string, got {json_type(text)}")
    _check_unicode(text, where)
    if not allow_empty and not text.strip():
        raise RowError(f"{where}: empty string (nothing to learn from)")
    return text


def _check_unicode(text: str, where: str) -> None:
    """JSON allows ``"\\ud800"``; such a string cannot be encoded to UTF-8, so no tokenizer can take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RowError(f"{where}: contains an unpaired surrogate escape (not valid Unicode)") from None


def _messages(value: dict) -> list[dict]:
    if "messages" not in value:
        raise RowError("messages: missing required field")
    turns = value["messages"]
    if not isinstance(turns, list):
        raise RowError(f"messages: expected an array of {{role, content}} objects, got {json_type(turns)}")
    if not turns:
        raise RowError("messages: empty array")
    out = [_turn(turn, i) for i, turn in enumerate(turns)]
    if not any(t["role"] == "assistant" for t in out):
        raise RowError("messages: no assistant turn (nothing to learn from)")
    if out[0]["role"] == "assistant":
        raise RowError("messages[0].role: a conversation cannot start with an assistant turn; add a user turn first")
    return out


def _turn(turn: Any, i: int, field: str = "messages") -> dict:
    where = f"{field}[{i}]"
    if not isinstance(turn, dict):
        raise RowError(f"{where}: expected an object with role and content, got {json_type(turn)}")
    if "role" not in turn:
        raise RowError(f"{where}.role: missing required field")
    role = turn["role"]
    if not isinstance(role, str):
        raise RowError(f"{where}.role: expected a string, got {json_type(role)}")
    if role not in ROLES:
        raise RowError(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}")
    content = _string(turn, "content", allow_empty=True, where=f"{where}.content")
    if role == "assistant" and not content.strip():
        raise RowError(f"{where}.content: empty assistant content (nothing to learn from)")
    return {"role": role, "content": content}
