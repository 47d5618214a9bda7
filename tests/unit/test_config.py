"""Config validation: every error at once, dotted paths, did-you-mean, nonsense refused before any model loads."""

import pytest
import yaml

from tuneforge.config import ConfigError, load_config
from conftest import base_config


def test_valid_config_round_trips(tmp_path, pc_file):
    cfg = load_config(base_config(tmp_path, pc_file))
    assert cfg.method[0].name == "lora" and cfg.method[0].rank == 4
    assert cfg.algorithm.name == "sft"
    assert len(cfg.hash()) == 16


def test_three_errors_reported_at_once_with_hint(tmp_path, pc_file):
    d = base_config(tmp_path, pc_file)
    d["train"]["learnig_rate"] = 1e-4
    d["method"] = [{"name": "lora", "rank": "eight"}, {"name": "loar"}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    paths = [p for p, _ in e.value.problems]
    assert "train.learnig_rate" in paths and "did you mean `learning_rate`" in msg
    assert "method.0.rank" in paths
    assert any(p.startswith("method.1") and "loar" in m and "lora" in m for p, m in e.value.problems)
    assert str(path) in msg


def test_top_level_typo_suggests_the_section_key(tmp_path, pc_file):
    """``learnig_rate:`` beside ``train:`` gets the same did-you-mean as inside it, with its section."""
    d = base_config(tmp_path, pc_file)
    d["learnig_rate"], d["modle"] = 1e-4, {}
    with pytest.raises(ConfigError) as e:
        load_config(d)
    got = dict(e.value.problems)
    assert "did you mean `train.learning_rate`" in got["learnig_rate"]
    assert "did you mean `model`" in got["modle"]


@pytest.mark.parametrize("override,key", [
    ("method.0.rank=0", "method.0.rank"),
    ("train.learning_rate=-1", "train.learning_rate"),
    ("data.train=/nope.jsonl", "data.train"),
    ("model.path=/no/such/model", "model.path"),
    ("model.path=tiny:nosuch", "model.path"),
])
def test_nonsense_fails_naming_the_key(tmp_path, pc_file, override, key):
    with pytest.raises(ConfigError) as e:
        load_config(base_config(tmp_path, pc_file), [override])
    assert key in [p for p, _ in e.value.problems]


def test_overrides_parse_yaml_values(tmp_path, pc_file):
    cfg = load_config(base_config(tmp_path, pc_file), ["train.max_steps=7", "method.0.alpha=3.5",
                                                       "train.precision=bf16"])
    assert cfg.train.max_steps == 7 and cfg.method[0].alpha == 3.5 and cfg.train.precision == "bf16"


def test_method_shorthands(tmp_path, pc_file):
    d = base_config(tmp_path, pc_file)
    d["method"] = "full"
    assert load_config(d).method[0].name == "full"
    d["method"] = {"name": "freeze", "top_k": 1}
    assert load_config(d).method[0].top_k == 1


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match="line"):
        load_config(p)


def test_remote_code_needs_revision(tmp_path, pc_file):
    with pytest.raises(ConfigError, match="revision"):
        load_config(base_config(tmp_path, pc_file), ["model.trust_remote_code=true"])


@pytest.mark.parametrize("revision", ["main", "v1.0", "0123abc", "sha256:xyz"])
def test_revision_must_be_a_pin_that_can_be_checked(tmp_path, pc_file, revision):
    """A branch name or short hash pins nothing for a local folder: refused when the config is read."""
    with pytest.raises(ConfigError, match="cannot pin checkpoint code"):
        load_config(base_config(tmp_path, pc_file), ["model.trust_remote_code=true", f"model.revision={revision}"])
    ok = load_config(base_config(tmp_path, pc_file), ["model.trust_remote_code=true", "model.revision=sha256:" + "0" * 64])
    assert ok.model.revision == "sha256:" + "0" * 64
