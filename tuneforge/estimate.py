"""How much memory a model needs to serve or fine-tune: pure functions, no weights loaded, nothing downloaded.

Two modes:

``can-it-run-llm`` reproduces the Hugging Face Space "Vokturz/can-it-run-llm" (the table in the seed notes). Its
conventions, read from the Space's ``app.py``/``utils.py``: the model is built empty with accelerate's
``create_empty_model``, which uses ``AutoModel`` -- the backbone *without* the LM head -- and sized in fp32 by
``accelerate.utils.calculate_maximum_sizes``; int8/int4 divide that by 4/8; its "GB" are GiB (2^30 bytes);
inference = 1.2 x size (EleutherAI, "Transformer Math 101", https://blog.eleuther.ai/transformer-math/), training
with Adam = 4 x size, and LoRA = (size + P_billions x pct/100 x 2 x 4) x 1.2 with pct = 2%: 16-bit trainable
parameters, the bracket in *decimal* GB while the size is in GiB. Llama-3-8B's backbone is 7,504,924,672
parameters (8.03B minus the 525M-parameter head), hence 27.96 "GB" in fp32 and the "(7.6B)" of its header (the Space
rounds the parameter count *up* to one decimal). The seed's serving rule M = P x 4 B / (32/Q) x 1.2 (decimal GB) is
``serving_rule_gb``.

``detailed`` (default) counts what a tuneforge training step holds, from the architecture's dimensions: weights at
the chosen bits (NF4 + double quantisation = 4 + 8/64 + 32/(64*256) = 4.127 bits, Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314; int8 with an fp32 absmax per output row, LLM.int8(), https://arxiv.org/abs/2208.07339
-- the schemes of ``tuneforge.quant``), trainable parameters per method, their gradients (adapters train in fp32),
optimizer state (torch's AdamW: two moments typed like each parameter; 8-bit AdamW, https://arxiv.org/abs/2110.02861:
a byte per moment + an fp32 absmax per 2048 values, as ``tuneforge.train.adam8bit``) and what autograd saves for
backward, read off ``torch.autograd.graph.saved_tensors_hooks`` on Hugging Face's Llama with SDPA (tests check it):

    per block and token: RMSNorm inputs (HF upcasts them, so fp32) and 1/rms, the normed output if the gain trains,
    each trainable linear's input (LoRA/IA3 save theirs too; a frozen linear saves none), SDPA's q, k, v, output
    and log-sum-exp (k and v at the KV-head width: SDPA handles GQA), the MLP's gate, silu(gate), up and their
    product. Blocks below the first trainable parameter save nothing. Head: tuneforge's chunked head+softmax
    (``algorithms/_head_logps.py``) keeps no logits: one (N, H) fp32 tensor plus a ~16 MB chunk buffer.

Gradients and activations do not peak together: backward frees each block's saved tensors as it creates that
block's gradients, so the step peaks at max(all activations + head gradient + backward temporaries, all gradients +
the optimizer's temporaries), on top of weights and optimizer state. The CUDA context and allocator slack are not
included (pass ``overhead``). ``benchmarks/estimate_vs_measured.py`` compares this with real runs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

GIB, GB = 1024**3, 1e9
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64 weights, fp32 absmax per 256 blocks
ADAM8_BYTES = 2 * (1 + 4 / 2048)  # two 8-bit moments, fp32 absmax per 2048-value block each
HEAD_CHUNK_ELEMENTS = 1 << 22  # tuneforge.algorithms._head_logps.CHUNK_ELEMENTS (asserted by a test)
SOFT_PROMPTS = ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2")
BOTTLENECKS = ("houlsby", "pfeiffer", "parallel", "scaled_parallel", "compacter", "compacter_pp", "adapter_bias")
# where each bottleneck-family method sits (its activations follow that placement's)
PLACED_AS = {"compacter": "houlsby", "compacter_pp": "pfeiffer", "adapter_bias": "parallel"}
PHM_N = 4  # Compacter's n (and rank 1): its defaults
METHODS = ("none", "full", "freeze", "lora", "qlora", "ia3", "bitfit", *SOFT_PROMPTS, *BOTTLENECKS)
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
DTYPE_DIVISOR = {32: 1, 16: 2, 8: 4, 4: 8}  # can-it-run-llm: fp32 size / this ("float16/bfloat16", "int8", "int4")


class EstimateError(ValueError):
    """A model spec or option the estimator cannot use; the message says what to pass instead."""


@dataclass(frozen=True)
class Arch:
    """The dimensions that decide memory. ``gated``: Llama-style SwiGLU MLP (gate/up/down) and RMSNorm; otherwise a
    GPT-style GELU MLP (fc/proj) with LayerNorm."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    gated: bool = True
    positions: int = 0  # learned absolute position embeddings (GPT-2)
    name: str = ""

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads


