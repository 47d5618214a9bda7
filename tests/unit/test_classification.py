"""Classification on encoders (and decoders with a score head): rows, labels, the loss and metrics, the head saved
with the adapter in PEFT's layout, and the errors a user gets for bad files."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import assert_we_load_peft, perturb_trainable, run_cli

from tuneforge.algorithms import classification as C
from tuneforge.api import train
from tuneforge.config import ConfigError, load_config
from tuneforge.data.classification import (ClassificationDataset, build_classification_dataset, collate_classification,
                                           label_name, read_labels, sorted_labels)
from tuneforge.data.report import DataError
from tuneforge.methods import METHOD_CONFIGS, apply_methods, load_adapter, save_adapter
from tuneforge.models.labels import model_labels, read_labels as read_saved_labels
from tuneforge.models.load import load_model
from tuneforge.models.tiny import build_tiny, char_tokenizer


def _rows(n: int, seed: int) -> list[dict]:
    """Whether a 9-letter a/b string has more a's than b's: learnable in a few dozen steps by the tiny encoder."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = "".join(rng.choice("ab") for _ in range(9))
        out.append({"text": s, "label": "pos" if s.count("a") > s.count("b") else "neg"})
    return out


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _recipe(tmp_path, method, steps=60, **algo):
    train_file = _write(tmp_path / "train.jsonl", _rows(400, 0))
    eval_file = _write(tmp_path / "eval.jsonl", _rows(100, 1))
    return load_config({"model": {"path": "tiny:bert"}, "data": {"train": train_file, "eval": eval_file, "max_len": 32},
                        "method": method, "algorithm": {"name": "classification", **algo},
                        "train": {"output_dir": str(tmp_path / "run"), "max_steps": steps, "batch_size": 16,
                                  "learning_rate": 3e-3, "progress": False, "tensorboard": False, "log_every": 1000,
                                  "eval_every": steps}})


# ------------------------------------------------------------------------------------------------ rows and labels
def test_label_names_and_order():
    assert label_name(1) == label_name("1") == label_name(1.0) == "1"
    assert sorted_labels(["10", "2", "1"]) == ["1", "2", "10"]  # numerically: SST-2's 0 stays class 0
    assert sorted_labels(["pos", "neg"]) == ["neg", "pos"]
    with pytest.raises(ValueError, match="label"):
        label_name(1.5)
    with pytest.raises(ValueError, match="label"):
        label_name(True)


def test_tsv_file_as_glue_ships_it(tmp_path):
    f = tmp_path / "dev.tsv"
    f.write_text('sentence\tlabel\nit \'s a "charming journey . \t1\nbleak \t0\n')
    tok = char_tokenizer(encoder=True)
    ds = build_classification_dataset(str(f), tok)
    assert ds.labels == ["0", "1"] and [r["class_label"] for r in ds.rows] == [1, 0]
    assert ds.rows[0]["input_ids"][0] == tok.cls_token_id and ds.rows[0]["input_ids"][-1] == tok.sep_token_id


def test_sentence_pairs_use_the_pair_template(tmp_path):
    f = _write(tmp_path / "p.jsonl", [{"text_a": "ab", "text_b": "c", "label": 0}, {"sentence1": "x", "sentence2": "yz",
                                                                                   "label": 1}])
    ds = build_classification_dataset(f, char_tokenizer(encoder=True))
    assert ds.rows[0]["token_type_ids"] == [0, 0, 0, 0, 1, 1]
    batch = collate_classification(ds.rows, 0)
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 6] and batch["class_labels"].tolist() == [0, 1]


