"""``tuneforge.estimate`` for the methods that add tensors beside the base weights: soft prompts, the bottleneck family
with AdapterDrop and AdapterFusion, intrinsic-dimension fine-tuning's subspace, and UniPELT. ``estimate`` calls
these; the byte counts were read off ``torch.autograd.graph.saved_tensors_hooks`` on Hugging Face's Llama (SDPA) with
each tuneforge method applied, and the tests hold them to within 2% of that in fp32 and bf16.

Soft prompts: every block is in the gradient's path (a prefix trains at every layer, or the virtual tokens enter at
the bottom) -- the seeds' point that prompt methods cost about full fine-tuning's activations. With a prefix the
attention gets an explicit mask, so transformers repeats K and V to every query head (SDPA's GQA path needs no mask)
and saves them at T + n positions, plus a (B, 1, T, T + n) mask per layer; input-level prompts also run their n
tokens through every block once (batch 1).

Bottleneck adapters: each adapter keeps its input (fp32, the adapter's dtype) and its m-wide activation; the lowest
adapter's sub-layer and everything below it is out of the gradient's path (Houlsby's first adapter follows block 0's
attention, so block 0's MLP is in it; Pfeiffer's and the parallel adapter's follow block 0's MLP, so none of block 0
is). Compacter's PHM layers build each weight per step and keep it (m x d, and the n factors s_i t_i, m d / n).

Gates (``gate``; Mao et al. 2022, UniPELT, https://arxiv.org/abs/2110.07577, sec. 3.2): a gated LoRA layer or
adapter scales its output by σ(W_g x + b_g), one value per token from what it reads (W_g: d_in -> 1, with a bias),
so each adds d_in + 1 trainable numbers and keeps per token the gate's value and the ungated output (both fp32, for
their product); the gate casts its input to fp32 apart from the adapter's own cast, a second fp32 copy in 16 bit.
A fusion member's gate is frozen: it keeps the value and the member's output, not its input. (``tuneforge.estimate``
models gated LoRA in its block model.)

UniPELT (``tuneforge.methods.unipelt``): gated LoRA on W_q and W_v (the block model's), a prefix of n = 10 key/value
pairs in every layer, ungated, and a gated Pfeiffer adapter after every FFN, under one adapter name. The prefix puts
every block in the gradient's path, so the activations are prefix tuning's with each block also keeping its LoRA's
and its adapter's tensors.

AdapterDrop (Rücklé et al. 2021, "AdapterDrop: On the Efficiency of Adapters in Transformers",
https://arxiv.org/abs/2010.11918, sec. 3): with a fixed k the adapters of blocks 0 .. k-1 are never created, so the
trainable count is the adapter's over L - k blocks (Compacter's shared rules stay whole) and the gradient's path
starts at block k's lowest adapter: blocks 0 .. k-1 save nothing, which is the paper's training saving. A robust
(random) k keeps every adapter and its worst step is k = 0: estimate the plain adapter for it.

AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
https://arxiv.org/abs/2005.00247, sec. 3.2): at every adapted sub-layer N frozen members of one bottleneck method
and a trained attention over their outputs, Q (src x d), K and V (d x d), each with a bias: 3 d^2 + 3 d trainable
numbers a site; the members' tensors are resident but frozen (the ``adapter`` bytes count them, the optimizer does
not). Per token a site keeps the query's input and output, the stacked member outputs z (N x d; the key's and
value's shared input), K z and V z, the N-way softmax, and each member's m-wide activation (its frozen linears keep
no input; AdapterBias's identity keeps nothing; a Compacter member also keeps its two PHM weights, built per step for
its input gradient). At the lowest site nothing below trains, so its members keep nothing. Backward reaches the top
site first, with everything still saved, and holds the gradient of z there (N x d a token) beside it (torch.profiler).

Intrinsic dimension (Li et al. 2018, "Measuring the Intrinsic Dimension of Objective Landscapes",
https://arxiv.org/abs/1804.08838; Aghajanyan et al. 2021, "Intrinsic Dimensionality Explains the Effectiveness of
Language Model Fine-Tuning", https://arxiv.org/abs/2012.13255): θ = θ0 + P θ^d trains d numbers (θ^{d-m} and SAID's
m scales, one a target layer). P is drawn once, when the method is applied, and held as non-persistent buffers:
Fastfood's signs (int8), permutation (int64) and Gaussian (fp32) per L-wide block, L = 2^ceil(log2 d), 13 bytes a
padded weight; or a dense (D x d) fp32 matrix. Every target layer computes its ΔW (fp32) each step and adds
F.linear(x, ΔW), so the activations are full fine-tuning's for the target linears -- every block is in the path --
with each layer's input kept in fp32 (a copy per layer in 16 bit, as LoRA's), plus what building ΔW keeps: ΔW
itself, and for Fastfood the signs cast to fp32 and the first Hadamard transform's output (gather keeps its input),
both k x L, and the k block norms; SAID keeps the unscaled P θ too. While a layer's ΔW is built (forward) or
differentiated (backward), about three more k x L fp32 temporaries are live (``BUILD_TEMPORARIES``, measured with
torch.profiler); a dense P's are ΔW's gradient. Backward also holds a target's input gradient twice, from the frozen
weight and from ΔW, before summing them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.estimate import BOTTLENECKS, SOFT_PROMPTS, SRC_LEVEL, Arch, EstimateError, block_linears

# where each bottleneck-family method sits (its activations follow that placement's)
PLACED_AS = {"compacter": "houlsby", "compacter_pp": "pfeiffer", "adapter_bias": "parallel"}
PHM_N = 4  # Compacter's n (and rank 1): its defaults
MEMBER_DEFAULT = {"adapter_drop": "houlsby", "adapter_fusion": "pfeiffer"}  # the method docs' and the paper's
UNIPELT_ADAPTER = "pfeiffer"  # UniPELT's adapter follows each FFN (tuneforge.methods.unipelt)
PROJECTIONS = ("fastfood", "dense")
DENSE_LIMIT = 2 ** 28  # tuneforge.methods.intrinsic.DENSE_LIMIT (asserted by a test)
BUILD_TEMPORARIES = 3  # k x L fp32 tensors beyond the kept ones while one layer's ΔW is built (torch.profiler)


@dataclass(frozen=True)
class Options:
    """The method options ``estimate`` passes through (see its docstring)."""
    virtual_tokens: int = 20
    bottleneck: int = 0
    intrinsic_dim: int = 0
    projection: str = "fastfood"
    said: bool = False
    drop_layers: int = 0
    fusion_adapters: int = 2
    adapter_method: str | None = None
    gate: bool = False


@dataclass
class Counts:
    """What a method adds: trainable numbers, the largest trainable tensor, frozen adapter numbers (fusion members),
    and for intrinsic the projection's bytes, what building ΔW keeps for backward and its peak temporaries."""
    trainable: int
    biggest: int
    frozen: int = 0
    projection: int = 0
    fixed_saved: int = 0
    build_temporaries: int = 0
    widest_input: int = 0


