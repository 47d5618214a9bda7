"""Methods: what is trained and how the model is changed. One module per method, registered in ``METHODS``.

Each method module provides ``Config`` (pydantic, ``name`` literal), ``apply(model, cfg, adapter)``,
``merge(model, adapter)`` and ``state_dict(model, cfg, adapter)``; methods that PEFT also has add ``PEFT_TYPE``,
``peft_config(...)``, ``from_peft_config(...)`` and ``load_state_dict(...)`` so their files use PEFT's layout.

This package composes them: ``apply_methods`` freezes the base once and applies a list of configs in order (so
``[freeze(top_k=1), lora]`` trains the top block plus LoRA everywhere); ``save_adapter``/``load_adapter`` write and
read ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's layout when the run is one PEFT-native method,
tuneforge's ``"tuneforge_method"`` list otherwise).

Which tensor belongs to whom is asked of the methods, never read off names or shapes: each adapter layer type says
which of its tensors its method added and whether they take weight decay (``AdapterLayer.ADAPTER_TENSORS``), so
``adapter_tensors`` tells an adapter's tensor from a base weight even when one method's layer wraps another's (in
``[lora, ia3]`` the LoRA tensors sit under the IA3 wrapper's ``base_layer``). Everything else is the model's own.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import nn

from tuneforge.methods import (adapter_bias, adapter_drop, adapter_fusion, bitfit, compacter, compacter_pp,
                               diff_pruning, freeze, full, houlsby, ia3, intrinsic, lokr, lora, p_tuning, p_tuning_v2,
                               parallel, pfeiffer, prefix_tuning, prompt_tuning, qlora, scaled_parallel, sparse,
                               unipelt)
from tuneforge.methods._inject import count_parameters, freeze_all
from tuneforge.methods._scope import adapter_layers, adapter_scope, set_active

METHODS = {"full": full, "freeze": freeze, "bitfit": bitfit, "diff_pruning": diff_pruning, "sparse": sparse,
           "lora": lora, "qlora": qlora, "lokr": lokr, "ia3": ia3, "houlsby": houlsby, "pfeiffer": pfeiffer,
           "parallel": parallel, "scaled_parallel": scaled_parallel, "prompt_tuning": prompt_tuning,
           "prefix_tuning": prefix_tuning, "p_tuning": p_tuning, "p_tuning_v2": p_tuning_v2, "compacter": compacter,
           "compacter_pp": compacter_pp, "adapter_bias": adapter_bias, "adapter_drop": adapter_drop,
           "adapter_fusion": adapter_fusion, "intrinsic": intrinsic, "unipelt": unipelt}
# virtual tokens (``_soft_prompt``; unipelt's prefix is one)
SOFT_PROMPTS = ("prompt_tuning", "prefix_tuning", "p_tuning", "p_tuning_v2", "unipelt")
METHOD_CONFIGS = {name: mod.Config for name, mod in METHODS.items()}
PEFT_TYPES: dict[str, str] = {}  # PEFT's type -> our method; the first listed wins (LORA -> lora, not qlora)
for _name, _mod in METHODS.items():
    if hasattr(_mod, "PEFT_TYPE"):
        PEFT_TYPES.setdefault(_mod.PEFT_TYPE, _name)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# tuneforge's own record of the methods, beside PEFT's config: PEFT warns about (and may one day refuse) keys it does
# not know, so adapter_config.json of a PEFT-layout adapter holds PEFT's keys only
METHODS_FILE = "tuneforge_adapter.json"

__all__ = ["METHODS", "METHOD_CONFIGS", "apply_methods", "prepare_methods", "regularizer", "step_methods", "finalize_methods", "adapter_scope", "set_active", "merge_methods",
           "save_adapter", "load_adapter", "method_state_dict", "count_parameters", "adapter_tensors", "weight_decays"]


class NothingToTrainError(ValueError):
    pass


# bottleneck adapters (``_bottleneck``)
WRAPS_SUBLAYERS = ("houlsby", "pfeiffer", "parallel", "scaled_parallel", "compacter", "compacter_pp", "adapter_bias",
                   "adapter_fusion", "unipelt")
# methods that may follow them in a list (soft prompts touch no layer; AdapterDrop acts on them)
AFTER_SUBLAYERS_OK = WRAPS_SUBLAYERS + ("full", "freeze", "prompt_tuning", "prefix_tuning", "p_tuning", "p_tuning_v2",
                                        "adapter_drop")


def method_order_error(names: list[str]) -> str | None:
    """Why a method list cannot be applied in this order, or None. A bottleneck adapter wraps the module at its
    target (``o_proj`` becomes ``o_proj.base``), so a method that targets or wraps linear layers by name (LoRA, IA3,
    QLoRA, BitFit, ...) must come before it, or it would miss or quantise those layers."""
    first = next((i for i, n in enumerate(names) if n in WRAPS_SUBLAYERS), None)
    late = [n for n in names[first + 1:] if n not in AFTER_SUBLAYERS_OK] if first is not None else []
    if late:
        return (f"{', '.join(late)} after {names[first]}: list the bottleneck adapters last (e.g. "
                f"[{', '.join(late + [names[first]])}]), so the linear layers they wrap are adapted first")
    drop = next((i for i, n in enumerate(names) if n == "adapter_drop"), None)
    after = [n for n in names[drop + 1:] if n in WRAPS_SUBLAYERS] if drop is not None else []
    if after:  # AdapterDrop acts on the adapters that exist when it is applied
        return (f"{', '.join(after)} after adapter_drop: list adapter_drop after every bottleneck adapter it should "
                f"drop (e.g. [{', '.join(after)}, adapter_drop])")
    return None


def _apply(model: nn.Module, cfg, adapter: str, tokenizer=None) -> None:
    """One method's ``apply``; the tokenizer goes to the methods that take one (a soft prompt's text init)."""
    fn = METHODS[cfg.name].apply
    if tokenizer is not None and "tokenizer" in inspect.signature(fn).parameters:
        fn(model, cfg, adapter, tokenizer=tokenizer)
    else:
        fn(model, cfg, adapter)


def apply_methods(model: nn.Module, cfgs: list, adapter: str = "default", tokenizer=None) -> None:
    """Freeze the base model, then apply each method config in order; refuse a result with nothing to train.
    ``tokenizer`` is needed by soft prompts initialised from text."""
    order = method_order_error([c.name for c in cfgs])
    if order:
        raise ValueError(order)
    freeze_all(model)
    for cfg in cfgs:
        _apply(model, cfg, adapter, tokenizer)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise NothingToTrainError(f"methods {[c.name for c in cfgs]} leave no trainable parameter in this model")


def adapter_tensors(model: nn.Module) -> dict[int, bool]:
    """id(tensor) -> whether it takes weight decay, for every tensor an adapter method added to ``model`` (any
    adapter name, trainable or not). A tensor not in it is the model's own: a base weight, a bias, a head."""
    out: dict[int, bool] = {}
    for layer in adapter_layers(model):
        for p, decays in layer.adapter_tensors().values():
            out[id(p)] = decays
    return out


