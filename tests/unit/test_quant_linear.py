"""QuantLinear: exact forward/backward against the dequantised weight, memory, state, model surgery."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.quant.linear import QuantizedWeight, QuantLinear, quantize_model_
from tuneforge.safeio import load_safetensors, save_safetensors

KINDS = [("nf4", True), ("nf4", False), ("int8", False)]


def make(kind="nf4", dq=True, out=48, inp=130, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=bias)
    return lin, QuantLinear.from_linear(lin, kind=kind, double_quant=dq)


@pytest.mark.parametrize("kind,dq", KINDS)
def test_forward_and_input_grad_equal_float_linear_with_dequantised_weight(kind, dq):
    lin, q = make(kind, dq)
    w = q.dequantize()
    x = torch.randn(3, 5, 130, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = q(x), F.linear(x_ref, w, lin.bias)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("kind,dq", KINDS)
def test_dequantised_weight_is_close_to_the_original(kind, dq):
    lin, q = make(kind, dq)
    err = (q.dequantize() - lin.weight).abs().max() / lin.weight.abs().max()
    assert err < (0.2 if kind == "nf4" else 0.01)


def test_weight_gets_no_gradient_and_only_the_bias_is_a_parameter():
    lin, q = make()
    assert [p for p in q.parameters()] == [lin.bias]
    assert all(not b.requires_grad for b in q.buffers())
    lin.bias.requires_grad_(False)
    x = torch.randn(4, 130, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and lin.bias.grad is None


def test_bias_gradient_when_bias_trains():
    lin, q = make()
    x = torch.randn(2, 7, 130)
    q(x).pow(2).sum().backward()
    g_q = lin.bias.grad.clone()
    lin.bias.grad = None
    F.linear(x, q.dequantize(), lin.bias).pow(2).sum().backward()
    assert torch.allclose(g_q, lin.bias.grad, rtol=1e-6, atol=1e-6)


def test_nothing_is_saved_for_backward():
    """The memory point: backward dequantises again instead of keeping the float weight (or the input) alive."""
    _, q = make(out=64, inp=64)
    saved = []
    x = torch.randn(8, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert saved == []
    y.sum().backward()
    assert x.grad is not None


def test_lora_style_adapter_on_top_trains():
    _, q = make()
    a, b = nn.Linear(130, 4, bias=False), nn.Linear(4, 48, bias=False)
    nn.init.normal_(b.weight)
    x = torch.randn(6, 130)
    (q(x) + b(a(x))).pow(2).mean().backward()
    assert a.weight.grad.abs().sum() > 0 and b.weight.grad.abs().sum() > 0


def test_frozen_weight_memory_ratio_vs_16_bit():
    torch.manual_seed(0)
    lin = nn.Linear(1024, 1024, bias=False)
    sixteen_bit = 1024 * 1024 * 2
    nf4 = QuantLinear.from_linear(lin, "nf4", double_quant=True).nbytes() / sixteen_bit
    nf4_plain = QuantLinear.from_linear(lin, "nf4", double_quant=False).nbytes() / sixteen_bit
    int8 = QuantLinear.from_linear(lin, "int8").nbytes() / sixteen_bit
    assert nf4 <= 0.3 and nf4 == pytest.approx((4 + 8 / 64 + 32 / 64 / 256) / 16, abs=1e-5)  # ~0.258
    assert nf4_plain == pytest.approx(4.5 / 16)
    assert int8 == pytest.approx((8 + 32 / 1024) / 16)


@pytest.mark.parametrize("kind,dq", KINDS)
def test_state_dict_round_trips_through_safetensors(tmp_path, kind, dq):
    lin, q = make(kind, dq)
    path = tmp_path / "q.safetensors"
    save_safetensors(q.state_dict(), path)
    _, fresh = make(kind, dq, seed=1)  # same layout, different weights
    assert not torch.equal(fresh.dequantize(), q.dequantize())
    fresh.load_state_dict(load_safetensors(path))
    assert torch.equal(fresh.dequantize(), q.dequantize())
    x = torch.randn(2, 130)
    assert torch.equal(fresh(x), q(x))
    assert {k: v.dtype for k, v in fresh.state_dict().items()} == {k: v.dtype for k, v in q.state_dict().items()}


def test_weight_stand_in_describes_the_weight():
    _, q = make()
    w = q.weight
    assert isinstance(w, QuantizedWeight) and w.shape == (48, 130) == q.weight_shape
    assert (w.dtype, w.device, w.ndim, w.requires_grad) == (torch.float32, torch.device("cpu"), 2, False)
    assert (q.in_features, q.out_features) == (130, 48) and w.size(1) == 130 and w.numel() == 48 * 130
    assert torch.equal(w.dequantize(), q.dequantize())


def test_dtype_casts_keep_fp32_constants_and_move_the_compute_dtype():
    _, q = make()
    before = q.dequantize()
    q.half()
    assert q.dtype == torch.float16 and q.weight.dtype == torch.float16 and q.bias.dtype == torch.float16
    assert q.qweight_absmax2.dtype == torch.float32 and q.qweight_absmax.dtype == torch.uint8
    q.float()
    assert torch.equal(q.dequantize(), before)  # no precision was lost on the constants


def test_explicit_compute_dtype_and_autocast():
    lin, q = make()
    q.compute_dtype = torch.bfloat16
    x = torch.randn(3, 130)
    y = q(x)
    ref = F.linear(x.bfloat16(), q.dequantize(torch.bfloat16), lin.bias.bfloat16()).float()
    assert y.dtype == torch.float32 and torch.equal(y, ref)
    q.compute_dtype = None
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


def test_from_conv1d_transposes_the_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 130)  # weight (in=130, out=48)
    q = QuantLinear.from_linear(conv, "nf4")
    assert q.fan_in_fan_out and q.weight_shape == (48, 130)
    assert (q.dequantize().t() - conv.weight).abs().max() < 0.2 * conv.weight.abs().max()
    x = torch.randn(2, 130)
    assert torch.equal(q(x), F.linear(x, q.dequantize(), conv.bias))


def test_from_linear_refuses_other_modules_and_kinds():
    with pytest.raises(TypeError):
        QuantLinear.from_linear(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="kind"):
        QuantLinear.from_linear(nn.Linear(4, 4), kind="fp4")


def test_quantize_model_on_tiny_gpt2():
    from tuneforge.models.tiny import build_tiny

    model, _ = build_tiny("gpt2")
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    before, after = quantize_model_(model, "nf4")
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 4 * model.config.n_layer and "lm_head" not in names
    assert all(m.fan_in_fan_out for m in model.modules() if isinstance(m, QuantLinear))
    assert after / before < 0.3 / 2  # fp32 weights: ~4.13 / 32 bits
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_quantize_model_targets_skip_and_tied_weights():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 8))
    net[3].weight = net[2].weight  # tied
    with pytest.warns(UserWarning, match="shared"):
        quantize_model_(net, "int8", targets=["0", "2", "3"], skip=["re:9"])
    assert isinstance(net[0], QuantLinear) and isinstance(net[2], nn.Linear) and isinstance(net[3], nn.Linear)
    net2 = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    before, after = quantize_model_(net2, "nf4", skip=["1"])
    assert isinstance(net2[0], QuantLinear) and type(net2[1]) is nn.Linear and before == 8 * 8 * 4
    with pytest.raises(ValueError, match="kind"):
        quantize_model_(net2, "int4")
