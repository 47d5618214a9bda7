"""Dropout policy: which algorithms train with dropout off, and switching it off everywhere in a model.

The preference and policy-gradient losses compare forwards of the same weights: DPO's policy and reference, PPO's
and GRPO's π and π_old (ratio ρ = π/π_old), and their KL terms to π_ref. The reference, π_old and the rollout are
computed in eval mode (no dropout), so with dropout on during training the two sides differ even at identical
weights — DPO's first loss is not log 2, ρ ≠ 1 on PPO's first epoch, GRPO's KL ≠ 0 — and the noise enters the
gradient as if it were signal. TRL therefore disables model dropout by default for DPO, online DPO and ORPO (and its
former PPO trainer always did). tuneforge does the same for those and for GRPO and PPO, whose importance ratios
assume it (TRL's GRPO leaves it to the user); SFT, reward modelling and rejection sampling (plain likelihood
losses, no second forward to agree with) keep the model's dropout as a regulariser. ``train.disable_dropout``
overrides the algorithm's default either way.
"""

from __future__ import annotations

import contextlib

from torch import nn

DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def dropout_disabled(setting: bool | None, algorithm) -> bool:
    """``train.disable_dropout`` when set, else the algorithm module's ``DISABLE_DROPOUT_DEFAULT`` (False if none)."""
    return bool(getattr(algorithm, "DISABLE_DROPOUT_DEFAULT", False)) if setting is None else setting


def _is_dropout_rate(name: str, value) -> bool:
    """Dropout-probability attributes by name: ``*dropout*``, GPT-2-style ``*_pdrop`` (DBRX keeps ``resid_pdrop`` on
    its blocks and passes it to ``F.dropout`` each forward) and OPT-style ``layerdrop``."""
    named = "dropout" in name or name.endswith("pdrop") or name == "layerdrop"
    return named and type(value) is float and value > 0


def _configs(model: nn.Module) -> list:
    """Every distinct Hugging Face config the model's modules hold, with their sub-configs (``text_config``...)."""
    from transformers import PretrainedConfig

    seen, out = set(), []
    todo = [getattr(m, "config", None) for m in model.modules()]
    while todo:
        cfg = todo.pop()
        if isinstance(cfg, PretrainedConfig) and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
            todo.extend(v for v in vars(cfg).values() if isinstance(v, PretrainedConfig))
    return out


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0, in place; returns how many were non-zero.

    Four kinds: dropout modules (``p``; LoRA's ``lora_dropout`` is one), probabilities that attention layers keep
    as plain float attributes and pass to the attention kernel (Llama's ``attention_dropout``, OPT's ``dropout``),
    probabilities a model reads from its config at every forward (Falcon's ``hidden_dropout`` and
    ``attention_dropout``, Persimmon's ``attention_dropout``: zeroing modules alone, as TRL does, misses these), and
    LoKr's rank and module dropout (drawn in its forward while training), and robust AdapterDrop's random k
    (training then drops the inference k); ``*_pdrop`` and OPT-style ``layerdrop`` too. Train mode is
    kept: nothing else in the model changes behaviour. The config's original rates are remembered and
    ``config_dropout_restored`` puts them back while a model is saved, so a saved model keeps its own settings.
    """
    from tuneforge.methods._bottleneck import BottleneckLayer
    from tuneforge.methods.lokr import LoKrLayer

    changed = 0
    for m in model.modules():
        if isinstance(m, BottleneckLayer) and any(ks["train"] != ks["eval"] for ks in m.drop_below.values()):
            m.train_k_is_eval_k, changed = True, changed + 1  # robust AdapterDrop's random k
        if isinstance(m, DROPOUT_MODULES) and m.p:
            m.p, changed = 0.0, changed + 1
        for name, value in list(vars(m).items()):
            if _is_dropout_rate(name, value):
                setattr(m, name, 0.0)
                changed += 1
        if isinstance(m, LoKrLayer):
            for adapter, (rank_p, rescale, module_p) in list(m.dropouts.items()):
                changed += (rank_p > 0) + (module_p > 0)
                m.dropouts[adapter] = (0.0, rescale, 0.0)
    saved = getattr(model, "_config_dropout", [])
    for cfg in _configs(model):
        for name, value in list(vars(cfg).items()):
            if _is_dropout_rate(name, value):
                saved.append((cfg, name, value))
                setattr(cfg, name, 0.0)
                changed += 1
    object.__setattr__(model, "_config_dropout", saved)  # a plain attribute: not a submodule, not saved
    return changed


@contextlib.contextmanager
def config_dropout_restored(model: nn.Module):
    """Inside the block the model's configs carry the dropout rates ``disable_dropout`` zeroed (for saving)."""
    saved = getattr(model, "_config_dropout", [])
    for cfg, name, value in saved:
        setattr(cfg, name, value)
    try:
        yield
    finally:
        for cfg, name, _ in saved:
            setattr(cfg, name, 0.0)