def test_bad_files_name_file_line_and_field(tmp_path):
    tok = char_tokenizer(encoder=True)
    f = _write(tmp_path / "e.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "maybe"}])
    with pytest.raises(DataError, match=r"e\.jsonl:2: label: 'maybe' is not one of the run's labels"):
        build_classification_dataset(f, tok, labels=["neg", "pos"])
    f = _write(tmp_path / "m.jsonl", [{"text": "a", "label": 1}, {"text": "b"}])
    with pytest.raises(DataError, match=r"m\.jsonl:2: label: missing"):
        build_classification_dataset(f, tok)
    t = tmp_path / "r.tsv"
    t.write_text("sentence\tlabel\ngood\t1\nbad\t0\tsurplus\n")
    with pytest.raises(DataError, match=r"r\.tsv:3: expected 2 fields \(from the header\), got 3"):
        build_classification_dataset(str(t), tok)
    f = _write(tmp_path / "pair.jsonl", [{"text_a": "a", "text_b": "b", "label": 1}])
    with pytest.raises(DataError, match=r"pair\.jsonl:1: text_b: sentence pairs need a tokenizer with a pair template"):
        build_classification_dataset(f, char_tokenizer())  # the decoders' tokenizer: no separator, no segments


def test_truncation_modes(tmp_path):
    tok = char_tokenizer(encoder=True)
    f = _write(tmp_path / "t.jsonl", [{"text": "abcdefgh", "label": 0}, {"text": "ab", "label": 1}])
    ds = build_classification_dataset(f, tok, max_len=6)
    assert len(ds.rows[0]["input_ids"]) == 6 and ds.rows[0]["input_ids"][-1] == tok.sep_token_id
    assert len(build_classification_dataset(f, tok, max_len=6, truncation="drop").rows) == 1
    with pytest.raises(DataError, match="longer than max_len"):
        build_classification_dataset(f, tok, max_len=6, truncation="error")


def test_read_labels_of_a_file(tmp_path):
    f = _write(tmp_path / "l.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": 10}, {"text": "c", "label": 2}])
    assert read_labels(f) == ["2", "10"]


# ------------------------------------------------------------------------------------------------ loss and metrics
def test_loss_is_the_step_mean_cross_entropy():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # p = (1/4, 3/4) and (1/2, 1/2)
    targets = torch.tensor([1, 0])
    want = -(math.log(0.75) + math.log(0.5)) / 4  # the step has 4 rows; this micro-batch 2 of them
    assert C.loss_fn(logits, targets, 4.0).item() == pytest.approx(want, rel=1e-6)


def test_accuracy_and_macro_f1_by_hand():
    # gold 0 0 0 1 1 2, predicted 0 0 1 1 0 2: class 0 tp2 fp1 fn1 -> 2/3; class 1 tp1 fp1 fn1 -> 1/2; class 2 -> 1
    s = C.scores([0, 0, 1, 1, 0, 2], [0, 0, 0, 1, 1, 2], 3)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_config_labels_must_be_distinct():
    with pytest.raises(ValueError):
        C.Config(labels=["a", "a"])