def _is_norm(module: nn.Module) -> bool:
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
    return isinstance(module, norms) or "norm" in type(module).__name__.lower()  # LlamaRMSNorm, T5LayerNorm, ...


def _own_tensors_without_decay(model: nn.Module) -> set[int]:
    """The model's biases and normalisation gains/shifts: what AdamW practice (HF Trainer, PEFT) leaves undecayed,
    since pulling them toward 0 is no useful prior. Decided by the module that holds each tensor, not its shape."""
    out = set()
    for module in model.modules():
        norm = _is_norm(module)
        for name, p in module.named_parameters(recurse=False):
            if norm or name == "bias":
                out.add(id(p))
    return out


def weight_decays(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, bool]:
    """name -> whether AdamW's weight decay applies, for the trainable ``params`` of ``model``: an adapter's tensor
    as its method declares; the model's own tensors (full, freeze, BitFit, reward/value heads) all but biases and
    norm parameters."""
    adapters, plain = adapter_tensors(model), _own_tensors_without_decay(model)
    return {n: adapters[id(p)] if id(p) in adapters else id(p) not in plain for n, p in params.items()}


def prepare_methods(model: nn.Module, cfgs: list, losses, adapter: str = "default") -> None:
    """Data-dependent set-up before training (sparse fine-tuning's gradient selection); ``losses()`` returns a
    fresh iterator of calibration losses, computed by the caller on the training data."""
    for cfg in cfgs:
        if hasattr(METHODS[cfg.name], "prepare"):
            METHODS[cfg.name].prepare(model, cfg, losses(), adapter)