def _llama(H, I, L, nh, kv, V, tied=False, **kw) -> dict:
    return dict(hidden=H, intermediate=I, layers=L, heads=nh, kv_heads=kv, vocab=V, tied=tied, **kw)


# Published config.json dimensions of each model on the Hugging Face Hub.
PRESETS: dict[str, dict] = {
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": _llama(5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": _llama(8192, 28672, 80, 64, 8, 32000),
    "llama-3-8b": _llama(4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": _llama(8192, 28672, 80, 64, 8, 128256),
    "llama-3.2-1b": _llama(2048, 8192, 16, 32, 8, 128256, tied=True, head_dim=64),
    "mistral-7b": _llama(4096, 14336, 32, 32, 8, 32000),
    "qwen2-0.5b": _llama(896, 4864, 24, 14, 2, 151936, tied=True, qkv_bias=True),
    "qwen2-7b": _llama(3584, 18944, 28, 28, 4, 152064, qkv_bias=True),
}


# ------------------------------------------------------------------------------------------------ model input
def arch_from_config(cfg, name: str = "") -> Arch:
    """Dimensions from a transformers config (Llama/Mistral/Qwen2-like, GPT-2, GPT-NeoX; others read as Llama)."""
    def g(*keys, default=None):
        return next((getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None), default)

    mt = getattr(cfg, "model_type", "")
    H, nh = g("hidden_size", "n_embd"), g("num_attention_heads", "n_head")
    kw = dict(hidden=H, intermediate=g("intermediate_size", "n_inner", default=4 * H),
              layers=g("num_hidden_layers", "n_layer"), heads=nh, kv_heads=g("num_key_value_heads", default=nh),
              vocab=cfg.vocab_size, tied=bool(getattr(cfg, "tie_word_embeddings", False)), name=name or mt)
    if mt in ("gpt2", "gpt_neox"):
        return Arch(**kw, qkv_bias=True, o_bias=True, mlp_bias=True, gated=False,
                    positions=g("n_positions", default=0) if mt == "gpt2" else 0)
    att = bool(getattr(cfg, "attention_bias", False))
    return Arch(**kw, head_dim=getattr(cfg, "head_dim", None) or 0, qkv_bias=att or mt == "qwen2", o_bias=att,
                mlp_bias=bool(getattr(cfg, "mlp_bias", False)))


def parse_count(spec: str) -> int | None:
    """'7b', '70e9', '8.03B', '125m' -> a parameter count; None if ``spec`` is not a count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?(?:e\d+)?)\s*([kmbt]?)\s*", str(spec).lower())
    if not m:
        return None
    return round(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2)])


def known_presets() -> list[str]:
    from tuneforge.models.tiny import PRESETS as TINY

    return sorted(PRESETS) + [f"tiny:{p}" for p in sorted(TINY)]


def resolve_model(spec) -> Arch | int:
    """A directory (or file) with config.json, a GGUF file or packaged model (``smollm2``), a preset name,
    ``tiny:<preset>``, an :class:`Arch` or a count."""
    if isinstance(spec, (Arch, int)):
        return spec
    s = str(spec).strip()
    if s.lower() in PRESETS:
        return Arch(**PRESETS[s.lower()], name=s.lower())
    if s.startswith("tiny:"):
        from tuneforge.models.tiny import PRESETS as TINY
        from tuneforge.models.tiny import _make_config, char_tokenizer

        if s[5:] not in TINY:
            raise EstimateError(f"unknown preset {s!r}; known: {', '.join(known_presets())}")
        return arch_from_config(_make_config(s[5:], None, char_tokenizer()), s)
    from tuneforge.models.gguf import GgufError, gguf_file

    try:
        gg = gguf_file(s)
    except GgufError as e:
        raise EstimateError(str(e)) from None
    if gg is not None:  # the architecture is in the file's metadata: nothing is dequantised
        from transformers import AutoConfig

        try:
            return arch_from_config(AutoConfig.from_pretrained(str(gg.parent), gguf_file=gg.name), s)
        except (OSError, ValueError, KeyError) as e:
            raise EstimateError(f"cannot read a model config from {gg}: {e}") from None
    p = Path(s).expanduser()
    if p.exists():
        from transformers import AutoConfig

        if p.is_dir() and not (p / "config.json").exists():
            raise EstimateError(f"{p} has no config.json")
        try:
            return arch_from_config(AutoConfig.from_pretrained(str(p)), p.name)
        except (OSError, ValueError) as e:
            raise EstimateError(f"cannot read a model config from {p}: {e}") from None
    n = parse_count(s)
    if n is None or n < 1:
        raise EstimateError(f"{s!r} is not a model directory, a known preset or a parameter count (like 7b or "
                            f"70e9); known presets: {', '.join(known_presets())}")
    return n


# ----------------------------------------------------------------------------------------------- parameters
def block_linears(a: Arch) -> list[tuple[str, int, int, bool, str]]:
    """Per-block linear layers: (name, in, out, has bias, name of the tensor they read)."""
    H, I, q, kv = a.hidden, a.intermediate, a.heads * a.hd, a.kv_heads * a.hd
    if not a.gated:
        return [("qkv", H, q + 2 * kv, a.qkv_bias, "h1"), ("o", q, H, a.o_bias, "attn"),
                ("fc", H, I, a.mlp_bias, "h2"), ("proj", I, H, a.mlp_bias, "p")]
    return [("q_proj", H, q, a.qkv_bias, "h1"), ("k_proj", H, kv, a.qkv_bias, "h1"),
            ("v_proj", H, kv, a.qkv_bias, "h1"),
            ("o_proj", q, H, a.o_bias, "attn"), ("gate_proj", H, I, a.mlp_bias, "h2"),
            ("up_proj", H, I, a.mlp_bias, "h2"), ("down_proj", I, H, a.mlp_bias, "p")]


def param_counts(a: Arch) -> dict[str, int]:
    """Parameters by part; ``backbone`` is what ``AutoModel`` (no LM head) holds, ``total`` the causal LM."""
    norm = a.hidden * (1 if a.gated else 2)  # RMSNorm gain, or LayerNorm gain + bias
    lin = sum(i * o for _, i, o, _, _ in block_linears(a))
    bias = sum(o for _, _, o, b, _ in block_linears(a) if b)
    block = lin + bias + 2 * norm
    emb = a.vocab * a.hidden + a.positions * a.hidden
    backbone = emb + a.layers * block + norm
    head = 0 if a.tied else a.vocab * a.hidden
    return {"embedding": emb, "block": block, "block_linear": lin, "block_bias": bias + (2 * a.hidden if not a.gated
            else 0), "final_norm": norm, "head": head, "backbone": backbone, "total": backbone + head}


# ----------------------------------------------------------------------------------- the can-it-run-llm table
def serving_rule_gb(params: float, bits: int) -> float:
    """M = (P x 4 bytes) / (32 / Q) x 1.2, in decimal GB (the seed's serving rule: 70B at 16 bit -> 168 GB)."""
    return params * 4 / (32 / bits) * 1.2 / GB


def can_it_run_llm(model, lora_pct: float = 2.0) -> dict:
    """The Space's table, unrounded: {dtype: {"Total Size (GB)", "Inference (GB)", "Training using Adam (GB)",
    "LoRA Fine-Tuning (GB)"}} with its "GB" = GiB, plus the header's parameter count in billions (rounded up)."""
    m = resolve_model(model)
    p = m if isinstance(m, int) else param_counts(m)["backbone"]
    rows = {}
    for bits, name in ((32, "float32"), (16, "float16/bfloat16"), (8, "int8"), (4, "int4")):
        size = p * 4 / DTYPE_DIVISOR[bits] / GIB
        rows[name] = {"Total Size (GB)": size, "Inference (GB)": size * 1.2, "Training using Adam (GB)": size * 4,
                      "LoRA Fine-Tuning (GB)": (size + p / 1e9 * lora_pct / 100 * (16 / 8) * 4) * 1.2}
    return {"parameters": p, "header_billions": round(p / 1e9 + 0.05, 1), "lora_pct": lora_pct, "rows": rows}


# -------------------------------------------------------------------------------------------- detailed mode
@dataclass
class Estimate:
    """Bytes by part; ``training`` and ``inference`` are peaks (see the module docstring for how they combine)."""
    model: str
    method: str
    bits: int
    batch: int
    seq: int
    optimizer: str
    params_total: int
    params_trainable: int
    weights: int = 0
    adapter: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int | None = None
    workspace: int | None = None
    kv_cache: int | None = None
    training: int | None = None
    inference: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _plan(a: Arch, method: str, targets, top_k: int) -> dict:
    """Which tensors train: block linears trained in full, LoRA'd, IA3-scaled; norms, head, embedding; and how
    many top blocks lie in the gradient's path."""
    names = [n for n, *_ in block_linears(a)]
    plan = {"full": set(), "lora": set(), "ia3_out": set(), "ia3_in": set(), "bias": False, "norms": False,
            "head": False, "emb": False, "region": a.layers}
    if method == "full":
        plan.update(full=set(names), norms=True, head=True, emb=True)
    elif method == "freeze":
        if not 1 <= top_k <= a.layers:
            raise EstimateError(f"freeze: top_k={top_k} but the model has {a.layers} blocks")
        plan.update(full=set(names), norms=True, region=top_k)
    elif method in ("lora", "qlora"):
        chosen = set(targets or names)
        if chosen - set(names):
            raise EstimateError(f"unknown LoRA targets {sorted(chosen - set(names))}; this model has {names}")
        plan["lora"] = chosen
    elif method == "ia3":  # PEFT/tuneforge defaults: keys and values scaled on their output, the FFN down on its input
        plan.update(ia3_out={"k_proj", "v_proj"} if a.gated else {"qkv"}, ia3_in={names[-1]})
    elif method in SOFT_PROMPTS + BOTTLENECKS:
        pass  # no block weight trains; their own tensors are counted by ``_additive``
    elif method == "bitfit":
        if not any(b for *_, b, _ in block_linears(a)) and a.gated:
            raise EstimateError("bitfit trains bias vectors and this architecture has none")
        plan["bias"] = True
    return plan


def _trainable(a: Arch, plan: dict, rank: int) -> tuple[int, int]:
    """(trainable parameter count, elements of the largest trainable tensor)."""
    pc, lins = param_counts(a), block_linears(a)
    if plan["emb"]:
        return pc["total"], max(a.vocab * a.hidden, max(i * o for _, i, o, _, _ in lins))
    n = biggest = 0
    if plan["full"]:
        n, biggest = plan["region"] * pc["block"], max(i * o for _, i, o, _, _ in lins)
    for name, i, o, _, _ in lins:
        if name in plan["lora"]:
            n, biggest = n + a.layers * rank * (i + o), max(biggest, rank * max(i, o))
        n += a.layers * (o * (name in plan["ia3_out"]) + i * (name in plan["ia3_in"]))
    if plan["bias"]:
        n, biggest = a.layers * pc["block_bias"] + (0 if a.gated else a.hidden), max(a.intermediate, a.hidden)
    return n, biggest


def _additive(a: Arch, method: str, n: int, m: int) -> int:
    """Trainable numbers of the methods that add tensors beside the weights: n virtual tokens of width d (input
    level; P-tuning adds its MLP encoder, d -> d -> d -> d) or of layers x 2 x kv_dim (a key/value prefix); a
    bottleneck adapter's D (m x d) + U (d x m) and their biases, twice per block for Houlsby."""
    kv = a.kv_heads * a.hd
    if method == "prompt_tuning":
        return n * a.hidden
    if method == "p_tuning":
        return n * a.hidden + 3 * (a.hidden * a.hidden + a.hidden)
    if method in ("prefix_tuning", "p_tuning_v2"):
        return n * a.layers * 2 * kv
    if method == "adapter_bias":  # v (d) and L_α (d -> 1, with bias) per block
        return a.layers * (2 * a.hidden + 1)
    if method in ("compacter", "compacter_pp"):  # PHM D and U: (m + d) each at rank 1, biases, 2 n^3 shared rules
        per = 2 * (m + a.hidden) + m + a.hidden
        return a.layers * (2 if method == "compacter" else 1) * per + 2 * PHM_N ** 3
    per = 2 * a.hidden * m + m + a.hidden + (method == "scaled_parallel")
    return a.layers * (2 if method == "houlsby" else 1) * per


def _additive_activations(a: Arch, method: str, per_block: float, attn_part: float, act: int, batch: int,
                          seq: int, n: int, m: int) -> float:
    """Bytes autograd keeps for the additive methods (measured with ``saved_tensors_hooks`` on HF's Llama, SDPA):

    * soft prompts: every block is in the gradient's path (a prefix trains at every layer, or the virtual tokens
      enter at the bottom) -- the seeds' point that prompt methods cost about full fine-tuning's activations. With a
      prefix the attention gets an explicit mask, so transformers repeats K and V to every query head (SDPA's GQA
      path needs no mask) and saves them at T + n positions, plus a (B, 1, T, T + n) mask per layer; input-level
      prompts also run their n tokens through every block once (batch 1);
    * bottleneck adapters: each adapter keeps its input (fp32, the adapter's dtype) and its m-wide activation; the
      lowest adapter's sub-layer and everything below it is out of the gradient's path (Houlsby's first adapter
      follows block 0's attention, so block 0's MLP is in it; Pfeiffer's and the parallel adapter's follow block
      0's MLP, so none of block 0 is)."""
    N = batch * seq
    # Compacter's PHM layers build each weight per step (kept for backward: W, m x d, and the n factors s_i t_i,
    # m d / n), and GELU keeps its m-wide input beside the up-projection's input
    phm = (N * m * 4 + 2 * (m * a.hidden + m * a.hidden // PHM_N) * 4) if method.startswith("compacter") else 0
    method = PLACED_AS.get(method, method)
    if method in SOFT_PROMPTS:
        kv_plain = 2 * a.kv_heads * a.hd * act  # K and V per token as the block model counts them
        per_layer = (N * (per_block - kv_plain) + 2 * batch * a.heads * (seq + n) * a.hd * act
                     + batch * seq * (seq + n) * act)
        virtual = n * per_block if method in ("prompt_tuning", "p_tuning") else 0
        return a.layers * (per_layer + virtual)
    adapters = a.layers * (2 if method == "houlsby" else 1)
    lowest = per_block - attn_part if method == "houlsby" else 0
    scaled = a.hidden * 4 if method == "scaled_parallel" else 0  # U f(D x), kept for the gradient of the learned s
    # the block model leaves out the lowest block's input (no gradient below it); here it comes from an adapter
    entry = a.hidden * (4 if a.gated else act)
    return N * ((a.layers - 1) * per_block + lowest + adapters * ((a.hidden + m) * 4 + scaled) + entry) + adapters * phm


def _saved_per_token(a: Arch, plan: dict, act: int, rank: int) -> tuple[float, float]:
    """Bytes autograd keeps per token: (one block in the gradient's path, the head). Names dedupe tensors that
    several consumers save (in fp32 an fp32 adapter's ``x.to(float32)`` is ``x`` itself; in 16 bit it is a copy)."""
    keep: dict[str, float] = {}
    nb = 4 if a.gated else act  # HF's RMSNorm upcasts its input to fp32 before saving it; LayerNorm does not
    for i in (1, 2):
        keep[f"x{i}"], keep[f"rstd{i}"] = a.hidden * nb, 4 * (1 if a.gated else 2)
        if plan["norms"] and a.gated:
            keep[f"normed{i}"] = a.hidden * act
    q, kv = a.heads * a.hd, a.kv_heads * a.hd
    keep.update(q=q * act, k=kv * act, v=kv * act, attn=q * act, lse=a.heads * 4)
    if a.gated:
        keep.update(gate=a.intermediate * act, act=a.intermediate * act, up=a.intermediate * act)
    else:
        keep["fc"] = a.intermediate * act  # GELU's input; its output is "p"
    for name, i, o, _, src in block_linears(a):
        if name in plan["full"] or name in plan["ia3_in"]:
            keep[src] = i * act
        if name in plan["lora"]:
            keep[src if act == 4 else f"{src}:{name}"] = i * 4
            keep[f"lora_a:{name}"] = rank * 4
        if name in plan["ia3_out"]:
            keep[f"out:{name}"] = o * act
    head = a.hidden * nb + 4 + (a.hidden * act if plan["head"] and a.gated else 0)  # final norm
    head += a.hidden * act if plan["head"] else a.hidden * 4  # the head's input copy, or d = W^T (e_y - p) in fp32
    head += 8 + (8 if plan["emb"] else 0)  # int64 targets; token ids for the embedding's backward
    # With nothing trainable below it, the lowest trained block's input needs no gradient: its norm saves no copy.
    plan["attn_bytes"] = sum(v for k, v in keep.items() if k in ("x1", "rstd1", "normed1", "q", "k", "v", "attn",
                                                                 "lse"))
    return sum(keep.values()), head - (0 if plan["emb"] else a.hidden * nb)


def estimate(model, method: str = "full", bits: int = 16, batch: int = 1, seq: int = 512, optimizer: str = "adamw",
             rank: int = 8, targets: list[str] | None = None, top_k: int = 1, device: str = "cuda",
             overhead: int = 0, virtual_tokens: int = 20, bottleneck: int = 0) -> Estimate:
    """Memory of ``method`` training (and of serving the result) at ``bits`` for ``batch`` x ``seq`` tokens.
    ``virtual_tokens``: a soft prompt's n; ``bottleneck``: an adapter's m (0 = hidden / 16; Compacter's
    hidden / 32 rounded up to a multiple of 4).

    ``device`` matters only for the optimizer's temporaries: tuneforge's AdamW runs per tensor on CPU (two
    temporaries the size of the largest tensor) and ``foreach`` on GPU (one the size of all trainable tensors)."""
    if method not in METHODS:
        raise EstimateError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if optimizer not in OPTIMIZERS:  # adamw8bit: tensors under 4096 elements keep fp32 moments (ignored here)
        raise EstimateError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if method == "qlora":
        bits = 4
    if bits not in DTYPE_DIVISOR:
        raise EstimateError(f"bits must be 32, 16, 8 or 4, not {bits}")
    if bits < 16 and method in ("full", "freeze", "bitfit"):
        raise EstimateError(f"{method} updates base weights, which cannot train in {bits}-bit; use lora/qlora/ia3 "
                            "on a quantised base, or bits 16/32")
    if min(batch, seq, rank, virtual_tokens) < 1 or bottleneck < 0:
        raise EstimateError("batch, seq, rank and virtual_tokens must be at least 1 (bottleneck at least 0)")
    m = resolve_model(model)
    base_b, act = (4, 4) if bits == 32 else (2, 2)  # storage of unquantised tensors; compute dtype
    opt_per = {"adamw": None, "adamw8bit": ADAM8_BYTES, "sgd": 0}[optimizer]
    if isinstance(m, int):  # no dimensions: every parameter is treated as a quantisable matrix weight
        if method not in ("none", "full"):
            raise EstimateError(f"{method}'s trainable parameters depend on the layer shapes: give a model directory "
                                "(config.json) or a preset instead of a parameter count")
        e = Estimate(f"{m:,} parameters", method, bits, batch, seq, optimizer, m, m if method == "full" else 0,
                     weights=int(m * {8: 8, 4: NF4_BITS}.get(bits, bits) / 8))
        e.inference = e.weights + overhead
        if method == "full":
            e.gradients, e.optimizer_state = m * base_b, m * (2 * base_b if opt_per is None else opt_per)
            e.training = e.weights + e.gradients + e.optimizer_state + overhead
        e.notes.append("activations, KV cache and workspace need the architecture (hidden size, layers, heads, "
                       "vocabulary): pass a config.json directory or a preset; totals here omit them")
        return e
    pc, lins = param_counts(m), block_linears(m)
    quantised = m.layers * pc["block_linear"] if bits < 16 else 0
    q_bytes = (NF4_BITS / 8 * quantised if bits == 4 else
               m.layers * sum(i * o + 4 * o for _, i, o, _, _ in lins) if bits == 8 else 0)  # int8: + fp32 per row
    weights = int(q_bytes + (pc["total"] - quantised) * base_b)
    plan = _plan(m, method, targets, top_k)
    n_train, biggest = _trainable(m, plan, rank) if method != "none" else (0, 0)
    width = bottleneck or max(1, m.hidden // 16)
    if method in ("compacter", "compacter_pp") and not bottleneck:  # d / 32, up to a multiple of n
        width = max(PHM_N, -(-(m.hidden // 32) // PHM_N) * PHM_N)
    width = 1 if method == "adapter_bias" else width
    additive = method in SOFT_PROMPTS + BOTTLENECKS
    if additive:
        n_train = _additive(m, method, virtual_tokens, width)
        biggest = (virtual_tokens * m.layers * 2 * m.kv_heads * m.hd if method in ("prefix_tuning", "p_tuning_v2")
                   else m.hidden * max(width, m.hidden if method == "p_tuning" else 0, virtual_tokens))
    adapter_like = method in ("lora", "qlora", "ia3") or additive
    tb = 4 if adapter_like else base_b  # adapters are created in fp32 (as PEFT does)
    e = Estimate(m.name, method, bits, batch, seq, optimizer, pc["total"], n_train, weights=weights,
                 adapter=n_train * 4 if adapter_like else 0)
    N = batch * seq
    e.kv_cache = 2 * m.layers * m.kv_heads * m.hd * act * N
    prefill = N * (2 * m.hidden + 3 * m.intermediate) * act + batch * m.vocab * 4  # one block's live tensors
    dequant = max(i * o for _, i, o, _, _ in lins) * 2 if bits < 16 else 0  # a layer's weight, dequantised to bf16
    e.inference = weights + e.adapter + e.kv_cache + prefill + dequant + overhead
    if method == "none":
        e.notes.append("inference only: weights + KV cache + one block's prefill tensors")
        return e
    e.gradients = n_train * tb
    e.optimizer_state = int(n_train * (2 * tb if opt_per is None else opt_per))
    per_block, head = _saved_per_token(m, plan, act, rank)
    blocks = N * plan["region"] * per_block
    if additive:
        blocks = _additive_activations(m, method, per_block, plan["attn_bytes"], act, batch, seq, virtual_tokens,
                                       width)
        if method in SOFT_PROMPTS:  # serving keeps the prefix in every row's KV cache
            e.kv_cache = 2 * m.layers * m.kv_heads * m.hd * act * batch * (seq + virtual_tokens)
            e.inference += e.kv_cache - 2 * m.layers * m.kv_heads * m.hd * act * N
    e.activations = int(blocks + N * head)
    rows = HEAD_CHUNK_ELEMENTS // m.vocab  # a CPU process only makes the rows it writes resident; a GPU holds all
    head_ws = (min(rows, N) if device == "cpu" else rows) * m.vocab * (4 + (2 if act == 2 else 0))
    # Backward's high-water mark: the head's input gradient (N, H) in fp32 while everything is still saved, or,
    # once the head's tensors are released, the top MLP's: the residual stream's gradient plus d(silu(gate)) and
    # d(up) (one I-wide gradient for a GELU MLP) before that block's saved tensors go (measured with torch.profiler)
    bwd = max(e.activations + N * m.hidden * 4, blocks + N * (m.hidden + (2 if m.gated else 1) * m.intermediate) * act)
    opt_tmp = 0 if opt_per is not None else n_train * tb if device != "cpu" else 2 * biggest * tb
    head_grad = (m.vocab * m.hidden + m.hidden) * tb if plan["head"] else 0
    e.workspace = head_ws + dequant + max(bwd - e.activations, opt_tmp)
    e.training = (weights + e.adapter + e.optimizer_state + head_ws + dequant + overhead
                  + max(bwd + head_grad, e.gradients + opt_tmp))
    e.notes.append(f"peak = weights + adapter + optimizer + max(activations + head grad + backward temporaries, "
                   f"gradients + optimizer temporaries) + {head_ws / 2**20:.0f} MiB head chunk buffer")
    if bits < 16:
        kind = "NF4, double-quantised" if bits == 4 else "int8, an fp32 scale per row"
        e.notes.append(f"{bits}-bit applies to block linear weights ({kind}); embeddings, head, norms stay 16-bit")
    if not m.gated:
        e.notes.append("activations are modelled on Llama-style blocks; against autograd's saved tensors they read "
                       "13% low on GPT-NeoX and 60% low on GPT-2 with attention dropout (T x T math attention)")
    return e


# ------------------------------------------------------------------------------------------------ formatting
def human(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def format_estimate(e: Estimate) -> str:
    lines = [(f"{e.model}: {e.params_total:,} parameters ({e.params_total / 1e9:.2f}B); method {e.method}, "
              f"{e.params_trainable:,} trainable; {e.bits}-bit; batch {e.batch} x seq {e.seq}; {e.optimizer}")]
    rows = [("weights", e.weights), ("adapter (fp32)", e.adapter), ("gradients", e.gradients),
            ("optimizer state", e.optimizer_state), ("activations (saved for backward)", e.activations),
            ("workspace (temporaries)", e.workspace), ("training peak", e.training), ("", None),
            ("KV cache (batch x seq)", e.kv_cache), ("inference peak", e.inference)]
    lines += [f"  {k:34s} {human(v):>12s}" if k else "" for k, v in rows]
    return "\n".join(lines + [f"  note: {n}" for n in e.notes])


def format_can_it_run(t: dict) -> str:
    cols = list(t["rows"])
    keys = list(t["rows"][cols[0]])
    title = (f"{t['parameters']:,} parameters without the LM head ({t['header_billions']:.1f}B as the Space shows "
             f"it); GB = GiB; LoRA at {t['lora_pct']:g}% trainable")
    out = [title, f"{'':28s}" + "".join(f"{c:>18s}" for c in cols)]
    out += [f"{k:28s}" + "".join(f"{t['rows'][c][k]:>18.2f}" for c in cols) for k in keys]
    return "\n".join(out)