# ------------------------------------------------------------------------------------------------ training
def test_lora_on_an_encoder_learns_and_saves_the_head_in_peft_layout(tmp_path):
    out = train(_recipe(tmp_path, [{"name": "lora", "rank": 4}]))
    final = out.result.history[-1]
    assert final["eval_accuracy"] >= 0.85, final  # chance is ~0.5; 60 steps reach 1.0 on this task
    cfg = json.loads((out.saved / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    assert read_saved_labels(out.saved) == ["neg", "pos"]
    # reloading gives the trained classifier's predictions
    model, tok = load_model(load_config({"model": {"path": "tiny:bert"}, "data": {"train": str(tmp_path / "train.jsonl")}
                                         }).model, labels=["neg", "pos"])
    load_adapter(model, out.saved)
    ds = build_classification_dataset(str(tmp_path / "eval.jsonl"), tok, labels=["neg", "pos"])
    res = C.evaluate(model, ds, lambda rows: collate_classification(rows, tok.pad_token_id))
    assert res["accuracy"] == pytest.approx(final["eval_accuracy"])


@pytest.mark.parametrize("method", [[{"name": "full"}], [{"name": "houlsby"}], [{"name": "bitfit"}],
                                    [{"name": "ia3"}], [{"name": "prefix_tuning", "num_virtual_tokens": 4}]])
def test_methods_train_on_an_encoder(tmp_path, method):
    out = train(_recipe(tmp_path, method, steps=3))
    assert out.saved.exists() and (out.saved / ("config.json" if method[0]["name"] == "full" else "labels.json")).exists()
    if method[0]["name"] == "full":  # a whole classifier: its labels live in its config
        model, _ = load_model(load_config({"model": {"path": str(out.saved)}, "data": {"train": str(tmp_path / "train.jsonl")}}
                                          ).model)
        assert type(model).__name__ == "BertForSequenceClassification"
        assert model.config.id2label == {0: "neg", 1: "pos"}


def test_decoder_with_a_score_head_classifies(tmp_path):
    cfg = _recipe(tmp_path, [{"name": "lora", "rank": 4}], steps=3)
    cfg.model.path = "tiny:llama"
    out = train(cfg)
    assert json.loads((out.saved / "adapter_config.json").read_text())["modules_to_save"] == ["score"]


# ------------------------------------------------------------------------------------------------ refusals
def test_classification_rows_with_a_generative_algorithm(tmp_path):
    f = _write(tmp_path / "c.jsonl", _rows(4, 0))
    cfg = load_config({"model": {"path": "tiny:llama"}, "data": {"train": f},
                       "train": {"output_dir": str(tmp_path / "o"), "max_steps": 1, "progress": False}})
    with pytest.raises(ConfigError, match=r"c\.jsonl:1: classification rows .* use algorithm: classification"):
        train(cfg)
    assert not (tmp_path / "o").exists()


def test_generative_algorithm_on_an_encoder_is_refused(tmp_path):
    f = _write(tmp_path / "t.jsonl", [{"text": "hello"}])
    cfg = load_config({"model": {"path": "tiny:bert"}, "data": {"train": f},
                       "train": {"output_dir": str(tmp_path / "o"), "max_steps": 1, "progress": False}})
    with pytest.raises(ConfigError, match="is an encoder .*use algorithm: classification"):
        train(cfg)


def test_input_level_prompts_on_encoders_refuse_what_they_cannot_do():
    model, tok = build_tiny("bert")
    with pytest.raises(ValueError, match="after the input, which tuneforge does only in causal decoders"):
        apply_methods(model, [METHOD_CONFIGS["p_tuning"](name="p_tuning", template="[P:2] {prompt} [P:1]")])
    apply_methods(model, [METHOD_CONFIGS["prompt_tuning"](name="prompt_tuning", num_virtual_tokens=4)], tokenizer=tok)
    apply_methods(model, [METHOD_CONFIGS["prefix_tuning"](name="prefix_tuning", num_virtual_tokens=2)],
                  adapter="other")
    from tuneforge.methods._scope import adapter_scope

    with adapter_scope(model, ("default", "other")), pytest.raises(ValueError, match="in one forward"):
        model(**tok(["ab"], return_tensors="pt"))
    with adapter_scope(model, ["default", None]), pytest.raises(ValueError, match="same prompt length"):
        model(**tok(["ab", "ba"], return_tensors="pt"))  # one row prompted, one not
    with adapter_scope(model, "default"), pytest.raises(ValueError, match="exceed the model's 512 positions"):
        model(**tok(["a" * 600], return_tensors="pt", truncation=True, max_length=510))


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning"])
def test_input_level_prompt_on_an_encoder_is_peft_s_computation(tmp_path, name):
    """[P; E(x)] with the mask's and token types' columns in front: PEFT loads ours with the head and equal logits,
    and we load PEFT's."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model, tok = build_tiny("bert")
    model.eval()
    x = tok(["aab ab", "bbba"], padding=True, return_tensors="pt")
    plain = model(**x).logits.detach()
    cfgs = [METHOD_CONFIGS[name](name=name, num_virtual_tokens=3)]
    apply_methods(model, cfgs, tokenizer=tok)
    perturb_trainable(model)
    with torch.no_grad():
        model.classifier.weight.normal_()
    save_adapter(model, cfgs, tmp_path / "a", base_path="tiny:bert", modules_to_save=["classifier"])
    ours = model(**x).logits.detach()
    assert (ours - plain).abs().max() > 1e-3
    theirs = peft.PeftModel.from_pretrained(build_tiny("bert")[0].eval(), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**x).logits, ours, atol=1e-5, rtol=0)
    peft_cfg = (peft.PromptTuningConfig if name == "prompt_tuning" else peft.PromptEncoderConfig)(
        task_type="SEQ_CLS", num_virtual_tokens=3)
    assert_we_load_peft(peft.get_peft_model(build_tiny("bert")[0], peft_cfg), build_tiny("bert")[0], x, tmp_path / "p")


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning"])
def test_input_level_prompts_train_an_encoder_classifier_and_reload(tmp_path, name):
    """Through the loop with the head: the prompt gets gradients, and the saved adapter reloads to the run's own
    held-out figure. (Whether it *learns* is a pretrained encoder's question: benchmarks/sst2_methods.py on MiniLM;
    a random tiny encoder gives soft prompts nothing to steer.)"""
    out = train(_recipe(tmp_path, [{"name": name, "num_virtual_tokens": 4}], steps=6))
    final = out.result.history[-1]
    assert all(h["grad_norm"] > 0 for h in out.result.history)
    assert json.loads((out.saved / "adapter_config.json").read_text())["peft_type"] == name.upper()
    model, tok = load_model(load_config({"model": {"path": "tiny:bert"}, "data": {"train": str(tmp_path / "train.jsonl")}
                                         }).model, labels=["neg", "pos"])
    plain = C.evaluate(model, build_classification_dataset(str(tmp_path / "eval.jsonl"), tok, labels=["neg", "pos"]),
                       lambda rows: collate_classification(rows, tok.pad_token_id))
    load_adapter(model, out.saved)
    ds = build_classification_dataset(str(tmp_path / "eval.jsonl"), tok, labels=["neg", "pos"])
    res = C.evaluate(model, ds, lambda rows: collate_classification(rows, tok.pad_token_id))
    assert res["accuracy"] == pytest.approx(final["eval_accuracy"]) and res["loss"] != plain["loss"]


# ------------------------------------------------------------------------------------------------ PEFT interop
@pytest.mark.parametrize("name", ["lora", "ia3", "prefix_tuning", "p_tuning_v2"])
def test_peft_loads_our_encoder_adapter_and_head(tmp_path, name):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model, tok = build_tiny("bert")
    model.eval()
    cfgs = [METHOD_CONFIGS[name](name=name, **({"num_virtual_tokens": 3} if "p" in name[:2] else {}))]
    apply_methods(model, cfgs, tokenizer=tok)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
        model.classifier.weight.normal_()
    save_adapter(model, cfgs, tmp_path / "a", base_path="tiny:bert", modules_to_save=["classifier"])
    base, _ = build_tiny("bert")
    ours = model(**tok(["aab ab", "bbba"], padding=True, return_tensors="pt")).logits
    theirs = peft.PeftModel.from_pretrained(base.eval(), tmp_path / "a").eval()
    with torch.no_grad():
        plain = build_tiny("bert")[0].eval()(**tok(["aab ab", "bbba"], padding=True, return_tensors="pt")).logits
        got = theirs(**tok(["aab ab", "bbba"], padding=True, return_tensors="pt")).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter and head change the output
    torch.testing.assert_close(got, ours.detach(), atol=1e-5, rtol=0)


def test_we_load_peft_lora_classifier(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base, tok = build_tiny("bert")
    pm = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "p")
    pm.eval()
    x = tok(["aab ab", "bbba"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = pm(**x).logits
        ours, _ = build_tiny("bert")
        load_adapter(ours.eval(), tmp_path / "p")
        got = ours(**x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_dataset_split_keeps_labels(tmp_path):
    f = _write(tmp_path / "s.jsonl", _rows(20, 3))
    ds = build_classification_dataset(f, char_tokenizer(encoder=True))
    a, b = ds.split(0.25)
    assert isinstance(a, ClassificationDataset) and a.labels == b.labels == ds.labels and len(a) + len(b) == 20


# ------------------------------------------------------------------------------------------------ command line
_cli = run_cli


def test_classify_and_eval_commands(tmp_path, capsys):
    out = train(_recipe(tmp_path, [{"name": "lora", "rank": 4}], steps=3))
    capsys.readouterr()  # the training run's own output
    code, stdout, _ = _cli(["classify", "--model", "tiny:bert", "--adapter", str(out.saved), "--text", "aaab"], capsys)
    res = json.loads(stdout)
    assert code == 0 and res["label"] in ("neg", "pos") and sum(res["probs"].values()) == pytest.approx(1, abs=1e-4)
    preds = tmp_path / "preds.jsonl"
    code, stdout, _ = _cli(["classify", "--model", "tiny:bert", "--adapter", str(out.saved), "--file",
                            str(tmp_path / "eval.jsonl"), "--out", str(preds)], capsys)
    assert code == 0 and len(preds.read_text().splitlines()) == 100
    assert set(json.loads(stdout.splitlines()[-1])) >= {"accuracy", "macro_f1", "loss"}
    code, stdout, _ = _cli(["eval", "--model", "tiny:bert", "--adapter", str(out.saved), "--data",
                            str(tmp_path / "eval.jsonl")], capsys)
    assert code == 0 and 0.0 <= json.loads(stdout)["accuracy"] <= 1.0
    bad = _write(tmp_path / "bad.jsonl", [{"text": "ab", "label": "maybe"}])
    code, _, err = _cli(["classify", "--model", "tiny:bert", "--adapter", str(out.saved), "--file", bad], capsys)
    assert code == 2 and err.startswith("error:") and "bad.jsonl:1: label: 'maybe'" in err and "Traceback" not in err


def test_compare_scores_classifiers_by_accuracy(tmp_path, capsys):
    import yaml

    cfg = _recipe(tmp_path, [{"name": "lora", "rank": 4}], steps=2).model_dump(mode="json")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, stdout, err = _cli(["compare", str(path), "--methods", "lora:rank=2,houlsby", "--steps", "2", "--out",
                              str(tmp_path / "cmp")], capsys)
    assert code == 0, stdout + err
    res = json.loads((tmp_path / "cmp" / "compare" / "compare.json").read_text())
    assert res["metric"] == "accuracy" and res["higher_is_better"]
    assert all(0.0 <= r["metrics"]["accuracy"] <= 1.0 and r["status"] == "ok" for r in res["runs"])


def test_merged_classifier_equals_adapter_and_head(tmp_path, capsys):
    out = train(_recipe(tmp_path, [{"name": "lora", "rank": 4}], steps=3))
    capsys.readouterr()
    code, _, err = _cli(["merge", "--model", "tiny:bert", "--adapter", str(out.saved), "--out", str(tmp_path / "m")],
                        capsys)
    assert code == 0, err
    cfg = load_config({"model": {"path": "tiny:bert"}, "data": {"train": str(tmp_path / "train.jsonl")}})
    adapted, tok = load_model(cfg.model, labels=["neg", "pos"])
    load_adapter(adapted.eval(), out.saved)
    cfg.model.path = str(tmp_path / "m")
    merged, _ = load_model(cfg.model)  # a whole classifier: labels from its config
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    x = tok(["aab ab", "bbba"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(**x).logits, adapted(**x).logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ review fixes
def _tiny_roberta_classifier():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=80, num_labels=2, pad_token_id=1)
    return RobertaForSequenceClassification(cfg)


def test_a_heads_inner_layers_are_never_adapted_or_quantised():
    from tuneforge.models import arch

    model = _tiny_roberta_classifier()  # its head is classifier.dense + classifier.out_proj
    assert not [n for n in arch.linear_modules(model) if n.startswith("classifier")]
    apply_methods(model, [METHOD_CONFIGS["qlora"](name="qlora", rank=2)])
    assert type(model.classifier.dense) is torch.nn.Linear and type(model.classifier.out_proj) is torch.nn.Linear


def _classifier_checkpoint(tmp_path, labels):
    model, tok = build_tiny("bert", labels=labels)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


def test_a_classifier_checkpoint_keeps_its_class_order(tmp_path):
    from tuneforge.api import run_labels

    ckpt = _classifier_checkpoint(tmp_path, ["contradiction", "neutral", "entailment"])
    rows = [{"text": t, "label": lab} for t, lab in (("ab", "neutral"), ("ba", "entailment"), ("aa", "contradiction"))]
    f = _write(tmp_path / "nli.jsonl", rows)
    cfg = load_config({"model": {"path": ckpt}, "data": {"train": f}, "algorithm": {"name": "classification"},
                       "method": [{"name": "lora", "rank": 2}],
                       "train": {"output_dir": str(tmp_path / "o"), "max_steps": 1, "progress": False}})
    assert run_labels(cfg) == ["contradiction", "neutral", "entailment"]  # not sorted: the head's rows
    out = train(cfg)  # no false "3 labels vs 2" refusal before loading
    assert read_saved_labels(out.saved) == ["contradiction", "neutral", "entailment"]
    cfg.algorithm.labels = ["contradiction", "entailment", "neutral"]
    with pytest.raises(ConfigError, match="same order"):
        run_labels(cfg)
    cfg.algorithm.labels = None
    cfg.data.train = _write(tmp_path / "other.jsonl", [{"text": "ab", "label": "yes"}, {"text": "b", "label": "no"}])
    with pytest.raises(ConfigError, match="is a classifier of"):
        run_labels(cfg)


def test_accuracy_metric_is_a_share_under_accumulation(tmp_path):
    cfg = _recipe(tmp_path, [{"name": "lora", "rank": 2}], steps=2)
    cfg.train.batch_size, cfg.train.grad_accum = 2, 4
    out = train(cfg)
    assert all(0.0 <= h["accuracy"] <= 1.0 for h in out.result.history)


def test_integer_label_names_in_the_config():
    assert C.Config(labels=[0, 1]).labels == ["0", "1"]


def test_max_len_beyond_the_encoders_positions(tmp_path):
    cfg = _recipe(tmp_path, [{"name": "lora", "rank": 2}], steps=1)
    cfg.data.max_len = 600  # the tiny BERT has 512 positions
    with pytest.raises(ConfigError, match="has 512 positions"):
        train(cfg)


def test_classify_file_pairs_placeholders_and_bad_labels_json(tmp_path, capsys):
    out = train(_recipe(tmp_path, [{"name": "lora", "rank": 4}], steps=3))
    capsys.readouterr()
    f = _write(tmp_path / "mixed.jsonl", [{"text": "aab", "label": -1},
                                          {"text_a": "aab", "text_b": "bbbbbbbb", "label": -1}])
    code, stdout, err = _cli(["classify", "--model", "tiny:bert", "--adapter", str(out.saved), "--file", f], capsys)
    preds = [json.loads(x) for x in stdout.splitlines()]
    assert code == 0 and len(preds) == 2 and "accuracy" not in err  # a test split's -1: predictions, no metrics
    assert preds[0]["probs"] != preds[1]["probs"]  # the second text of the pair is read
    (out.saved / "labels.json").write_text("{not json")
    code, _, err = _cli(["classify", "--model", "tiny:bert", "--adapter", str(out.saved), "--text", "a"], capsys)
    assert code == 2 and err.startswith("error:") and "labels.json" in err and "Traceback" not in err


def test_we_load_peft_prefix_tuning_and_unnamed_lora_classifiers(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base, tok = build_tiny("bert")
    pm = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "prefix")
    x = tok(["aab ab", "bbba"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = pm.eval()(**x).logits
        ours = build_tiny("bert")[0].eval()
        load_adapter(ours, tmp_path / "prefix")
        torch.testing.assert_close(ours(**x).logits, want, atol=1e-5, rtol=0)
    lora = peft.get_peft_model(build_tiny("bert", labels=["a", "b", "c"])[0],
                               peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    lora.save_pretrained(tmp_path / "lora")  # no labels.json: three unnamed classes from the head's rows
    code, stdout, err = _cli(["classify", "--model", "tiny:bert", "--adapter", str(tmp_path / "lora"), "--text", "ab"],
                             capsys)
    assert code == 0, err
    assert set(json.loads(stdout)["probs"]) == {"LABEL_0", "LABEL_1", "LABEL_2"}


def test_a_decoder_classifier_pools_at_the_last_real_token_whatever_its_config_says():
    from types import SimpleNamespace

    mcfg = SimpleNamespace(path="tiny:llama", dtype="float32", trust_remote_code=False, revision=None,
                           attn_implementation=None)
    model, tok = load_model(mcfg, labels=["a", "b"])
    assert model.config.pad_token_id == tok.pad_token_id
    rows = [{"input_ids": tok("abcd")["input_ids"], "class_label": 0}, {"input_ids": tok("ab")["input_ids"],
                                                                         "class_label": 1}]
    with torch.no_grad():
        batch = C.forward_logits(model.eval(), collate_classification(rows, tok.pad_token_id))
        alone = C.forward_logits(model, collate_classification(rows[1:], tok.pad_token_id))
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=0)  # padding does not move the pooled token


def _tiny_encoder(kind: str):
    """Tiny encoders with what sets them apart: RoBERTa's positions from padding_idx + 1, ALBERT's embeddings
    narrower than its hidden size, DistilBERT's missing position_ids and token types."""
    import transformers as T

    torch.manual_seed(0)
    if kind == "roberta":
        return _tiny_roberta_classifier().eval()
    if kind == "albert":
        return T.AlbertForSequenceClassification(T.AlbertConfig(
            vocab_size=120, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=80, pad_token_id=0)).eval()
    return T.DistilBertForSequenceClassification(T.DistilBertConfig(
        vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=80, pad_token_id=0)).eval()


@pytest.mark.parametrize("kind,name", [("roberta", "prompt_tuning"), ("roberta", "prefix_tuning"),
                                       ("albert", "prompt_tuning"), ("albert", "p_tuning"),
                                       ("distilbert", "prompt_tuning")])
def test_soft_prompts_on_other_encoders_equal_peft(tmp_path, kind, name):
    """PEFT computes what we compute, and loads our file, across the encoders' differences (RoBERTa's positions in
    front of a key/value prefix and under explicit position_ids too; ALBERT's token_dim is its embedding width)."""
    peft = pytest.importorskip("peft")
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 1]]) if kind == "roberta" else torch.tensor([[5, 6, 7, 8, 9],
                                                                                                   [5, 6, 7, 0, 0]])
    x = {"input_ids": ids, "attention_mask": (ids > 1).long()}
    model = _tiny_encoder(kind)
    cfgs = [METHOD_CONFIGS[name](name=name, num_virtual_tokens=3)]
    apply_methods(model, cfgs)
    perturb_trainable(model)
    from tuneforge.models.arch import task_head_names

    save_adapter(model, cfgs, tmp_path / "a", base_path="x", modules_to_save=task_head_names(model))
    theirs = peft.PeftModel.from_pretrained(_tiny_encoder(kind), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, theirs(**x).logits, atol=1e-5, rtol=0)
        if kind == "roberta" and name == "prompt_tuning":  # RoBERTa's own positions, given explicitly
            pos = torch.arange(2, 7)[None].expand(2, 5)
            torch.testing.assert_close(model(**x, position_ids=pos).logits, theirs(**x).logits, atol=1e-5, rtol=0)


