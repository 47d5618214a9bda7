"""Every method under every algorithm: 3 optimizer steps of each pair on the tiny Llama, through the real
``api.train`` (config validation, algorithm prepare, the one loop, final save). Each pair must produce finite
losses, move its trainable parameters, and leave a saved adapter/model behind."""

import pytest
import torch
from conftest import base_config, write_jsonl

from tuneforge.algorithms import ALGORITHMS
from tuneforge.api import train
from tuneforge.config import load_config
from tuneforge.tasks import make_examples, preference_pairs

METHODS = {  # name -> method config on the tiny llama (bias-free: bitfit adds biases)
    "full": {"name": "full"}, "freeze": {"name": "freeze", "top_k": 1}, "bitfit": {"name": "bitfit", "add_bias": True},
    "diff_pruning": {"name": "diff_pruning", "density": 0.01},
    "sparse": {"name": "sparse", "density": 0.01, "selection": "gradient", "calibration_batches": 1},
    "lora": {"name": "lora", "rank": 4}, "dora": {"name": "lora", "rank": 4, "dora": True},
    "qlora": {"name": "qlora", "rank": 4}, "lokr": {"name": "lokr", "rank": 2}, "ia3": {"name": "ia3"},
    "lora+ia3": [{"name": "lora", "rank": 4}, {"name": "ia3"}],
    "houlsby": {"name": "houlsby", "bottleneck": 4}, "pfeiffer": {"name": "pfeiffer", "bottleneck": 4},
    "parallel": {"name": "parallel", "bottleneck": 4}, "scaled_parallel": {"name": "scaled_parallel", "bottleneck": 4},
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 4},
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": 3, "projection": True, "encoder_hidden_size": 8},
    "p_tuning": {"name": "p_tuning", "num_virtual_tokens": 3, "encoder": "lstm", "encoder_hidden_size": 8},
    "p_tuning_template": {"name": "p_tuning", "template": "[P:2] {prompt} [P:2]", "encoder": "lstm",
                          "encoder_hidden_size": 8},  # virtual tokens before and after the prompt
    "p_tuning_v2": {"name": "p_tuning_v2", "num_virtual_tokens": 3},
    "mam": [{"name": "prefix_tuning", "num_virtual_tokens": 3}, {"name": "parallel", "bottleneck": 4}],
    "compacter": {"name": "compacter", "bottleneck": 4}, "compacter_pp": {"name": "compacter_pp", "bottleneck": 8},
    "adapter_bias": {"name": "adapter_bias"},
    "adapter_drop": [{"name": "houlsby", "bottleneck": 4}, {"name": "adapter_drop", "drop_layers": 1, "random": True}],
    "adapter_fusion": {"name": "adapter_fusion", "adapters": "MEMBERS"},  # two Pfeiffer adapters (``files``)
    "intrinsic": {"name": "intrinsic", "dimension": 32}, "intrinsic_said": {"name": "intrinsic", "dimension": 48,
                                                                            "said": True, "projection": "dense"},
    "unipelt": {"name": "unipelt", "num_virtual_tokens": 3, "rank": 4},
}
ONLINE = {"max_new_tokens": 4, "rewards": [{"name": "length", "target": 2}]}
ALGORITHM_CONFIGS = {
    "sft": {}, "reward": {}, "dpo": {"beta": 0.1}, "orpo": {"lam": 0.5},
    "grpo": {**ONLINE, "num_generations": 2}, "ppo": {**ONLINE, "ppo_epochs": 2},
    "rejection_sampling": {**ONLINE, "num_samples": 2}, "online_dpo": ONLINE,
    "rlaif": {"max_new_tokens": 4, "judge": {"function": "JUDGE"}},
    "classification": {},  # the tiny Llama with a score head (LlamaForSequenceClassification)
}


def test_every_algorithm_is_in_the_matrix():
    assert set(ALGORITHM_CONFIGS) == set(ALGORITHMS)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("matrix")
    judge = d / "judge.py"
    judge.write_text("def shorter(prompt, a, b):\n    return 1.0 if len(a) < len(b) else 0.0\n")
    return {"members": _fusion_members(d),
            "pc": write_jsonl(d / "pc.jsonl", make_examples("copy", 24, seed=1)),
            "pref": write_jsonl(d / "pref.jsonl", preference_pairs("reverse", 24, seed=1)),
            "cls": write_jsonl(d / "cls.jsonl", [{"text": r["prompt"], "label": len(r["prompt"]) % 2}
                                                 for r in make_examples("copy", 24, seed=1)]),
            "judge": f"{judge}:shorter"}


def _fusion_members(d) -> list[str]:
    """Two trained-looking Pfeiffer adapters on the tiny llama, for AdapterFusion's row."""
    from tuneforge.methods import METHODS as REGISTRY
    from tuneforge.methods import apply_methods, save_adapter
    from tuneforge.methods._inject import trainable_parameters
    from tuneforge.models.tiny import build_tiny

    out = []
    for i in range(2):
        model, cfg = build_tiny("llama")[0], REGISTRY["pfeiffer"].Config(bottleneck=4)
        apply_methods(model, [cfg])
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in trainable_parameters(model).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        out.append(str(save_adapter(model, [cfg], d / f"member{i}")))
    return out


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("algorithm", list(ALGORITHM_CONFIGS))
def test_method_trains_under_algorithm(method, algorithm, files, tmp_path):
    algo = {"name": algorithm, **ALGORITHM_CONFIGS[algorithm]}
    if algorithm == "rlaif":
        algo["judge"] = {"function": files["judge"]}
    data = files["pref"] if algorithm in ("reward", "dpo", "orpo") else files["cls" if algorithm == "classification"
                                                                              else "pc"]
    cfg = base_config(tmp_path, data, max_steps=3, batch_size=2, learning_rate=1e-2)
    m = METHODS[method]
    m = [{**c, "adapters": files["members"]} if c.get("adapters") == "MEMBERS" else c
         for c in (m if isinstance(m, list) else [m])]
    cfg.update(method=m, algorithm=algo)
    before = {}

    def snapshot(loop):
        if not before:
            before.update({n: p.detach().clone() for n, p in loop.params.items()})

    out = train(load_config(cfg), hooks={"after_backward": snapshot})
    history = out.result.history
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history), history
    assert out.result.state.skipped_steps == 0
    moved = [n for n, p in _final_params(out).items() if n in before and not torch.equal(p, before[n])]
    assert moved, f"{method} under {algorithm}: no trainable tensor changed in 3 steps"
    assert out.saved is not None and out.saved.exists()


def _final_params(out):
    from tuneforge.safeio import load_safetensors

    return load_safetensors(out.result.checkpoint / "model.safetensors")
