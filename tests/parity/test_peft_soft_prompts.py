"""Soft prompts against PEFT: prompt tuning, P-tuning and prefix tuning files load both ways with equal logits
(PEFT's prompt-tuning logits include the virtual positions: ours are aligned with input_ids, so theirs are
compared from position n on), and greedy generation through tuneforge's engine equals greedy decoding under PEFT's
forward."""

import pytest
import torch

peft = pytest.importorskip("peft")

from tuneforge.methods import apply_methods, load_adapter, save_adapter  # noqa: E402
from tuneforge.methods import p_tuning, p_tuning_v2, prefix_tuning, prompt_tuning  # noqa: E402
from tuneforge.methods._inject import trainable_parameters  # noqa: E402
from tuneforge.models.tiny import build_tiny  # noqa: E402
from tuneforge.train.rollout import sample  # noqa: E402

N = 5
CASES = {  # name -> (our config, PEFT config, whether PEFT's logits include the virtual positions)
    "prompt_tuning": (lambda: prompt_tuning.Config(num_virtual_tokens=N),
                      lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N), True),
    "p_tuning_mlp": (lambda: p_tuning.Config(num_virtual_tokens=N, encoder_hidden_size=16),
                     lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                      encoder_hidden_size=16), True),
    "p_tuning_lstm": (lambda: p_tuning.Config(num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=8),
                      lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                       encoder_reparameterization_type="LSTM",
                                                       encoder_hidden_size=8), True),
    "prefix_tuning": (lambda: prefix_tuning.Config(num_virtual_tokens=N),
                      lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N), False),
    "prefix_projection": (lambda: prefix_tuning.Config(num_virtual_tokens=N, projection=True, encoder_hidden_size=16),
                          lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                          prefix_projection=True, encoder_hidden_size=16), False),
    "p_tuning_v2": (lambda: p_tuning_v2.Config(num_virtual_tokens=N),
                    lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N), False),
}
PRESETS = ["llama", "gpt2", "gpt_neox"]  # llama: grouped-query attention (4 heads, 2 KV heads)


def _ids():
    return torch.randint(5, 60, (2, 10), generator=torch.Generator().manual_seed(0))


def _randomise(model, scale=0.3):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _theirs(pm, ids, shifted):
    out = pm(input_ids=ids).logits
    return out[:, N:] if shifted else out


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", list(CASES))
def test_tuneforge_soft_prompt_loads_in_peft(tmp_path, name, preset):
    ours_cfg, _, shifted = CASES[name]
    model, _ = build_tiny(preset)
    apply_methods(model, [ours_cfg()])
    _randomise(model)
    model.eval()
    ours = model(_ids()).logits
    save_adapter(model, [ours_cfg()], tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(build_tiny(preset)[0], str(tmp_path / "ad")).eval()
    assert torch.allclose(_theirs(pm, _ids(), shifted), ours, atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", list(CASES))
def test_peft_soft_prompt_loads_in_tuneforge(tmp_path, name, preset):
    _, peft_cfg, shifted = CASES[name]
    torch.manual_seed(1)
    pm = peft.get_peft_model(build_tiny(preset)[0], peft_cfg()).eval()
    theirs = _theirs(pm, _ids(), shifted)
    pm.save_pretrained(str(tmp_path / "peft"))
    fresh, _ = build_tiny(preset)
    load_adapter(fresh, tmp_path / "peft")
    assert torch.allclose(fresh.eval()(_ids()).logits, theirs, atol=1e-5)


@torch.no_grad()
def _peft_greedy(pm, prompt, steps, shifted):
    """Greedy decoding under PEFT's forward, one full pass per token (no cache). PEFT 0.21's own ``generate`` is not
    the reference: under transformers 5 (which renamed ``past_key_values`` to ``cache``) its prompt-learning
    ``prepare_inputs_for_generation`` no longer trims the input to the new token, and its output departs from its
    own forward's greedy choice after a few tokens."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(_theirs(pm, torch.tensor([seq]), shifted)[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning_mlp", "prefix_tuning"])
def test_greedy_generation_equals_peft_greedy(tmp_path, name, preset):
    """tuneforge's engine (KV cache, the prefix inside it, oneDNN linears) decodes what PEFT's model would."""
    ours_cfg, _, shifted = CASES[name]
    model, _ = build_tiny(preset)
    apply_methods(model, [ours_cfg()])
    _randomise(model, scale=1.0)
    save_adapter(model, [ours_cfg()], tmp_path / "ad")
    pm = peft.PeftModel.from_pretrained(build_tiny(preset)[0], str(tmp_path / "ad")).eval()
    for prompt in _ids().tolist():
        ours = sample(model, [prompt], pad_id=0, max_new_tokens=8).tokens[0]
        assert ours.tolist() == _peft_greedy(pm, prompt, 8, shifted)
