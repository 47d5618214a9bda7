"""The chunked head + softmax equals the plain head + log_softmax in value and gradient, frozen or trainable head;
frozen weights kept in bf16 give the same results as autocast casting them on the fly."""

import pytest
import torch

import tuneforge.algorithms._head_logps as H
import tuneforge.algorithms._logps as L
from tuneforge.methods import apply_methods
from tuneforge.methods.lora import Config as LoraConfig
from tuneforge.models.tiny import build_tiny
from tuneforge.train.precision import cast_frozen_matmul_weights_


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(H, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows of a 50-token vocabulary per chunk: 4 chunks + rest


def _reference(head, h, y):
    return torch.log_softmax(head(h).double(), -1).gather(1, y[:, None]).squeeze(1)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("head_trains", [False, True])
def test_values_and_gradients_match_log_softmax(small_chunks, bias, head_trains):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=bias).double().requires_grad_(head_trains)
    h = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (13,))
    g = torch.randn(13, dtype=torch.float64)  # an arbitrary upstream gradient per token (DPO/GRPO-like losses)
    ours = H.head_token_logps(head, h, y)
    (ours * g).sum().backward()
    got = {"h": h.grad.clone(), **{n: p.grad.clone() for n, p in head.named_parameters() if p.requires_grad}}
    h.grad = None
    head.zero_grad()
    ref = _reference(head, h, y)
    (ref * g).sum().backward()
    want = {"h": h.grad, **{n: p.grad for n, p in head.named_parameters() if p.requires_grad}}
    assert torch.allclose(ours.double(), ref, atol=1e-6)
    assert set(got) == set(want) and all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_gradcheck_frozen_head(small_chunks):
    torch.manual_seed(1)
    head = torch.nn.Linear(4, 50, bias=False).double().requires_grad_(False)
    h = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (7,))
    assert torch.autograd.gradcheck(lambda x: H.head_token_logps(head, x, y).double(), (h,))


def test_bf16_autocast_tracks_fp32():
    torch.manual_seed(2)
    head = torch.nn.Linear(32, 300, bias=False).requires_grad_(False)
    h = torch.randn(40, 32)
    y = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", torch.bfloat16):
        ours = H.head_token_logps(head, h, y)
        hf_style = torch.log_softmax(head(h).float(), -1).gather(1, y[:, None]).squeeze(1)  # what HF's loss does
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, hf_style, atol=1e-5)
    assert torch.allclose(ours, _reference(head, h, y).float(), atol=0.1)


def test_no_rows_keeps_the_graph():
    head = torch.nn.Linear(4, 10, bias=False).requires_grad_(False)
    h = torch.randn(0, 4, requires_grad=True)
    out = H.head_token_logps(head, h, torch.zeros(0, dtype=torch.long))
    out.sum().backward()
    assert out.shape == (0,) and h.grad is not None


def _lora_model(preset="llama"):
    model, _ = build_tiny(preset, seed=0)
    apply_methods(model, [LoraConfig(name="lora", rank=4, init="gaussian")])
    model.train()
    return model


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 90, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _loss_and_grads(model, batch, fused, monkeypatch, autocast=False):
    monkeypatch.setattr(L, "fusable_head", H.fusable_head if fused else (lambda head: False))
    model.zero_grad()
    torch.manual_seed(0)  # GPT-2 has dropout: the same masks on both paths
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        ce, n = L.token_cross_entropy_sum(model, batch)
    ce.backward()
    return float(ce.detach()), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_fused_sft_loss_equals_plain(monkeypatch, preset):
    model, batch = _lora_model(preset), _batch()
    a = _loss_and_grads(model, batch, True, monkeypatch)
    b = _loss_and_grads(model, batch, False, monkeypatch)
    assert a[1] == b[1] == 3 * 8
    assert a[0] == pytest.approx(b[0], abs=1e-4)
    # The loss is a sum over 24 tokens, so gradients reach ~16: fp32 rounding of the two summation orders is
    # ~1e-6 relative, and differs between CPUs; compare relative to each tensor's scale.
    for k in a[2]:
        scale = float(b[2][k].abs().max()) + 1e-12
        assert torch.allclose(a[2][k], b[2][k], rtol=1e-4, atol=1e-5 * scale), k


def test_frozen_bf16_weights_change_nothing_under_autocast(monkeypatch):
    model, batch = _lora_model(), _batch()
    before = _loss_and_grads(model, batch, True, monkeypatch, autocast=True)
    n = cast_frozen_matmul_weights_(model)
    after = _loss_and_grads(model, batch, True, monkeypatch, autocast=True)
    assert n == 2 * 7 + 1  # 2 layers x 7 LoRA-wrapped projections + the untied output head
    assert model.model.embed_tokens.weight.dtype == torch.float32  # embeddings and norms stay fp32
    assert model.model.norm.weight.dtype == torch.float32
    assert before[0] == after[0]
    assert all(torch.equal(before[2][k], after[2][k]) for k in before[2])


def test_tied_head_is_not_cast():
    model, _ = build_tiny("gpt2", seed=0)
    assert model.lm_head.weight is model.transformer.wte.weight
    model.requires_grad_(False)
    cast_frozen_matmul_weights_(model)
    assert model.lm_head.weight.dtype == torch.float32
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
