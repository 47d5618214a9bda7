"""Shared fixtures: tiny models and data files built in code (no downloads), threads pinned for determinism."""

import json
import os
import sys

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
sys.path.insert(0, os.path.dirname(__file__))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture
def pc_file(tmp_path):
    """Prompt/completion rows of the copy task."""
    from tuneforge.tasks import make_examples

    return write_jsonl(tmp_path / "train.jsonl", make_examples("copy", 64, seed=1))


def base_config(tmp_path, data, **train):
    """A minimal run config dict on the tiny llama: fp32, no progress bar, small batches."""
    t = {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 4, "learning_rate": 1e-3,
         "precision": "fp32", "progress": False, "tensorboard": False, "log_every": 1000}
    t.update(train)
    return {"model": {"path": "tiny:llama"}, "data": {"train": data, "max_len": 64},
            "method": [{"name": "lora", "rank": 4}], "train": t}


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory):
    """The demo's pretrained tiny Llama (copying and sorting at ~100%, reversal at ~0%), built once per session:
    about 50 s of CPU, so every learning test fine-tunes the same base instead of pretraining its own."""
    from tuneforge.demo import DemoPlan, pretrain

    out = tmp_path_factory.mktemp("demo_base")
    return pretrain(out, DemoPlan()), out


def run_cli(argv, capsys):
    """``tuneforge <argv>`` in-process: (exit code, stdout, stderr)."""
    from tuneforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def perturb_trainable(model, std=0.5):
    """Every trainable tensor drawn from N(0, std^2): an adapter that visibly changes the output."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, std)
    return model


def assert_we_load_peft(pm, fresh, inputs: dict, path) -> None:
    """A PEFT model with random trainable weights is saved; ``fresh`` (the same base) loads it with equal logits."""
    import torch

    from tuneforge.methods import load_adapter

    perturb_trainable(pm).save_pretrained(path)
    with torch.no_grad():
        want = pm.eval()(**inputs).logits
        load_adapter(fresh.eval(), path)
        torch.testing.assert_close(fresh(**inputs).logits, want, atol=1e-5, rtol=0)
