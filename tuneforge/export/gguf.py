"""GGUF out: a merged model, or a LoRA adapter, as the single-file format llama.cpp (and Ollama) loads.

A GGUF file is a header of typed key/value metadata followed by named tensors. What llama.cpp expects in it is set
by its own converters (``convert_hf_to_gguf.py`` for models, ``convert_lora_to_gguf.py`` for adapters), and
this module follows their conventions, citing each where it matters:

* tensor names come from the ``gguf`` package's per-architecture name map (``gguf.get_tensor_name_map``), so
  ``model.layers.3.self_attn.q_proj.weight`` becomes ``blk.3.attn_q.weight`` exactly as llama.cpp names it;
* Llama-family q/k projections are stored with their rows permuted (see ``permute_qk``): llama.cpp applies
  rotary embeddings to interleaved pairs, Hugging Face to the two halves of each head;
* 1-D tensors (norm gains, biases) are always F32; ``q8_0`` quantises only 2-D tensors whose rows are a whole
  number of 32-value blocks, and writes the rest as F16 (``convert_hf_to_gguf`` falls back the same way);
* a tied output head is not written: llama.cpp (and transformers' GGUF reader) use ``token_embd`` for it when
  ``output.weight`` is absent.

Files are written to a temporary name in the target folder and renamed into place, so a failure (an unsupported
tokenizer, a full disk) never leaves a half-written ``.gguf`` under the requested name.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
import torch

OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# Hugging Face model_type -> (llama.cpp architecture, whether q/k rows are permuted). Mistral is written as
# "llama", as convert_hf_to_gguf does (same graph; llama.cpp's llama arch has no sliding window, see _warn_swa).
# Qwen2 uses NeoX-style (half-split) rotary in llama.cpp too, so its q/k are stored as Hugging Face has them.
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

LORA_METHODS = ("lora", "qlora")  # qlora's adapter is a plain LoRA on the (dequantised) base
_QK = re.compile(r"^blk\.\d+\.attn_(q|k)\.(weight|bias)$")


class GgufExportError(ValueError):
    """A model, tokenizer or adapter that cannot be expressed as GGUF; the message says what and why."""


# ---------------------------------------------------------------------------------------------------- public API
def write_model_gguf(model, tokenizer, out: str | os.PathLike, outtype: str = "f16",
                     source_gguf: str | os.PathLike | None = None, *, with_tokenizer: bool = True,
                     name: str | None = None) -> Path:
    """Write a merged Hugging Face causal LM (llama, mistral, qwen2) and its tokenizer as one GGUF file.

    ``outtype`` is ``f32``, ``f16`` or ``q8_0`` (see the module docstring for which tensors each applies to).
    Tokenizer metadata is copied verbatim from ``source_gguf`` when the model came from a GGUF file (that keeps
    llama.cpp's own pre-tokenizer id and token types), else built from a byte-level BPE ``tokenizer``;
    ``with_tokenizer=False`` writes none (a file llama.cpp cannot run, for tests of the tensors alone).
    Returns the path written.
    """
    qtype, ftype = _outtype(outtype)
    config = model.config
    arch, permuted = architecture(config)
    _refuse_unmerged(model)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    rope_theta, rope = _rope(config, arch)
    _warn_swa(config)

    def fill(w: gguf.GGUFWriter) -> None:
        _write_general(w, name or _default_name(config), ftype, gguf.GGUFType.MODEL)
        _write_hparams(w, config, n_vocab, rope_theta, rope)
        if with_tokenizer:
            if source_gguf is not None:
                copy_tokenizer_metadata(w, Path(source_gguf), n_vocab)
            else:
                write_bpe_tokenizer(w, tokenizer, n_vocab)
        # one tensor at a time: its float32 copy is dropped once encoded, so a bf16 model never exists in fp32
        for tname, data in _model_tensors(model, arch, permuted):
            add_tensor(w, tname, data, qtype)
        if rope["rope_type"] == "llama3":
            add_tensor(w, "rope_freqs.weight", llama3_rope_factors(config, rope_theta, rope), qtype)

    return _write_atomically(Path(out), arch, fill)


def write_lora_gguf(model, adapter_name: str, out: str | os.PathLike, outtype: str = "f16", *,
                    methods: list | None = None, name: str | None = None) -> Path:
    """Write tuneforge LoRA adapter ``adapter_name`` (on ``model``, not merged) as a llama.cpp GGUF LoRA.

    The layout is ``convert_lora_to_gguf.py``'s: ``general.type = adapter``, ``adapter.type = lora``,
    ``adapter.lora.alpha``, and per adapted weight ``<base tensor>.lora_a`` (A, r x in) and ``.lora_b``
    (B, out x r). llama.cpp scales B A by ``alpha / r`` with r read off ``lora_b``, so alpha is written as
    tuneforge's scaling times r: that reproduces alpha/r, alpha/sqrt(r) (rsLoRA) or any other scaling exactly.
    For Llama-family q/k, B's rows get the same permutation as the base weight (A's columns index the layer's
    input, which is not permuted), so B A lands on the base GGUF's permuted rows.

    ``methods`` (the adapter's method configs, when known) lets the export refuse a run that also trained
    something a LoRA file cannot carry (full, bitfit, IA3, ...); DoRA is refused either way (its magnitude
    rescales the merged weight, which llama.cpp's additive LoRA cannot express).
    """
    from tuneforge.methods._scope import adapter_layers
    from tuneforge.methods.lora import LoraLayer, lora_layers

    qtype, ftype = _outtype(outtype)
    check_lora_methods(methods)
    config = model.config
    arch, permuted = architecture(config)
    others = sorted({type(m).__name__ for m in adapter_layers(model)
                     if not isinstance(m, LoraLayer) and adapter_name in m.adapter_names()})
    if others:
        raise GgufExportError(f"adapter {adapter_name!r} also uses {', '.join(others)}; a GGUF LoRA holds only "
                              "LoRA's A and B (merge and export the whole model instead)")
    name_map = _name_map(config, arch)
    tied = _tied(model)
    tensors, alphas = [], set()
    for path, layer in lora_layers(model).items():
        if adapter_name not in layer.adapter_names():
            continue
        a, b = _lora_pair(layer, adapter_name, path)
        base = _gguf_name(name_map, f"{path}.weight", arch)
        if base == "output.weight" and tied:  # llama.cpp issue #9065: a tied head has no tensor of its own
            raise GgufExportError(f"{path}: LoRA on the output head of a model with tied embeddings cannot be "
                                  "applied by llama.cpp (the head is token_embd); drop lm_head from the targets")
        heads = _qk_heads(base, config) if permuted else None
        if heads:
            b = permute_qk(b, heads)
        alphas.add(layer.scaling[adapter_name] * a.shape[0])
        tensors += [(f"{base}.lora_a", a.numpy()), (f"{base}.lora_b", b.contiguous().numpy())]
    if not tensors:
        raise GgufExportError(f"the model holds no LoRA adapter named {adapter_name!r}")
    alpha = _one_alpha(alphas)

    def fill(w: gguf.GGUFWriter) -> None:
        _write_general(w, name or f"{_default_name(config)}-lora", ftype, gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for tname, data in tensors:
            add_tensor(w, tname, data, qtype)

    return _write_atomically(Path(out), arch, fill)


# -------------------------------------------------------------------------------------------------- architecture
def architecture(config) -> tuple[str, bool]:
    """(llama.cpp architecture, q/k permuted) for a config, or an error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GgufExportError(f"model_type {model_type!r} cannot be exported to GGUF yet; supported: "
                              f"{', '.join(ARCHITECTURES)}")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":  # llama.cpp's llama/qwen2 graphs hard-code a SiLU-gated MLP
        raise GgufExportError(f"{model_type} with hidden_act {act!r}: llama.cpp's {ARCHITECTURES[model_type][0]} "
                              "graph computes SiLU only")
    return ARCHITECTURES[model_type]


def _name_map(config, arch: str) -> gguf.TensorNameMap:
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)


def _gguf_name(name_map: gguf.TensorNameMap, hf_name: str, arch: str) -> str:
    """The GGUF tensor name llama.cpp uses for a Hugging Face parameter name; unmapped names are an error,
    never silently dropped (a missing tensor would surface only when llama.cpp refuses the file)."""
    gname = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise GgufExportError(f"{hf_name}: no GGUF tensor for it in llama.cpp's {arch} architecture (a head or "
                              "module this architecture does not have?)")
    return gname


def _rope(config, arch: str) -> tuple[float, dict]:
    """(rope theta, rope parameters) from the transformers 5 ``rope_parameters`` or the older fields."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise GgufExportError("per-layer-type rope parameters are not supported by this GGUF export")
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    params["rope_type"] = kind
    supported = ("default", "linear", "llama3") if arch == "llama" else ("default", "linear")
    if kind not in supported:
        raise GgufExportError(f"rope_type {kind!r} is not supported by this GGUF export for {arch} "
                              f"(supported: {', '.join(supported)})")
    return theta, params


def llama3_rope_factors(config, theta: float, rope: dict) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling as llama.cpp stores it: a ``rope_freqs`` tensor of one
    divisor per frequency (convert_hf_to_gguf's LlamaModel; ggml divides each rotation frequency by it).

    Short wavelengths keep their frequency (1), long ones are slowed by ``factor``, and those in between
    interpolate smoothly, which is transformers' ``llama3`` rope init expressed as divisors."""
    dim = _head_dim(config)
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _warn_swa(config) -> None:
    """llama.cpp's llama and qwen2 graphs attend to the whole context; a model trained with a sliding window
    then differs from its Hugging Face self once a prompt is longer than the window."""
    window = getattr(config, "sliding_window", None)
    uses = getattr(config, "use_sliding_window", config.model_type == "mistral")
    if uses and window and window < getattr(config, "max_position_embeddings", 0):
        warnings.warn(f"{config.model_type}: sliding_window {window} is not expressed in GGUF; llama.cpp will "
                      f"attend to the full context, which matches this model only for prompts up to {window} tokens",
                      stacklevel=3)


# ------------------------------------------------------------------------------------------------------ metadata
def _outtype(outtype: str):
    if outtype not in OUTTYPES:
        raise GgufExportError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    return OUTTYPES[outtype]


def _default_name(config) -> str:
    """The model folder's name; failing that not the bare model type, since transformers' GGUF reader takes a
    llama file whose general.name is exactly "mistral" for a Mistral checkpoint and then cannot map its tensors."""
    return Path(getattr(config, "_name_or_path", "") or "").name or f"{config.model_type} (tuneforge)"


def _write_general(w: gguf.GGUFWriter, name: str, ftype, kind: str) -> None:
    w.add_type(kind)
    w.add_name(name)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_hparams(w: gguf.GGUFWriter, config, n_vocab: int, rope_theta: float, rope: dict) -> None:
    """The ``<arch>.*`` keys llama.cpp sizes its graph from (names from gguf.Keys.LLM / Attention / Rope)."""
    n_head = config.num_attention_heads
    head_dim = _head_dim(config)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    w.add_rope_freq_base(rope_theta)
    w.add_rope_dimension_count(head_dim)
    if head_dim * n_head != config.hidden_size:  # llama.cpp assumes n_embd / n_head unless told
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(n_vocab)
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))


