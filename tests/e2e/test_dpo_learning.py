"""DPO learns a preference the base model does not have: on the demo's base (which copies well and cannot reverse),
pairs prefer the reversed string over the copied one. Held-out preference accuracy (log p(chosen) > log p(rejected))
was measured at 46.5% before and 93% after 60 LoRA steps of DPO (99% with ORPO, λ = 0.5); the test asks for +25
points and a clearly larger margin."""

from pathlib import Path

import pytest

from tuneforge.api import train
from tuneforge.config import ModelConfig, load_config
from tuneforge.data import build_dataset
from tuneforge.eval.metrics import preference_accuracy
from tuneforge.methods import load_adapter
from tuneforge.models.load import load_model
from tuneforge.tasks import preference_pairs, write_jsonl

pytestmark = pytest.mark.slow


def _accuracy(base: str, adapter: str | None, eval_file: Path) -> dict:
    model, tok = load_model(ModelConfig(path=base))
    if adapter:
        load_adapter(model, adapter)
    return preference_accuracy(model, build_dataset(str(eval_file), tok, max_len=64), tok.pad_token_id or 0)


@pytest.mark.parametrize("algorithm", [{"name": "dpo", "beta": 0.1}, {"name": "orpo", "lam": 0.5}])
def test_preference_training_raises_held_out_accuracy_and_margin(demo_base, tmp_path, algorithm):
    base, _ = demo_base
    write_jsonl(preference_pairs("reverse", 2000, seed=1), tmp_path / "pairs.jsonl")
    write_jsonl(preference_pairs("reverse", 200, seed=2), tmp_path / "eval.jsonl")
    before = _accuracy(base, None, tmp_path / "eval.jsonl")
    cfg = load_config({"model": {"path": base}, "data": {"train": str(tmp_path / "pairs.jsonl"), "max_len": 64},
                       "method": [{"name": "lora", "rank": 8, "alpha": 16}], "algorithm": algorithm,
                       "train": {"output_dir": str(tmp_path / "dpo"), "max_steps": 60, "batch_size": 16,
                                 "learning_rate": 2e-3, "warmup_steps": 6, "precision": "fp32", "progress": False,
                                 "tensorboard": False}})
    after = _accuracy(base, str(train(cfg).saved), tmp_path / "eval.jsonl")
    assert after["preference_accuracy"] >= before["preference_accuracy"] + 0.25, (before, after)
    assert after["logp_margin"] > 0 > before["logp_margin"] or after["logp_margin"] > before["logp_margin"] + 5


def test_reward_model_reaches_90_percent_held_out_pairwise_accuracy(demo_base, tmp_path):
    """Measured: 98% on 200 held-out pairs after 300 LoRA steps (lr 2e-3, batch 16), ~21 s."""
    from tuneforge.algorithms.reward import load_head, score_dataset

    base, _ = demo_base
    write_jsonl(preference_pairs("reverse", 2000, seed=1), tmp_path / "pairs.jsonl")
    write_jsonl(preference_pairs("reverse", 200, seed=2), tmp_path / "eval.jsonl")
    cfg = load_config({"model": {"path": base}, "data": {"train": str(tmp_path / "pairs.jsonl"), "max_len": 64},
                       "method": [{"name": "lora", "rank": 8, "alpha": 16}], "algorithm": {"name": "reward"},
                       "train": {"output_dir": str(tmp_path / "rm"), "max_steps": 300, "batch_size": 16,
                                 "learning_rate": 2e-3, "warmup_steps": 6, "precision": "fp32", "progress": False,
                                 "tensorboard": False}})
    saved = train(cfg).saved
    model, tok = load_model(ModelConfig(path=base))
    load_adapter(model, saved)
    load_head(model, saved)
    res = score_dataset(model.eval(), build_dataset(str(tmp_path / "eval.jsonl"), tok, max_len=64), tok.pad_token_id or 0)
    assert sum(c > r for c, r in res) / len(res) >= 0.90
