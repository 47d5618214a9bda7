"""SE-3: a checkpoint's own Python files never run unless the user opted in and pinned a revision.

Each fixture directory carries ``configuration_evil.py`` / ``modeling_evil.py`` / ``tokenization_evil.py`` that
write a sentinel file the moment they are imported, and an ``auto_map`` pointing the relevant Auto* loader at
them. A positive control (trust + revision) shows the sentinel really appears when the code runs, so its absence
elsewhere means something.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import transformers
import transformers.dynamic_module_utils as dynamic_modules

from tuneforge.models import load
from tuneforge.models.load import ModelLoadError, load_model, load_tokenizer, meta_model
from tuneforge.models.tiny import save_tiny

EVIL_MODULES = ("configuration_evil", "modeling_evil", "tokenization_evil")
CONFIG_MAP = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
MODEL_MAP = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}


def mcfg(path, trust=False, revision=None):
    return types.SimpleNamespace(path=str(path), dtype="auto", trust_remote_code=trust, revision=revision,
                                 attn_implementation=None)


def _edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


@pytest.fixture
def evil(tmp_path):
    """Factory: a real tiny llama dir, turned hostile for one sub-loader; returns (dir, sentinel)."""

    def make(component: str) -> tuple[Path, Path]:
        model_dir = tmp_path / component
        save_tiny("llama", model_dir)
        sentinel = tmp_path / f"ran-{component}"
        for module in EVIL_MODULES:
            (model_dir / f"{module}.py").write_text(
                f"from pathlib import Path\nPath({str(sentinel)!r}).write_text({module!r})\n"
            )
        if component == "config":
            _edit_json(model_dir / "config.json", model_type="evil", auto_map=CONFIG_MAP)
        elif component == "model":
            _edit_json(model_dir / "config.json", model_type="evil", auto_map=MODEL_MAP)
        elif component == "model_known_type":
            _edit_json(model_dir / "config.json", auto_map=MODEL_MAP)
        elif component == "tokenizer":
            _edit_json(model_dir / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
                       auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
        return model_dir, sentinel

    return make


@pytest.fixture
def isolated_module_cache(tmp_path, monkeypatch):
    """Keep transformers' copy of executed remote code out of ~/.cache and out of later tests."""
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("transformers_modules"):
            del sys.modules[name]


@pytest.mark.parametrize("component", ["config", "model", "tokenizer"])
def test_untrusted_remote_code_is_refused_and_never_runs(evil, component):
    model_dir, sentinel = evil(component)
    with pytest.raises(ModelLoadError) as info:
        load_model(mcfg(model_dir))
    message = str(info.value)
    assert str(model_dir) in message and "trust_remote_code" in message and "revision" in message
    assert not sentinel.exists()


@pytest.mark.parametrize("component", ["config", "model", "tokenizer"])
def test_transformers_is_also_told_not_to_trust(evil, component, monkeypatch):
    """Defence in depth: with our JSON pre-check switched off, the flags passed to transformers still refuse."""
    model_dir, sentinel = evil(component)
    monkeypatch.setattr(load, "_refuse_remote_code", lambda path: None)
    with pytest.raises(ModelLoadError, match=str(model_dir)):
        load_model(mcfg(model_dir))
    assert not sentinel.exists()


def test_known_architecture_ignores_shipped_modeling_code(evil):
    model_dir, sentinel = evil("model_known_type")
    with pytest.warns(UserWarning, match="NOT run"):
        model, _ = load_model(mcfg(model_dir))
    assert type(model) is transformers.LlamaForCausalLM
    assert not sentinel.exists()


# The lighter loaders (tokenizer only; module tree on the meta device) follow the same rules as load_model.
LOADERS = {"load_model": load_model, "load_tokenizer": load_tokenizer, "meta_model": meta_model}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("component", ["config", "model", "tokenizer"])
def test_trust_without_pinned_revision_is_refused(evil, component, loader):
    model_dir, sentinel = evil(component)
    with pytest.raises(ModelLoadError, match="revision"):
        LOADERS[loader](mcfg(model_dir, trust=True, revision=None))
    assert not sentinel.exists()


@pytest.mark.parametrize(("loader", "component"), [("load_tokenizer", "tokenizer"), ("load_tokenizer", "config"),
                                                   ("meta_model", "config"), ("meta_model", "model")])
def test_light_loaders_refuse_untrusted_code(evil, loader, component):
    model_dir, sentinel = evil(component)
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        LOADERS[loader](mcfg(model_dir))
    assert not sentinel.exists()


def test_trust_and_revision_reach_every_sub_loader(tmp_path, monkeypatch):
    save_tiny("llama", tmp_path)
    seen = {}
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            seen[_name] = kwargs
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model(mcfg(tmp_path, trust=True, revision="0123456789abcdef"))
    assert set(seen) == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    for name, kwargs in seen.items():
        assert kwargs["trust_remote_code"] is True, name
        assert kwargs["revision"] == "0123456789abcdef", name
        assert kwargs["local_files_only"] is True, name


@pytest.mark.parametrize("component", ["config", "model_known_type", "tokenizer"])
def test_positive_control_trusted_code_does_run(evil, component, isolated_module_cache):
    """Proves the fixture: opting in (trust + pinned revision) imports the shipped module, writing the sentinel."""
    model_dir, sentinel = evil(component)
    with pytest.raises(ModelLoadError):  # the evil modules define no classes, so loading fails after import
        load_model(mcfg(model_dir, trust=True, revision="0123456789abcdef"))
    assert sentinel.exists()
