"""P-tuning: virtual tokens produced by a small prompt encoder (Liu et al. 2021, "GPT Understands, Too",
https://arxiv.org/abs/2103.10385, sec. 3.2, eq. 2-3).

Free embeddings h_1..h_n are not fed to the model directly: a prompt encoder maps them to the virtual tokens,

    h_i' = MLP([LSTM→(h_1:i); LSTM←(h_i:n)])        (bidirectional LSTM then a 2-layer ReLU MLP, eq. 3)

so the n tokens are coupled (sec. 3.2: independent embeddings fall into poor local minima, and the tokens of a
natural prompt depend on each other). ``encoder: mlp`` uses PEFT's default 3-layer MLP instead; ``none`` trains
the tokens directly (what a PEFT adapter saved in its inference layout holds). The encoder is only a training-time
reparameterisation: its output is what the model reads, and what PEFT saves as ``prompt_embeddings``; tuneforge
saves the encoder's weights beside it so a run resumes exactly and reloads train on.

The virtual tokens go in front of the input, as in PEFT (the paper also places them between a template's words;
templates are not supported yet). They run through the decoder as a key/value prefix (``_soft_prompt``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tuneforge.methods import _soft_prompt as SP

NAME = "p_tuning"
PEFT_TYPE = "P_TUNING"
MERGEABLE = False
STATE_SUFFIXES = SP.state_suffixes()


class Config(SP.SoftPromptConfig):
    name: Literal["p_tuning"] = "p_tuning"
    encoder: Literal["mlp", "lstm", "none"] = Field("mlp", description="the prompt encoder: mlp (PEFT's default), "
                                                    "lstm (the paper's bidirectional LSTM + MLP), none (no encoder)")
    encoder_hidden_size: int | None = Field(None, gt=0, description="the encoder's width; default the model's d")
    encoder_num_layers: int = Field(2, gt=0, description="LSTM layers (lstm only)")
    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LSTM dropout between layers (lstm only)")


class PromptEncoder(SP.PromptModule):
    kind, method = "input", NAME

    def __init__(self, n: int, d: int, cfg: Config, device, dtype):
        super().__init__()
        h = cfg.encoder_hidden_size or d
        self.embedding = nn.Parameter(torch.randn(n, d, dtype=dtype).to(device))  # nn.Embedding's N(0, 1), as PEFT
        self.encoder_type = cfg.encoder
        kw = {"device": device, "dtype": dtype}
        if cfg.encoder == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(d, h, **kw), nn.ReLU(), nn.Linear(h, h, **kw), nn.ReLU(),
                                          nn.Linear(h, d, **kw))
        elif cfg.encoder == "lstm":
            self.lstm_head = nn.LSTM(d, h, num_layers=cfg.encoder_num_layers, dropout=cfg.encoder_dropout,
                                     bidirectional=True, batch_first=True, **kw)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **kw), nn.ReLU(), nn.Linear(2 * h, d, **kw))

    @property
    def n(self) -> int:
        return self.value().shape[0]

    def produce(self) -> torch.Tensor:
        if self.encoder_type == "none":
            return self.embedding
        x = self.embedding[None]
        if self.encoder_type == "lstm":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]

    def direct(self) -> nn.Parameter | None:
        return self.embedding if self.encoder_type == "none" else None

    def decays(self, name: str) -> bool:
        return name.startswith(("mlp_head.", "lstm_head.")) and "bias" not in name.rsplit(".", 1)[-1]


def apply(model: nn.Module, cfg: Config, adapter: str = "default") -> None:
    SP.check_model(model, NAME)
    device, dtype = SP._param_like(model)
    SP.container(model, create=True).add(adapter, PromptEncoder(cfg.num_virtual_tokens, SP.hidden_size(model), cfg,
                                                                device, dtype))


merge, unload, state_dict, load_state_dict = SP.method_functions(NAME)
for_loading = SP.for_loading


def peft_config(model: nn.Module, cfg: Config, base_path: str | None) -> dict:
    d = SP.hidden_size(model)
    out = SP.peft_common(model, cfg, PEFT_TYPE, base_path, d, int(SP._cfg(model).num_attention_heads))
    out.update(encoder_reparameterization_type="LSTM" if cfg.encoder == "lstm" else "MLP",
               encoder_hidden_size=cfg.encoder_hidden_size or d, encoder_num_layers=cfg.encoder_num_layers,
               encoder_dropout=cfg.encoder_dropout)
    return out


def from_peft_config(d: dict) -> Config:
    SP.check_peft_common(d, PEFT_TYPE)
    enc = "lstm" if d.get("encoder_reparameterization_type") == "LSTM" else "mlp"
    return Config(num_virtual_tokens=int(d["num_virtual_tokens"]), encoder=enc,
                  encoder_hidden_size=d.get("encoder_hidden_size"), encoder_num_layers=d.get("encoder_num_layers", 2),
                  encoder_dropout=d.get("encoder_dropout", 0.0))
