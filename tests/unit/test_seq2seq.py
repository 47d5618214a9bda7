"""Encoder-decoder models (T5): the batch split (prompt -> encoder, completion -> decoder) checked by hand, SFT, DPO
and ORPO through the one loop with the methods that make sense there, generation, PEFT interop, and refusals."""

from __future__ import annotations

import json

import pytest
import torch

from tuneforge.algorithms._logps import sequence_logps_from_model
from tuneforge.api import train
from tuneforge.config import ConfigError, load_config
from tuneforge.data.seq2seq import IGNORE, model_inputs, seq2seq_batch
from tuneforge.methods import METHOD_CONFIGS, apply_methods, load_adapter, save_adapter
from tuneforge.models.tiny import build_tiny
from conftest import assert_we_load_peft, perturb_trainable, write_jsonl

from tuneforge.tasks import make_examples, preference_pairs
from tuneforge.train.rollout import generate


def test_batch_split_by_hand():
    # row 0: prompt [5, 6, 7], completion [8, 9]; row 1: prompt [5], completion [4, 3, 2]; right-padded with 0
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9], [5, 4, 3, 2, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
             "labels": torch.tensor([[IGNORE, IGNORE, IGNORE, 8, 9], [IGNORE, 4, 3, 2, IGNORE]]),
             "chosen_index": torch.tensor([0])}
    out = seq2seq_batch(batch, start_id=1, pad_id=0)
    assert out["encoder_input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert out["encoder_attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["input_ids"].tolist() == [[1, 8, 9, 0], [1, 4, 3, 2]]  # start token, then teacher forcing
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert out["labels"].tolist() == [[IGNORE, 8, 9, IGNORE], [IGNORE, 4, 3, 2]]
    assert out["chosen_index"].tolist() == [0]  # other keys pass through
    kw = model_inputs(out)
    assert set(kw) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"}
    with pytest.raises(ValueError, match="needs a prompt"):
        seq2seq_batch({**batch, "labels": batch["input_ids"]}, 1, 0)


def test_sequence_logps_equal_the_models_own_loss():
    """log p(completion | prompt) from the shared helper = -(T5's own label loss) x tokens, on the same rows."""
    model, tok = build_tiny("t5")
    batch = seq2seq_batch({"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "attention_mask": torch.ones(1, 5,
                                                                                                       dtype=torch.long),
                           "labels": torch.tensor([[IGNORE, IGNORE, IGNORE, 8, 9]])}, start_id=0, pad_id=0)
    logps, n = sequence_logps_from_model(model, batch)
    ref = model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[8, 9]])).loss  # T5 shifts labels itself
    assert n.tolist() == [2]
    torch.testing.assert_close(logps[0], -2 * ref, atol=1e-5, rtol=0)