def regularizer(model: nn.Module, cfgs: list, adapter: str = "default") -> torch.Tensor | None:
    """The sum of the methods' penalty terms (diff pruning's L0), added to the loss once per optimizer step."""
    terms = [METHODS[c.name].regularizer(model, c, adapter) for c in cfgs if hasattr(METHODS[c.name], "regularizer")]
    terms = [t for t in terms if t is not None]
    return sum(terms) if terms else None


def has_regularizer(cfgs: list) -> bool:
    return any(hasattr(METHODS[c.name], "regularizer") for c in cfgs)


def step_methods(model: nn.Module, cfgs: list, step: int, total: int, adapter: str = "default") -> None:
    """Per-step schedules (diff pruning's projection at a fraction of the run), called by the loop before optimizer
    step ``step`` (0-based) of ``total``. Each method decides from the step and its own weights alone, so a resumed
    run and every process decide the same."""
    for cfg in cfgs:
        if hasattr(METHODS[cfg.name], "on_step"):
            METHODS[cfg.name].on_step(model, cfg, step, total, adapter)


def has_step_hook(cfgs: list) -> bool:
    return any(hasattr(METHODS[c.name], "on_step") for c in cfgs)


def finalize_methods(model: nn.Module, cfgs: list, adapter: str = "default") -> None:
    """End-of-training steps (diff pruning's projection to the target sparsity), before saving."""
    for cfg in cfgs:
        if hasattr(METHODS[cfg.name], "finalize"):
            METHODS[cfg.name].finalize(model, cfg, adapter)


def merge_methods(model: nn.Module, cfgs: list, adapter: str = "default", unload: bool = True) -> nn.Module:
    """Fold every method that can be folded into the base weights; with ``unload`` restore plain HF modules. A list
    with a method that cannot be folded is refused before anything is merged (no half-merged model): a method that
    never merges, or a config whose options rule it out (``merge_refusal()``: a gated LoRA)."""
    from tuneforge.methods._bottleneck import NotMergeableError

    for cfg in cfgs:
        if not getattr(METHODS[cfg.name], "MERGEABLE", True):
            METHODS[cfg.name].merge(model, adapter)  # raises its reason
        reason = getattr(cfg, "merge_refusal", lambda: None)()
        if reason:
            raise NotMergeableError(reason)
    for cfg in cfgs:
        METHODS[cfg.name].merge(model, adapter)
        if unload and hasattr(METHODS[cfg.name], "unload"):
            METHODS[cfg.name].unload(model)
    return model


def method_state_dict(model: nn.Module, cfgs: list, adapter: str = "default") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for cfg in cfgs:
        out.update(METHODS[cfg.name].state_dict(model, cfg, adapter))
    return out


def _is_peft_native(cfgs: list) -> bool:
    """One method PEFT has, with no option PEFT's config cannot hold (``peft_layout()``: a gated LoRA)."""
    return (len(cfgs) == 1 and hasattr(METHODS[cfgs[0].name], "PEFT_TYPE")
            and getattr(cfgs[0], "peft_layout", lambda: True)())


