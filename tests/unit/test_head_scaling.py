"""Token log-probs equal the model's own logits on every architecture ``arch.py`` names, including models that
scale or cap their logits after the output head (Granite's ``logits_scaling``, MiniCPM3's hidden-state scaling,
FalconH1's ``lm_head_multiplier``, Gemma 2's soft-capping, Cohere's ``logit_scale``): the fused head path proves
itself on the first batch and falls back to the model's forward when it would be wrong."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import tuneforge.algorithms._logps as L
from tuneforge.models import arch
from tuneforge.models.load import ENCODER_TYPES

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=96, max_position_embeddings=128, n_embd=32, n_layer=2, n_head=4,
             n_positions=128, n_inner=64, ffn_dim=64, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
             head_dim=8, moe_intermediate_size=32, pad_token_id=0)
PER_TYPE = {
    "falcon": {"head_dim": None},  # derived from hidden size / heads
    "gptj": {"rotary_dim": 4},
    "minicpm3": {"head_dim": 4, "num_key_value_heads": 4, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "kv_lora_rank": 8,
                 "q_lora_rank": 16, "dim_model_base": 8},  # hidden states scaled by 8 / 32 before the head
    "granite": {"logits_scaling": 8.0},
    "granitemoe": {"logits_scaling": 8.0},
    "falcon_h1": {"lm_head_multiplier": 0.25, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8,
                  "mamba_d_state": 8, "mamba_chunk_size": 8},
}
SCALED = {"granite", "granitemoe", "minicpm3", "falcon_h1", "gemma2", "cohere"}
# the decoder-only types with curated targets (encoders classify, encoder-decoders have their own tests)
TYPES = sorted((set(arch._DEFAULT_TARGETS) | SCALED) - set(ENCODER_TYPES) - {"t5", "mt5", "umt5"})


def _tiny(model_type: str, **extra):
    cfg = AutoConfig.for_model(model_type)
    for k, v in {**SMALL, **PER_TYPE.get(model_type, {}), **extra}.items():
        if v is not None and (hasattr(cfg, k) or k in PER_TYPE.get(model_type, {})):
            setattr(cfg, k, v)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (2, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    labels[1, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return -F.cross_entropy(logits[keep].float(), targets[keep], reduction="none")


@pytest.mark.parametrize("model_type", TYPES)
def test_token_logps_equal_model_logits(model_type):
    model = _tiny(model_type).eval()
    batch = _batch()
    with torch.no_grad():
        ours, _ = L.supervised_token_logps(model, batch)
        want = _reference_logps(model, batch)
        rows, _ = L.token_logps_and_hidden(model, batch)[:2]
    assert torch.allclose(ours, want, atol=1e-4), (model_type, float((ours - want).abs().max()))
    assert torch.allclose(rows[batch["labels"][:, 1:] != -100], want, atol=1e-4)
    if model_type in SCALED:  # the fused head must not have been used
        assert L._head(model) is None


def test_granite_scaled_logits_nll_matches_transformers_loss():
    """The case the review reproduced: logits_scaling=8, tuneforge's NLL equals transformers' own loss."""
    model = _tiny("granite").eval()
    batch = _batch()
    with torch.no_grad():
        s, n = L.token_cross_entropy_sum(model, batch)
        hf = model(**batch).loss
    assert abs(float(s) / n - float(hf)) < 1e-4


def test_check_leaves_the_rng_stream_alone_and_sees_through_dropout():
    """The one-off check runs two forwards under a forked RNG: with dropout active both draw the same masks (so a
    plain head passes), and the caller's random stream is where it was (so resumed runs stay exact)."""
    model = _tiny("llama", attention_dropout=0.3).train()
    before = torch.get_rng_state()
    ok, diff = L.head_matches_logits(model, model.get_output_embeddings(), {k: v for k, v in _batch().items()
                                                                             if k != "labels"})
    assert ok and diff < 1e-5
    assert torch.equal(torch.get_rng_state(), before)


def test_check_never_computes_full_sequence_logits():
    """The check compares only the last CHECK_POSITIONS positions: the output head never sees (T, V) logits, which
    for a large vocabulary and a long row would be gigabytes on the first batch."""
    model = _tiny("granite").eval()
    T = 3 * L.CHECK_POSITIONS
    ids = torch.randint(1, 96, (1, T))
    widths = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: widths.append(o.shape[1]))
    try:
        ok, _ = L.head_matches_logits(model, model.get_output_embeddings(),
                                      {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    finally:
        hook.remove()
    assert not ok  # Granite divides by logits_scaling: still caught on the last positions
    assert widths and max(widths) == L.CHECK_POSITIONS


def test_check_runs_under_a_per_example_adapter_selection():
    """A mixed-task batch names one adapter per row; the one-row check must not slice against that (it crashed)."""
    from tuneforge.methods import lora
    from tuneforge.methods._scope import adapter_scope

    model = _tiny("llama")
    for name in ("a", "b"):
        lora.apply(model, lora.Config(rank=2, init="gaussian"), adapter=name)
    model.eval()
    batch = _batch()
    L._HEAD_CHECKED.pop(model, None)
    with torch.no_grad(), adapter_scope(model, ["a", "b"]):
        ours, _ = L.supervised_token_logps(model, batch)
        want = _reference_logps(model, batch)
    assert L._HEAD_CHECKED[model] is True
    assert torch.allclose(ours, want, atol=1e-4)
