"""Soft prompts (prompt tuning, P-tuning, prefix tuning, P-tuning v2) beyond the method contract: virtual tokens are
invisible to algorithms (aligned logits, any padding, any cache), mixed batches with prompts of different lengths,
compositions, and the config errors that come before any weight loads."""

import pytest
import torch
from conftest import base_config

from tuneforge.methods import (METHODS, adapter_scope, apply_methods, load_adapter, merge_methods, save_adapter,
                               weight_decays)
from tuneforge.methods import _soft_prompt as SP
from tuneforge.methods._inject import trainable_parameters
from tuneforge.models.tiny import build_tiny
from tuneforge.train.rollout import sample


def _ids(b=3, t=9, seed=0):
    return torch.randint(5, 60, (b, t), generator=torch.Generator().manual_seed(seed))


def _perturb(model, scale=0.3):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _three_adapters(preset="llama"):
    """a: prompt tuning (4 tokens), b: prefix tuning (3), c: P-tuning (2): three prefix lengths."""
    model, _ = build_tiny(preset)
    apply_methods(model, [METHODS["prompt_tuning"].Config(num_virtual_tokens=4)], adapter="a")
    apply_methods(model, [METHODS["prefix_tuning"].Config(num_virtual_tokens=3)], adapter="b")
    apply_methods(model, [METHODS["p_tuning"].Config(num_virtual_tokens=2, encoder_hidden_size=8)], adapter="c")
    _perturb(model)
    return model.eval()


@pytest.mark.parametrize("preset", ["llama", "gpt2", "gpt_neox"])
def test_mixed_batch_with_prompts_of_different_lengths_equals_one_by_one(preset):
    model = _three_adapters(preset)
    ids, names = _ids(4), ["b", None, "a", "c"]
    with adapter_scope(model, names):
        mixed = model(ids).logits
    for i, n in enumerate(names):
        with adapter_scope(model, n):
            assert torch.allclose(model(ids[i:i + 1]).logits, mixed[i:i + 1], atol=1e-5), (i, n)


def test_left_padded_batch_equals_rows_alone():
    """A padded row sees the positions and context it has alone: the prefix's columns go in front of the mask and
    every input position moves up by the row's prefix length."""
    model = _three_adapters()
    ids = _ids(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    for n in ("a", "b", "c"):
        with adapter_scope(model, n):
            batch = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            alone = model(input_ids=ids[1:, 4:]).logits
        assert torch.allclose(batch[1, 4:], alone[0], atol=1e-5)


@pytest.mark.parametrize("names", [None, ["a", "c", None, "b"]])
def test_batched_generation_equals_one_by_one(names):
    """The rollout engine (left padding, KV cache with the prefix inside) gives each prompt what it gets alone,
    with one adapter for the batch or one per row."""
    model = _three_adapters()
    prompts = [_ids(1, t, seed=t)[0].tolist() for t in (3, 7, 5, 9)]
    rows = names or ["b"] * 4
    with adapter_scope(model, names if names else "b"):
        batch = sample(model, prompts, pad_id=0, max_new_tokens=6)
    for i, p in enumerate(prompts):
        with adapter_scope(model, rows[i]):
            alone = sample(model, [p], pad_id=0, max_new_tokens=6)
        assert batch.tokens[i].tolist() == alone.tokens[0].tolist(), i


def test_hugging_face_generate_equals_the_rollout_engine():
    model = _three_adapters()
    prompt = _ids(1, 6)
    with adapter_scope(model, "a"):
        theirs = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                do_sample=False, pad_token_id=0, eos_token_id=None)[0, 6:]
        ours = sample(model, prompt.tolist(), pad_id=0, max_new_tokens=6).tokens[0]
    assert ours.tolist() == theirs.tolist()


def test_logits_and_hidden_states_are_aligned_with_input_ids():
    """What algorithms read: (B, T, V) logits and (B, T, H) hidden states, never n virtual positions more; the
    fused token log-probs equal log-softmax of the model's own logits."""
    from tuneforge.algorithms._logps import supervised_token_logps

    model = _three_adapters()
    ids = _ids(2, 8)
    labels = ids.clone()
    labels[:, :3] = -100
    with adapter_scope(model, "b"):
        logits = model(ids).logits
        hidden = model.base_model(input_ids=ids).last_hidden_state
        logps, keep = supervised_token_logps(model, {"input_ids": ids, "labels": labels,
                                                     "attention_mask": torch.ones_like(ids)})
    assert logits.shape[:2] == hidden.shape[:2] == ids.shape
    ref = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0][keep]
    assert torch.allclose(logps, ref, atol=1e-5)