# PEFT's key prefixes for a module saved whole (``modules_to_save``): a tuner wraps the model once more
# (``base_model.model.classifier``) than a prompt-learning method does (``base_model.classifier``)
HEAD_PREFIX, PROMPT_HEAD_PREFIX = "base_model.model.", "base_model."
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")


def head_state_dict(model: nn.Module, names: list[str], prefix: str = HEAD_PREFIX) -> dict[str, torch.Tensor]:
    """A classifier's head tensors under PEFT's keys, e.g. ``base_model.model.classifier.weight`` (what
    ``get_peft_model_state_dict`` writes for ``modules_to_save``)."""
    return {f"{prefix}{n}.{k}": v for n in names for k, v in getattr(model, n).state_dict().items()}


def save_adapter(model: nn.Module, cfgs: list, out_dir: str | Path, adapter: str = "default",
                 base_path: str | None = None, modules_to_save: list[str] | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (atomically, file by file).

    ``modules_to_save``: top-level modules trained in full beside the adapter (a classifier's head), saved whole in
    the same file under PEFT's keys and listed in PEFT's config, so ``PeftModel.from_pretrained`` restores them."""
    from tuneforge.safeio import atomic_write_text, save_safetensors

    from tuneforge import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # a method may complete its config from the model (AdapterFusion records its members' configs)
    methods = [getattr(METHODS[c.name], "saved_config", lambda m, c, a: c)(model, c, adapter).model_dump(mode="json")
               for c in cfgs]
    if _is_peft_native(cfgs):
        fn = METHODS[cfgs[0].name].peft_config  # LoRA's names the layers that hold this adapter
        kw = {"adapter": adapter} if "adapter" in inspect.signature(fn).parameters else {}
        config = {k: v for k, v in fn(model, cfgs[0], base_path, **kw).items() if not k.startswith("tuneforge")}
        if modules_to_save:
            config.update(modules_to_save=list(modules_to_save), task_type="SEQ_CLS")
        elif getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            config["task_type"] = "SEQ_2_SEQ_LM"  # PEFT wraps it as a seq2seq model (decoder inputs passed on)
    else:  # no PEFT type holds this (a composition, or a method PEFT lacks): PEFT cannot load it either way
        config = {"tuneforge_method": methods, "base_model_name_or_path": base_path}
    prompt = _is_peft_native(cfgs) and getattr(METHODS[cfgs[0].name], "PEFT_TYPE", None) in PROMPT_LEARNING
    heads = head_state_dict(model, modules_to_save or [], PROMPT_HEAD_PREFIX if prompt else HEAD_PREFIX)
    state = {**method_state_dict(model, cfgs, adapter), **heads}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_safetensors(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    atomic_write_text(out / METHODS_FILE, json.dumps({"tuneforge_method": methods, "tuneforge": __version__,
                                                      "base_model_name_or_path": base_path}, indent=2) + "\n")
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


class AdapterError(ValueError):
    """An adapter directory tuneforge cannot load; the message names the file, what was found, and the fix."""


def read_adapter_config(path: str | Path) -> list:
    """The method configs an adapter directory was saved with (PEFT's or tuneforge's config file)."""
    file = Path(path) / CONFIG_FILE
    if not file.exists():
        raise AdapterError(f"{file}: no adapter config (is {path} an adapter directory?)")
    ours = Path(path) / METHODS_FILE
    d = json.loads(ours.read_text()) if ours.exists() else json.loads(file.read_text())
    if "tuneforge_method" in d:  # tuneforge's record (older saves kept it inside adapter_config.json)
        return [METHOD_CONFIGS[c["name"]].model_validate(c) for c in d["tuneforge_method"]]
    ptype = d.get("peft_type")
    if ptype not in PEFT_TYPES:
        raise AdapterError(f"{file}: a PEFT adapter of type {ptype!r}, which tuneforge cannot load (it reads PEFT's "
                           f"{', '.join(PEFT_TYPES)} adapters); load this one with peft.PeftModel.from_pretrained, or "
                           f"train the task with a method tuneforge has (tuneforge ls)")
    try:
        return [METHODS[PEFT_TYPES[ptype]].from_peft_config(d)]
    except (ValueError, KeyError, TypeError) as exc:  # a PEFT option tuneforge does not read, a missing key
        raise AdapterError(f"{file}: {exc}") from None


def _weights_file(path: str | Path) -> Path:
    file = Path(path) / WEIGHTS_FILE
    if file.exists():
        return file
    pickled = Path(path) / "adapter_model.bin"
    if pickled.exists():
        raise AdapterError(
            f"{pickled}: this adapter's weights are a pickle (adapter_model.bin) and it has no {WEIGHTS_FILE}; "
            "tuneforge reads adapter weights only as safetensors. Convert it where you trust the file: python -c "
            f"\"import torch, safetensors.torch as st; st.save_file(torch.load('{pickled}', weights_only=True), "
            f"'{file}')\" (weights_only=True refuses anything but tensors)")
    raise AdapterError(f"{path}: no {WEIGHTS_FILE}; is {path} an adapter directory written by tuneforge or PEFT?")


def load_adapter(model: nn.Module, path: str | Path, adapter: str = "default", apply: bool = True) -> list:
    """Apply the saved methods to ``model`` under ``adapter`` and load their weights; returns the configs."""
    from tuneforge.safeio import load_safetensors

    cfgs = read_adapter_config(path)
    tensors = load_safetensors(_weights_file(path))
    if apply:  # saved weights replace the initial ones: an init that needs a tokenizer is not run
        for cfg in cfgs:
            _apply(model, getattr(METHODS[cfg.name], "for_loading", lambda c: c)(cfg), adapter)
    for cfg in cfgs:
        mod = METHODS[cfg.name]
        # a method's keys: those it would save now, plus any of its declared suffixes (a projected or selected
        # layout the freshly applied method does not have yet)
        suffixes = getattr(mod, "STATE_SUFFIXES", ())
        keys = set(mod.state_dict(model, cfg, adapter)) | {k for k in tensors if k.endswith(suffixes or ("\0",))}
        part = {k: v for k, v in tensors.items() if k in keys}
        if hasattr(mod, "load_state_dict"):
            mod.load_state_dict(model, cfg, part, adapter)
        else:
            _copy_parameters(model, part, keys, path)
    _load_heads(model, tensors, path)
    return cfgs


def _load_heads(model: nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    """Copy saved classifier heads (``modules_to_save``) into the model's own, shape-checked."""
    from tuneforge.models.arch import task_head_names

    for name in task_head_names(model):
        own = getattr(model, name).state_dict()
        saved = {k[len(pre) + len(name) + 1:]: v for pre in (HEAD_PREFIX, PROMPT_HEAD_PREFIX)
                 for k, v in tensors.items() if k.startswith(f"{pre}{name}.")}
        if not saved:
            continue
        bad = [k for k in own if k not in saved or saved[k].shape != own[k].shape]
        if bad:
            k = bad[0]
            raise AdapterError(f"{path}: the saved {name} head does not fit this model ({name}.{k}: saved "
                               f"{tuple(saved[k].shape) if k in saved else 'missing'}, model {tuple(own[k].shape)}); "
                               "load it on the base model with the adapter's labels")
        getattr(model, name).load_state_dict({k: saved[k] for k in own})


def _copy_parameters(model: nn.Module, tensors: dict[str, torch.Tensor], keys: set[str], path) -> None:
    missing = keys - set(tensors)
    if missing:
        raise KeyError(f"{path}: adapter file lacks {len(missing)} tensor(s), e.g. {sorted(missing)[:3]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k in keys:
            if params[k].shape != tensors[k].shape:
                raise ValueError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, model has {tuple(params[k].shape)}")
            params[k].copy_(tensors[k])
