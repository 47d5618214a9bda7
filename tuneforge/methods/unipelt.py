"""UniPELT: LoRA, prefix tuning and a bottleneck adapter in every block, each gated by its input (Mao et al. 2022,
"UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning", https://arxiv.org/abs/2110.07577).

The paper's premise (sec. 1, table 1): which parameter-efficient method works best differs from task to task and
with the amount of data, so instead of choosing, train all of them at once and let a learned gate per submodule
decide, token by token and layer by layer, how much of each to use (sec. 3.2, fig. 1). Under one adapter name:

* LoRA on the attention's query and value projections, scaled by G_L = σ(W_L x + b_L) from the projection's input x:
  h = W0 x + G_L · s · B A x (``lora`` with ``gate: true``). UniPELT's code replaces LoRA's constant α/r by the
  gate; the default alpha = rank makes s = 1, so here too the gate is the update's whole scale;
* a sequential (Pfeiffer) adapter after each FFN, scaled by G_A = σ(W_A h + b_A) from its input h, the FFN output:
  h ← h + G_A · U f(D h) (``pfeiffer`` with ``gate: true``);
* a prefix of n key/value pairs in every attention layer (``prefix_tuning``), **not gated**; see below.

Defaults are the paper's and AdapterHub's ``UniPELTConfig``: LoRA r = 8 on W_q and W_v, prefix length 10, adapter
bottleneck d/16 (48 on BERT-base, the paper's size). Gates are (d -> 1) linear maps, one per adapted layer, with
weights N(0, 0.02²) and zero bias: every gate starts near 0.5. LoRA's B = 0 and the adapter's U = 0 make both gated
terms exactly 0 at step 0, so the model starts as the base model with the prefix in front (prefix tuning itself is not
the identity at init: its keys and values are there from the first step). Gates are per token, where UniPELT's code
and AdapterHub average them over the sequence: in a causal LM that mean would let every token's output depend on
the tokens after it.

**Why the prefix has no gate.** The paper's G_P = σ(W_P x + b_P) is computed from each token's layer input x and
multiplies the prefix's keys and values, so every query token sees its own scaled copy of the prefix. tuneforge keeps
a prefix where the model keeps its past, in the KV cache (``_soft_prompt``): one set of keys and values per row,
written once and read by every later query, which is what makes generation, rollouts and serving handle soft
prompts like any other method. A per-query factor cannot live there; it would have to be applied inside every
attention call. AdapterHub's way around this, one gate per row from the mean over the row's sequence, fits in the
cache but is wrong for a decoder: (1) in training each position's prefix scale then depends on the tokens after it,
so the model can read the future through it; (2) with a cache the factor is fixed at prefill from the prompt alone,
so the tokens generated next see another prefix than the same text does in one forward pass, and generation stops
agreeing with scoring. An input-independent gate σ(b) would be causal but is only a rescaling of the prefix the
optimiser can learn anyway. So the prefix is left ungated, and what remains of the paper's mechanism, choosing
between methods per token and layer, is done by G_L and G_A.

Not mergeable (the gates depend on the input; the adapter is non-linear; the prefix is extra keys and values):
``merge`` refuses. Saved in tuneforge's layout (PEFT has no UniPELT). ``gate: false`` gives the ungated
mixture, the paper's ablation baseline. A list of methods does the same with other sizes or parts, e.g.
``[{name: lora, gate: true, target_modules: [q_proj, v_proj]}, {name: pfeiffer, gate: true}]`` is UniPELT without
the prefix, which is the identity at init and packs rows.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from tuneforge.methods import _bottleneck as BN
from tuneforge.methods import _soft_prompt as SP
from tuneforge.methods import lora, pfeiffer
from tuneforge.methods import prefix_tuning as PT
from tuneforge.models import arch

NAME = "unipelt"
MERGEABLE = False
STATE_SUFFIXES = SP.state_suffixes()

# The attention's query and value projections (the paper's W_q, W_v). Fused q|k|v projections are adapted whole, as
# PEFT's defaults do for these architectures; other models with q_proj/v_proj layers need no entry.
QUERY_VALUE = {"gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"],
               "bloom": ["query_key_value"], "phi3": ["qkv_proj"]}

NOT_MERGEABLE = ("unipelt's gates depend on each token's input, its adapter is non-linear and its prefix is extra keys "
                 "and values, so it cannot be folded into the base weights; keep the adapter beside the base model "
                 "(tuneforge generate/serve --adapter), or train a mergeable method (lora, ia3, lokr)")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["unipelt"] = "unipelt"
    gate: bool = Field(True, description="gate LoRA and the adapter (G_L, G_A); false = the ungated mixture")
    # LoRA (G_L)
    rank: int = Field(8, gt=0, description="LoRA's r (the paper's 8)")
    alpha: float = Field(8.0, gt=0, description="LoRA's alpha; alpha = rank gives s = 1, the gate alone scales")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_targets: list[str] | None = Field(None, description="layers LoRA adapts; None = query and value")
    # prefix tuning (ungated)
    num_virtual_tokens: int = Field(10, gt=0, description="the prefix length (the paper's 10)")
    prefix_init: Literal["random", "sample_vocab", "text"] | None = Field(
        None, description="as prefix_tuning's init; default sample_vocab, random with prefix_projection")
    init_text: str | None = Field(None, description="the phrase for prefix_init: text")
    prefix_projection: bool = Field(False, description="reparameterise the prefix through a tanh MLP (Li & Liang "
                                                       "eq. 5), as prefix_tuning's projection")
    encoder_hidden_size: int | None = Field(None, gt=0, description="that MLP's width; default the model's d")
    # the adapter (G_A), after the FFN
    bottleneck: int | None = Field(None, gt=0, description="the adapter's width m; default d / reduction_factor")
    reduction_factor: float | None = Field(None, gt=0, description="m = d / reduction_factor (default 16)")
    non_linearity: Literal["relu", "gelu", "silu", "swish", "tanh"] = "relu"
    adapter_targets: list[str] | None = Field(None, description="sub-layers the adapter follows; None = FFN output")
    exclude_modules: list[str] = Field(default_factory=list, description="layers neither LoRA nor the adapter takes")

    @model_validator(mode="after")
    def _parts_valid(self):  # each part's own checks, at config time
        self.lora_config(["q_proj"])
        self.prefix_config()
        self.adapter_config()
        return self

    def lora_config(self, targets: list[str]) -> lora.Config:
        return lora.Config(rank=self.rank, alpha=self.alpha, dropout=self.lora_dropout,
                           target_modules=self.lora_targets or targets, exclude_modules=self.exclude_modules,
                           gate=self.gate)

    def prefix_config(self) -> PT.Config:
        return PT.Config(num_virtual_tokens=self.num_virtual_tokens, init=self.prefix_init, init_text=self.init_text,
                         projection=self.prefix_projection, encoder_hidden_size=self.encoder_hidden_size)

    def adapter_config(self) -> pfeiffer.Config:
        return pfeiffer.Config(bottleneck=self.bottleneck, reduction_factor=self.reduction_factor,
                               non_linearity=self.non_linearity, target_modules=self.adapter_targets,
                               exclude_modules=self.exclude_modules, gate=self.gate)


def query_value(model: nn.Module) -> list[str]:
    """The query and value projections' names on this architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in QUERY_VALUE:
        return QUERY_VALUE[model_type]
    leaves = {p.rsplit(".", 1)[-1] for p in arch.linear_modules(model)}
    if {"q_proj", "v_proj"} <= leaves:
        return ["q_proj", "v_proj"]
    raise ValueError(f"{NAME}: no query/value projections known for model type {model_type!r}; set lora_targets "
                     f"(this model's linear layers: {', '.join(sorted(leaves)[:12])})")


