"""Every shipped recipe validates, and its method targets exist on the tiny model of its family."""

from pathlib import Path

import pytest

from tuneforge.api import check_targets
from tuneforge.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path):
    cfg = load_config(path, check_files=False)
    check_targets(cfg)
    for preset in ("tiny:gpt2", "tiny:gpt_neox"):
        check_targets(load_config(path, [f"model.path={preset}"], check_files=False))
