"""Run configuration: pydantic v2 models, YAML loading, dotted overrides and "did you mean" errors.

Every section forbids unknown keys (``extra="forbid"``) so that a typo such as ``learnig_rate`` is an error rather
than a silently ignored setting. Methods and algorithms are discriminated unions on ``name``: each method module
contributes its own ``Config`` class, so adding a method never touches this file beyond the registry import.

``load_config`` collects *every* problem (YAML syntax, unknown keys with suggestions, wrong types, missing files) and
raises one ``ConfigError`` listing them with their dotted key paths, before any model is loaded.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneforge.methods import METHOD_CONFIGS
from tuneforge.models.gguf import PACKAGED, GgufError, is_packaged, packaged_file
from tuneforge.algorithms import ALGORITHM_CONFIGS
from tuneforge.models.code_pin import pin_format_error


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(Strict):
    path: str = Field(description="local Hugging Face model directory, a .gguf file, a packaged model's name "
                      "(smollm2), or tiny:<preset> to build one in code")
    gguf_file: str | None = Field(None, description="the .gguf file inside model.path, when path is a folder")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    revision: str | None = Field(None, description="pins the checkpoint's code, required with trust_remote_code: "
                                 "sha256:<digest of the folder's .py files> or a hub snapshot's commit")
    attn_implementation: str | None = "sdpa"

    @model_validator(mode="after")
    def _remote_code_needs_revision(self):
        if self.trust_remote_code and not self.revision:
            raise ValueError("trust_remote_code=true needs a pinned model.revision (the code you agreed to run)")
        bad = pin_format_error(self.revision)
        if bad:
            raise ValueError(bad)
        return self


class DataConfig(Strict):
    train: str = Field(description="JSONL, CSV or Parquet file of training rows")
    eval: str | None = None
    format: Literal["auto", "text", "prompt_completion", "messages", "preference"] = "auto"
    max_len: int = Field(512, gt=0)
    truncation: Literal["right", "left", "drop", "error"] = "right"
    packing: bool = False
    skip_bad_rows: bool = False
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="held out from train when no eval file")


class TrainConfig(Strict):
    output_dir: str = "runs/tuneforge"
    seed: int = 0
    max_steps: int | None = Field(None, gt=0)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(4, gt=0, description="rows per micro-batch on each process")
    grad_accum: int = Field(1, gt=0)
    group_by_length: bool = Field(False, description="batch rows of similar length together (less padding, faster "
                                  "steps on short, uneven rows), in windows of 50 shuffled batches as HF's Trainer")
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw8bit = moments stored blockwise "
                                                                          "in 8 bits (Dettmers et al. 2022)")
    optimizer_offload: bool = Field(False, description="keep optimizer moments in CPU RAM (adamw8bit)")
    paged_optimizer: bool = Field(False, description="CUDA unified-memory optimizer state; refused on CPU")
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast where the "
                                                        "hardware has native bf16 matmuls, else fp32")
    frozen_bf16: bool = Field(True, description="under bf16 with adapter methods, store frozen linear weights in "
                                                "bf16 (same results as autocast, half their memory)")
    share_prompts: bool = Field(True, description="score responses that follow one prompt (a preference pair, a "
                                                  "GRPO group) with the prompt computed once (same log-probs, fewer "
                                                  "tokens; sdpa/eager attention)")
    eval_every: int = Field(0, ge=0)
    save_every: int = Field(0, ge=0, description="0 = only at the end")
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(1, gt=0)
    nan_policy: Literal["skip", "raise", "ignore"] = "skip"
    max_bad_steps: int = Field(3, gt=0, description="consecutive non-finite steps before aborting")
    progress: bool = True
    tensorboard: bool = True
    deterministic: bool = False
    disable_dropout: bool | None = Field(
        None, description="set every dropout probability (the model's and the methods') to 0; null = the "
                          "algorithm's default: on for dpo, orpo, online_dpo, rlaif, grpo, ppo, off for sft, reward, "
                          "rejection_sampling")
    num_threads: int = Field(0, ge=0, description="torch threads; 0 = torch default")

    @model_validator(mode="after")
    def _optimizer_options(self):
        if (self.optimizer_offload or self.paged_optimizer) and self.optimizer != "adamw8bit":
            raise ValueError("optimizer_offload and paged_optimizer need optimizer: adamw8bit")
        if self.paged_optimizer:
            import torch

            if not torch.cuda.is_available():
                raise ValueError("paged_optimizer needs CUDA (state in CUDA unified memory, paged to RAM under "
                                 "pressure); on this machine use optimizer_offload: true instead")
        return self


MethodConfig = Annotated[Union[tuple(METHOD_CONFIGS.values())], Field(discriminator="name")]  # type: ignore[misc]
AlgorithmConfig = Annotated[Union[tuple(ALGORITHM_CONFIGS.values())], Field(discriminator="name")]  # type: ignore


class RunConfig(Strict):
    model: ModelConfig
    data: DataConfig
    method: list[MethodConfig] = Field(default_factory=lambda: [METHOD_CONFIGS["lora"](name="lora")])
    algorithm: AlgorithmConfig = Field(default_factory=lambda: ALGORITHM_CONFIGS["sft"](name="sft"))
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        """``method: lora``, ``method: {name: lora}`` and a list of either all mean a list of configs."""
        v = [v] if isinstance(v, (dict, str)) else v
        return [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _method_order(self):
        from tuneforge.methods import method_order_error

        order = method_order_error([m.name for m in self.method])
        if order:
            raise ValueError(f"method: {order}")
        return self

    def trajectory(self) -> dict:
        """Everything that changes the training trajectory (output location and display options excluded)."""
        d = self.model_dump(mode="json")
        for key in ("output_dir", "progress", "tensorboard"):
            d["train"].pop(key, None)
        return d

    def hash(self) -> str:
        """Short hash of :meth:`trajectory`, stored in every checkpoint and checked on resume (CK-4)."""
        return hashlib.sha256(json.dumps(self.trajectory(), sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """All problems of one config, each as ``(dotted.path, message)``."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config"):
        self.problems = problems
        self.source = source
        lines = [f"{source}: {len(problems)} error(s)"] + [f"  {p or '<root>'}: {m}" for p, m in problems]
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------------------------------- overrides
def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.learning_rate=1e-4`` -> (["train", "learning_rate"], 1e-4); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError([(item, "override must look like dotted.key=value")], "command line")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = d
        for k in keys[:-1]:
            if isinstance(node, list):
                node = node[int(k)]
            else:
                node = node.setdefault(k, {})
        if isinstance(node, list):
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value
    return d


