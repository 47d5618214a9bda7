"""Every method on SmolLM2-135M-Instruct (tied embeddings, GQA 9/3 heads, BPE, ChatML): it applies, is the base
model at init where the method promises that, lowers the loss of a chat batch in three steps, saves, reloads into
a fresh model with bit-equal logits, and merges back into a plain Llama with the same logits. PEFT loads the
LoRA, IA3 and LoKr adapters tuneforge writes and gives the same logits.

The base is loaded once per module; each case trains a deep copy of it."""

import copy

import pytest
import torch

from tuneforge.methods import (METHODS, apply_methods, finalize_methods, load_adapter, merge_methods,
                               save_adapter)
from tuneforge.methods._inject import trainable_parameters
from tuneforge.models.load import load_model
from tuneforge.tasks import make_chat_examples

from .conftest import smollm2_mcfg

CASES = {  # case -> (method name, config, learning rate)
    "full": ("full", {}, 2e-5), "freeze": ("freeze", {"top_k": 2}, 1e-4),
    "bitfit": ("bitfit", {"add_bias": True}, 1e-3), "diff_pruning": ("diff_pruning", {"density": 0.005}, 1e-3),
    "sparse": ("sparse", {"density": 0.005, "selection": "magnitude"}, 1e-3),
    "lora": ("lora", {"rank": 8, "alpha": 16}, 2e-3), "dora": ("lora", {"rank": 8, "alpha": 16, "dora": True}, 2e-3),
    "lokr": ("lokr", {"rank": 4}, 2e-3), "ia3": ("ia3", {}, 1e-2), "qlora": ("qlora", {"rank": 8}, 2e-3),
}
IDENTITY_AT_INIT = {"bitfit", "diff_pruning", "sparse", "lora", "dora", "lokr", "ia3"}
EXACT_MERGE = {"full", "freeze", "bitfit"}  # trained weights are the model's own (bitfit: the same bias add)
# sparse/diff pruning fold W + Δ into one matrix: x·(W+Δ) rounds differently from x·W + x·Δ (~1e-4 on logits of ~40)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    model, tok = load_model(smollm2_mcfg())
    return model.eval(), tok


def _chat_batch(tok, n=4, seed=5):
    """Chat rows through the ChatML template, loss on the assistant turn only (as SFT trains)."""
    rows, prompts = [], []
    for ex in make_chat_examples("record", n, seed=seed):
        msgs = ex["messages"]
        prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        assert full[:len(prompt)] == prompt
        rows.append(full)
        prompts.append(len(prompt))
    width = max(map(len, rows))
    ids = torch.full((n, width), tok.pad_token_id)
    labels = torch.full((n, width), -100)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, prompts)):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, p:len(row)] = torch.tensor(row[p:])
        mask[i, :len(row)] = 1
    return ids, mask, labels


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _cfg(case):
    name, kw, _ = CASES[case]
    return METHODS[name].Config(**kw)


@pytest.mark.parametrize("case", list(CASES))
def test_method_trains_saves_reloads_and_merges(smol, case, tmp_path):
    base, tok = smol
    ids, mask, labels = _chat_batch(tok)
    ref = _logits(base, ids, mask)
    model = copy.deepcopy(base)
    cfg = _cfg(case)
    apply_methods(model, [cfg])
    if case in IDENTITY_AT_INIT:
        assert torch.equal(_logits(model.eval(), ids, mask), ref)
    params = list(trainable_parameters(model).values())
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.AdamW(params, lr=CASES[case][2], weight_decay=0.0)
    model.train()
    losses = []
    torch.manual_seed(0)
    for _ in range(4):  # three updates, then the loss after them
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        losses.append(loss.item())
        if len(losses) == 4:
            break
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < 0.9 * losses[0], losses
    finalize_methods(model, [cfg])
    model.eval()
    ours = _logits(model, ids, mask)
    assert not torch.equal(ours, ref)
    save_adapter(model, [cfg], tmp_path / "adapter")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(_logits(fresh.eval(), ids, mask), ours)
    merge_methods(fresh, [cfg])
    assert not any(getattr(m, "is_adapter_layer", False) for m in fresh.modules())
    merged = _logits(fresh, ids, mask)
    tol = 0 if case in EXACT_MERGE else (5e-2 if case == "qlora" else 2e-3)  # 135M fp32: logits reach ~40
    assert (merged - ours).abs().max().item() <= tol, (merged - ours).abs().max().item()
    if case == "qlora":  # its merged weights are the dequantised NF4 ones: the same model, one weight format
        assert not any("4bit" in type(m).__name__.lower() for m in fresh.modules())


