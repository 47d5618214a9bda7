"""Bottleneck adapters, shared by ``houlsby``, ``pfeiffer``, ``parallel`` and ``scaled_parallel``, and the family
built on the same layer: ``compacter``/``compacter_pp`` (D and U as PHM layers), ``adapter_bias`` (width 1, no
non-linearity), ``adapter_fusion`` (attention over a layer's frozen adapters) and ``adapter_drop`` (per-adapter
block thresholds).

A bottleneck adapter is a small two-layer network with a narrow middle, added to a sub-layer of every block
(Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", https://arxiv.org/abs/1902.00751, sec. 2.1 and
fig. 2):

    A(h) = U f(D h),        D: (m x d) down-projection, f a non-linearity, U: (d x m) up-projection, m << d.

It is added either *sequentially*, to the output h of a sub-layer (``h + A(h)``: Houlsby after attention and after
the FFN, Pfeiffer et al. 2021 after the FFN only), or *in parallel* to a sub-layer, reading its input x
(``F(x) + s A(x)``: He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning",
https://arxiv.org/abs/2110.04366, sec. 3 and eq. 6, the parallel adapter at the FFN with scaling s; ``s`` learned in
``scaled_parallel``). U starts at zero, so A = 0 and the model's outputs are unchanged at step 0 (Houlsby's
near-identity initialisation, made exact); D starts small and random (normal, std 1e-2) so gradients reach U.

With ``gate: true`` the adapter's output is scaled by a learned gate read from the adapter's own input, one value per
token (UniPELT, Mao et al. 2022, https://arxiv.org/abs/2110.07577, sec. 3.2: h ← G_A · A(h) + h, G_A = σ(W_g h +
b_g)); W_g ~ N(0, 0.02²) and b_g = 0 start every gate near 0.5, and U = 0 still makes A = 0 at step 0. UniPELT's code
and AdapterHub average the gate over the sequence; per token keeps a causal LM causal (no token's output depends on
later tokens) and makes generation with a KV cache equal a full forward.

A is non-linear, so it cannot be folded into the base weights: ``merge`` refuses with the reason. Each wrapped module
keeps one adapter per name; per-example selection (mixed-task batches) adds each row's adapter to that row only. In a
composition, list bottleneck adapters after the methods that wrap linear layers (``[lora, houlsby]``): they wrap
whatever module sits at their target, and the linear layers they wrap stay visible under ``<path>.base``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from tuneforge.methods._inject import copy_checked, find_targets, replace_module
from tuneforge.methods._scope import AdapterLayer, PerExample
from tuneforge.models import arch

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh,
               "identity": lambda x: x}  # identity: AdapterBias's linear shift
DEFAULT_REDUCTION = 16  # m = d / 16 (AdapterHub's default reduction factor)
INIT_STD = 1e-2  # D's initial scale (AdapterHub's and Houlsby's near-zero initialisation)
GATE_INIT_STD = 0.02  # a gate's initial weight scale (AdapterHub's); its bias starts at 0, the gate near 0.5

# Per-architecture defaults: the attention output and FFN output projections (sequential adapters), and the FFN block
# (parallel adapters). Any model can name its own with ``target_modules``.
ATTN_OUT = {"llama": "self_attn.o_proj", "gpt2": "attn.c_proj", "gpt_neox": "attention.dense"}
FFN_OUT = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}
FFN_BLOCK = {"llama": "mlp", "gpt2": "mlp", "gpt_neox": "mlp"}
for _t in ("mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite", "phi3"):
    ATTN_OUT[_t], FFN_OUT[_t], FFN_BLOCK[_t] = "self_attn.o_proj", "mlp.down_proj", "mlp"
# Encoders (Houlsby's own setting): BERT's attention output and FFN output projections, each before its residual
# add and LayerNorm, as in Houlsby et al.'s fig. 2. BERT's FFN is two sibling modules (``intermediate``, ``output``,
# the latter holding the residual and LayerNorm), so there is no FFN block to run a parallel adapter beside:
# parallel adapters, AdapterBias and their kin need target_modules there.
for _t in ("bert", "roberta", "xlm-roberta", "camembert", "electra"):
    ATTN_OUT[_t], FFN_OUT[_t] = "attention.output.dense", r"re:.*\.layer\.\d+\.output\.dense"
ATTN_OUT["distilbert"], FFN_OUT["distilbert"] = "attention.out_lin", "ffn.lin2"
for _t in ("t5", "mt5", "umt5"):  # every block of encoder and decoder: self-attention output, FFN output
    ATTN_OUT[_t], FFN_OUT[_t] = "SelfAttention.o", "DenseReluDense.wo"


class BottleneckConfig(BaseModel):
    """Options every bottleneck adapter shares (each method adds its ``name`` literal)."""

    model_config = ConfigDict(extra="forbid")
    bottleneck: int | None = Field(None, gt=0, description="m, the middle width; default d / reduction_factor")
    reduction_factor: float | None = Field(None, gt=0, description="m = d / reduction_factor (default 16) when "
                                                                    "bottleneck is unset")
    non_linearity: Literal["relu", "gelu", "silu", "swish", "tanh"] = "relu"
    target_modules: list[str] | None = Field(None, description="modules to adapt; None = the architecture's default")
    exclude_modules: list[str] = Field(default_factory=list)
    gate: bool = Field(False, description="UniPELT's gate: scale the adapter's output by σ(W_g h + b_g) per token, "
                                          "h the adapter's input (a learned d -> 1 map per adapted sub-layer)")

    @model_validator(mode="after")
    def _one_size(self):
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ValueError("give bottleneck or reduction_factor, not both")
        return self

    def width(self, d: int) -> int:
        return self.bottleneck or max(1, int(d // (self.reduction_factor or DEFAULT_REDUCTION)))


class BottleneckLayer(AdapterLayer):
    """A module with bottleneck adapters: ``base(x) + A(base(x))`` (sequential) or ``base(x) + s A(x)`` (parallel)."""

    ADAPTER_TENSORS = {"adapter_down": True, "adapter_up": True, "adapter_scale": False, "fusion": True}
    wraps_linear = False  # models.arch: the base's own linear layers stay visible to other methods, not this one's

    def __init__(self, base: nn.Module, d_in: int, d_out: int, placement: str, method: str, block: int | None = None):
        super().__init__()
        self.base = base
        self.d_in, self.d_out, self.placement, self.method = d_in, d_out, placement, method
        self.block = block  # index of the transformer block this sits in (AdapterDrop drops the lowest ones)
        self.adapter_down, self.adapter_up = nn.ModuleDict(), nn.ModuleDict()
        self.adapter_scale = nn.ParameterDict()  # learned s (scaled_parallel)
        self.fusion = nn.ModuleDict()  # adapter_fusion: attention over this layer's frozen member adapters
        self.fixed_scale: dict[str, float] = {}
        self.act: dict[str, str] = {}
        self.active: tuple[str, ...] | PerExample = ()
        # adapter_drop: adapter name -> {"train": k, "eval": k}, that adapter off here when this block is below k
        self.drop_below: dict[str, dict[str, int]] = {}
        self.train_k_is_eval_k = False  # set when dropout is off: a robust k is dropout, and goes with it

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped projection's own weight (absent for a wrapped block): models read it (T5's FFN checks
        ``wo.weight.dtype`` before its output projection)."""
        return self.base.weight

    def adapter_names(self) -> list[str]:
        return list(self.adapter_down) + list(self.fusion)

    def adapter_tensors(self) -> dict[str, tuple[nn.Parameter, bool]]:
        """D's and U's weights decay (their identity is 0); their biases do not, like every bias (HF Trainer's and
        AdapterHub's practice, and this project's for the model's own); nor does AdapterFusion's value matrix,
        whose starting point is the identity."""
        no_decay = {id(p) for f in self.fusion.values() for p in f.value.parameters()}
        return {n: (p, decays and not n.endswith(".bias") and id(p) not in no_decay)
                for n, (p, decays) in super().adapter_tensors().items()}

    def base_parameters(self) -> list[nn.Parameter]:
        return list(self.base.parameters())

    def dropped(self, name: str) -> bool:
        """Whether AdapterDrop has switched adapter ``name`` off in this block, in the current mode."""
        ks = self.drop_below.get(name)
        if ks is None or self.block is None:
            return False
        return self.block < ks["train" if self.training and not self.train_k_is_eval_k else "eval"]

    def add_adapter(self, name: str, width: int, act: str, scale: float = 1.0, learn_scale: bool = False,
                    pair=None, up_bias: bool = True, gate: bool = False) -> None:
        """Add adapter ``name``: D and U are ``nn.Linear`` unless ``pair`` builds them (Compacter's PHM layers:
        ``pair(d_src, width, d_out, device, dtype) -> (D, U)``, U already zero); ``gate`` adds G_A."""
        if name in self.adapter_names():
            raise ValueError(f"adapter name {name!r} is already used at this sub-layer (by {self.method} or an "
                             "adapter_fusion); give the second method its own adapter name")
        ref = next((p for p in self.base.parameters() if p.is_floating_point()), None)
        dev = ref.device if ref is not None else None
        dt = torch.float32 if ref is None or ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
        src = self.d_in if self.placement == "parallel" else self.d_out
        if pair is not None:
            down, up = pair(src, width, self.d_out, dev, dt)
        else:
            down = nn.Linear(src, width, device=dev, dtype=dt)
            up = nn.Linear(width, self.d_out, bias=up_bias, device=dev, dtype=dt)
            with torch.no_grad():
                nn.init.normal_(down.weight, std=INIT_STD)
                nn.init.zeros_(down.bias)
                nn.init.zeros_(up.weight)  # A = 0: outputs unchanged at step 0
                if up.bias is not None:
                    nn.init.zeros_(up.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        if gate:  # UniPELT's G_A, a (d_src -> 1) map held by U, whose output it scales: whatever handles an
            # adapter by its D and U (saving, a fusion freezing its members, AdapterDrop removing one) has it too
            up.gate = nn.Linear(src, 1, device=dev, dtype=dt)
            with torch.no_grad():
                nn.init.normal_(up.gate.weight, std=GATE_INIT_STD)
                nn.init.zeros_(up.gate.bias)
        self.act[name] = act
        if learn_scale:
            self.adapter_scale[name] = nn.Parameter(torch.tensor(float(scale), device=dev, dtype=dt))
        else:
            self.fixed_scale[name] = float(scale)
        if not isinstance(self.active, PerExample):
            self.active = tuple(self.active) + (name,)

    def _delta(self, name: str, src: torch.Tensor) -> torch.Tensor:
        """What adapter (or fusion) ``name`` adds to the sub-layer's output; ``src`` is what it reads."""
        if name in self.fusion:
            return self.fusion[name](src, [self._delta(m, src) for m in self.fusion[name].members])
        down, up = self.adapter_down[name], self.adapter_up[name]
        dt = next(down.parameters()).dtype
        a = up(ACTIVATIONS[self.act[name]](down(src.to(dt))))
        gate = getattr(up, "gate", None)
        if gate is not None:  # G_A, one value per token, from what the adapter reads
            a = a * torch.sigmoid(gate(src.to(dt)))
        s = self.adapter_scale[name] if name in self.adapter_scale else self.fixed_scale[name]
        return a * s if not (isinstance(s, float) and s == 1.0) else a

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        groups = [(n, rows) for n, rows in self.batch_groups(x) if not self.dropped(n)]
        if not groups:
            return out
        main = out[0] if isinstance(out, tuple) else out
        src = x if self.placement == "parallel" else main
        for name, rows in groups:
            if rows is None:
                main = main + self._delta(name, src).to(main.dtype)
            else:
                main = main.index_add(0, rows, self._delta(name, src.index_select(0, rows)).to(main.dtype))
        return (main, *out[1:]) if isinstance(out, tuple) else main


def bottleneck_layers(model: nn.Module) -> dict[str, BottleneckLayer]:
    return {p: m for p, m in model.named_modules() if isinstance(m, BottleneckLayer)}


def _modules_by_suffix(model: nn.Module, targets: list[str], exclude: list[str], blocks_only: bool
                       ) -> dict[str, nn.Module]:
    """Target modules by the same matching rules as the other methods; for parallel adapters any module of a
    block (an FFN block is not a linear layer)."""
    if blocks_only:
        cands = {p: m for bp, b in arch.blocks(model) for p, m in
                 ((f"{bp}.{n}" if n else bp, m) for n, m in b.named_modules()) if p != bp}
        return find_targets(model, targets, candidates=cands, exclude=exclude)
    # linear layers, and sub-layers another bottleneck adapter already wraps (a second name, or a nested method)
    return find_targets(model, targets, candidates=arch.linear_modules(model) | bottleneck_layers(model),
                        exclude=exclude)


def _hidden(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not d:
        raise ValueError("bottleneck adapters need the model's hidden size (config.hidden_size)")
    return int(d)


def block_index(model: nn.Module, path: str) -> int | None:
    """Index of the transformer block holding module ``path`` (None outside the blocks)."""
    for i, (bp, _) in enumerate(arch.blocks(model)):
        if path.startswith(bp + "."):
            return i
    return None


def apply_bottleneck(model: nn.Module, cfg: BottleneckConfig, adapter: str, method: str, defaults: list[dict],
                     placement: str, scale: float = 1.0, learn_scale: bool = False, pair=None, width=None,
                     act: str | None = None, up_bias: bool = True) -> dict[str, BottleneckLayer]:
    """Wrap each target (or the architecture's defaults, ``defaults`` = list of suffix tables) and add ``adapter``;
    ``pair``/``width``/``act``/``up_bias`` as in ``BottleneckLayer.add_adapter`` (``width`` default: the config's).
    Returns the layers by path."""
    if any(layer.method == method and adapter in layer.adapter_down for layer in bottleneck_layers(model).values()):
        raise ValueError(f"{method} adapter {adapter!r} already exists on this model")
    targets = cfg.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if any(model_type not in table for table in defaults):
            raise ValueError(f"{method} has no default targets for model type {model_type!r}; set target_modules "
                             f"(e.g. {', '.join(t['llama'] for t in defaults)} on Llama)")
        targets = [table[model_type] for table in defaults]
    d = _hidden(model)
    out: dict[str, BottleneckLayer] = {}
    found = _modules_by_suffix(model, targets, cfg.exclude_modules, blocks_only=placement == "parallel")
    for path, module in found.items():
        if isinstance(module, BottleneckLayer) and module.method == method:
            layer = module  # another adapter name of the same method
        else:
            linear = isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2
            d_in, d_out = arch.weight_in_out(module) if linear else (d, d)
            layer = BottleneckLayer(module, d_in, d_out, placement, method, block_index(model, path))
            replace_module(model, path, layer)
        layer.add_adapter(adapter, width or cfg.width(d), act or cfg.non_linearity, scale, learn_scale, pair, up_bias,
                          gate=getattr(cfg, "gate", False))
        for p in (*layer.adapter_down[adapter].parameters(), *layer.adapter_up[adapter].parameters()):
            p.requires_grad_(True)  # (U's parameters include a gate's)
        if adapter in layer.adapter_scale:
            layer.adapter_scale[adapter].requires_grad_(True)
        out[path] = layer
    return out


class NotMergeableError(ValueError):
    """A method whose change to the model is not a weight update (``tuneforge merge`` reports it as a user error)."""


def refuse_merge(method: str) -> None:
    raise NotMergeableError(f"{method} adapters are non-linear (U f(D h)) and cannot be folded into the base weights; "
                     "keep the adapter beside the base model (tuneforge generate/serve --adapter), or train a "
                     "mergeable method (lora, ia3, lokr)")


def unload(model: nn.Module) -> None:
    """Put the wrapped modules back (the adapters are dropped)."""
    for path, layer in sorted(bottleneck_layers(model).items(), key=lambda kv: -kv[0].count(".")):
        replace_module(model, path, layer.base)


def method_functions(method: str):
    """``merge``, ``unload``, ``state_dict`` and ``load_state_dict`` of one bottleneck method, with the signatures the
    methods package calls (each method module binds them to its name)."""
    def merge(model: nn.Module, adapter: str = "default") -> None:
        refuse_merge(method)

    def state_dict_(model: nn.Module, cfg=None, adapter: str = "default") -> dict[str, torch.Tensor]:
        return state_dict(model, method, adapter)

    def load_state_dict_(model: nn.Module, cfg, tensors: dict[str, torch.Tensor], adapter: str = "default") -> None:
        load_state_dict(model, method, tensors, adapter)

    return merge, unload, state_dict_, load_state_dict_


# ------------------------------------------------------------------------------------------------------ saving
def state_dict(model: nn.Module, method: str, adapter: str) -> dict[str, torch.Tensor]:
    """``<path>.adapter_down.weight`` etc. per adapted sub-layer; a tensor shared by every layer (Compacter's rule
    matrices, the ``SHARED`` attribute of its D/U modules) once, as ``<method>.<attr>.<down|up>``."""
    out = {}
    for path, layer in bottleneck_layers(model).items():
        if layer.method != method or adapter not in layer.adapter_down:
            continue
        for part in ("down", "up"):
            mod = getattr(layer, f"adapter_{part}")[adapter]
            shared = getattr(mod, "SHARED", ())
            for n, p in mod.named_parameters():
                if n.split(".")[0] in shared:
                    out.setdefault(f"{method}.{n.split('.')[0]}.{part}", p.detach())
                else:
                    out[f"{path}.adapter_{part}.{n}"] = p.detach()
        if adapter in layer.adapter_scale:
            out[f"{path}.adapter_scale"] = layer.adapter_scale[adapter].detach()
    return out


def load_state_dict(model: nn.Module, method: str, tensors: dict[str, torch.Tensor], adapter: str) -> None:
    copy_checked(state_dict(model, method, adapter), tensors, method)