# ------------------------------------------------------------------------------------------------ validation
def member_kind(method: str, o: Options) -> str:
    """The bottleneck method a method adds or acts on (AdapterDrop's adapters, AdapterFusion's members)."""
    if method in BOTTLENECKS:
        return method
    kind = o.adapter_method or MEMBER_DEFAULT[method]
    if kind not in BOTTLENECKS:
        raise EstimateError(f"{method}: adapter_method {kind!r} is not a bottleneck adapter; choose one of "
                            f"{', '.join(BOTTLENECKS)}")
    return kind


def width(a: Arch, kind: str, bottleneck: int) -> int:
    """m: as given, or the method's default (hidden / 16; Compacter's hidden / 32 up to a multiple of n)."""
    if kind == "adapter_bias":
        return 1
    if bottleneck:
        return bottleneck
    if kind in ("compacter", "compacter_pp"):
        return max(PHM_N, -(-(a.hidden // 32) // PHM_N) * PHM_N)
    return max(1, a.hidden // 16)


def check(a: Arch, method: str, o: Options) -> None:
    if method == "adapter_drop" and not 1 <= o.drop_layers < a.layers:
        raise EstimateError(f"adapter_drop drops the adapters of blocks 0 .. k-1: drop_layers (--drop-layers) must be "
                            f"1 .. {a.layers - 1} for this {a.layers}-block model, not {o.drop_layers}")
    if method == "adapter_fusion" and o.fusion_adapters < 2:
        raise EstimateError(f"adapter_fusion attends over at least 2 adapters, not fusion_adapters="
                            f"{o.fusion_adapters} (--fusion-adapters)")
    if method in MEMBER_DEFAULT:
        kind = member_kind(method, o)
        if kind == "adapter_bias" and (o.bottleneck or o.gate):
            raise EstimateError(f"{method} on adapter_bias: AdapterBias is one vector wide and has no gate, so "
                                "--bottleneck and --gate do not apply; leave them out")


# ------------------------------------------------------------------------------------------- bottleneck family
def sites_per_block(kind: str) -> int:
    return 2 if PLACED_AS.get(kind, kind) == "houlsby" else 1


def adapter_numbers(a: Arch, kind: str, m: int, gate: bool = False) -> tuple[int, int]:
    """(numbers of one adapter at one site, numbers shared by all its sites): D (m x d) + U (d x m) and their
    biases; Compacter's PHM D and U at rank 1, (m + d) each, and 2 n^3 shared rules; AdapterBias's v (d) and
    L_α (d -> 1, with bias); a gate's W_g (d -> 1) and b_g."""
    g = a.hidden + 1 if gate else 0
    if kind == "adapter_bias":
        return 2 * a.hidden + 1, 0
    if kind in ("compacter", "compacter_pp"):
        return 2 * (m + a.hidden) + m + a.hidden + g, 2 * PHM_N ** 3
    return 2 * a.hidden * m + m + a.hidden + (kind == "scaled_parallel") + g, 0


def bottleneck_numbers(a: Arch, kind: str, m: int, live: int, gate: bool = False) -> int:
    per, shared = adapter_numbers(a, kind, m, gate)
    return live * sites_per_block(kind) * per + shared


def fusion_numbers(a: Arch) -> int:
    """Q, K and V with biases at one site (every site reads and writes the hidden width)."""
    return 3 * (a.hidden * a.hidden + a.hidden)


def soft_prompt_numbers(a: Arch, method: str, n: int) -> int:
    """n virtual tokens of width d (input level; P-tuning adds its MLP encoder, d -> d -> d -> d) or of
    layers x 2 x kv_dim (a key/value prefix)."""
    if method == "prompt_tuning":
        return n * a.hidden
    if method == "p_tuning":
        return n * a.hidden + 3 * (a.hidden * a.hidden + a.hidden)
    return n * a.layers * 2 * a.kv_heads * a.hd


# --------------------------------------------------------------------------------------------------- intrinsic
def intrinsic_layers(a: Arch, targets: set[str]) -> list[int]:
    """Weights of every target layer of the model (the default: every block linear)."""
    return [i * o for name, i, o, _, _ in block_linears(a) if name in targets] * a.layers


def intrinsic_counts(a: Arch, plan: dict, o: Options) -> Counts:
    """θ (and λ), P's buffers, and what building each ΔW keeps: ΔW itself unless the layer's input needs no
    gradient (the lowest block's first targets, ``plan["start"]``: F.linear then keeps only that input)."""
    sizes = intrinsic_layers(a, plan["delta"])
    d, total = o.intrinsic_dim, sum(sizes)
    _check_intrinsic(len(sizes), total, o)
    free = d - len(sizes) if o.said else d
    biggest = max(free, len(sizes) if o.said else 0)
    kept = total - sum(i * o_ for name, i, o_, _, src in block_linears(a)
                       if name in plan["delta"] and SRC_LEVEL[src] == plan["start"])
    said = 4 * total if o.said else 0  # the unscaled P θ, kept for λ's gradient
    widest = max(i for name, i, *_ in block_linears(a) if name in plan["delta"])
    if o.projection == "dense":
        return Counts(d, biggest, projection=4 * total * free, fixed_saved=4 * kept + said,
                      build_temporaries=4 * max(sizes), widest_input=widest)
    L = 1 << max(0, (free - 1).bit_length())
    blocks = [-(-n // L) for n in sizes]
    padded = L * sum(blocks)
    return Counts(d, biggest, projection=13 * padded, fixed_saved=4 * (kept + 2 * padded + sum(blocks)) + said,
                  build_temporaries=4 * BUILD_TEMPORARIES * L * max(blocks), widest_input=widest)


def _check_intrinsic(layers: int, total: int, o: Options) -> None:
    d = o.intrinsic_dim
    if d < 1:
        raise EstimateError("intrinsic trains d numbers: pass intrinsic_dim (--intrinsic-dim), e.g. 1000")
    if o.projection not in PROJECTIONS:
        raise EstimateError(f"projection must be one of {', '.join(PROJECTIONS)}, not {o.projection!r}")
    if o.said and d <= layers:
        raise EstimateError(f"intrinsic with said has one λ per target layer ({layers}): intrinsic_dim must exceed "
                            f"{layers}")
    if d > total:
        raise EstimateError(f"intrinsic_dim {d} exceeds the {total} weights it projects onto; lower it, or estimate "
                            "full")
    if o.projection == "dense" and total * d > DENSE_LIMIT:
        raise EstimateError(f"a dense projection would hold {total} x {d} floats ({total * d * 4 / 2**30:.1f} GiB), "
                            "which tuneforge refuses; use projection fastfood")


# ------------------------------------------------------------------------------------------------- the counts
def counts(a: Arch, method: str, o: Options, plan: dict) -> Counts:
    """Trainable (and frozen) numbers of ``method``, with the options validated (``plan``: ``estimate._plan``'s)."""
    if method == "intrinsic":
        return intrinsic_counts(a, plan, o)
    if method == "unipelt":  # the prefix and the adapter (its LoRA and LoRA's gates are in the plan)
        prefix, m = soft_prompt_numbers(a, "prefix_tuning", o.virtual_tokens), width(a, UNIPELT_ADAPTER, o.bottleneck)
        return Counts(prefix + bottleneck_numbers(a, UNIPELT_ADAPTER, m, a.layers, o.gate), max(prefix, a.hidden * m))
    if method in SOFT_PROMPTS:
        n = soft_prompt_numbers(a, method, o.virtual_tokens)
        prefix = method in ("prefix_tuning", "p_tuning_v2")
        biggest = n if prefix else a.hidden * max(o.virtual_tokens, a.hidden if method == "p_tuning" else 0)
        return Counts(n, biggest)
    check(a, method, o)
    kind = member_kind(method, o)
    m = width(a, kind, o.bottleneck)
    biggest = a.hidden * m
    if method == "adapter_fusion":
        members = o.fusion_adapters * bottleneck_numbers(a, kind, m, a.layers, o.gate)
        return Counts(a.layers * sites_per_block(kind) * fusion_numbers(a), a.hidden * a.hidden, frozen=members)
    live = a.layers - (o.drop_layers if method == "adapter_drop" else 0)
    return Counts(bottleneck_numbers(a, kind, m, live, o.gate), biggest)


def backward_temporaries(a: Arch, method: str, o: Options, c: Counts, tokens: int) -> int:
    """Beyond the block model's backward temporaries: AdapterFusion's gradient of z at its top site; intrinsic's ΔW
    build for one layer, and a target's input gradient from the ΔW path (fp32) beside the frozen weight's, before
    they are summed (torch.profiler)."""
    if method == "adapter_fusion":
        return tokens * o.fusion_adapters * a.hidden * 4
    return c.build_temporaries + tokens * c.widest_input * 4


# -------------------------------------------------------------------------------------------- the activations
def saved(a: Arch, method: str, o: Options, per_block: float, attn_part: float, act: int, batch: int,
          seq: int) -> float:
    """Bytes the blocks keep for backward per step (the head's part is the caller's)."""
    if method in SOFT_PROMPTS:
        return _soft_prompt_saved(a, method, per_block, act, batch, seq, o.virtual_tokens)
    if method == "unipelt":  # a prefix model whose blocks also hold (gated) LoRA, in per_block, and an adapter
        site_token, _ = _adapter_site(a, UNIPELT_ADAPTER, width(a, UNIPELT_ADAPTER, o.bottleneck), o.gate, act)
        return _soft_prompt_saved(a, "prefix_tuning", per_block + site_token, act, batch, seq, o.virtual_tokens)
    kind = member_kind(method, o)
    m, N = width(a, kind, o.bottleneck), batch * seq
    if method == "adapter_fusion":
        return _fusion_saved(a, kind, m, o.fusion_adapters, per_block, attn_part, act, N, o.gate)
    live = a.layers - (o.drop_layers if method == "adapter_drop" else 0)
    site_token, site_fixed = _adapter_site(a, kind, m, o.gate, act)
    return _path_saved(a, kind, per_block, attn_part, act, N, live, site_token, site_fixed)


def _soft_prompt_saved(a: Arch, method: str, per_block: float, act: int, batch: int, seq: int, n: int) -> float:
    N = batch * seq
    kv_plain = 2 * a.kv_heads * a.hd * act  # K and V per token as the block model counts them
    per_layer = (N * (per_block - kv_plain) + 2 * batch * a.heads * (seq + n) * a.hd * act
                 + batch * seq * (seq + n) * act)
    virtual = n * per_block if method in ("prompt_tuning", "p_tuning") else 0
    return a.layers * (per_layer + virtual)


def _adapter_site(a: Arch, kind: str, m: int, gate: bool = False, act: int = 4) -> tuple[float, float]:
    """(bytes per token, bytes per step) a trained adapter keeps at one site: its fp32 input and m-wide activation;
    a learned scale keeps U f(D x) for its gradient; Compacter's GELU keeps its input beside U's, and its PHM layers
    keep each built weight (m x d) and the n factors s_i t_i (m d / n). A gate keeps σ(W_g h + b_g) and the
    ungated output (d) for the product, and in 16 bit its own fp32 copy of the input (it casts h apart from D)."""
    token = (a.hidden + m) * 4 + (a.hidden * 4 if kind == "scaled_parallel" else 0)
    token += (a.hidden + 1) * 4 + (a.hidden * 4 if act != 4 else 0) if gate else 0
    if kind not in ("compacter", "compacter_pp"):
        return token, 0
    return token + m * 4, 2 * (m * a.hidden + m * a.hidden // PHM_N) * 4


def _path_saved(a: Arch, kind: str, per_block: float, attn_part: float, act: int, N: int, live: int,
                site_token: float, site_fixed: float) -> float:
    """Blocks from the lowest adapted sub-layer up, with ``live`` (the top) blocks holding adapters: the lowest
    one's sub-layer and everything below are out of the gradient's path. The block model leaves out the lowest
    block's input (no gradient below it); here it comes from an adapter."""
    sites = live * sites_per_block(kind)
    lowest = per_block - attn_part if PLACED_AS.get(kind, kind) == "houlsby" else 0
    entry = a.hidden * (4 if a.gated else act)
    return N * ((live - 1) * per_block + lowest + entry + sites * site_token) + sites * site_fixed


def _fusion_saved(a: Arch, kind: str, m: int, n: int, per_block: float, attn_part: float, act: int,
                  N: int, gate: bool = False) -> float:
    """AdapterFusion's sites (see the module docstring); the lowest site's members keep nothing. A gated member
    keeps its gate's value and its ungated output for their product (its frozen gate keeps no input)."""
    H = a.hidden
    member_token = (0 if kind == "adapter_bias" else m * 4) + ((H + 1) * 4 if gate else 0)
    member_fixed = 2 * m * H * 4 if kind in ("compacter", "compacter_pp") else 0
    site_token = 4 * (n * (3 * H + 1) + 2 * H) + n * member_token
    total = _path_saved(a, kind, per_block, attn_part, act, N, a.layers, site_token, n * member_fixed)
    return total - n * (N * member_token + member_fixed)
