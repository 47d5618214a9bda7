"""SE-3: a checkpoint's own Python files never run unless the user opted in and pinned them (model.revision), and
the pin is checked: transformers ignores ``revision`` for local folders, so tuneforge verifies it itself.

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
from tuneforge.models.code_pin import code_digest, git_blob_id
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
    pin = code_digest(tmp_path)
    load_model(mcfg(tmp_path, trust=True, revision=pin))
    assert set(seen) == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    for name, kwargs in seen.items():
        assert kwargs["trust_remote_code"] is True, name
        assert kwargs["revision"] == pin, name
        assert kwargs["local_files_only"] is True, name


@pytest.mark.parametrize("component", ["config", "model_known_type", "tokenizer"])
def test_positive_control_trusted_code_does_run(evil, component, isolated_module_cache):
    """Proves the fixture: opting in (trust + pinned revision) imports the shipped module, writing the sentinel."""
    model_dir, sentinel = evil(component)
    with pytest.raises(ModelLoadError):  # the evil modules define no classes, so loading fails after import
        load_model(mcfg(model_dir, trust=True, revision=code_digest(model_dir)))
    assert sentinel.exists()


# ------------------------------------------------------------------ the pin is verified (transformers ignores it)
@pytest.mark.parametrize("loader", list(LOADERS))
def test_made_up_commit_on_a_plain_folder_is_refused_before_any_code_runs(evil, loader):
    """The reviewed defect: a folder that is no git repository, with an invented 40-hex revision, still ran its
    configuration_*.py. Now the pin is checked first, and the refusal prints the digest to pin."""
    model_dir, sentinel = evil("config")
    with pytest.raises(ModelLoadError) as info:
        LOADERS[loader](mcfg(model_dir, trust=True, revision="0123456789abcdef0123456789abcdef01234567"))
    assert "not the hub cache snapshot" in str(info.value) and code_digest(model_dir) in str(info.value)
    assert not sentinel.exists()


@pytest.mark.parametrize("change", ["edit", "add", "rename", "delete"])
def test_digest_pin_catches_any_change_to_the_code(evil, change):
    model_dir, sentinel = evil("config")
    pin = code_digest(model_dir)
    target = model_dir / "configuration_evil.py"
    if change == "edit":
        target.write_text(target.read_text() + "\n# one more line\n")
    elif change == "add":
        (model_dir / "helpers.py").write_text("x = 1\n")
    elif change == "rename":
        target.rename(model_dir / "configuration_evil2.py")
    else:
        (model_dir / "tokenization_evil.py").unlink()
    assert code_digest(model_dir) != pin
    # (a renamed module also leaves auto_map naming a file that is gone: refused for that reason first)
    with pytest.raises(ModelLoadError, match="does not match model.revision|not a .py file inside the folder"):
        load_model(mcfg(model_dir, trust=True, revision=pin))
    assert not sentinel.exists()


def test_digest_ignores_files_that_are_not_code_and_hidden_folders(tmp_path):
    (tmp_path / "modeling_x.py").write_text("A = 1\n")
    pin = code_digest(tmp_path)
    (tmp_path / "README.md").write_text("docs")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "hook.py").write_text("not shipped code")
    assert code_digest(tmp_path) == pin
    assert pin == code_digest(tmp_path) and pin.startswith("sha256:") and len(pin) == 7 + 64


def _snapshot(root: Path, files: dict[str, str]) -> tuple[Path, str]:
    """A hub-cache layout: snapshots/<commit>/<file> -> ../../blobs/<git blob id>."""
    commit = "a" * 40
    snap, blobs = root / "snapshots" / commit, root / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for name, text in files.items():
        blob = blobs / git_blob_id(text.encode())
        blob.write_text(text)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snap, commit


def test_hub_snapshot_commit_pin_verifies_each_code_blob(tmp_path):
    snap, commit = _snapshot(tmp_path, {"modeling_x.py": "A = 1\n"})
    load._remote_code_policy(mcfg(snap, trust=True, revision=commit))  # matches: no error
    with pytest.raises(ModelLoadError, match="not the hub cache snapshot"):
        load._remote_code_policy(mcfg(snap, trust=True, revision="b" * 40))
    (snap / "modeling_x.py").resolve().write_text("A = 2  # edited in the cache\n")
    with pytest.raises(ModelLoadError, match="not the blob of commit"):
        load._remote_code_policy(mcfg(snap, trust=True, revision=commit))


def test_git_blob_id_matches_git():
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git hash-object /dev/null
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


# ------------------------------------------------------- what a pin must cover besides the folder's own .py files
@pytest.mark.parametrize("where", ["absolute path", "other repo", "no such module"])
def test_auto_map_naming_code_outside_the_folder_is_refused(evil, tmp_path, where, isolated_module_cache):
    """The reviewed bypass: auto_map may name ``<repo or path>--module.Class``; transformers then imports that code,
    which no digest of the folder covers. Such entries are refused before any loader runs."""
    model_dir, sentinel = evil("config")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "configuration_evil.py").write_text(f"from pathlib import Path\nPath({str(sentinel)!r}).write_text('x')\n")
    ref = {"absolute path": f"{elsewhere}--configuration_evil.EvilConfig", "other repo": "someone/repo--configuration_evil.EvilConfig",
           "no such module": "configuration_missing.EvilConfig"}[where]
    _edit_json(model_dir / "config.json", auto_map={**CONFIG_MAP, "AutoConfig": ref})
    with pytest.raises(ModelLoadError, match="auto_map names code that is not a .py file inside the folder"):
        load_model(mcfg(model_dir, trust=True, revision=code_digest(model_dir)))
    assert not sentinel.exists()


def test_digest_covers_auto_map(evil):
    """Re-pointing a loader at another module of the folder changes what runs, so it changes the digest."""
    model_dir, _ = evil("config")
    pin = code_digest(model_dir)
    _edit_json(model_dir / "config.json", auto_map={**CONFIG_MAP, "AutoConfig": "modeling_evil.EvilConfig"})
    assert code_digest(model_dir) != pin
    _edit_json(model_dir / "config.json", auto_map=CONFIG_MAP)
    assert code_digest(model_dir) == pin


def test_digest_follows_symlinked_folders(tmp_path):
    """``from .pkg.mod import x`` imports through a symlinked folder; its files must be hashed (rglob skips them)."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "mod.py").write_text("A = 1\n")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "modeling_x.py").write_text("from .pkg.mod import A\n")
    (model_dir / "pkg").symlink_to(real, target_is_directory=True)
    (model_dir / "loop").symlink_to(model_dir, target_is_directory=True)  # a cycle is walked once
    pin = code_digest(model_dir)
    (real / "mod.py").write_text("A = 2  # changed behind the link\n")
    assert code_digest(model_dir) != pin


