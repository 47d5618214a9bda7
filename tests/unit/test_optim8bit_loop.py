"""The 8-bit AdamW option in the training loop: it trains, resumes exactly, and its impossible settings fail in
the config (before any model loads)."""

import pytest
import torch
from conftest import base_config

from tuneforge import api
from tuneforge.config import ConfigError, RunConfig, load_config
from tuneforge.safeio import load_safetensors


def _cfg(tmp_path, data, **train):
    d = base_config(tmp_path, data, optimizer="adamw8bit", **train)
    d["method"] = [{"name": "full"}]  # big enough tensors to take the 8-bit path
    return RunConfig.model_validate(d)


def test_adamw8bit_trains_and_resumes_bitwise(tmp_path, pc_file):
    full = api.train(_cfg(tmp_path / "a", pc_file, max_steps=6, learning_rate=1e-3))
    assert full.result.history[-1]["loss"] < full.result.history[0]["loss"]
    cut = _cfg(tmp_path / "b", pc_file, max_steps=6, learning_rate=1e-3, save_every=3, keep_last=5)
    from tuneforge.train.adam8bit import AdamW8bit

    seen = {}
    api.train(cut, hooks={"after_clip": lambda loop: seen.setdefault("opt", loop.opt)})
    assert isinstance(seen["opt"], AdamW8bit)
    resumed = api.train(cut, resume=str(tmp_path / "b" / "run" / "checkpoints" / "step-00000003"))
    a = load_safetensors(full.saved / "model.safetensors")
    b = load_safetensors(resumed.saved / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_offload_runs_on_cpu(tmp_path, pc_file):
    out = api.train(_cfg(tmp_path, pc_file, max_steps=2, optimizer_offload=True))
    assert len(out.result.history) == 2


@pytest.mark.parametrize("train,match", [({"optimizer_offload": True}, "need optimizer: adamw8bit"),
                                         ({"optimizer": "adamw8bit", "paged_optimizer": True}, "CUDA")])
def test_impossible_optimizer_settings_fail_in_config(tmp_path, pc_file, train, match):
    if "paged_optimizer" in train and torch.cuda.is_available():
        pytest.skip("paged optimizers are allowed on CUDA")
    d = base_config(tmp_path, pc_file, **train)
    with pytest.raises(ConfigError, match=match):
        load_config(d)
