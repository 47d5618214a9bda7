"""Reward functions for the online algorithms (PPO, GRPO, rejection sampling, online DPO).

A reward is any callable ``fn(prompts, completions, answers) -> list[float]``: ``prompts`` and ``completions`` are
texts, ``answers`` the reference completions of the prompt rows (the ``completion`` field of prompt/completion data,
the last assistant turn of chat data). Built-ins cover the verifiable-reward setting of DeepSeekMath/R1 (exact
match, a format regex, a length target); ``python`` imports the user's own function; ``reward_model`` scores with a
model trained by ``algorithm: reward``. Several combine with weights: r = Σ_k w_k r_k.

A scoring model (the reward model here, the RLAIF judge) is frozen and runs once per rollout batch, so it lives where
the policy lives and in the policy's dtype (``placement``): a GPU run scores on its GPU, a bf16 policy gets a bf16
scorer, and its forwards run under the loop's autocast like the policy's.

Failure policy (never a silent NaN in the loss): a reward function that raises stops training with
``RewardError`` naming the function and the data rows; a non-finite or missing value marks that sample invalid —
the algorithm drops it (GRPO: its whole group, whose advantages would be meaningless) and counts it in the
``invalid_rewards`` metric, with the rows logged.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Callable, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field

from tuneforge.tasks import cut_prediction, exact_match as _exact


class RewardError(RuntimeError):
    """A reward function failed; the message names it and the rows it was scoring."""


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    weight: float = 1.0


class ExactMatch(_Base):
    """1 when the completion (cut at the first eos/newline, stripped) equals the reference answer, else 0."""
    name: Literal["exact_match"] = "exact_match"


class Similarity(_Base):
    """difflib's ratio between the completion (cut as for exact match) and the reference answer, in [0, 1]: a dense
    reward that tells a near miss from a wild guess, where exact match is 0 for both."""
    name: Literal["similarity"] = "similarity"


class CharAccuracy(_Base):
    """Share of positions where the completion (cut as for exact match) has the reference's character, over the
    longer of the two lengths, in [0, 1]. Dense like ``similarity`` but not gameable by answering short: difflib's
    ratio gives a two-character guess made of the answer's first and last characters 0.5 on any length, so a policy
    sampled against it collapses to short outputs; here every missing or extra character costs 1/len."""
    name: Literal["char_accuracy"] = "char_accuracy"


class Regex(_Base):
    """1 when the stripped completion fully matches ``pattern`` (a format reward), else 0."""
    name: Literal["regex"] = "regex"
    pattern: str


class Length(_Base):
    """−|len(completion) − target| / target in characters: 0 at the target length, negative either side."""
    name: Literal["length"] = "length"
    target: int = Field(gt=0)


class Python(_Base):
    """``module:function`` or ``path/to/file.py:function``, called as fn(prompts, completions, answers)."""
    name: Literal["python"] = "python"
    function: str


class RewardModel(_Base):
    """A reward model saved by ``algorithm: reward``: ``path`` is its ``adapter/`` (then ``base`` is the model the
    adapter was trained on) or its ``model/`` directory."""
    name: Literal["reward_model"] = "reward_model"
    path: str
    base: str | None = None
    batch_size: int = Field(32, gt=0)


RewardConfig = Annotated[Union[ExactMatch, Similarity, CharAccuracy, Regex, Length, Python, RewardModel], Field(discriminator="name")]


# --------------------------------------------------------------------------------------------------- built-ins
def exact_match(prompts, completions, answers):
    return [1.0 if _exact(c, a) else 0.0 for c, a in zip(completions, answers)]


def _cut(completions, answers):
    return [cut_prediction(c, a) for c, a in zip(completions, answers)]


def similarity(prompts, completions, answers):
    cut = _cut(completions, answers)
    return [difflib.SequenceMatcher(None, c, a.strip()).ratio() for c, a in zip(cut, answers)]


def char_accuracy(prompts, completions, answers):
    out = []
    for c, a in zip(_cut(completions, answers), answers):
        a = a.strip()
        n = max(len(c), len(a))
        out.append(sum(x == y for x, y in zip(c, a)) / n if n else 1.0)
    return out


def regex(pattern: str):
    rx = re.compile(pattern)
    return lambda prompts, completions, answers: [1.0 if rx.fullmatch(c.strip()) else 0.0 for c in completions]


def length(target: int):
    return lambda prompts, completions, answers: [-abs(len(c) - target) / target for c in completions]


def import_function(spec: str) -> Callable:
    """``pkg.module:fn`` or ``file.py:fn`` -> the callable (the user's own code, named in their config)."""
    if ":" not in spec:
        raise ValueError(f"reward function {spec!r}: write it as module:function or path/to/file.py:function")
    mod_name, attr = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.exists():
            raise FileNotFoundError(f"reward function file not found: {path}")
        mspec = importlib.util.spec_from_file_location(f"tuneforge_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[mspec.name] = module
        mspec.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {mod_name} has no callable {attr!r}")
    return fn


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def run_device() -> torch.device:
    """This process's training device when no policy is at hand: the one ``train.dist.init`` picks (the current
    CUDA device, which it set to the local rank's, else the CPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def placement(like=None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for a frozen scoring model next to the policy ``like``: the policy's device and the dtype its
    base was loaded in, read off its input embedding (adapters keep their own fp32 tensors, QLoRA quantises only
    linear layers, and ``frozen_bf16`` casts later, so the embedding is what ``model.dtype`` gave). Without a policy
    (``tuneforge label``): the run's device, in fp32."""
    if like is None:
        return run_device(), torch.float32
    emb = like.get_input_embeddings() if hasattr(like, "get_input_embeddings") else None
    w = emb.weight if emb is not None else next(p for p in like.parameters() if p.is_floating_point())
    return w.device, w.dtype


def load_scoring_model(path: str, like=None):
    """``(model, tokenizer)`` of a frozen scoring model, loaded at ``placement(like)`` (a dtype the loader has no
    name for, such as fp64, loads as fp32)."""
    from types import SimpleNamespace

    from tuneforge.models.load import load_model

    device, dtype = placement(like)
    mcfg = SimpleNamespace(path=path, dtype=_DTYPE_NAMES.get(dtype, "float32"), trust_remote_code=False,
                           revision=None, attn_implementation="sdpa")
    return load_model(mcfg, device=str(device))


class ModelScorer:
    """Scores (prompt ids, completion ids) with a trained reward head. When the reward model shares the policy's
    vocabulary the token ids are scored as generated (plus eos, where the head was trained to read the score);
    otherwise the texts are re-tokenized with the reward model's tokenizer. ``like``: the policy it scores for
    (see ``placement``).

    A P-tuning reward model with a template (tokens after the prompt) trained on conversational rows read its slots
    after every assistant turn's generation prompt; a flat prompt text would put them at its end only. So when the
    policy's prompt is a conversation (``messages``: its turns, as the data rows hold them), the conversation and
    the completion, as an assistant turn, are encoded as the reward model's conversational training rows were."""

    template = None  # the reward model's P-tuning template (``model_template``), set on loading

    def __init__(self, cfg: RewardModel, like=None):
        from tuneforge.algorithms.reward import load_head
        from tuneforge.methods import load_adapter

        adapter = (Path(cfg.path) / "adapter_config.json").exists()
        if adapter and not cfg.base:
            raise ValueError(f"reward_model.path {cfg.path} is an adapter: set reward_model.base to its base model")
        self.model, self.tok = load_scoring_model(cfg.base if adapter else cfg.path, like)
        if adapter:
            load_adapter(self.model, cfg.path)
        load_head(self.model, cfg.path)
        self.model.eval().requires_grad_(False)
        self.batch_size = cfg.batch_size
        self.path, self._enc = cfg.path, None
        from tuneforge.train.rollout import model_template

        self.template = model_template(self.model)  # a P-tuning reward model reads its own template's slots

    @staticmethod
    def _prompt_text(ids: list[int], policy_tok, fallback: str) -> str:
        """The policy's prompt as text *with* its chat markup (``<|im_start|>user ...``): a chat-trained reward model
        read those markers in training, and the special-token-free text other rewards get has lost them. The
        policy tokenizer's own leading specials (its bos) are left out: the reward tokenizer adds its own."""
        if policy_tok is None:
            return fallback
        from tuneforge.data.tokenize import leading_specials

        start = leading_specials(policy_tok)
        ids = ids[len(start):] if start and list(ids[:len(start)]) == start else ids
        return policy_tok.decode(ids, skip_special_tokens=False)

    def _encoder(self):
        """The data pipeline's encoder for the reward model's tokenizer: a prompt and a completion re-tokenized
        separately would differ at their seam from the joint encoding the head was trained on (SentencePiece's
        leading space, BPE merges across the boundary)."""
        if self._enc is None:
            from tuneforge.data.tokenize import Encoder

            self._enc = Encoder(self.tok, "preference", self.path, self.template)
        return self._enc

    def _conversation(self, messages, i: int) -> list[dict] | None:
        """Sample i's prompt turns, when they are to be encoded as a conversation (a templated reward model with a
        chat template, and a policy prompt that is one)."""
        if self.template is None or messages is None or not getattr(self.tok, "chat_template", None):
            return None
        turns = messages[i]
        return list(turns) if isinstance(turns, list) else None

    @torch.no_grad()
    def __call__(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], texts: tuple, policy_tok,
                 messages: list | None = None):
        """Scores (N,) of the completions; ``messages``: per sample, the prompt's turns when it is a conversation
        (else None), which a templated reward model encodes through its chat template."""
        from tuneforge.algorithms.reward import scores
        from tuneforge.data import collate
        from tuneforge.train.rollout import pad_id_of

        from tuneforge.data.template import without_slots

        same = policy_tok is not None and policy_tok.get_vocab() == self.tok.get_vocab() and self.template is None
        eos = self.tok.eos_token_id
        seqs = []
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            turns = self._conversation(messages, i)
            if turns is not None:  # as a conversational preference row: slots open every assistant turn
                head, (tail,) = self._encoder().encode_responses(turns, [[{"role": "assistant",
                                                                          "content": texts[1][i]}]])
                seqs.append({"input_ids": head + tail, "labels": head + tail})  # ends at its end-of-turn marker
                continue
            p = without_slots(p)  # the policy's P-tuning template slots are the policy's, not the reward model's
            if not same:  # re-tokenized as the reward model's training rows were encoded: jointly (no seam), + eos
                p, (c,) = self._encoder().encode_responses(self._prompt_text(p, policy_tok, texts[0][i]),
                                                           [texts[1][i]])
            c = list(c) if (c and c[-1] == eos) or eos is None else list(c) + [eos]
            seqs.append({"input_ids": list(p) + c, "labels": list(p) + c})
        dev = next(self.model.parameters()).device
        out: list[float] = []
        for s in range(0, len(seqs), self.batch_size):
            batch = {k: v.to(dev) for k, v in collate(seqs[s:s + self.batch_size], pad_id_of(self.tok)).items()}
            out += scores(self.model, batch).tolist()
        return out


def build(cfg, like=None) -> Callable:
    """A config -> the callable (text functions) or a ``ModelScorer`` (token-level) placed next to ``like``."""
    table = {"exact_match": lambda c: exact_match, "similarity": lambda c: similarity,
             "char_accuracy": lambda c: char_accuracy, "regex": lambda c: regex(c.pattern),
             "length": lambda c: length(c.target), "python": lambda c: import_function(c.function),
             "reward_model": lambda c: ModelScorer(c, like)}
    return table[cfg.name](cfg)


# ------------------------------------------------------------------------------------------------ combination
def combined_rewards(fns: list[tuple], prompts: list[str], completions: list[str], answers: list[str],
                     prompt_ids: list[list[int]], completion_ids: list[list[int]], where: list[str],
                     policy_tok=None, prompt_messages: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_k w_k r_k per sample (N,) in float64, and a (N,) bool of which samples have every reward finite.

    ``fns`` holds (label, weight, callable); ``where`` names each sample's data row (file:line) for messages;
    ``prompt_messages``: per sample, its prompt's turns when the prompt is a conversation (else None), for reward
    models that encode conversations themselves (``ModelScorer``).
    """
    total = torch.zeros(len(completions), dtype=torch.float64)
    valid = torch.ones(len(completions), dtype=torch.bool)
    for label, weight, fn in fns:
        try:
            if isinstance(fn, ModelScorer):
                values = fn(prompt_ids, completion_ids, (prompts, completions), policy_tok, prompt_messages)
            else:
                values = fn(prompts, completions, answers)
        except Exception as e:  # the user's function: report which one and on what, then stop
            rows = ", ".join(sorted(set(where))[:8])
            raise RewardError(f"reward function {label} raised {type(e).__name__}: {e} (scoring rows {rows})") from e
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise RewardError(f"reward function {label} returned {len(values)} values for {len(completions)} "
                              "completions; it must return one number per completion")
        for i, v in enumerate(values):
            try:
                x = float(v)
            except (TypeError, ValueError):
                x = math.nan
            if math.isfinite(x):
                total[i] += weight * x
            else:
                valid[i] = False
    return total, valid


def reward_functions(cfgs: list, like=None) -> list[tuple]:
    """(label, weight, callable) per config; reward models load next to the policy ``like`` (its device and dtype),
    or on the run's device in fp32 when no policy is given."""
    return [(f"{i}:{c.name}", c.weight, build(c, like)) for i, c in enumerate(cfgs)]