# ------------------------------------------------------------------------------------------------------- tensors
def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows from Hugging Face's half-split rotary layout to llama.cpp's interleaved one.

    Hugging Face rotates dimension i with i + d/2 inside a head; llama.cpp (the original Llama code) rotates
    2i with 2i+1. convert_hf_to_gguf regroups every head's rows as (2, d/2) -> (d/2, 2); ``n_head`` is the
    query head count for q and the key/value head count for k (GQA). Works on weights and biases alike."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute_qk`` (what transformers' GGUF reader applies when loading llama q/k)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _qk_heads(gguf_name: str, config) -> int | None:
    m = _QK.match(gguf_name)
    if m is None:
        return None
    n_head = config.num_attention_heads
    return n_head if m.group(1) == "q" else (getattr(config, "num_key_value_heads", None) or n_head)


def _tied(model) -> bool:
    """Whether the output head is the embedding itself (then llama.cpp reads token_embd for both)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def _refuse_unmerged(model) -> None:
    from tuneforge.methods._scope import adapter_layers

    kinds = sorted({type(m).__name__ for m in adapter_layers(model)})
    if kinds:
        raise GgufExportError(f"the model still has adapter layers ({', '.join(kinds)}); merge them first "
                              "(tuneforge.methods.merge_methods) or export a LoRA with write_lora_gguf")


def _model_tensors(model, arch: str, permuted: bool) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every tensor of the model, q/k permuted, a tied head left out."""
    config = model.config
    name_map, tied = _name_map(config, arch), _tied(model)
    for hf_name, t in model.state_dict().items():
        gname = _gguf_name(name_map, hf_name, arch)
        if gname == "output.weight" and tied:
            continue
        data = t.detach().to("cpu", torch.float32)
        heads = _qk_heads(gname, config) if permuted else None
        if heads:
            data = permute_qk(data, heads)
        yield gname, data.contiguous().numpy()


