"""UniPELT (Mao et al. 2022) and the gate option of LoRA and the bottleneck adapters: the gated forwards against
their formulas by hand, identity at init, closed-form counts, save/load, per-example selection, a KV cache, training
moves the gates and nothing frozen, merge refused, config errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import base_config

from tuneforge.config import RunConfig
from tuneforge.methods import (METHODS, adapter_scope, apply_methods, count_parameters, load_adapter, merge_methods,
                               read_adapter_config, save_adapter, weight_decays)
from tuneforge.methods import _soft_prompt as SP
from tuneforge.methods import lora, pfeiffer, prefix_tuning, unipelt
from tuneforge.methods._bottleneck import NotMergeableError, bottleneck_layers
from tuneforge.methods._inject import trainable_parameters
from tuneforge.models.tiny import build_tiny


def _ids(b=3, t=9, seed=0):
    return torch.randint(5, 60, (b, t), generator=torch.Generator().manual_seed(seed))


def _perturb(model, seed=3, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _gated_pair():
    return [lora.Config(rank=4, alpha=8, gate=True, target_modules=["q_proj", "v_proj"]),
            pfeiffer.Config(bottleneck=4, gate=True)]


# ----------------------------------------------------------------------------------------------- the formulas
def test_gated_lora_forward_by_hand():
    """y = W0 x + σ(W_g x + b_g) · s B A x, one gate per token, on random A, B and gate."""
    model, _ = build_tiny("llama")
    apply_methods(model, [lora.Config(rank=4, alpha=8, gate=True, target_modules=["q_proj"])])
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, lora.GatedLoraLayer) and not isinstance(layer, lora.LoraLayer)
    _perturb(model, scale=0.3)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    a, b, g = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_gate["default"]
    gate = torch.sigmoid(x @ g.weight.T + g.bias)  # (2, 5, 1)
    want = x @ layer.weight.T + gate * (8 / 4) * (x @ a.T @ b.T)
    assert torch.allclose(layer(x), want, atol=1e-5)
    assert gate.std() > 1e-3  # the gate differs from token to token


def test_gated_adapter_forward_by_hand():
    """h ← h + σ(W_g h + b_g) · U f(D h), h the FFN's output (the adapter's input)."""
    model, _ = build_tiny("llama")
    apply_methods(model, [pfeiffer.Config(bottleneck=4, gate=True)])
    layer = model.model.layers[0].mlp.down_proj
    _perturb(model, scale=0.3)
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1))
    h = layer.base(x)
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    gate = torch.sigmoid(h @ up.gate.weight.T + up.gate.bias)
    want = h + gate * (F.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)
    assert torch.allclose(layer(x), want, atol=1e-5)


def test_gates_start_near_a_half_and_the_gated_parts_are_the_identity_at_init():
    model, _ = build_tiny("llama")
    model.eval()
    ref = model(_ids()).logits
    apply_methods(model, _gated_pair())
    assert torch.equal(model(_ids()).logits, ref)  # B = 0 and U = 0: both gated terms are exactly 0
    gates = [layer.lora_gate["default"] for layer in lora.gated_layers(model).values()]
    gates += [layer.adapter_up["default"].gate for layer in bottleneck_layers(model).values()]
    assert len(gates) == 2 * 2 + 2
    for g in gates:
        assert torch.equal(g.bias, torch.zeros(1)) and 0.005 < float(g.weight.detach().std()) < 0.05


def test_unipelt_at_init_is_its_prefix_alone():
    """At step 0 UniPELT's gated LoRA and adapter add exactly nothing: the model equals prefix tuning with the same
    prefix."""
    model, _ = build_tiny("llama")
    model.eval()
    apply_methods(model, [unipelt.Config()])
    ours = model(_ids()).logits
    prefix = SP.state_dict(model, "unipelt", "default")
    alone, _ = build_tiny("llama")
    alone.eval()
    cfg = prefix_tuning.Config(num_virtual_tokens=10)
    apply_methods(alone, [cfg])
    prefix_tuning.load_state_dict(alone, cfg, prefix)
    assert torch.equal(alone(_ids()).logits, ours)
    base, _ = build_tiny("llama")
    assert not torch.allclose(base.eval()(_ids()).logits, ours, atol=1e-4)  # the prefix itself acts from step 0


# ------------------------------------------------------------------------------------------------------ counts
def unipelt_trainable(config, rank=8, n=10, reduction=16) -> int:
    """LoRA on W_q (d -> H hd) and W_v (d -> KV hd): r (in + out) + a gate (in + 1) each; a prefix n x L x 2 x KV hd;
    an adapter after each FFN: D (m x d) + m, U (d x m) + d and a gate d + 1, m = d / reduction."""
    d, L, H = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    kv, hd = getattr(config, "num_key_value_heads", None) or H, getattr(config, "head_dim", None) or d // H
    m = int(d // reduction)
    lora_part = rank * (d + H * hd) + rank * (d + kv * hd) + 2 * (d + 1)
    return L * (lora_part + (2 * d * m + m + d) + (d + 1)) + n * L * 2 * kv * hd


def test_trainable_count_on_the_tiny_llama():
    model, _ = build_tiny("llama")
    apply_methods(model, [unipelt.Config()])
    assert count_parameters(model)[0] == unipelt_trainable(model.config) == 6414


def test_trainable_count_on_a_7b_shaped_model():
    """Llama-2-7B's shape (32 layers, d 4096, 32 heads) on a weightless model: LoRA 8.4M (with 0.26M of gates),
    prefix 2.6M, adapters 16.8M."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                         intermediate_size=11008, vocab_size=32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    apply_methods(model, [unipelt.Config()])
    want = unipelt_trainable(config)
    assert count_parameters(model)[0] == want == 32 * (4 * 8 * 4096 + 2 * 4097 + 2 * 4096 * 256 + 256 + 4096 + 4097) \
        + 10 * 32 * 2 * 4096