def test_hub_snapshot_auto_map_file_must_be_a_blob_too(tmp_path):
    snap, commit = _snapshot(tmp_path, {"modeling_x.py": "A = 1\n"})
    (snap / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.A"}}))  # a plain file
    with pytest.raises(ModelLoadError, match="not the blob of commit"):
        load._remote_code_policy(mcfg(snap, trust=True, revision=commit))


def test_legacy_list_auto_map_is_checked_too(evil, tmp_path, isolated_module_cache):
    """transformers still reads a tokenizer ``auto_map`` given as a bare [slow, fast] list; it was not checked, so
    an entry naming code outside the folder ran under a matching sha256 pin."""
    model_dir, sentinel = evil("tokenizer")
    elsewhere = tmp_path / "outside"
    elsewhere.mkdir()
    (elsewhere / "evil.py").write_text(f"from pathlib import Path\nPath({str(sentinel)!r}).write_text('x')\n")
    _edit_json(model_dir / "tokenizer_config.json", auto_map=[None, f"{elsewhere}--evil.EvilTokenizer"])
    with pytest.raises(ModelLoadError, match="auto_map names code that is not a .py file inside the folder"):
        load_tokenizer(mcfg(model_dir, trust=True, revision=code_digest(model_dir)))
    assert not sentinel.exists()
    _edit_json(model_dir / "tokenizer_config.json", auto_map=[None, "tokenization_evil.EvilTokenizer"])
    pin = code_digest(model_dir)
    _edit_json(model_dir / "tokenizer_config.json", auto_map=[None, "modeling_evil.EvilTokenizer"])
    assert code_digest(model_dir) != pin
