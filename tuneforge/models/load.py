"""Load a causal LM and its tokenizer from ``tiny:<preset>`` or a local Hugging Face directory.

Security stance (why this module is stricter than plain ``from_pretrained``):

* Nothing is downloaded: every sub-loader gets ``local_files_only=True``.
* Repository code never runs unless the user opted in with ``trust_remote_code`` *and* pinned a ``revision``
  (the version of the code they reviewed), and the folder's code matches that pin (``code_pin.py``: transformers
  itself ignores ``revision`` for local folders). The check lives here as well as in the config schema, so library
  callers that build a config object by hand get the same protection. ``trust_remote_code`` and ``revision`` are
  passed to *every* sub-loader (config, model, tokenizer): one loader left at a default is enough for a
  checkpoint to smuggle code in through it.
* Before transformers sees the directory we read ``config.json`` / ``tokenizer_config.json`` as plain JSON and
  refuse a checkpoint whose architecture or tokenizer exists only as repository code, with a message that names
  the path and the fix instead of a deep transformers traceback.
* Weights are read as safetensors whenever the directory has them. A directory holding only pickle weights
  (``pytorch_model*.bin``) is loaded with ``use_safetensors=False`` and ``weights_only=True``. In transformers
  5.x ``PreTrainedModel.from_pretrained(weights_only=True)`` is the default, and the ``.bin`` branch of
  ``modeling_utils._load_pretrained_model`` calls ``modeling_utils.load_state_dict(ckpt_file, ...)``, whose
  ``weights_only`` parameter defaults to True and which first calls ``check_torch_load_is_safe()`` (torch >= 2.6)
  and then ``torch.load(..., weights_only=True)``: the restricted unpickler that refuses arbitrary globals. We pass
  ``weights_only=True`` explicitly anyway so a future default change cannot silently weaken this.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from tuneforge.models import arch
from tuneforge.models.code_pin import CodePinError, verify_code_pin
from tuneforge.models.tiny import ENCODERS, PRESETS, build_tiny, char_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, TypeError, AttributeError)


class ModelLoadError(ValueError):
    """A model directory or preset cannot be loaded; the message names the path and what to change."""


# Encoder-only model types: they classify (a ``*ForSequenceClassification`` head), they do not generate.
ENCODER_TYPES = ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                 "camembert", "mpnet", "modernbert")


def load_model(mcfg: Any, device: str | None = None, labels: list[str] | None = None):
    """Return ``(model, tokenizer)`` for a model config (any object with ``path``, ``dtype``,
    ``trust_remote_code``, ``revision`` and ``attn_implementation`` attributes).

    ``labels``: load a sequence classifier (``AutoModelForSequenceClassification``) with these classes, its head
    new (or the checkpoint's own when it is a classifier of the same classes). Without labels a checkpoint saved as a
    classifier loads as one, with its own labels; an encoder without labels is refused (it cannot generate).

    Duck typing keeps this module importable without the pydantic config layer, and lets tests pass a
    ``SimpleNamespace``.
    """
    path = source_path(mcfg)
    trust, revision = _remote_code_policy(mcfg)
    if path.startswith("tiny:"):
        model, tokenizer = _load_tiny(path.removeprefix("tiny:"), mcfg, labels)
    else:
        model, tokenizer = _load_local(Path(path).expanduser(), mcfg, trust, revision, labels)
    _ensure_pad_token(model, tokenizer)
    if device is not None:
        model.to(device)
    return model, tokenizer


def source_path(mcfg: Any) -> str:
    """The folder (or ``tiny:`` preset) to load: ``model.path`` itself, or for a GGUF source (a ``.gguf`` file, a
    folder plus ``model.gguf_file``, a packaged model's name) its dequantised copy (``models/gguf.py``)."""
    from tuneforge.models.gguf import GgufError, gguf_file, is_packaged, local_folder, packaged_file

    path = str(mcfg.path)
    if path.startswith("tiny:"):
        return path
    try:
        file = gguf_file(path, getattr(mcfg, "gguf_file", None))
        if file is None and is_packaged(path):  # a packaged Hugging Face folder
            return str(packaged_file(path))
        return path if file is None else str(local_folder(file))
    except GgufError as exc:
        raise ModelLoadError(str(exc)) from exc


def _remote_code_policy(mcfg: Any) -> tuple[bool, str | None]:
    """``(trust_remote_code, revision)``, refusing trust without a pinned revision.

    Every public loader here calls this, so a hand-built config object (bypassing the pydantic validator) cannot
    opt into running checkpoint code without naming the exact version that was reviewed.
    """
    trust = bool(getattr(mcfg, "trust_remote_code", False))
    revision = getattr(mcfg, "revision", None)
    if trust and not revision:
        raise ModelLoadError(
            f"{mcfg.path}: trust_remote_code=true runs code shipped with the checkpoint; pin the exact code you "
            "reviewed with model.revision (sha256:<digest of its .py files>, or a hub snapshot's commit), or set "
            "trust_remote_code=false"
        )
    folder = Path(str(mcfg.path)).expanduser()
    if trust and not str(mcfg.path).startswith("tiny:") and folder.is_dir():
        try:  # transformers ignores revision for local folders: the pin is checked here (models/code_pin.py)
            verify_code_pin(folder, revision)
        except CodePinError as exc:
            raise ModelLoadError(str(exc)) from None
    return trust, revision


def _resolve_dtype(name: str | None, auto: Any):
    """Map the config's dtype name to a torch dtype; ``auto`` means whatever ``auto`` stands for at the caller."""
    if name in (None, "auto"):
        return auto
    if name not in _DTYPES:
        raise ModelLoadError(f"model.dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


def _load_tiny(preset: str, mcfg: Any, labels: list[str] | None = None):
    if preset not in PRESETS:
        raise ModelLoadError(f"tiny:{preset}: unknown preset; choose one of {', '.join(sorted(PRESETS))}")
    dtype = _resolve_dtype(getattr(mcfg, "dtype", "float32"), torch.float32)
    return build_tiny(preset, dtype=dtype, attn_implementation=getattr(mcfg, "attn_implementation", None),
                      labels=labels)


def is_classifier_config(config: Any) -> bool:
    """A checkpoint saved as a sequence classifier (its ``architectures``)."""
    return any(str(a).endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def checkpoint_labels(mcfg: Any) -> list[str] | None:
    """The class names of a checkpoint saved as a sequence classifier, in class-id order (None: not a classifier,
    or a tiny preset), read from its config.json alone."""
    path = source_path(mcfg)
    file = Path(path).expanduser() / "config.json"
    if path.startswith("tiny:") or not file.is_file():
        return None
    cfg = _read_json(file)
    if not any(str(a).endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
        return None
    id2label = cfg.get("id2label") or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)] if id2label else None


def _classifier_kwargs(path: Path, config: Any, labels: list[str] | None) -> dict | None:
    """``from_pretrained`` options for a sequence classifier with ``labels`` (None: not a classifier load)."""
    if labels is None:
        if is_classifier_config(config):
            return {}
        if getattr(config, "model_type", None) in ENCODER_TYPES:
            raise ModelLoadError(f"{path} is an encoder ({config.model_type}): it classifies, it does not generate; "
                                 "train it with algorithm: classification, and run it with tuneforge classify")
        return None
    own = getattr(config, "id2label", None) or {}
    if is_classifier_config(config) and len(own) != len(labels):
        raise ModelLoadError(f"{path} is a classifier with {len(own)} labels ({', '.join(map(str, own.values()))}) "
                             f"but the data has {len(labels)} ({', '.join(labels)}); start from its base model, or "
                             "give algorithm.labels its label set")
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def _load_local(path: Path, mcfg: Any, trust: bool, revision: str | None, labels: list[str] | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_directory(path)
    if not trust:
        _refuse_remote_code(path)
    common = {"local_files_only": True, "trust_remote_code": trust, "revision": revision}
    config = _guarded("config", path, AutoConfig.from_pretrained, str(path), **common)
    model_kwargs = dict(common, config=config, dtype=_resolve_dtype(getattr(mcfg, "dtype", "auto"), "auto"))
    model_kwargs.update(_weight_kwargs(path))
    attn = getattr(mcfg, "attn_implementation", None)
    if attn:
        model_kwargs["attn_implementation"] = attn
    auto = AutoModelForCausalLM
    if getattr(config, "is_encoder_decoder", False):  # T5 and kin: prompt -> encoder, completion -> decoder
        from transformers import AutoModelForSeq2SeqLM as auto
    head = _classifier_kwargs(path, config, labels)
    if head is not None:  # a classifier (or a reward model with a one-label score head)
        from transformers import AutoModelForSequenceClassification as auto

        for k, v in head.items():
            setattr(config, k, v)
    model = _guarded("model", path, auto.from_pretrained, str(path), **model_kwargs)
    tokenizer = _guarded("tokenizer", path, AutoTokenizer.from_pretrained, str(path), **common)
    model.eval()
    return model, tokenizer


def _check_directory(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(
            f"model path {path} does not exist; give a local Hugging Face model directory (tuneforge never "
            "downloads) or tiny:<preset>"
        )
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a directory; point model.path at the folder holding config.json")
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} has no config.json, so it is not a Hugging Face model directory; point model.path at the folder "
            "written by save_pretrained (or tiny:<preset>)"
        )


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{file} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} must hold a JSON object")
    return data


def _refuse_remote_code(path: Path) -> None:
    """Refuse, from the JSON alone, a checkpoint that can only be built by running its own Python files.

    An ``auto_map`` next to an architecture transformers knows is harmless with trust_remote_code=False (the
    built-in class is used), so only unknown architectures / tokenizer classes are refused here.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    fix = "review that code, then set model.trust_remote_code=true with a pinned model.revision"
    config = _read_json(path / "config.json")
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        if config.get("auto_map"):
            raise ModelLoadError(
                f"{path}: model_type {model_type!r} is defined by Python files in the checkpoint "
                f"(auto_map {sorted(config['auto_map'])}); trust_remote_code is false. To run it, {fix}"
            )
        raise ModelLoadError(
            f"{path}: model_type {model_type!r} is not an architecture this transformers version knows; "
            "upgrade transformers or convert the checkpoint"
        )
    if config.get("auto_map"):
        warnings.warn(
            f"{path} ships custom code (auto_map {sorted(config['auto_map'])}) that is NOT run because "
            f"trust_remote_code is false; the built-in {model_type!r} implementation is used instead",
            stacklevel=4,
        )
    tok_file = path / "tokenizer_config.json"
    tok_config = _read_json(tok_file) if tok_file.is_file() else {}
    tok_class = tok_config.get("tokenizer_class")
    if tok_config.get("auto_map") and tok_class and tokenizer_class_from_name(tok_class) is None:
        raise ModelLoadError(
            f"{path}: tokenizer class {tok_class!r} is defined by Python files in the checkpoint; trust_remote_code is "
            f"false. To run it, {fix}"
        )


def _weight_kwargs(path: Path) -> dict:
    """Prefer safetensors; fall back to pickle weights only through torch's restricted ``weights_only`` loader."""
    if any(path.glob("*.safetensors")):
        return {"use_safetensors": True}
    if any(path.glob("pytorch_model*.bin")):
        warnings.warn(
            f"{path} has only pickle weights (pytorch_model*.bin); loading them with torch.load(weights_only=True). "
            "Convert to safetensors to avoid pickle entirely.",
            stacklevel=3,
        )
        return {"use_safetensors": False, "weights_only": True}
    raise ModelLoadError(
        f"{path} holds no model weights (*.safetensors or pytorch_model*.bin); save the model with save_pretrained"
    )


def _refused_pickle(path: Path, exc: Exception) -> ModelLoadError:
    """torch's restricted unpickler refused a ``.bin``: say what it found and how to convert without unpickling
    anything (only torch's unrestricted unpickler would read it, and that runs whatever the pickle names)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = f"the pickled Python object {found.group(1)}" if found else "Python objects besides tensors"
    return ModelLoadError(
        f"{path}: its only weights are a pickle (pytorch_model*.bin) holding {what}, which tuneforge refuses to "
        "unpickle (torch.load(weights_only=True) allows tensors only; anything more can run code). Convert it to "
        "safetensors where you trust the file: load the state dict in that environment and save it with "
        "safetensors.torch.save_file (keep only its tensors), or re-save the model with "
        "save_pretrained(safe_serialization=True)")


def _guarded(what: str, path: Path, loader, *args, **kwargs):
    """Run one transformers sub-loader and turn its many exception types into one actionable ModelLoadError."""
    try:
        return loader(*args, **kwargs)
    except pickle.UnpicklingError as exc:
        raise _refused_pickle(path, exc) from None
    except _LOAD_ERRORS as exc:
        text = str(exc)
        hint = ""
        if "trust_remote_code" in text or "custom code" in text:
            hint = " The checkpoint ships its own code: review it, then set model.trust_remote_code=true with a pinned model.revision."
        raise ModelLoadError(f"could not load the {what} from {path}: {text}{hint}") from exc


def _ensure_pad_token(model, tokenizer) -> None:
    """Batching needs a pad id; many causal LMs ship without one, and eos is the conventional stand-in.

    Padding positions are masked out of attention and loss, so reusing eos changes no training signal; the warning
    is there because it does mean a literal eos in the text is indistinguishable from padding by id alone.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("the tokenizer has neither a pad nor an eos token; add a pad token to the checkpoint")
        warnings.warn(f"tokenizer has no pad token; using eos {tokenizer.eos_token!r} as pad", stacklevel=3)
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None or (
            type(model).__name__.endswith("ForSequenceClassification") and model.config.pad_token_id != pad_id):
        model.config.pad_token_id = pad_id  # a decoder classifier pools at the last token that is not this id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = pad_id


def model_summary(model) -> dict:
    """A few facts for logs and run manifests; cheap enough to call on every run."""
    config = model.config
    params = list(model.parameters())
    first = params[0] if params else None
    return {
        "model_type": getattr(config, "model_type", type(model).__name__),
        "n_params": sum(p.numel() for p in params),
        "n_trainable": sum(p.numel() for p in params if p.requires_grad),
        "n_layers": len(arch.blocks(model)) or getattr(config, "num_hidden_layers", 0),
        "hidden": getattr(config, "hidden_size", None),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
    }


def load_tokenizer(mcfg: Any):
    """Only the tokenizer, so data can be checked before any weights load (same remote-code rules as the model)."""
    path = source_path(mcfg)
    if path.startswith("tiny:"):
        return char_tokenizer(encoder=path.removeprefix("tiny:") in ENCODERS)
    from transformers import AutoTokenizer

    local = Path(path).expanduser()
    _check_directory(local)
    trust, revision = _remote_code_policy(mcfg)
    if not trust:
        _refuse_remote_code(local)
    tok = _guarded("tokenizer", local, AutoTokenizer.from_pretrained, str(local), local_files_only=True,
                   trust_remote_code=trust, revision=revision)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def meta_model(mcfg: Any, labels: list[str] | None = None):
    """The model's module tree on the meta device: names and shapes, no weights read, no memory used.

    Used to check method targets and count parameters before (or instead of) a real load. ``labels`` as in
    ``load_model``; an encoder gets a two-label head when none are given (its layers are what matter here).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = source_path(mcfg)
    with torch.device("meta"):
        if path.startswith("tiny:"):
            return build_tiny(path.removeprefix("tiny:"), labels=labels)[0]
        local = Path(path).expanduser()
        _check_directory(local)
        trust, revision = _remote_code_policy(mcfg)
        if not trust:
            _refuse_remote_code(local)
        config = _guarded("config", local, AutoConfig.from_pretrained, str(local), local_files_only=True,
                          trust_remote_code=trust, revision=revision)
        # from_config hands code_revision to the dynamic-module loader, and drops it only on that branch.
        pinned = {"code_revision": revision} if trust else {}
        if labels is None and getattr(config, "model_type", None) in ENCODER_TYPES and not is_classifier_config(config):
            labels = ["0", "1"]
        head = _classifier_kwargs(local, config, labels)
        if head is None and getattr(config, "is_encoder_decoder", False):
            from transformers import AutoModelForSeq2SeqLM

            return AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=trust, **pinned)
        if head is None:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust, **pinned)
        for k, v in head.items():
            setattr(config, k, v)
        return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust, **pinned)