def tensor_type(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The type one tensor is stored as under ``qtype``, by convert_hf_to_gguf's rules: vectors stay F32 (norm
    gains and biases are tiny and precision-critical); Q8_0 needs rows that are whole 32-value blocks, else F16."""
    if data.ndim <= 1 or qtype == gguf.GGMLQuantizationType.F32:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qtype


def add_tensor(w: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    kind = tensor_type(data, qtype)
    encoded = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), kind)
    quantized = kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    w.add_tensor(name, encoded, raw_dtype=kind if quantized else None)


# ---------------------------------------------------------------------------------------------------- tokenizer
def _tokenizer_key(key: str) -> bool:
    return key.startswith("tokenizer.ggml.") or key == "tokenizer.chat_template" or \
        key.startswith("tokenizer.chat_template.")


def copy_tokenizer_metadata(w: gguf.GGUFWriter, source: Path, n_vocab: int) -> None:
    """Copy ``tokenizer.ggml.*`` and the chat template(s) from the GGUF the model came from, byte for byte.

    The source file's keys are what llama.cpp itself wrote (or accepted) for this vocabulary, including the
    pre-tokenizer id it recognised by hashing the original tokenizer, which cannot be recovered from the
    Hugging Face tokenizer transformers rebuilt from them."""
    reader = gguf.GGUFReader(source)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GgufExportError(f"{source}: holds no tokenizer (tokenizer.ggml.tokens) to copy")
    if len(tokens.data) != n_vocab:
        raise GgufExportError(f"{source} has {len(tokens.data)} tokens but the model's embedding has {n_vocab} rows "
                              "(was the vocabulary resized?); export without source_gguf to build the tokenizer "
                              "from the Hugging Face one")
    for key, field in reader.fields.items():
        if _tokenizer_key(key):
            w.add_key_value(key, *_field_value(key, field))


def _field_value(key: str, field) -> tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]:
    """(value, type, element type) of a reader field, strings as raw bytes so nothing is re-encoded."""
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
        if len(field.types) != 2:
            raise GgufExportError(f"{key}: nested arrays are not copied")
        sub = field.types[1]
        if sub == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], vtype, sub
        return list(field.contents()), vtype, sub
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]), vtype, None
    return field.contents(), vtype, None


def write_bpe_tokenizer(w: gguf.GGUFWriter, tokenizer, n_vocab: int) -> None:
    """Tokenizer metadata for a Hugging Face byte-level BPE (GPT-2 style) fast tokenizer, the ``gpt2`` model of
    llama.cpp, laid out as convert_hf_to_gguf's ``_set_vocab_gpt2`` does: every id up to the embedding size,
    added special tokens as CONTROL, other added tokens as USER_DEFINED, ids the tokenizer lacks as UNUSED
    ``[PAD<id>]`` placeholders; merges from the tokenizer's own JSON; special ids; whether encoding adds bos/eos;
    the chat template. Anything llama.cpp's gpt2 tokenizer cannot reproduce is refused (see ``_bpe_backend``)."""
    if tokenizer is None:
        raise GgufExportError("no tokenizer to write: pass the model's tokenizer, or source_gguf, or "
                              "with_tokenizer=False for tensors only")
    backend = _bpe_backend(tokenizer)
    tokens, types = _vocab_in_id_order(tokenizer, n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_id(backend.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]])
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            add(tid)
    add_bos, add_eos = _adds_bos_eos(tokenizer)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        w.add_chat_template([{"name": k, "template": v} for k, v in template.items()])
    elif template:
        w.add_chat_template(template)