def _files(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", make_examples("copy", 200, seed=1))
    held = write_jsonl(tmp_path / "held.jsonl", make_examples("copy", 40, seed=2))
    pref = write_jsonl(tmp_path / "pref.jsonl", preference_pairs("reverse", 40, seed=1))
    return sft, held, pref


def _cfg(tmp_path, data, method, algorithm="sft", steps=3, lr=1e-2, **extra):
    return load_config({"model": {"path": "tiny:t5"}, "data": {"train": data, "max_len": 64, **extra},
                        "method": method, "algorithm": {"name": algorithm},
                        "train": {"output_dir": str(tmp_path / f"run-{algorithm}"), "max_steps": steps,
                                  "batch_size": 8, "learning_rate": lr, "progress": False, "tensorboard": False,
                                  "log_every": 1000}})


def test_sft_learns_and_generates(tmp_path):
    sft, held, _ = _files(tmp_path)
    cfg = _cfg(tmp_path, sft, [{"name": "full"}], steps=60, lr=3e-3, eval=held)
    cfg.train.eval_every = 60
    out = train(cfg)
    h = out.result.history
    assert h[-1]["eval_loss"] < 0.7 * h[0]["loss"], (h[0], h[-1])  # held-out loss well below the start
    from tuneforge.models.load import load_model

    trained, tok = load_model(load_config({"model": {"path": str(out.saved)}, "data": {"train": sft}}).model)
    assert type(trained).__name__ == "T5ForConditionalGeneration"
    texts = generate(trained, tok, ["abc", "hello"], max_new_tokens=8)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.mark.parametrize("method", [[{"name": "lora", "rank": 4}], [{"name": "ia3"}], [{"name": "houlsby"}],
                                    [{"name": "bitfit", "add_bias": True}], [{"name": "full"}],
                                    [{"name": "qlora", "rank": 4}], [{"name": "prompt_tuning", "num_virtual_tokens": 4}],
                                    [{"name": "freeze", "top_k": 1}],
                                    [{"name": "houlsby"}, {"name": "adapter_drop", "drop_layers": 1}],
                                    [{"name": "p_tuning", "num_virtual_tokens": 3, "encoder": "lstm"}]])
@pytest.mark.parametrize("algorithm", ["sft", "dpo", "orpo"])
def test_methods_train_under_seq2seq_algorithms(tmp_path, method, algorithm):
    sft, _, pref = _files(tmp_path)
    out = train(_cfg(tmp_path, sft if algorithm == "sft" else pref, method, algorithm))
    assert len(out.result.history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in out.result.history)
    assert out.saved.exists()


def _vowel_pairs(n: int, seed: int) -> list[dict]:
    """Prompts of random letters; the chosen answer is 4 random vowels, the rejected 4 random consonants: a
    preference a random model can learn and carry to prompts and answers it never saw."""
    import random

    rng = random.Random(seed)
    word = lambda letters: "".join(rng.choice(letters) for _ in range(4))  # noqa: E731
    return [{"prompt": word("abcdefghijklmnopqrstuvwxyz") + ":", "chosen": word("aeiou"), "rejected": word("bcdfgklmnpst")}
            for _ in range(n)]


def test_dpo_moves_held_out_preferences_on_t5(tmp_path):
    from tuneforge.data import build_dataset
    from tuneforge.eval.metrics import preference_accuracy

    pref = write_jsonl(tmp_path / "pref.jsonl", _vowel_pairs(80, seed=1))
    held = write_jsonl(tmp_path / "held.jsonl", _vowel_pairs(100, seed=2))
    out = train(_cfg(tmp_path, pref, [{"name": "lora", "rank": 8}], "dpo", steps=30, lr=1e-2))
    model, tok = build_tiny("t5")
    ds = build_dataset(held, tok, max_len=64)  # pairs the run never saw
    before = preference_accuracy(model.eval(), ds, tok.pad_token_id)["preference_accuracy"]
    load_adapter(model, out.saved)
    after = preference_accuracy(model.eval(), ds, tok.pad_token_id)["preference_accuracy"]
    assert after >= 0.9 and after >= before + 0.3, (before, after)


def test_refusals(tmp_path):
    sft, _, pref = _files(tmp_path)
    with pytest.raises(ConfigError, match="does not run on an encoder-decoder"):
        train(load_config({"model": {"path": "tiny:t5"}, "data": {"train": pref},
                           "algorithm": {"name": "reward"}, "train": {"output_dir": str(tmp_path / "r")}}))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "just text"}] * 4)
    with pytest.raises(ConfigError, match="prompt/completion rows"):
        train(_cfg(tmp_path, text, [{"name": "lora", "rank": 2}]))
    model, tok = build_tiny("t5")
    with pytest.raises(ValueError, match="encoder-decoder"):
        apply_methods(model, [METHOD_CONFIGS["prefix_tuning"](name="prefix_tuning")], tokenizer=tok)


@pytest.mark.parametrize("name", ["lora", "ia3"])
def test_peft_loads_our_t5_adapter(tmp_path, name):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model, tok = build_tiny("t5")
    cfgs = [METHOD_CONFIGS[name](name=name)]
    apply_methods(model, cfgs, tokenizer=tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    save_adapter(model.eval(), cfgs, tmp_path / "a", base_path="tiny:t5")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    theirs = peft.PeftModel.from_pretrained(build_tiny("t5")[0].eval(), tmp_path / "a").eval()
    x = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "decoder_input_ids": torch.tensor([[0, 9, 10]])}
    with torch.no_grad():
        torch.testing.assert_close(theirs(**x).logits, model(**x).logits, atol=1e-5, rtol=0)


def test_rows_without_a_prompt_and_text_eval_files_are_refused_before_training(tmp_path):
    sft, _, _ = _files(tmp_path)
    rows = [{"prompt": "x:", "completion": "abcdefghijkl"}, {"prompt": "x:", "completion": "y"}]
    cut = write_jsonl(tmp_path / "cut.jsonl", rows)  # left truncation to 8 tokens leaves row 1 no prompt
    cfg = _cfg(tmp_path, cut, [{"name": "lora", "rank": 2}])
    cfg.data.max_len, cfg.data.truncation = 8, "left"
    with pytest.raises(ConfigError, match=r"no prompt tokens left for the encoder \(lines 1\)"):
        train(cfg)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "just text"}] * 4)
    with pytest.raises(ConfigError, match=r"data\.eval.*'text' rows"):
        train(_cfg(tmp_path, sft, [{"name": "lora", "rank": 2}], eval=text))
    assert not (tmp_path / "run-sft" / "checkpoints").exists()