# -------------------------------------------------------------------------------------------------------- errors
def _model_at(loc: tuple, root: type[BaseModel] = None) -> type[BaseModel] | None:
    """The pydantic model class that owns the last key of ``loc`` (for did-you-mean on unknown keys)."""
    node: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if node in (None,) or not (isinstance(node, type) and issubclass(node, BaseModel)):
            if part in METHOD_CONFIGS:
                node = METHOD_CONFIGS[part]
                continue
            if part in ALGORITHM_CONFIGS:
                node = ALGORITHM_CONFIGS[part]
                continue
            return None
        field = node.model_fields.get(part)
        if field is None:
            node = METHOD_CONFIGS.get(part) or ALGORITHM_CONFIGS.get(part)
            continue
        ann = field.annotation
        node = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _dotted(loc: tuple, data: dict) -> str:
    """pydantic locs include the union tag (``method.0.lora.rank``); users wrote ``method.0.rank``."""
    out = []
    for part in loc:
        if isinstance(part, str) and (part in METHOD_CONFIGS or part in ALGORITHM_CONFIGS) and out:
            if out[-1] in ("algorithm",) or out[-1].isdigit():
                continue
        out.append(str(part))
    return ".".join(out)


def _candidates(owner: type[BaseModel]) -> list[str]:
    """The keys a misspelt key may have meant: the section's own, then one level down as ``section.key`` (a
    ``learnig_rate:`` written at the top level meant ``train.learning_rate``)."""
    own = list(owner.model_fields)
    nested = []
    for name, field in owner.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            nested += [f"{name}.{k}" for k in sub.model_fields]
    return own + [n for n in nested if n.split(".", 1)[1] not in own]