def apply(model: nn.Module, cfg: Config, adapter: str = "default", tokenizer=None) -> None:
    """Add the three parts under ``adapter``: gated LoRA on W_q/W_v, the prefix, a gated adapter after each FFN.
    What the model cannot take is refused before anything is added."""
    SP.check_model(model, NAME)
    targets = cfg.lora_targets or query_value(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if cfg.adapter_targets is None and model_type not in BN.FFN_OUT:
        raise ValueError(f"{NAME} has no default adapter position for model type {model_type!r}; set "
                         f"adapter_targets (e.g. {BN.FFN_OUT['llama']} on Llama)")
    if any(adapter in layer.adapter_names() for layer in lora.all_layers(model).values()):
        raise ValueError(f"adapter name {adapter!r} already has LoRA on this model; give {NAME} its own name")
    lora.apply(model, cfg.lora_config(targets), adapter)
    PT.apply_prefix(model, cfg.prefix_config(), adapter, NAME, tokenizer, cfg.prefix_projection,
                    cfg.encoder_hidden_size)
    BN.apply_bottleneck(model, cfg.adapter_config(), adapter, NAME, [BN.FFN_OUT], "sequential")


def merge(model: nn.Module, adapter: str = "default") -> None:
    raise BN.NotMergeableError(NOT_MERGEABLE)


def for_loading(cfg: Config) -> Config:
    """The config to apply before saved weights replace the initial ones: no tokenizer-dependent init."""
    return cfg.model_copy(update={"prefix_init": "random", "init_text": None}) if cfg.prefix_init == "text" else cfg


# ------------------------------------------------------------------------------------------------------ saving
def state_dict(model: nn.Module, cfg: Config | None = None, adapter: str = "default") -> dict[str, torch.Tensor]:
    """LoRA's keys (``base_model.model.<path>.lora_A.weight``, ``.lora_gate.weight``, ...), the adapter's
    (``<path>.adapter_down.weight``, ``<path>.adapter_up.gate.weight``, ...) and the prefix's
    (``prompt_embeddings``, with the projection's weights when it has one)."""
    return {**lora.state_dict(model, None, adapter), **BN.state_dict(model, NAME, adapter),
            **SP.state_dict(model, NAME, adapter)}


def load_state_dict(model: nn.Module, cfg: Config | None, tensors: dict[str, torch.Tensor],
                    adapter: str = "default") -> None:
    key, own = SP._keys(model, NAME, adapter)
    prefix = {k: v for k, v in tensors.items() if k == key or k.startswith(own)}
    low_rank = {k: v for k, v in tensors.items() if k.startswith("base_model.model.")}
    # the adapter's own keys only: another soft prompt of the same adapter (``prompt_tuning.prompt_embeddings``)
    # arrives here too, since loading hands every method the keys ending in a soft prompt's suffix
    bottleneck = set(BN.state_dict(model, NAME, adapter))
    rest = {k: v for k, v in tensors.items() if k in bottleneck}
    lora.load_state_dict(model, None, low_rank, adapter)
    BN.load_state_dict(model, NAME, rest, adapter)
    SP.load_state_dict(model, NAME, prefix, adapter)