def test_encoder_prompt_refusals_and_inference_truncation(tmp_path):
    from tuneforge.eval.classify import classify_texts
    from tuneforge.methods._soft_prompt import max_positions

    from transformers import MPNetConfig, MPNetForSequenceClassification

    mpnet = MPNetForSequenceClassification(MPNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=4, intermediate_size=64,
                                                       max_position_embeddings=66, pad_token_id=1))
    assert max_positions(mpnet) == 64  # an absolute table from padding_idx + 1, beside its relative buckets
    model, tok = build_tiny("bert")
    with pytest.raises(ValueError, match="in one adapter"):  # one adapter cannot hold both kinds on an encoder
        apply_methods(model, [METHOD_CONFIGS["prompt_tuning"](name="prompt_tuning", num_virtual_tokens=2),
                              METHOD_CONFIGS["prefix_tuning"](name="prefix_tuning", num_virtual_tokens=2)])
    model, tok = build_tiny("bert")
    model.config.classifier_pooling = "mean"  # as ModernBERT's: the head pools with the caller's T-column mask
    with pytest.raises(ValueError, match="mean-pools"):
        apply_methods(model, [METHOD_CONFIGS["prompt_tuning"](name="prompt_tuning")])
    model, tok = build_tiny("bert")
    apply_methods(model.eval(), [METHOD_CONFIGS["prompt_tuning"](name="prompt_tuning", num_virtual_tokens=4)],
                  tokenizer=tok)
    out = classify_texts(model, tok, ["ab" * 400], max_len=512)  # 512 input tokens would not fit beside 4
    assert len(out) == 1 and set(out[0]["probs"]) == set(model_labels(model))
