"""Per-architecture knowledge, in one place.

Methods (LoRA and friends, quantisation, layer freezing, probing) need to know which modules are the linear
projections, which module is the output head and where the transformer blocks live. Model families spell these
differently (``q_proj`` vs ``c_attn`` vs ``query_key_value``; ``model.layers`` vs ``transformer.h``), so every such
spelling lives here and nowhere else; each function also has a structural fallback so an unlisted architecture
still works, just with less curated defaults.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_FUSED_QKV = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]

# Default LoRA targets (module-name suffixes) by config.model_type: all attention and MLP projections, which is
# what the QLoRA paper found necessary to match full fine-tuning.
_DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                                "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "cohere")},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": _FUSED_QKV,
    "falcon": _FUSED_QKV,
    "bloom": _FUSED_QKV,
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    # encoders: every projection of attention and the FFN (BERT's "output.dense" ends both the attention sub-layer
    # and the FFN; the pooler's "dense" is not a target)
    **{t: ["query", "key", "value", "intermediate.dense", "output.dense"]
       for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    # encoder-decoders: every attention projection (self and cross) and the FFN, gated (wi_0/wi_1) or not
    **{t: ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"] for t in ("t5", "mt5", "umt5")},
}

# Where the block list lives, tried before the structural search so the common cases are exact.
_BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers",
                "transformer.blocks", "model.language_model.layers", "bert.encoder.layer", "roberta.encoder.layer",
                "electra.encoder.layer", "distilbert.transformer.layer", "encoder.layer")
# Output heads: to the vocabulary, and a sequence classifier's (``classifier``, ``pre_classifier``, ``score``: the
# modules PEFT trains and saves beside a classification adapter). Never adapted or quantised; a classification run
# trains the latter in full.
_HEAD_NAMES = ("lm_head", "embed_out")
TASK_HEAD_NAMES = ("classifier", "pre_classifier", "score")


def is_conv1d(module: nn.Module) -> bool:
    """True for GPT-2 style ``Conv1D``: a linear layer whose weight is stored transposed, as (in, out).

    Code that builds adapters or quantises weights must transpose these, which is why it asks.
    """
    return isinstance(module, Conv1D)


def output_head_names(model: nn.Module) -> list[str]:
    """Dotted names of the output projection(s) to the vocabulary.

    Heads are excluded from LoRA targets and quantisation by default: they are tied to the embeddings in many
    models, and adapting or quantising them costs the most accuracy per parameter.
    """
    names = []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name.rsplit(".", 1)[-1] in _HEAD_NAMES:
            names.append(name)
    return names + [n for n in task_head_names(model) if n not in names]


def task_head_names(model: nn.Module) -> list[str]:
    """Dotted names of a sequence classifier's head modules (top-level ``classifier``/``pre_classifier``/
    ``score``), in PEFT's ``modules_to_save`` spelling."""
    return [n for n in TASK_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear``, ``Conv1D`` and quantised linear by dotted name, excluding the output head.

    A layer a tuneforge method has already wrapped (``is_adapter_layer``) stands for the linear it wraps, so a second
    adapter targets the same names as the first."""
    heads = set(output_head_names(model))
    out: dict[str, nn.Module] = {}
    wrapped: list[str] = []  # layers already wrapped by a tuneforge method count as linear; their insides do not
    for name, module in model.named_modules():  # a head's inner layers (RoBERTa's classifier.dense) are head too
        if any(name.startswith(w + ".") for w in wrapped) or name in heads or any(name.startswith(h + ".")
                                                                                  for h in heads):
            continue
        if getattr(module, "is_adapter_layer", False):
            if getattr(module, "wraps_linear", True):
                wrapped.append(name)
                out[name] = module
            else:  # a layer around a block or a sub-layer's output (bottleneck adapters): its base's linears count,
                wrapped.extend(f"{name}.{a}" for a in getattr(module, "ADAPTER_TENSORS", {}))  # its own do not
        elif isinstance(module, nn.Linear) or is_conv1d(module) or getattr(module, "is_quant_linear", False):
            out[name] = module
    return out


def linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear``, a GPT-2 ``Conv1D`` or a quantised linear layer."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or getattr(module, "is_quant_linear", False)


def default_targets(model: nn.Module) -> list[str]:
    """Default adapter targets as module-name suffixes.

    Curated per model type, filtered to suffixes that actually occur (a variant may drop a projection); an
    unknown architecture gets every distinct leaf name of its linear layers.
    """
    names = list(linear_modules(model))
    leaves = {name.rsplit(".", 1)[-1] for name in names}
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    curated = [t for t in _DEFAULT_TARGETS.get(model_type, []) if any(n.endswith("." + t) for n in names)]
    return curated or sorted(leaves)


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _longest_repeated_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ModuleList whose children all share one class: structurally, the stack of blocks."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


def _stacks(model: nn.Module) -> list[str]:
    """An encoder-decoder's two stacks (``encoder``, ``decoder`` in T5; ``model.encoder``, ``model.decoder`` in
    BART), by their paths; [] for a single-stack model."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return []
    paths = {id(m): p for p, m in model.named_modules()}
    out = []
    for getter in ("get_encoder", "get_decoder"):
        fn = getattr(model, getter, None)
        stack = fn() if callable(fn) else None
        if stack is None or id(stack) not in paths:
            return []
        out.append(paths[id(stack)])
    return out


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Transformer blocks in forward order, as ``(dotted name, module)``: an encoder-decoder's encoder blocks, then
    its decoder blocks (so "the top k layers" are the decoder's last, the ones nearest the output)."""
    stacks = _stacks(model)
    if stacks:
        out = []
        for stack in stacks:
            found = _longest_repeated_list(model.get_submodule(stack))
            if found is not None:
                out += [(f"{stack}.{found[0]}.{i}", block) for i, block in enumerate(found[1])]
        return out
    for path in _BLOCK_PATHS:
        found = _get_submodule(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return [(f"{path}.{i}", block) for i, block in enumerate(found)]
    found = _longest_repeated_list(model)
    if found is None:
        return []
    path, layers = found
    return [(f"{path}.{i}", block) for i, block in enumerate(layers)]


def weight_in_out(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or Conv1D, hiding Conv1D's transposed storage."""
    weight: torch.Tensor = module.weight
    if is_conv1d(module):
        return weight.shape[0], weight.shape[1]
    return weight.shape[1], weight.shape[0]
