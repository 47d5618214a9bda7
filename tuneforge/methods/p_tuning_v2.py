"""P-tuning v2: deep prompts, trainable keys and values at every layer without reparameterisation (Liu et al. 2022,
"P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales and Tasks",
https://arxiv.org/abs/2110.07602, sec. 3.2).

The mechanism is prefix tuning's (``prefix_tuning``, Li & Liang 2021): prompts in every layer's attention rather
than only at the input, which gives more tunable capacity (0.1-3% of the weights) and a direct path from the prompt
to every layer's representation. What differs is the recipe the paper settles on (sec. 3.2): no reparameterisation
encoder (its effect is task-dependent, and it costs memory), randomly initialised prompts, and prompt lengths chosen
per task (20 for simple classification, 100+ for hard sequence labelling). Its files are PEFT prefix-tuning files
(``prefix_projection: false``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tuneforge.methods import _soft_prompt as SP
from tuneforge.methods import prefix_tuning as PT

NAME = "p_tuning_v2"
PEFT_TYPE = "PREFIX_TUNING"
MERGEABLE = False
STATE_SUFFIXES = SP.state_suffixes()


class Config(PT.PrefixConfig):
    name: Literal["p_tuning_v2"] = "p_tuning_v2"
    init: Literal["random", "sample_vocab", "text"] | None = Field(
        "random", description="random (the paper's; normal at each layer's key/value scale), sample_vocab or text")


def apply(model: nn.Module, cfg: Config, adapter: str = "default", tokenizer=None) -> None:
    PT.apply_prefix(model, cfg, adapter, NAME, tokenizer)


merge, unload, state_dict, load_state_dict = SP.method_functions(NAME)
for_loading = SP.for_loading


def peft_config(model: nn.Module, cfg: Config, base_path: str | None) -> dict:
    return PT.prefix_peft_config(model, cfg, base_path, False, None)


def from_peft_config(d: dict) -> Config:
    SP.check_peft_common(d, PEFT_TYPE)
    return Config(num_virtual_tokens=int(d["num_virtual_tokens"]))
