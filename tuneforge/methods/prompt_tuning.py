"""Prompt tuning: n trainable virtual token embeddings in front of every input (Lester et al. 2021, "The Power of
Scale for Parameter-Efficient Prompt Tuning", https://arxiv.org/abs/2104.08691, sec. 2).

The model reads ``[P; E(x)]`` with P (n x d) the only trained tensor: n·d parameters, 20 x 576 = 11,520 on
SmolLM2-135M (0.009%). Lester et al. initialise P from embeddings of sampled vocabulary tokens (sec. 3, "sampled
vocab"; they sample the 5000 most common tokens) or of the class labels, and find either beats random
initialisation, most of all on small models; the paper's central result is that the gap to full fine-tuning
closes only at ~10B parameters, so expect it to trail the other methods on small models.

Here P runs through the decoder as a key/value prefix (``_soft_prompt``: exactly the same computation, since
causal attention keeps P's hidden states independent of x), so logits stay aligned with ``input_ids`` for every
algorithm. PEFT's layout: ``peft_type: PROMPT_TUNING`` and the tensor ``prompt_embeddings`` (n x d).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from tuneforge.methods import _soft_prompt as SP

NAME = "prompt_tuning"
PEFT_TYPE = "PROMPT_TUNING"
MERGEABLE = False
STATE_SUFFIXES = SP.state_suffixes()
_INIT_TO_PEFT = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "RANDOM"}


class Config(SP.InitConfig):
    name: Literal["prompt_tuning"] = "prompt_tuning"


class PromptEmbedding(SP.PromptModule):
    kind, method = "input", NAME

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.embedding = nn.Parameter(value)

    @property
    def n(self) -> int:
        return self.value().shape[0]

    def produce(self) -> torch.Tensor:
        return self.embedding

    def direct(self) -> nn.Parameter:
        return self.embedding


def initial_embeddings(model: nn.Module, cfg: SP.InitConfig, n: int, tokenizer=None, method: str = NAME
                       ) -> torch.Tensor:
    """P at step 0: copies of real token embeddings (sample_vocab, text) or random at their scale."""
    if cfg.init == "random":
        return SP.random_like_embeddings(model, n)
    ids = SP.init_token_ids(model, cfg.init, cfg.init_text, n, tokenizer, method)
    table = model.get_input_embeddings().weight
    device, dtype = SP._param_like(model)
    if table.device.type == "meta":
        return torch.empty(n, table.shape[1], device=device, dtype=dtype)
    return table.detach()[ids.to(table.device)].to(dtype).clone()


def apply(model: nn.Module, cfg: Config, adapter: str = "default", tokenizer=None) -> None:
    SP.check_model(model, NAME, input_level=True)
    value = initial_embeddings(model, cfg, cfg.num_virtual_tokens, tokenizer)
    SP.container(model, create=True).add(adapter, PromptEmbedding(value))


merge, unload, state_dict, load_state_dict = SP.method_functions(NAME)
for_loading = SP.for_loading


def peft_config(model: nn.Module, cfg: Config, base_path: str | None) -> dict:
    d = SP.embedding_size(model)
    out = SP.peft_common(model, cfg, PEFT_TYPE, base_path, d, int(SP._cfg(model).num_attention_heads))
    # text init is recorded as RANDOM: PEFT would otherwise load a tokenizer to re-run an init the saved weights
    # replace anyway (tuneforge_adapter.json keeps the real init)
    out.update(prompt_tuning_init=_INIT_TO_PEFT[cfg.init], prompt_tuning_init_text=None,
               tokenizer_name_or_path=None, tokenizer_kwargs=None)
    return out


def from_peft_config(d: dict) -> Config:
    SP.check_peft_common(d, PEFT_TYPE)
    init = {"SAMPLE_VOCAB": "sample_vocab", "TEXT": "text"}.get(d.get("prompt_tuning_init"), "random")
    text = d.get("prompt_tuning_init_text") if init == "text" else None
    return Config(num_virtual_tokens=int(d["num_virtual_tokens"]), init=init if (init != "text" or text) else
                  "random", init_text=text)