def test_fused_query_value_projections_on_gpt2():
    model, _ = build_tiny("gpt2")
    apply_methods(model, [unipelt.Config()])
    assert sorted(p.rsplit(".", 1)[-1] for p in lora.gated_layers(model)) == ["c_attn", "c_attn"]
    assert sorted(p.split(".", 3)[-1] for p in bottleneck_layers(model)) == ["mlp.c_proj", "mlp.c_proj"]


# ------------------------------------------------------------------------------------------ the adapter contract
@pytest.mark.parametrize("kw", [{}, {"prefix_projection": True, "encoder_hidden_size": 8}, {"gate": False}])
def test_save_load_round_trip(tmp_path, kw):
    model, _ = build_tiny("llama")
    cfg = unipelt.Config(**kw)
    apply_methods(model, [cfg])
    _perturb(model)
    model.eval()
    ours = model(_ids()).logits
    save_adapter(model, [cfg], tmp_path / "ad")
    assert "tuneforge_method" in json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    fresh, _ = build_tiny("llama")
    assert load_adapter(fresh, tmp_path / "ad") == [cfg]
    assert torch.equal(fresh.eval()(_ids()).logits, ours)


@pytest.mark.parametrize("order", ["prompt_tuning first", "unipelt first"])
def test_unipelt_beside_another_soft_prompt_reloads(tmp_path, order):
    """Loading hands every soft-prompt method the keys ending in ``prompt_embeddings``; unipelt's adapter part takes
    only its own, so the other prompt's tensor is not refused as unexpected."""
    other = METHODS["prompt_tuning"].Config(num_virtual_tokens=2, init="random")
    cfgs = [other, unipelt.Config(num_virtual_tokens=3, rank=4)]
    cfgs = cfgs if order == "prompt_tuning first" else cfgs[::-1]
    model, _ = build_tiny("llama")
    apply_methods(model, cfgs)
    _perturb(model)
    ours = model.eval()(_ids()).logits
    save_adapter(model, cfgs, tmp_path / "ad")
    fresh, _ = build_tiny("llama")
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh.eval()(_ids()).logits, ours)