def test_eval_command_on_t5(tmp_path, capsys):
    from tuneforge.cli import main

    sft, held, _ = _files(tmp_path)
    out = train(_cfg(tmp_path, sft, [{"name": "lora", "rank": 2}]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "tiny:t5", "--adapter", str(out.saved), "--data", held, "--exact-match",
              "--max-new-tokens", "4"])
    res = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert e.value.code == 0 and res["loss"] > 0 and 0.0 <= res["exact_match"] <= 1.0
    # one prompt (the streaming path): the text prompt goes to the encoder, as from a file
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "tiny:t5", "--adapter", str(out.saved), "--prompt", "abc", "--max-new-tokens", "4"])
    assert e.value.code == 0
    f = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "abc"}])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["generate", "--model", "tiny:t5", "--adapter", str(out.saved), "--file", f, "--max-new-tokens", "4"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["completion"] is not None


def _encoder_prompted(name):
    torch.manual_seed(0)
    model, tok = build_tiny("t5")
    cfgs = [METHOD_CONFIGS[name](name=name, num_virtual_tokens=3)]
    apply_methods(model.eval(), cfgs, tokenizer=tok)
    return perturb_trainable(model), tok, cfgs


T5_ROWS = {"input_ids": torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1],
                                                                                                   [1, 1, 0, 0]]),
           "decoder_input_ids": torch.tensor([[0, 9, 10], [0, 9, 10]])}


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning"])
def test_encoder_prompts_on_t5_match_peft_both_ways(tmp_path, name):
    """The virtual tokens go in front of the encoder's input (and the cross-attention mask): PEFT's
    PeftModelForSeq2SeqLM computes the same logits from our file, and we read its file (2 submodules: 2n rows, of
    which its prompt methods use the first n)."""
    peft = pytest.importorskip("peft")
    model, tok, cfgs = _encoder_prompted(name)
    save_adapter(model, cfgs, tmp_path / "a", base_path="tiny:t5")
    with torch.no_grad():
        ours = model(**T5_ROWS).logits
        plain = build_tiny("t5")[0].eval()(**T5_ROWS).logits
        theirs = peft.PeftModel.from_pretrained(build_tiny("t5")[0].eval(), tmp_path / "a").eval()
        assert (ours - plain).abs().max() > 1e-3
        torch.testing.assert_close(theirs(**T5_ROWS).logits, ours, atol=1e-5, rtol=0)
    peft_cfg = (peft.PromptTuningConfig if name == "prompt_tuning" else peft.PromptEncoderConfig)(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
    pm = peft.get_peft_model(build_tiny("t5")[0], peft_cfg)
    assert pm.peft_config["default"].num_transformer_submodules == 2
    assert_we_load_peft(pm, build_tiny("t5")[0], T5_ROWS, tmp_path / "p")


def test_encoder_prompt_generation_on_t5_is_the_forward_s_greedy_choice():
    """generate (the encoder run once, the decoder stepped with its cache) decodes what full forwards choose."""
    model, _, _ = _encoder_prompted("prompt_tuning")
    ids, mask = T5_ROWS["input_ids"], T5_ROWS["attention_mask"]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    seq = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=ids, attention_mask=mask, decoder_input_ids=seq).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert out.tolist() == seq.tolist()


def test_prefix_methods_on_t5_are_refused_with_the_alternative():
    model, tok = build_tiny("t5")
    for name in ("prefix_tuning", "p_tuning_v2"):
        with pytest.raises(ValueError, match="train prompt_tuning, p_tuning, lora or ia3"):
            apply_methods(model, [METHOD_CONFIGS[name](name=name)], tokenizer=tok)


def test_layer_methods_see_both_stacks_in_forward_order():
    """The encoder's blocks, then the decoder's: freeze's top layer is the decoder's last (nearest the output)."""
    from tuneforge.methods._inject import trainable_parameters
    from tuneforge.models import arch

    model, tok = build_tiny("t5")
    assert [n for n, _ in arch.blocks(model)] == ["encoder.block.0", "encoder.block.1", "decoder.block.0",
                                                  "decoder.block.1"]
    apply_methods(model, [METHOD_CONFIGS["freeze"](name="freeze", top_k=1)], tokenizer=tok)
    assert {k.split(".")[0] + "." + k.split(".")[2] for k in trainable_parameters(model)} == {"decoder.1"}
