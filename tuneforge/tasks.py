"""Procedurally generated tasks with exact answers.

The demo, the tests and the preference/RL algorithms need data that (a) exists offline, (b) has a verifiable
answer, so accuracy and rewards are exact rather than judged, and (c) is small enough for a character-level tiny
model to learn in about a minute of CPU. Each task prints its own marker ("sort ", "rev ", "+", ...) so one model
can be taught a mixture and still know which task a prompt asks for, and answers stay at most ~8 characters.

Examples are a pure function of ``(task, seed)``: each task seeds its own ``random.Random`` from a string, so
adding a task never changes another task's data, and train/eval splits come from different seeds.
"""

from __future__ import annotations

import json
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

EOS = "</s>"
LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[..., tuple[str, str]]  # make(rng, **options) -> (prompt, answer)


def _letters(rng: random.Random, min_len: int, max_len: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))


def _add(rng: random.Random, max_digits: int = 3) -> tuple[str, str]:
    """Operands uniform below 10**max_digits: a million pairs, so seeded splits rarely share a prompt."""
    a = rng.randrange(10**max_digits)
    b = rng.randrange(10**max_digits)
    return f"{a}+{b}=", str(a + b)


def _sort(rng: random.Random, min_len: int = 3, max_len: int = 6) -> tuple[str, str]:
    word = _letters(rng, min_len, max_len)
    return f"sort {word}:", "".join(sorted(word))


def _reverse(rng: random.Random, min_len: int = 3, max_len: int = 6) -> tuple[str, str]:
    word = _letters(rng, min_len, max_len)
    return f"rev {word}:", word[::-1]


def _copy(rng: random.Random, min_len: int = 3, max_len: int = 6) -> tuple[str, str]:
    word = _letters(rng, min_len, max_len)
    return f"copy {word}:", word


def _max(rng: random.Random, min_count: int = 2, max_count: int = 4, max_value: int = 99) -> tuple[str, str]:
    numbers = [rng.randint(0, max_value) for _ in range(rng.randint(min_count, max_count))]
    return f"max {','.join(map(str, numbers))}:", str(max(numbers))


def _count(rng: random.Random, min_len: int = 4, max_len: int = 8, alphabet: str = "abcd") -> tuple[str, str]:
    """Count a letter in a word over a small alphabet, so counts above one are common (not almost always 0/1)."""
    word = _letters(rng, min_len, max_len, alphabet)
    letter = rng.choice(alphabet)
    return f"count {letter} in {word}:", str(word.count(letter))


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("add", "add two numbers of up to 3 digits: '47+385=' -> '432'", _add),
        Task("sort", "sort 3-6 lowercase letters: 'sort dbca:' -> 'abcd'", _sort),
        Task("reverse", "reverse 3-6 lowercase letters: 'rev abcd:' -> 'dcba'", _reverse),
        Task("copy", "repeat 3-6 lowercase letters: 'copy abcd:' -> 'abcd'", _copy),
        Task("max", "largest of 2-4 numbers below 100: 'max 12,7,93:' -> '93'", _max),
        Task("count", "occurrences of a letter in a 4-8 letter word: 'count a in abca:' -> '2'", _count),
    )
}


def _task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def make_examples(task: str, n: int, seed: int, **kw) -> list[dict]:
    """``n`` rows ``{"prompt", "completion"}`` for ``task``, deterministic in ``seed``; ``kw`` go to the generator
    (e.g. ``max_len=8`` for letter tasks, ``max_digits=2`` for add)."""
    spec = _task(task)
    rng = random.Random(f"tuneforge:{task}:{seed}")
    rows = []
    for _ in range(n):
        prompt, answer = spec.make(rng, **kw)
        rows.append({"prompt": prompt, "completion": answer})
    return rows


def _plausible_wrong(task: str, prompt: str, answer: str, rng: random.Random) -> str:
    """A wrong answer a model is likely to give: the input unchanged for reverse/sort (what copying produces), an
    off-by-one-digit number for arithmetic, otherwise one character changed."""
    if task in ("reverse", "sort"):
        return prompt.split(" ", 1)[1].rstrip(":")
    if answer.lstrip("-").isdigit():
        return str(int(answer) + rng.choice([-10, -1, 1, 10]))
    i = rng.randrange(len(answer))
    return answer[:i] + rng.choice([c for c in LETTERS if c != answer[i]]) + answer[i + 1:]


def preference_pairs(task: str, n: int, seed: int, **kw) -> list[dict]:
    """``n`` rows ``{"prompt", "chosen", "rejected"}``: the exact answer against a plausible wrong one (for reward
    modelling and DPO on a rule whose ground truth is known). Problems whose wrong answer happens to be right (a
    palindrome under reverse) are skipped, so every pair carries a preference."""
    spec = _task(task)
    rng = random.Random(f"tuneforge:pairs:{task}:{seed}")
    rows: list[dict] = []
    while len(rows) < n:
        prompt, answer = spec.make(rng, **kw)
        wrong = _plausible_wrong(task, prompt, answer, rng)
        if wrong != answer:
            rows.append({"prompt": prompt, "chosen": answer, "rejected": wrong})
    return rows


def exact_match(prediction: str, answer: str) -> bool:
    """Whether a generated continuation gives the answer.

    Generation runs past the answer (to eos, a newline or the token limit), so the prediction is cut at the first
    eos and kept to as many lines as the answer has (one, for the generated tasks), and both sides are stripped of
    surrounding whitespace before comparing.
    """
    return cut_prediction(prediction, answer) == answer.strip()