def test_a_plain_lora_beside_a_gated_one_saves_as_the_plain_adapter_alone(tmp_path):
    """A gated and a plain LoRA on one linear are two wrappers, one inside the other: each adapter's file still names
    the linear itself (no ``base_layer`` in keys or targets), so PEFT and a model without the other adapter load it."""
    from peft import PeftModel

    model, _ = build_tiny("llama")
    plain = lora.Config(rank=4)
    apply_methods(model, [plain], adapter="a")
    lora.apply(model, lora.Config(rank=4, gate=True), "b")
    _perturb(model)
    with adapter_scope(model, "a"):
        ours = model.eval()(_ids()).logits
    save_adapter(model, [plain], tmp_path / "a", adapter="a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "base_layer" not in config["target_modules"]
    fresh, _ = build_tiny("llama")
    load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh.eval()(_ids()).logits, ours)
    peft_model = PeftModel.from_pretrained(build_tiny("llama")[0], str(tmp_path / "a")).eval()
    assert (peft_model(_ids()).logits - ours).abs().max() < 1e-5
    save_adapter(model, [lora.Config(rank=4, gate=True)], tmp_path / "b", adapter="b")  # and the gated one
    with adapter_scope(model, "b"):
        gated = model(_ids()).logits
    fresh, _ = build_tiny("llama")
    load_adapter(fresh, tmp_path / "b")
    assert torch.equal(fresh.eval()(_ids()).logits, gated)


def test_gguf_lora_export_refuses_a_gated_lora_before_loading_anything():
    from tuneforge.export.gguf import GgufExportError, check_lora_methods

    check_lora_methods([lora.Config(rank=4)])
    with pytest.raises(GgufExportError, match="gated LoRA.*serve it beside the base model"):
        check_lora_methods([lora.Config(rank=4, gate=True)])