def _bpe_backend(tokenizer) -> dict:
    """The fast tokenizer's JSON, after checking it is byte-level BPE without a normaliser llama.cpp lacks."""
    what = type(tokenizer).__name__
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise GgufExportError(f"{what} is not a fast (tokenizers) tokenizer; GGUF export reads its tokenizer.json")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model_type = backend["model"].get("type")
    byte_level = [p for p in _walk(backend.get("pre_tokenizer")) if p.get("type") == "ByteLevel"]
    if model_type != "BPE" or not byte_level:
        pre = [p.get("type") for p in _walk(backend.get("pre_tokenizer"))] or ["none"]
        raise GgufExportError(f"the tokenizer ({what}: {model_type} model, pre-tokenizer {'/'.join(pre)}) is not "
                              "byte-level BPE, so it cannot be expressed as llama.cpp's gpt2 tokenizer; export a "
                              "model whose tokenizer is byte-level BPE, or one loaded from a GGUF file (its "
                              "tokenizer metadata is then copied), or pass with_tokenizer=False for tensors only")
    if any(p.get("add_prefix_space") for p in byte_level):
        raise GgufExportError("the byte-level pre-tokenizer adds a prefix space, which llama.cpp's gpt2 "
                              "tokenizer never does; the exported model would see different ids")
    norm = [n.get("type") for n in _walk(backend.get("normalizer"))]
    if any(n not in ("NFC", "Sequence") for n in norm):
        raise GgufExportError(f"the tokenizer's normalizer ({'/'.join(norm)}) has no llama.cpp equivalent")
    return backend


