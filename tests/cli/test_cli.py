"""The CLI end to end on the tiny model: train, validate, generate, eval, merge, ls, data check."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tuneforge.cli import main
from conftest import base_config, write_jsonl


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture
def trained(tmp_path, pc_file, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tmp_path, pc_file, max_steps=3)))
    code, out, err = run(["train", str(cfg), "train.max_steps=2"], capsys)
    assert code == 0, err
    return tmp_path / "run"


def test_train_writes_adapter_logs_and_plot(trained):
    assert (trained / "adapter" / "adapter_config.json").exists()
    assert len((trained / "metrics.jsonl").read_text().splitlines()) == 2  # the override took effect
    assert (trained / "loss.png").stat().st_size > 0
    assert any((trained / "tensorboard").iterdir()) if (trained / "tensorboard").exists() else True
    assert (trained / "checkpoints").exists()


# RELIABILITY.md BI-4
def test_validate_reports_all_errors(tmp_path, pc_file, capsys):
    d = base_config(tmp_path, pc_file)
    d["train"]["learnig_rate"] = 1
    d["method"] = [{"name": "lora", "rank": "eight"}, {"name": "nosuch"}]
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    code, out, err = run(["validate", str(p)], capsys)
    assert code == 2
    assert "3 error(s)" in err and "learning_rate" in err and "method.0.rank" in err and "nosuch" in err


# RELIABILITY.md BI-5
def test_validate_checks_targets_without_loading_weights(tmp_path, pc_file, capsys):
    d = base_config(tmp_path, pc_file)
    d["method"][0]["target_modules"] = ["q_proj", "vproj"]
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(d))
    code, _, err = run(["validate", str(p)], capsys)
    assert code == 2 and "'vproj'" in err and "v_proj" in err
    code, out, _ = run(["validate", str(tmp_path / "t.yaml"), "method.0.target_modules=null"], capsys)
    assert code == 0 and "OK" in out


def test_generate_eval_merge(trained, pc_file, tmp_path, capsys):
    ad = str(trained / "adapter")
    code, out, _ = run(["generate", "--model", "tiny:llama", "--adapter", ad, "--prompt", "copy abc:",
                        "--max-new-tokens", "4"], capsys)
    assert code == 0 and len(out.strip("\n")) <= 4 * 8
    code, out, _ = run(["eval", "--model", "tiny:llama", "--adapter", ad, "--data", pc_file, "--exact-match",
                        "--max-new-tokens", "4"], capsys)
    res = json.loads(out)
    assert code == 0 and res["loss"] > 0 and 0 <= res["exact_match"] <= 1 and res["n"] == 64
    code, out, _ = run(["merge", "--model", "tiny:llama", "--adapter", ad, "--out", str(tmp_path / "merged")],
                       capsys)
    assert code == 0
    from transformers import AutoModelForCausalLM

    from tuneforge.methods import load_adapter
    from tuneforge.models.tiny import build_tiny

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ref, _ = build_tiny("llama")
    load_adapter(ref, ad)
    ids = torch.randint(5, 60, (2, 9))
    assert torch.allclose(merged(ids).logits, ref(ids).logits, atol=1e-5)


def test_ls_prints_methods_and_parameter_counts(capsys):
    code, out, _ = run(["ls", "--model", "tiny:llama"], capsys)
    assert code == 0
    for word in ("lora", "full", "freeze", "sft", "lora.yaml".removesuffix(".yaml"), "%"):
        assert word in out
    from tuneforge.methods import METHODS

    rows = {line.split()[0]: line for line in out.splitlines() if "% of the model" in line}
    assert set(rows) == set(METHODS) - {"adapter_fusion"}  # it needs trained members; its line says so
    assert "adapter_fusion" in out and "fuses adapters trained before" in out
    assert rows["ia3"].split()[1] == "384"  # 2 layers x (k 32 + v 32 + down_proj input 128)


def test_data_check_lists_bad_rows_and_writes_nothing(tmp_path, capsys):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a"}, "not an object", {"prompt": 3, "completion": "x"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    before = set(tmp_path.iterdir())
    code, out, err = run(["data", "check", str(path), "--model", "tiny:llama"], capsys)
    assert code == 1
    for line in (2, 3, 4, 5):
        assert f"{path}:{line}" in out + err
    assert set(tmp_path.iterdir()) == before


def test_bad_data_refused_before_model_load_and_no_output(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": "y"}, {"text": 5}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tmp_path, bad)))
    code, _, err = run(["train", str(cfg)], capsys)
    assert code == 2 and f"{bad}:2" in err
    assert not (tmp_path / "run").exists()


def test_module_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "tuneforge", "ls"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "lora" in res.stdout


def test_show_sample_marks_loss_tokens(tmp_path, capsys):
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [row])
    code, out, _ = run(["data", "check", path, "--model", "tiny:llama", "--show-sample"], capsys)
    assert code == 0 and "<|user|>hi</s><|assistant|>[[hello</s>]]" in out


def test_label_writes_preference_rows_from_a_judge(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "rev ab:", "responses": ["ab", "ba"]},
                                                   {"prompt": "rev cd:", "responses": ["dc", "cd"]},
                                                   {"prompt": "rev ee:", "responses": ["ee", "ee"]}])
    judge = tmp_path / "judge.py"
    judge.write_text("def rev(prompt, a, b):\n    w = prompt[4:-1][::-1]\n    return float(a == w) - float(b == w) / 2 + 0.5\n")
    out = tmp_path / "labelled.jsonl"
    code, stdout, err = run(["label", "--data", pairs, "--out", str(out), "--judge-function", f"{judge}:rev"], capsys)
    assert code == 0, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("ba", "ab"), ("dc", "cd")]
    assert json.loads(stdout)["ties_skipped"] == 1
    # an LM judge runs end to end too (a random tiny model: only the file's shape is checked)
    code, stdout, err = run(["label", "--data", pairs, "--out", str(out), "--judge-model", "tiny:llama"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["pairs"] == 3
    code, _, err = run(["label", "--data", pairs, "--out", str(out)], capsys)
    assert code == 2 and "exactly one of model" in err


def test_grpo_train_from_the_cli_and_a_raising_reward_is_a_clear_error(tmp_path, pc_file, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def score(prompts, completions, answers):\n    return 1 / 0\n")
    cfg = base_config(tmp_path, pc_file, max_steps=2, batch_size=2)
    cfg["algorithm"] = {"name": "grpo", "num_generations": 2, "max_new_tokens": 4,
                        "rewards": [{"name": "python", "function": f"{bad}:score"}]}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run(["train", str(path)], capsys)
    assert code == 2 and "0:python raised ZeroDivisionError" in err and "train.jsonl:" in err
    code, _, err = run(["train", str(path), "algorithm.rewards.0.name=length", "algorithm.rewards.0.target=3",
                        "algorithm.rewards.0.function=null"], capsys)
    assert code == 2 and "function" in err  # length takes no function: extra keys are refused
    cfg["algorithm"]["rewards"] = [{"name": "length", "target": 3}]
    path.write_text(yaml.safe_dump(cfg))
    code, _, err = run(["train", str(path)], capsys)
    assert code == 0, err


def test_merge_of_a_bottleneck_adapter_is_a_user_error(tmp_path, pc_file, capsys):
    """A Houlsby adapter trains, generates and evaluates like any other; merge says why it cannot, in one line."""
    d = base_config(tmp_path, pc_file, max_steps=2)
    d["method"] = [{"name": "houlsby", "bottleneck": 4}]
    cfg = tmp_path / "h.yaml"
    cfg.write_text(yaml.safe_dump(d))
    code, _, err = run(["train", str(cfg)], capsys)
    assert code == 0, err
    ad = str(tmp_path / "run" / "adapter")
    code, out, _ = run(["generate", "--model", "tiny:llama", "--adapter", ad, "--prompt", "copy abc:",
                        "--max-new-tokens", "4"], capsys)
    assert code == 0
    code, out, err = run(["merge", "--model", "tiny:llama", "--adapter", ad, "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "Traceback" not in err and "non-linear" in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert not (tmp_path / "m").exists()


def test_ls_lists_every_method_on_an_architecture_without_bottleneck_defaults(tmp_path, capsys):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                             word_embed_proj_dim=16)).save_pretrained(tmp_path / "opt")
    code, out, err = run(["ls", "--model", str(tmp_path / "opt")], capsys)
    assert code == 0, err
    assert "lora" in out and "houlsby" in out and "n/a" in out and "set target_modules" in out
