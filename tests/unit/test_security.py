"""Security tests: malicious pickles are refused (SE-1) and no unsafe loader appears in tuneforge/."""

from __future__ import annotations

import ast
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch

import tuneforge
from tuneforge.safeio import UnsafeFileError, load_torch_weights

PACKAGE_DIR = Path(tuneforge.__file__).resolve().parent

# Offenders are never allowed; keep this empty - fix the code instead.
ALLOW_LIST: set[str] = set()

_TEXT_PATTERNS = {
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
    "pickle.load / pickle.loads": re.compile(r"\bpickle\s*\.\s*loads?\b"),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
}
_PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib"}
_PICKLE_FUNCS = {"load", "loads", "Unpickler"}
_TORCH_LOADS = {"torch.load", "torch.serialization.load"}


class Evil:
    """Unpickling this object creates ``sentinel`` - a stand-in for arbitrary code execution."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


# ---------------------------------------------------------------- the scanner


def _call_text(source: str, open_paren: int) -> str:
    """Source text of a call's argument list, up to the matching parenthesis."""
    depth = 0
    for i in range(open_paren, len(source)):
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        if depth == 0:
            return source[open_paren:i + 1]
    return source[open_paren:]


def _text_offences(source: str) -> list[tuple[int, str]]:
    """Plain-text grep: catches the patterns even in strings, comments and odd spellings."""
    found = []
    for reason, pattern in _TEXT_PATTERNS.items():
        found += [(source.count("\n", 0, m.start()) + 1, reason) for m in pattern.finditer(source)]
    for m in re.finditer(r"\btorch\s*\.\s*load\s*\(", source):
        if not re.search(r"weights_only\s*=\s*True", _call_text(source, m.end() - 1)):
            found.append((source.count("\n", 0, m.start()) + 1, "torch.load( without weights_only=True"))
    return found


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, from import statements (``from torch import load as L``)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _ast_offences(source: str) -> list[tuple[int, str]]:
    """Call-level check: catches aliased imports the text grep cannot see."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases) or ""
        module, _, func = name.rpartition(".")
        if module in _PICKLE_MODULES and func in _PICKLE_FUNCS:
            found.append((node.lineno, f"{name}() call"))
        elif name in _TORCH_LOADS:
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                found.append((node.lineno, f"{name}() without weights_only=True"))
    return found


def scan_source(source: str) -> list[tuple[int, str]]:
    return sorted(set(_text_offences(source)) | set(_ast_offences(source)))


def scan_package(root: Path) -> list[str]:
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        for line, reason in scan_source(path.read_text(encoding="utf-8")):
            entry = f"{rel}:{line}: {reason}"
            if entry not in ALLOW_LIST:
                offenders.append(entry)
    return offenders


# ---------------------------------------------------------------- repo-wide check


def test_no_unsafe_deserialisation_in_tuneforge():
    files = list(PACKAGE_DIR.rglob("*.py"))
    assert any(p.name == "safeio.py" for p in files), "scanner is not looking at the package"
    offenders = scan_package(PACKAGE_DIR)
    assert not offenders, "unsafe deserialisation in tuneforge/ (use tuneforge.safeio):\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\nsd = torch.load(path)\n",
        "import torch\nsd = torch.load(\n    path,\n    map_location='cpu',\n)\n",
        "import torch\nsd = torch.load(path, weights_only=False)\n",
        "import torch as T\nsd = T.load(path)\n",
        "from torch import load\nsd = load(path)\n",
        "from torch.serialization import load as L\nsd = L(path, weights_only=True if x else False)\n",
        "import pickle\nobj = pickle.load(fh)\n",
        "import pickle\nobj = pickle.loads(blob)\n",
        "import pickle as p\nobj = p.Unpickler(fh).load()\n",
        "from pickle import loads\nobj = loads(blob)\n",
        "import numpy as np\narr = np.load(path, allow_pickle=True)\n",
    ],
)
def test_scanner_flags_offenders(snippet):
    assert scan_source(snippet), f"scanner missed:\n{snippet}"


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\nsd = torch.load(path, weights_only=True, map_location='cpu')\n",
        "import torch\nsd = torch.load(\n    path,\n    weights_only=True,\n)\n",
        "import pickle\ntry:\n    pass\nexcept pickle.UnpicklingError:\n    pass\n",
        "import json\nobj = json.load(fh)\nobj = json.loads(text)\n",
    ],
)
def test_scanner_accepts_safe_code(snippet):
    assert scan_source(snippet) == []


# ---------------------------------------------------------------- SE-1


def _malicious_file(tmp_path: Path, name: str, zip_format: bool) -> tuple[Path, Path]:
    sentinel = tmp_path / f"pwned-{name}"
    path = tmp_path / name
    payload = {"weight": torch.ones(2, 2), "trap": Evil(sentinel)}
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    return path, sentinel


@pytest.mark.parametrize("name, zip_format", [("model.pt", True), ("pytorch_model.bin", False)])
def test_se1_malicious_pickle_is_refused(tmp_path, name, zip_format):
    path, sentinel = _malicious_file(tmp_path, name, zip_format)
    with pytest.raises(UnsafeFileError) as info:
        load_torch_weights(path)
    assert str(path) in str(info.value)
    assert "weights_only=False" not in str(info.value)  # never advise the unsafe loader
    assert not sentinel.exists()


def test_se1_raw_pickle_is_refused(tmp_path):
    sentinel = tmp_path / "pwned-raw"
    path = tmp_path / "weights.bin"
    path.write_bytes(pickle.dumps({"trap": Evil(sentinel)}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the unusual pickle protocol
        with pytest.raises(UnsafeFileError, match=re.escape(str(path))):
            load_torch_weights(path)
    assert not sentinel.exists()


def test_se1_control_the_crafted_file_really_executes_code(tmp_path):
    """Proves the refusal above is meaningful: an unsafe load of the same file runs the payload."""
    path, sentinel = _malicious_file(tmp_path, "model.pt", True)
    unsafe_kwargs = {"weights_only": False}  # the thing tuneforge must never do
    torch.load(path, map_location="cpu", **unsafe_kwargs)
    assert sentinel.exists()