def cut_prediction(prediction: str, answer: str) -> str:
    """``prediction`` cut at the first eos, kept to as many lines as ``answer`` has, stripped: the part of a
    generated continuation that is compared with the answer (by exact match and the dense rewards alike)."""
    lines = answer.strip().count("\n") + 1
    return "\n".join(prediction.split(EOS, 1)[0].split("\n")[:lines]).strip()


# --- chat tasks for pretrained chat models (real tokenizers: any characters) --------------------------------------
PEOPLE = ("Alice", "Bruno", "Chen", "Dara", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
          "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Uma", "Viktor", "Wanda", "Xavier",
          "Yara", "Zane")
CITIES = ("Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Dakar", "Hanoi", "Perth", "Porto", "Turin", "Accra",
          "Delhi", "Seoul", "Kyiv", "Riga", "Bern", "Rome", "Nice", "Lyon", "Graz", "Baku", "Doha", "Suva")


def _record(rng: random.Random) -> tuple[str, str]:
    """A record reformatted into a house style no pretrained model guesses: the city in capitals, the year, the
    initial. Nothing in the prompt says so, so an instruct model scores ~0% before and must learn the format."""
    name, city, year = rng.choice(PEOPLE), rng.choice(CITIES), rng.randint(1950, 2010)
    return f"name={name}; city={city}; born={year}", f"{city.upper()}/{year}/{name[0]}"


RECORD_RULE = ("Rewrite the record as CITY/YEAR/INITIAL: the city in capital letters, the year of birth, the first "
               "letter of the name. Example: name=Rosa; city=Lima; born=1987 -> LIMA/1987/R. Reply with the code only.")


def _record_told(rng: random.Random) -> tuple[str, str]:
    """The record task with its rule and one example in the prompt: an instruct model follows it some of the time,
    the starting point reinforcement learning needs (a policy whose samples are sometimes right)."""
    prompt, answer = _record(rng)
    return f"{RECORD_RULE}\n{prompt}", answer


def _record_wrong(answer: str, rng: random.Random) -> str:
    """A plausible near miss of a record answer: the city as written, the whole name, or the fields out of order."""
    city, year, initial = answer.split("/")
    name = next(n for n in PEOPLE if n[0] == initial)
    return rng.choice([f"{city.title()}/{year}/{initial}", f"{city}/{year}/{name}", f"{year}/{city}/{initial}"])


CHAT_TASKS: dict[str, Task] = {
    "record": Task("record", "reformat 'name=Rosa; city=Lima; born=1987' as 'LIMA/1987/R'", _record),
    "record_told": Task("record_told", "the record task with its rule and an example in the prompt", _record_told),
}


def make_chat_examples(task: str, n: int, seed: int) -> list[dict]:
    """``n`` chat rows ``{"messages": [user, assistant]}`` of a chat task, deterministic in ``seed``."""
    if task not in CHAT_TASKS:
        raise ValueError(f"unknown chat task {task!r}; choose one of {', '.join(CHAT_TASKS)}")
    rng = random.Random(f"tuneforge:chat:{task}:{seed}")
    rows = []
    for _ in range(n):
        prompt, answer = CHAT_TASKS[task].make(rng)
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return rows


def make_chat_preference_pairs(task: str, n: int, seed: int) -> list[dict]:
    """``n`` conversational preference rows in TRL's form, ``{"prompt": [user], "chosen": [assistant], "rejected":
    [assistant]}``: the exact answer of a record task against a near miss (``_record_wrong``)."""
    rng = random.Random(f"tuneforge:chat-pairs:{task}:{seed}")
    rows = []
    for r in make_chat_examples(task, n, seed):
        user, answer = r["messages"][0], r["messages"][1]["content"]
        rows.append({"prompt": [user], "chosen": [{"role": "assistant", "content": answer}],
                     "rejected": [{"role": "assistant", "content": _record_wrong(answer, rng)}]})
    return rows


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
    """One JSON object per line, UTF-8, parent folders created: the format the data loaders read."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def task_mixture(n: int, seed: int, tasks: list[str]) -> list[dict]:
    """``n`` rows ``{"prompt", "completion"}`` drawn uniformly from ``tasks``, deterministic in ``seed``.

    The demo "pretrains" on such a mixture with the loss on answers only: the random letters and digits of a
    prompt are unpredictable by construction, so supervising them would spend the small model's capacity on noise
    instead of on the prompt/answer format that a later fine-tune on a held-out task builds on.
    """
    for name in tasks:
        _task(name)
    if not tasks:
        raise ValueError("a task mixture needs at least one task")
    pick = random.Random(f"tuneforge:corpus:{seed}")
    streams = {name: random.Random(f"tuneforge:corpus:{name}:{seed}") for name in tasks}
    rows = []
    for _ in range(n):
        name = pick.choice(tasks)
        prompt, answer = TASKS[name].make(streams[name])
        rows.append({"prompt": prompt, "completion": answer})
    return rows


def pretraining_corpus(n: int, seed: int, tasks: list[str]) -> list[dict]:
    """The same mixture as plain ``{"text": prompt + answer}`` rows, for language-model style training on every
    token (the ``text`` data format)."""
    return [{"text": row["prompt"] + row["completion"]} for row in task_mixture(n, seed, tasks)]