def _problems(err: ValidationError, data: dict) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        loc = e["loc"]
        path = _dotted(loc, data)
        if e["type"] == "extra_forbidden":
            owner = _model_at(loc)
            hint = ""
            if owner is not None:
                close = difflib.get_close_matches(str(loc[-1]), _candidates(owner), n=1, cutoff=0.6)
                hint = f"; did you mean `{close[0]}`?" if close else f"; allowed: {', '.join(owner.model_fields)}"
            problems.append((path, f"unknown key{hint}"))
        elif e["type"] == "union_tag_invalid":
            tag = e.get("ctx", {}).get("tag")
            known = list(METHOD_CONFIGS) if "method" in path else list(ALGORITHM_CONFIGS)
            close = difflib.get_close_matches(str(tag), known, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            problems.append((path + ".name", f"unknown name {tag!r} (known: {', '.join(known)}){hint}"))
        else:
            problems.append((path, e["msg"]))
    return problems


def _check_paths(cfg: RunConfig, base: Path) -> list[tuple[str, str]]:
    problems = []
    for key in ("train", "eval"):
        p = getattr(cfg.data, key)
        if p and not (base / p).exists() and not Path(p).exists():
            problems.append((f"data.{key}", f"file not found: {p}"))
    mp = cfg.model.path
    if is_packaged(mp):
        try:
            packaged_file(mp)
        except GgufError as exc:
            problems.append(("model.path", str(exc)))
    elif not mp.startswith("tiny:") and not Path(mp).exists() and not (base / mp).exists():
        problems.append(("model.path", f"model directory not found: {mp} (models load from local paths only, or "
                                       f"name a packaged model: {', '.join(PACKAGED)})"))
    if mp.startswith("tiny:"):
        from tuneforge.models.tiny import PRESETS

        if mp[5:] not in PRESETS:
            problems.append(("model.path", f"unknown tiny preset {mp[5:]!r} (known: {', '.join(PRESETS)})"))
    return problems


def _resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """Data and model paths in a recipe are relative to the recipe file when they exist there."""
    for key in ("train", "eval"):
        p = getattr(cfg.data, key)
        if p and not Path(p).is_absolute() and not Path(p).exists() and (base / p).exists():
            setattr(cfg.data, key, str(base / p))
    mp = cfg.model.path
    if mp not in PACKAGED and not mp.startswith("tiny:") and not Path(mp).is_absolute() and not Path(mp).exists() and (base / mp).exists():
        cfg.model.path = str(base / mp)
    return cfg


def load_config(source: str | os.PathLike | dict, overrides: list[str] | None = None,
                check_files: bool = True) -> RunConfig:
    """Read YAML (or a dict), apply dotted overrides, validate; raise one ``ConfigError`` with every problem."""
    name, base = "config", Path.cwd()
    if isinstance(source, dict):
        data = json.loads(json.dumps(source))
    else:
        path = Path(source)
        name, base = str(path), path.parent
        if not path.exists():
            raise ConfigError([("", f"file not found: {path}")], name)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise ConfigError([("", f"{where}invalid YAML: {getattr(e, 'problem', e)}")], name) from None
        if not isinstance(data, dict):
            raise ConfigError([("", "top level must be a mapping of sections (model, data, method, train)")], name)
    data = apply_overrides(data, overrides or [])
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_problems(e, data), name) from None
    cfg = _resolve_paths(cfg, base)
    if check_files:
        problems = _check_paths(cfg, base)
        if problems:
            raise ConfigError(problems, name)
    return cfg
