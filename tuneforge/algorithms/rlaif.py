"""RLAIF: preferences labelled by an AI judge instead of people (Bai et al. 2022, Constitutional AI,
https://arxiv.org/abs/2212.08073, sec. 4; Lee et al. 2023, https://arxiv.org/abs/2309.00267).

The judge is any local causal LM prompted with a rubric (a "constitution") showing the request and two responses,
asked which is better. Its preference is read off the next-token distribution rather than from sampled text:

    P(A better) = softmax([logit("A"), logit("B")])_A                   (Lee et al. 2023, sec. 2.1)

LMs prefer whichever response is shown first (position bias), so each pair is judged in both orders and averaged:
P(a ≻ b) = ½ [P_A(a, b) + 1 − P_A(b, a)]   (Lee et al. 2023, sec. 2.1.2; Zheng et al. 2023, MT-Bench). A Python
callable ``fn(prompt, a, b) -> P(a ≻ b)`` can stand in for the model.

The labels feed the other algorithms: ``tuneforge label`` writes preference rows {prompt, chosen, rejected} for
``reward`` or ``dpo``, and ``algorithm: rlaif`` is online DPO whose pairs this judge labels on the fly (Guo et al.
2024's OAIF).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tuneforge.algorithms import online_dpo
from tuneforge.algorithms._reference import prepare_reference

DATA_FORMATS = online_dpo.DATA_FORMATS
DISABLE_DROPOUT_DEFAULT = online_dpo.DISABLE_DROPOUT_DEFAULT

RUBRIC = ("Compare two responses to the request. The better response is correct, follows the instruction exactly, "
          "and is harmless.\nRequest: {prompt}\nResponse A: {a}\nResponse B: {b}\nBetter response: ")


class Judge(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = Field(None, description="local model directory (or tiny:<preset>) of the judge LM")
    adapter: str | None = Field(None, description="adapter directory to load on the judge model")
    template: str = Field(RUBRIC, description="rubric with {prompt}, {a} and {b} placeholders")
    choices: tuple[str, str] = ("A", "B")
    function: str | None = Field(None, description="module:function or file.py:function returning P(a better)")
    batch_size: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.function is None):
            raise ValueError("a judge needs exactly one of model (a local LM) or function (a Python callable)")
        for key in ("{prompt}", "{a}", "{b}"):
            if self.model and key not in self.template:
                raise ValueError(f"judge.template lacks the {key} placeholder")
        return self


class Config(online_dpo.Config):
    name: Literal["rlaif"] = "rlaif"
    judge: Judge


class LMJudge:
    """A judge LM scoring P(first response better) from the logits of the two choice tokens."""

    def __init__(self, cfg: Judge, like=None):
        from tuneforge.algorithms.rewards import load_scoring_model
        from tuneforge.methods import load_adapter

        self.model, self.tok = load_scoring_model(cfg.model, like)  # next to the policy ``like``, in its dtype
        if cfg.adapter:
            load_adapter(self.model, cfg.adapter)
        self.model.eval().requires_grad_(False)
        self.cfg = cfg
        ids = [self.tok(c, add_special_tokens=False)["input_ids"] for c in cfg.choices]
        if any(len(i) == 0 for i in ids) or ids[0][0] == ids[1][0]:
            raise ValueError(f"judge.choices {cfg.choices} must start with two different tokens")
        self.choice_ids = [i[0] for i in ids]

    @torch.no_grad()
    def first_better(self, prompts: list[str], a: list[str], b: list[str]) -> torch.Tensor:
        """P_A for each (prompt, a, b) as shown, (N,) float64."""
        from tuneforge.train.rollout import _left_pad, encode_prompt, model_template, pad_id_of

        texts = [self.cfg.template.format(prompt=p, a=x, b=y) for p, x, y in zip(prompts, a, b)]
        out = []
        dev = next(self.model.parameters()).device
        template = model_template(self.model)
        for s in range(0, len(texts), self.cfg.batch_size):
            enc = [encode_prompt(self.tok, t, template) for t in texts[s:s + self.cfg.batch_size]]
            ids, mask = _left_pad(enc, pad_id_of(self.tok))
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev)
                                ).logits[:, -1, self.choice_ids].double()  # (b, 2)
            out.append(logits.softmax(-1)[:, 0].cpu())
        return torch.cat(out)

    def __call__(self, prompts: list[str], a: list[str], b: list[str]) -> torch.Tensor:
        return debiased(self.first_better, prompts, a, b)


def debiased(first_better, prompts: list[str], a: list[str], b: list[str]) -> torch.Tensor:
    """P(a ≻ b) averaged over both presentation orders (cancels position bias)."""
    forward = torch.as_tensor(first_better(prompts, a, b), dtype=torch.float64)
    backward = torch.as_tensor(first_better(prompts, b, a), dtype=torch.float64)
    return 0.5 * (forward + 1.0 - backward)


def build_judge(cfg: Judge, like=None):
    """A judge callable; an LM judge loads next to the policy ``like`` (its device and dtype), or on the run's device
    in fp32 without one (``tuneforge label``)."""
    if cfg.function:
        from tuneforge.algorithms.rewards import import_function

        fn = import_function(cfg.function)
        return lambda p, a, b: debiased(lambda *x: [float(fn(*t)) for t in zip(*x)], p, a, b)
    return LMJudge(cfg, like)


def judge_labeler(judge):
    """Labels rollout pairs (2 completions per prompt) with P(first better) from the judge."""

    def label(roll, rows, owner, ctx) -> torch.Tensor:
        tok = ctx.algo_state["tokenizer"]
        prompts = [tok.decode(roll.prompt_ids[i], skip_special_tokens=True) for i in range(0, len(owner), 2)]
        p = judge(prompts, roll.texts[0::2], roll.texts[1::2])
        return torch.where(torch.isfinite(p), p, torch.full_like(p, float("nan")))

    return label


# ------------------------------------------------------------------------------------------- the algorithm
def prepare(model, cfg: Config, state: dict) -> None:
    prepare_reference(model, cfg.reference, state, "rlaif")
    state["labeler"] = judge_labeler(build_judge(cfg.judge, like=model))


make_experience = online_dpo.make_experience
step = online_dpo.step


# ------------------------------------------------------------------------------------- offline labelling
def judge_text(x) -> str:
    """What the judge's rubric shows for a prompt or response: a string as it is, messages as ``role: content``
    lines (the judge reads a transcript; the policy's own chat template is not the judge's)."""
    if isinstance(x, str):
        return x
    return "\n".join(f"{m['role']}: {m['content']}" for m in x)


def label_rows(judge, rows: list[dict]) -> tuple[list[dict], int]:
    """Rows {prompt, responses: [a, b]} -> preference rows {prompt, chosen, rejected, judge_p}; ties skipped. Prompts
    and responses keep their form (strings, or messages for conversational rows), so the labelled file trains a chat
    model through its chat template."""
    prompts = [judge_text(r["prompt"]) for r in rows]
    p = judge(prompts, [judge_text(r["responses"][0]) for r in rows], [judge_text(r["responses"][1]) for r in rows])
    out, ties = [], 0
    for r, q in zip(rows, p.tolist()):
        a, b = r["responses"][:2]
        if q != q or q == 0.5 or a == b:
            ties += 1
            continue
        chosen, rejected = (a, b) if q > 0.5 else (b, a)
        out.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected, "judge_p": round(max(q, 1 - q), 6)})
    return out, ties


def read_response_pairs(path: str | Path) -> list[dict]:
    """Rows for ``tuneforge label``: {"prompt", "responses": [a, b]}, or {"prompt", "chosen", "rejected"} whose
    order the judge ignores (for measuring a judge against known labels). Either may be conversational (a prompt of
    messages; responses as assistant messages; or chosen/rejected as whole conversations sharing their opening)."""
    from tuneforge.data import read_rows
    from tuneforge.data.report import DataError
    from tuneforge.data.schema import RowError, validate

    rows = []
    for i, r in enumerate(read_rows(str(path)), 1):
        if isinstance(r, dict) and isinstance(r.get("responses"), list) and len(r["responses"]) >= 2 and \
                r["responses"][0] == r["responses"][1]:  # nothing to judge: counted as a tie by label_rows
            rows.append({"prompt": r.get("prompt", ""), "responses": r["responses"][:2]})
            continue
        try:
            if isinstance(r, dict) and isinstance(r.get("responses"), list) and len(r["responses"]) >= 2:
                prompt, responses = validate({"prompt": r.get("prompt", ""), "chosen": r["responses"][0],
                                              "rejected": r["responses"][1]}, "preference")
            elif isinstance(r, dict) and "chosen" in r and "rejected" in r:
                prompt, responses = validate(r, "preference")
            else:
                raise RowError("expected prompt + responses: [a, b] (or chosen + rejected)")
        except RowError as e:
            raise DataError(f"{path}:{i}: {e}") from None
        rows.append({"prompt": prompt, "responses": responses[:2]})
    return rows