def _trained_looking(model, scale):
    """Every trainable tensor moved off its init (an adapter whose factors are all non-zero); eval mode."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.eval()


@pytest.mark.parametrize("case", ["lora", "ia3", "lokr"])
def test_peft_loads_the_adapter_with_equal_logits(smol, smollm2_dir, case, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tok = smol
    ids, mask, _ = _chat_batch(tok, n=2, seed=9)
    model = copy.deepcopy(base)
    cfg = _cfg(case)
    apply_methods(model, [cfg])
    _trained_looking(model, 0.02)
    ours = _logits(model, ids, mask)
    save_adapter(model, [cfg], tmp_path / "adapter", base_path=str(smollm2_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    theirs = _logits(PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval(), ids, mask)
    assert (theirs - ours).abs().max().item() < 1e-4


SOFT = {  # case -> (method name, config, learning rate, whether PEFT's logits include the virtual positions)
    "prompt_tuning": ("prompt_tuning", {"num_virtual_tokens": 8}, 5e-2, True),
    "p_tuning": ("p_tuning", {"num_virtual_tokens": 8, "encoder_hidden_size": 64}, 2e-3, True),
    "prefix_tuning": ("prefix_tuning", {"num_virtual_tokens": 8}, 3e-2, False),
    "prefix_projection": ("prefix_tuning", {"num_virtual_tokens": 8, "projection": True,
                                            "encoder_hidden_size": 64}, 1e-3, False),
    "p_tuning_v2": ("p_tuning_v2", {"num_virtual_tokens": 8}, 3e-2, False),
}


@pytest.mark.parametrize("case", list(SOFT))
def test_soft_prompt_trains_saves_reloads_and_refuses_merge(smol, case, tmp_path):
    """Virtual tokens on a GQA model with tied embeddings: logits stay (B, T, V), three steps lower the chat loss,
    the adapter reloads bit-equal, and merge says why it cannot."""
    base, tok = smol
    ids, mask, labels = _chat_batch(tok)
    name, kw, lr, _ = SOFT[case]
    cfg = METHODS[name].Config(**kw)
    model = copy.deepcopy(base)
    torch.manual_seed(0)  # the initial prompt (sampled vocabulary, random encoder input) draws from the global RNG
    apply_methods(model, [cfg], tokenizer=tok)
    opt = torch.optim.AdamW(list(trainable_parameters(model).values()), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(4):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits.shape[:2] == ids.shape
        losses.append(out.loss.item())
        if len(losses) == 4:
            break
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert losses[-1] < 0.95 * losses[0], losses
    model.eval()
    ours = _logits(model, ids, mask)
    save_adapter(model, [cfg], tmp_path / "adapter")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(_logits(fresh.eval(), ids, mask), ours)
    with pytest.raises(ValueError, match="virtual tokens"):
        merge_methods(fresh, [cfg])


@pytest.mark.parametrize("case", ["prompt_tuning", "p_tuning", "prefix_tuning", "prefix_projection"])
def test_soft_prompt_peft_interop_both_ways(smol, smollm2_dir, case, tmp_path):
    """PEFT reads tuneforge's file and tuneforge reads PEFT's, with equal logits on SmolLM2 (GQA: the prefix is
    head_dim 64 x 3 KV heads wide). PEFT's prompt-tuning logits carry the n virtual positions first."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tok = smol
    ids, mask, _ = _chat_batch(tok, n=2, seed=9)
    name, kw, _, shifted = SOFT[case]
    n = kw["num_virtual_tokens"]
    cfg = METHODS[name].Config(**kw)
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    apply_methods(model, [cfg])
    _trained_looking(model, 0.05)
    ours = _logits(model, ids, mask)
    save_adapter(model, [cfg], tmp_path / "adapter", base_path=str(smollm2_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    pm = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    theirs = _logits(pm, ids, mask)
    theirs = theirs[:, n:] if shifted else theirs
    real = mask.bool()
    # P-tuning's perturbed encoder puts out virtual tokens 2.6x the norm of SmolLM2's token embeddings, and the
    # model is that much more sensitive to rounding there: even in float64, where only the fp32 rounding of PEFT's
    # saved prompt_embeddings differs, the two agree to 1.7e-4 (logits up to ~26); fp32 measured 3.2e-3
    tol = 5e-3 if case == "p_tuning" else 1e-4
    assert (theirs - ours)[real].abs().max().item() < tol
    pm.save_pretrained(str(tmp_path / "peft"))  # PEFT's own file (its inference layout) back into tuneforge
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "peft")
    assert (_logits(fresh.eval(), ids, mask) - ours)[real].abs().max().item() < tol