def test_shared_prompt_scoring_steps_aside_for_soft_prompts():
    from tuneforge.algorithms import _prefix
    from tuneforge.algorithms._logps import supervised_token_logps

    model = _three_adapters()
    _prefix.enable(model, True)
    prompt, r1, r2 = [7, 8, 9, 10, 11], [20, 21], [30, 31, 32]
    ids = torch.tensor([prompt + r1 + [0], prompt + r2])
    labels = torch.tensor([[-100] * 5 + r1 + [-100], [-100] * 5 + r2])
    batch = {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100) | (torch.arange(8) < 5)}
    batch["attention_mask"] = batch["attention_mask"].long()
    with adapter_scope(model, "a"):
        assert _prefix.share_prompts(model, batch) is None
        shared = supervised_token_logps(model, batch)[0]
        _prefix.enable(model, False)
        plain = supervised_token_logps(model, batch)[0]
    assert torch.equal(shared, plain)


def test_merge_refuses_and_unload_restores_the_base():
    model, _ = build_tiny("llama")
    model.eval()
    ref = model(_ids()).logits
    cfgs = [METHODS["prefix_tuning"].Config(num_virtual_tokens=3)]
    apply_methods(model, cfgs)
    assert not torch.allclose(model(_ids()).logits, ref, atol=1e-4)
    with pytest.raises(ValueError, match="virtual tokens"):
        merge_methods(model, cfgs)
    METHODS["prefix_tuning"].unload(model)
    assert not hasattr(model, SP.ATTR) and not model.base_model._forward_pre_hooks
    assert torch.equal(model(_ids()).logits, ref)


@pytest.mark.parametrize("combo", [["prefix_tuning", "lora"], ["lora", "prefix_tuning", "parallel"],
                                   ["prompt_tuning", "prefix_tuning"], ["p_tuning", "ia3"]])
def test_compositions_save_and_reload_with_identical_logits(tmp_path, combo):
    """[prefix, lora]; MAM (prefix tuning + a parallel adapter, He et al. 2022); two soft prompts stacked in one
    adapter (their tensors keyed apart); P-tuning with IA3."""
    kw = {"prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 3},
          "p_tuning": {"num_virtual_tokens": 2, "encoder_hidden_size": 8}, "lora": {"rank": 4},
          "parallel": {"bottleneck": 8}, "ia3": {}}
    cfgs = [METHODS[n].Config(**kw[n]) for n in combo]
    model, _ = build_tiny("llama")
    apply_methods(model, cfgs)
    _perturb(model)
    model.eval()
    ours = model(_ids()).logits
    save_adapter(model, cfgs, tmp_path / "ad")
    fresh, _ = build_tiny("llama")
    load_adapter(fresh, tmp_path / "ad")
    assert torch.equal(fresh.eval()(_ids()).logits, ours)


def test_projected_prefix_reloads_its_encoder_and_peft_layout_holds_the_product(tmp_path):
    """PEFT saves only the MLP's output and cannot resume (peft#1247); tuneforge saves both."""
    from safetensors.torch import load_file

    cfg = METHODS["prefix_tuning"].Config(num_virtual_tokens=3, projection=True, encoder_hidden_size=16)
    model, _ = build_tiny("llama")
    apply_methods(model, [cfg])
    _perturb(model)
    save_adapter(model, [cfg], tmp_path / "ad")
    saved = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    mod = SP.modules_of(model, "prefix_tuning", "default")
    assert torch.equal(saved["prompt_embeddings"], mod.produce().detach())
    assert {k for k in saved if k.startswith("tuneforge_encoder.")} == {
        "tuneforge_encoder." + n for n, _ in mod.named_parameters()}
    fresh, _ = build_tiny("llama")
    load_adapter(fresh, tmp_path / "ad")
    again = SP.modules_of(fresh, "prefix_tuning", "default")
    assert again.output is None and all(torch.equal(p, dict(mod.named_parameters())[n])
                                        for n, p in again.named_parameters())


def test_text_init_copies_the_phrase_embeddings_repeated_to_n():
    from tuneforge.models.tiny import char_tokenizer

    tok = char_tokenizer()
    model, _ = build_tiny("llama")
    apply_methods(model, [METHODS["prompt_tuning"].Config(num_virtual_tokens=5, init="text", init_text="ab")],
                  tokenizer=tok)
    ids = tok("ab", add_special_tokens=False)["input_ids"]
    table = model.get_input_embeddings().weight
    got = SP.modules_of(model, "prompt_tuning", "default").embedding
    assert torch.equal(got, table[torch.tensor((ids * 3)[:5])])


