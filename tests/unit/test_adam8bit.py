"""AdamW8bit: parity with torch AdamW, state size, exact resume through the checkpoint format, offload/paged."""

import pytest
import torch
from torch import nn

from tuneforge.safeio import load_safetensors, save_safetensors
from tuneforge.train.adam8bit import AdamW8bit
from tuneforge.train.checkpoint import optimizer_from_tensors, optimizer_to_tensors

HP = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8)


@pytest.fixture(autouse=True)
def one_thread():
    """These toys are tiny: a second thread costs more in synchronisation than it saves (over 10x on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def regression(seed=0, n=128, d_in=64, d_out=64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    y = x @ (torch.randn(d_out, d_in, generator=gen) * 0.1).T + 0.01 * torch.randn(n, d_out, generator=gen)
    return x, y


def model(seed=1, d_in=64, d_out=64):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)  # weight: 4096 elements (8-bit state), bias: 64 (fp32 state)


def groups(m, wd=0.01):
    """The layout tuneforge's make_optimizer builds for a plain linear layer: decay on its weight, none on its bias."""
    return [{"params": [m.weight], "weight_decay": wd}, {"params": [m.bias], "weight_decay": 0.0}]


def train(m, opt, data, steps):
    x, y = data
    for _ in range(steps):
        loss = ((m(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ((m(x) - y) ** 2).mean().item()


def test_tracks_torch_adamw_on_a_regression_toy():
    data = regression()
    ref_m, m8 = model(), model()
    ref = train(ref_m, torch.optim.AdamW(groups(ref_m), **HP, foreach=False), data, 100)
    opt = AdamW8bit(groups(m8), **HP)
    loss8 = train(m8, opt, data, 100)
    assert "exp_avg_code" in opt.state[m8.weight] and "exp_avg" in opt.state[m8.bias]
    assert ref < 1e-3 * ((data[1] - data[1].mean(0)) ** 2).mean()  # both actually converged
    assert abs(loss8 - ref) <= 0.03 * ref  # measured: 0.4% apart
    assert (m8.weight - ref_m.weight).abs().max() < 0.02 * ref_m.weight.abs().max()


def test_small_tensors_are_bit_identical_to_torch_adamw():
    data = regression(d_in=32, d_out=16)  # 512 + 16 elements: both below min_8bit_size, fp32 states
    ref_m, m = model(d_in=32, d_out=16), model(d_in=32, d_out=16)
    train(ref_m, torch.optim.AdamW(groups(ref_m), **HP, foreach=False), data, 20)
    train(m, AdamW8bit(groups(m), **HP), data, 20)
    assert torch.equal(ref_m.weight, m.weight) and torch.equal(ref_m.bias, m.bias)


def test_state_memory_is_about_two_bytes_per_parameter():
    p = nn.Parameter(torch.randn(512, 1024))
    p.grad = torch.randn_like(p)
    opt = AdamW8bit([p], lr=1e-3)
    opt.step()
    fp32_adam = 2 * 4 * p.numel()
    assert opt.state_bytes() == 2 * p.numel() + 2 * 4 * (p.numel() // 2048)  # codes + fp32 block constants
    assert opt.state_bytes() < 0.3 * fp32_adam  # ~0.25
    assert opt.state[p]["exp_avg_code"].dtype == torch.uint8 and opt.state[p]["exp_avg_absmax"].numel() == 256


def test_exact_resume_through_checkpoint_tensors(tmp_path):
    data = regression()
    straight = model()
    opt = AdamW8bit(groups(straight), **HP)
    train(straight, opt, data, 5)
    tensors, info = optimizer_to_tensors(opt)  # what the training loop checkpoints
    assert tensors["state.0.exp_avg_code"].dtype == torch.uint8 and info["state"]["0"]["step"] == 5
    save_safetensors(tensors, tmp_path / "opt.safetensors")
    saved_params = {k: v.clone() for k, v in straight.state_dict().items()}
    train(straight, opt, data, 5)

    resumed = model(seed=7)
    resumed.load_state_dict(saved_params)
    opt2 = AdamW8bit(groups(resumed), **HP)
    optimizer_from_tensors(opt2, load_safetensors(tmp_path / "opt.safetensors"), info)
    s = opt2.state[resumed.weight]
    assert s["exp_avg_code"].dtype == torch.uint8 and s["exp_avg_absmax"].dtype == torch.float32
    train(resumed, opt2, data, 5)
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)


def test_load_state_dict_keeps_uint8_for_low_precision_params():
    p = nn.Parameter(torch.randn(64, 128, dtype=torch.bfloat16))
    p.grad = torch.randn_like(p)
    opt = AdamW8bit([p])
    opt.step()
    sd = opt.state_dict()
    opt2 = AdamW8bit([p])
    opt2.load_state_dict(sd)  # torch's base class would cast every state tensor to bf16
    for key in ("exp_avg_code", "exp_avg_sq_code"):
        assert opt2.state[p][key].dtype == torch.uint8 and torch.equal(opt2.state[p][key], opt.state[p][key])
    assert opt2.state[p]["exp_avg_absmax"].dtype == torch.float32
    assert opt2.state[p]["exp_avg_code"] is not sd["state"][0]["exp_avg_code"]  # a copy, not an alias
    p.grad = torch.randn_like(p)
    opt2.step()
    assert p.dtype == torch.bfloat16


def test_load_refuses_state_from_another_block_size():
    p = nn.Parameter(torch.randn(8192))
    p.grad = torch.randn_like(p)
    opt = AdamW8bit([p], block_size=2048)
    opt.step()
    with pytest.raises(ValueError, match="block_size"):
        AdamW8bit([p], block_size=256).load_state_dict(opt.state_dict())


def test_offload_path_matches_and_keeps_state_on_cpu():
    data = regression()
    a, b = model(), model()
    train(a, AdamW8bit(groups(a), **HP), data, 5)
    opt = AdamW8bit(groups(b), **HP, offload=True)
    train(b, opt, data, 5)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert all(t.device.type == "cpu" for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def test_paged_is_refused_on_cpu_with_a_clear_error():
    with pytest.raises(ValueError, match="CUDA unified memory"):
        AdamW8bit(model().parameters(), paged=True)


def test_block_size_256_and_constructor_validation():
    data = regression()
    ref_m, m = model(), model()
    ref = train(ref_m, torch.optim.AdamW(groups(ref_m), **HP), data, 60)
    assert abs(train(m, AdamW8bit(groups(m), **HP, block_size=256), data, 60) - ref) <= 0.02 * ref
    with pytest.raises(ValueError):
        AdamW8bit(m.parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError):
        AdamW8bit(m.parameters(), block_size=0)