def test_a_gated_lora_is_saved_in_tuneforges_layout_not_as_a_peft_lora(tmp_path):
    model, _ = build_tiny("llama")
    cfg = lora.Config(rank=4, gate=True)
    apply_methods(model, [cfg])
    _perturb(model)
    model.eval()
    ours = model(_ids()).logits
    save_adapter(model, [cfg], tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert "peft_type" not in config and config["tuneforge_method"][0]["gate"] is True
    assert read_adapter_config(tmp_path / "ad") == [cfg]
    fresh, _ = build_tiny("llama")
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh.eval()(_ids()).logits, ours)
    plain = lora.Config(rank=4)  # an ungated LoRA stays a PEFT LoRA
    model, _ = build_tiny("llama")
    apply_methods(model, [plain])
    save_adapter(model, [plain], tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_per_example_adapters_in_one_batch_equal_one_by_one():
    model, _ = build_tiny("llama")
    apply_methods(model, [unipelt.Config()], adapter="a")
    apply_methods(model, [unipelt.Config(num_virtual_tokens=4, rank=2)], adapter="b")
    _perturb(model, scale=0.2)
    model.eval()
    ids, names = _ids(4), ["b", None, "a", "b"]
    with adapter_scope(model, names):
        mixed = model(ids).logits
    for i, n in enumerate(names):
        with adapter_scope(model, n):
            assert torch.allclose(model(ids[i:i + 1]).logits, mixed[i:i + 1], atol=1e-5), (i, n)


def test_decoding_with_a_kv_cache_equals_a_full_forward():
    """Per-token gates and a prefix that lives in the cache: feeding the tokens one by one through the cache gives
    the logits of one forward over the whole sequence (a sequence-mean gate would not)."""
    model, _ = build_tiny("llama")
    apply_methods(model, [unipelt.Config()])
    _perturb(model, scale=0.2)
    model.eval()
    ids = _ids(2, 8)
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(5, 8):
        out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_gated_lora_is_not_folded_into_rollouts_packed_weights():
    """Rollouts on CPU fold additive LoRA into a packed weight; a gated LoRA is no weight update and keeps its own
    path (its layer type is not a LoraLayer), so sampling sees the same model as training."""
    from tuneforge.train.rollout import onednn_linears

    model, _ = build_tiny("llama")
    apply_methods(model, [lora.Config(rank=4, gate=True)])
    _perturb(model, scale=0.3)
    model.eval()
    with torch.no_grad():
        want = model(_ids()).logits
        with onednn_linears(model, 3):
            got = model(_ids()).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_gate_weights_decay_and_gate_biases_do_not():
    model, _ = build_tiny("llama")
    apply_methods(model, [unipelt.Config()])
    decays = weight_decays(model, trainable_parameters(model))
    gates = {n: d for n, d in decays.items() if "gate" in n}
    assert len(gates) == 2 * (2 * 2 + 2)
    assert all(d == n.endswith(".weight") for n, d in gates.items())


def test_three_steps_move_the_gates_and_leave_the_base_frozen(tmp_path, pc_file):
    from tuneforge import api

    d = base_config(tmp_path, pc_file, max_steps=3, learning_rate=1e-2)
    d["method"] = [{"name": "unipelt", "num_virtual_tokens": 4}]
    torch.manual_seed(0)
    base = {n: p.detach().clone() for n, p in build_tiny("llama")[0].named_parameters()}
    seen = {}

    def snapshot(loop):
        if "before" not in seen:
            seen["loop"], seen["before"] = loop, {n: p.detach().clone() for n, p in loop.params.items()}

    api.train(RunConfig.model_validate(d), hooks={"after_backward": snapshot})
    loop, before = seen["loop"], seen["before"]
    gates = [n for n in loop.params if "gate" in n]
    assert len(gates) == 2 * (2 * 2 + 2)
    assert all(not torch.equal(loop.params[n], before[n]) for n in gates)
    frozen = {n.replace(".base.", "."): p for n, p in loop.model.named_parameters() if n not in loop.params}
    assert set(frozen) == set(base) and all(torch.equal(p, base[n]) for n, p in frozen.items())


# ---------------------------------------------------------------------------------------------------- merging
def test_merge_is_refused_before_anything_is_merged():
    model, _ = build_tiny("llama")
    cfgs = [METHODS["ia3"].Config(), lora.Config(rank=4, gate=True, target_modules=["q_proj"])]
    apply_methods(model, cfgs)
    _perturb(model)
    model.eval()
    before = model(_ids()).logits
    with pytest.raises(NotMergeableError, match="gated LoRA .* cannot be folded into the base weights"):
        merge_methods(model, cfgs)
    with pytest.raises(NotMergeableError, match="cannot be folded"):
        lora.merge(model)
    assert torch.equal(model(_ids()).logits, before)  # IA3 still unmerged, nothing changed
    model, _ = build_tiny("llama")
    cfg = unipelt.Config()
    apply_methods(model, [cfg])
    with pytest.raises(NotMergeableError, match="unipelt's gates depend on each token's input"):
        merge_methods(model, [cfg])


def test_merge_refuses_a_gated_qlora_before_dequantising():
    from tuneforge.methods import qlora

    model, _ = build_tiny("llama")
    cfg = qlora.Config(rank=4, gate=True)
    apply_methods(model, [cfg])
    with pytest.raises(NotMergeableError, match="gated LoRA"):
        merge_methods(model, [cfg])
    assert qlora.quantized_layers(model)


# ---------------------------------------------------------------------------------------------- config errors
def test_config_errors():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="gate and dora do not combine"):
        lora.Config(gate=True, dora=True)
    with pytest.raises(ValidationError, match="extra"):
        unipelt.Config(lora_rank=8)
    with pytest.raises(ValidationError, match="init: text needs init_text"):
        unipelt.Config(prefix_init="text")
    with pytest.raises(ValidationError, match="give bottleneck or reduction_factor, not both"):
        unipelt.Config(bottleneck=8, reduction_factor=4)
    with pytest.raises(ValidationError):
        unipelt.Config(num_virtual_tokens=0)


def test_refusals_when_applied():
    model, _ = build_tiny("llama")
    apply_methods(model, [lora.Config(rank=4)])
    with pytest.raises(ValueError, match="already has LoRA"):
        unipelt.apply(model, unipelt.Config())
    with pytest.raises(ValueError, match="list the bottleneck adapters last"):
        apply_methods(build_tiny("llama")[0], [unipelt.Config(), lora.Config()])
    from transformers import AutoModelForCausalLM, OPTConfig

    opt = AutoModelForCausalLM.from_config(OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     ffn_dim=32, vocab_size=64, word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="no default adapter position .* set adapter_targets"):
        apply_methods(opt, [unipelt.Config()])