def test_encoder_weights_decay_and_prompts_do_not():
    model, _ = build_tiny("llama")
    apply_methods(model, [METHODS["p_tuning"].Config(num_virtual_tokens=2, encoder_hidden_size=8)])
    decays = weight_decays(model, trainable_parameters(model))
    assert decays and all(d == ("mlp_head" in n and n.endswith("weight")) for n, d in decays.items())


# ------------------------------------------------------------------------------------------ bad input
def _check(tmp_path, pc_file, method, **data):
    from tuneforge import api
    from tuneforge.config import RunConfig

    d = base_config(tmp_path, pc_file)
    d["method"] = [method]
    d["data"].update(data)
    api.check_targets(RunConfig.model_validate(d), build_tiny("llama")[1])


def test_virtual_tokens_beyond_the_models_positions_is_a_config_error(tmp_path, pc_file):
    from tuneforge.config import ConfigError

    with pytest.raises(ConfigError, match=r"method\[0\].num_virtual_tokens.*lower data.max_len to 492"):
        _check(tmp_path, pc_file, {"name": "prompt_tuning", "num_virtual_tokens": 20}, max_len=500)
    _check(tmp_path, pc_file, {"name": "prompt_tuning", "num_virtual_tokens": 20}, max_len=492)


def test_packing_with_a_soft_prompt_is_a_config_error(tmp_path, pc_file):
    from tuneforge.config import ConfigError

    with pytest.raises(ConfigError, match="data.packing"):
        _check(tmp_path, pc_file, {"name": "prefix_tuning"}, packing=True)


def test_init_text_the_tokenizer_cannot_spell_is_a_config_error(tmp_path, pc_file):
    from tuneforge.config import ConfigError

    with pytest.raises(ConfigError, match="init_text .* tokens this tokenizer does not know"):
        _check(tmp_path, pc_file, {"name": "prompt_tuning", "init": "text", "init_text": "日本語"})
    with pytest.raises(ValueError, match="init: text needs init_text"):
        METHODS["prefix_tuning"].Config(init="text")


def test_models_that_cannot_hold_a_prefix_are_refused():
    from transformers import AutoModelForCausalLM, BloomConfig

    bloom = AutoModelForCausalLM.from_config(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="ALiBi"):
        apply_methods(bloom, [METHODS["prefix_tuning"].Config(num_virtual_tokens=2)])

    class NoCache(torch.nn.Module):
        config = build_tiny("llama")[0].config

        def forward(self, input_ids=None, attention_mask=None, position_ids=None):
            return input_ids

    with pytest.raises(ValueError, match="takes no KV cache"):
        SP.check_model(NoCache(), "prompt_tuning")


def test_training_rows_draw_their_own_dropout_on_the_virtual_tokens():
    """In training with dropout each row runs the virtual tokens with its own mask (as PEFT's per-row [P; E(x)]),
    not one mask broadcast to the batch; in eval the prefix is computed once and shared."""
    from tuneforge.methods._scope import adapter_layers

    model, _ = build_tiny("gpt2")  # dropout 0.1 in its config
    apply_methods(model, [METHODS["prompt_tuning"].Config(num_virtual_tokens=4)])
    c = SP.container(model)
    ids = _ids(1, 6).repeat(2, 1)
    seen = {}

    def grab(module, args, kwargs, output):
        seen["cache"] = kwargs.get("cache", kwargs.get("past_key_values"))

    h = model.base_model.register_forward_hook(grab, with_kwargs=True)
    try:
        model.train()
        torch.manual_seed(0)
        model(ids)
        k = seen["cache"].layers[0].keys[:, :, :4]
        assert not torch.equal(k[0], k[1])
        model.eval()
        model(ids)
        k = seen["cache"].layers[0].keys[:, :, :4]
        assert torch.equal(k[0], k[1])
    finally:
        h.remove()
    assert adapter_layers(model) == [c]


def test_gradient_checkpointing_and_static_caches_are_refused_with_the_reason():
    model, _ = build_tiny("llama")
    apply_methods(model, [METHODS["prefix_tuning"].Config(num_virtual_tokens=3)])
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(_ids())
    model.gradient_checkpointing_disable()
    model.eval()
    with pytest.raises(ValueError, match="dynamic KV cache"):
        model.generate(input_ids=_ids(1, 5), max_new_tokens=2, do_sample=False, cache_implementation="static",
                       pad_token_id=0)