def _walk(node) -> list[dict]:
    """A tokenizers component and the members of a ``Sequence`` of them, flattened."""
    if not node:
        return []
    inner = node.get("pretokenizers") or node.get("normalizers") or []
    return [node] + [x for n in inner for x in _walk(n)]


# Pre-tokenizer layouts llama.cpp knows by name (its llama-vocab.cpp regexes), keyed by the tokenizers JSON
# structure. convert_hf_to_gguf identifies them by hashing the tokenizer's output on a test text instead.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_id(pre: dict | None) -> str:
    """``tokenizer.ggml.pre`` for a byte-level pre-tokenizer: the llama.cpp id whose regex is this tokenizer's
    split (``gpt-2``: GPT-2's own regex inside ByteLevel; ``llama-bpe``, ``qwen2``: their Split regex; ``smollm``:
    single digits, then GPT-2's regex), else ``default`` with a warning, since llama.cpp's default split
    isolates punctuation runs first and may then cut text differently than the Hugging Face tokenizer."""
    parts = [p for p in _walk(pre) if p.get("type") != "Sequence"]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        named = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(regex)
        if named:
            return named
    warnings.warn(f"byte-level pre-tokenizer {'/'.join(kinds)} has no llama.cpp name; writing tokenizer.ggml.pre "
                  "'default', whose split llama.cpp may apply differently than this tokenizer", stacklevel=3)
    return "default"


def _vocab_in_id_order(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise GgufExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model's embedding has "
                              f"only {n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds bos / eos, read off the tokenizer's behaviour (its post-processor) rather than a
    config flag, which not every tokenizer keeps in step with what it does."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
    add_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]
    return add_bos, add_eos


# -------------------------------------------------------------------------------------------------------- LoRA
def check_lora_methods(methods: list | None) -> None:
    """Refuse method configs a GGUF LoRA cannot carry (callers run it before loading any weights)."""
    for cfg in methods or []:
        if cfg.name not in LORA_METHODS:
            raise GgufExportError(f"method {cfg.name!r} is not LoRA; a GGUF LoRA adapter holds only LoRA's A and B "
                                  "(merge the adapter and export the whole model instead)")
        if getattr(cfg, "dora", False):
            raise GgufExportError("DoRA rescales each merged weight row by a learnt magnitude, which llama.cpp's "
                                  "additive LoRA cannot express; merge the adapter and export the whole model")
        if getattr(cfg, "gate", False):
            raise GgufExportError("a gated LoRA scales B A x by a per-token gate σ(W_g x + b_g), which neither a "
                                  "GGUF LoRA nor a merged model can hold; serve it beside the base model "
                                  "(tuneforge generate/serve --adapter)")


def _lora_pair(layer, adapter: str, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    if adapter in layer.lora_magnitude_vector:
        raise GgufExportError(f"{path}: adapter {adapter!r} is DoRA, which llama.cpp's additive LoRA cannot "
                              "express; merge the adapter and export the whole model")
    if layer.fan_in_fan_out:
        raise GgufExportError(f"{path}: Conv1D layers are not part of a supported architecture")
    a = layer.lora_A[adapter].weight.detach().to("cpu", torch.float32).contiguous()
    b = layer.lora_B[adapter].weight.detach().to("cpu", torch.float32)
    return a, b


def _one_alpha(alphas: set[float]) -> float:
    """llama.cpp holds one alpha per adapter file; tuneforge's layers of one adapter share rank and scaling."""
    first = next(iter(alphas))
    if any(not math.isclose(a, first, rel_tol=1e-6) for a in alphas):
        raise GgufExportError(f"the adapter's layers need different alphas ({sorted(alphas)}), but a GGUF LoRA "
                              "file has one")
    if first == 0:  # llama.cpp reads alpha 0 as "no alpha" and applies B A unscaled
        raise GgufExportError("the adapter's scaling is 0 (lora_alpha 0), so it changes nothing, and llama.cpp "
                              "would read alpha 0 as unscaled: export the base model instead")
    return float(first)


# ------------------------------------------------------------------------------------------------------- files
def _write_atomically(out: Path, arch: str, fill: Callable[[gguf.GGUFWriter], None]) -> Path:
    """Build the whole file in a GGUFWriter (every check runs before any byte is written), write it under a
    temporary name next to ``out``, fsync, and rename it into place."""
    from tuneforge.safeio import fsync_dir, temp_file_beside

    writer = gguf.GGUFWriter(path=None, arch=arch)
    fill(writer)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(out)
    os.close(fd)
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    return out
