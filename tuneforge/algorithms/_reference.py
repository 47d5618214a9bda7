"""The reference policy π_ref of DPO, PPO, GRPO and online DPO: the model the KL term (or implicit reward) measures
against, which must stay fixed while the policy trains.

With ``reference: auto`` it is the same model with its adapters switched off when every trainable parameter lives in
an adapter (LoRA, IA3, LoKr, ...: no second copy of the weights), otherwise a frozen copy taken before training
(full fine-tuning, freeze, BitFit — their base weights move). Reference log-probs are computed in eval mode (no
dropout), so the reference is a fixed function, as the derivations assume.
"""

from __future__ import annotations

import copy

import torch

from tuneforge.algorithms._logps import sequence_logps_from_model, token_logps_from_model
from tuneforge.methods import adapter_tensors
from tuneforge.methods._scope import adapter_scope

HEADS = ("reward_head", "value_head")  # trained beside the policy, never part of what the reference computes


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    heads = {id(p) for n in HEADS if hasattr(model, n) for p in getattr(model, n).parameters()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in heads}


def trained_base_tensors(model) -> list[str]:
    """Names of the trainable tensors that are the model's own (not an adapter method's), heads aside. The adapter
    methods say which tensors are theirs (``methods.adapter_tensors``), so a composition such as ``[lora, ia3]``,
    whose LoRA tensors sit under the IA3 wrapper's ``base_layer``, still counts as adapters only."""
    owned = adapter_tensors(model)
    return [n for n, p in _trainable(model).items() if id(p) not in owned]


def adapters_cover_trainable(model) -> bool:
    """True when switching adapters off leaves exactly the untouched base (every trainable tensor is an adapter's)."""
    return bool(_trainable(model)) and not trained_base_tensors(model)


def prepare_reference(model, mode: str, state: dict, who: str = "algorithm") -> None:
    """Decide (once, before training and before a resume loads trained weights) what the reference is."""
    if "reference_mode" in state:
        return
    if mode == "auto":
        mode = "adapters_off" if adapters_cover_trainable(model) else "copy"
    if mode == "adapters_off" and not adapters_cover_trainable(model):
        base = trained_base_tensors(model)
        what = (f"this run also trains the model's own {', '.join(base[:3])}{' ...' if len(base) > 3 else ''}"
                if base else "this run trains no adapter")
        raise ValueError(f"{who}.reference=adapters_off needs every trainable parameter to be an adapter's (lora, "
                         f"ia3, lokr, ...); {what} — use reference: copy")
    state["reference_mode"] = mode
    if mode == "precomputed":
        state["reference_table"] = {}
    if mode == "copy":
        ref = copy.deepcopy(model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        state["reference_model"] = ref


@torch.no_grad()
def _with_reference(model, state: dict, fn):
    if state.get("reference_mode") == "copy":
        return fn(state["reference_model"])
    was_training = model.training
    model.eval()
    try:
        with adapter_scope(model, None):
            return fn(model)
    finally:
        model.train(was_training)


def _row_keys(batch: dict) -> list[tuple]:
    """Each row's identity: its unpadded token ids and labels (right padding)."""
    lengths = batch["attention_mask"].sum(1).tolist()
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    return [(tuple(i[:n]), tuple(lab[:n])) for i, lab, n in zip(ids, labels, lengths)]


@torch.no_grad()
def precompute_sequence_logps(model, data, collate, batch_size: int, state: dict) -> None:
    """Fill ``state["reference_table"]`` with the summed response log-probs of every sequence of ``data`` under the
    model as it is now (eval mode), keyed by the sequence."""
    was_training = model.training
    model.eval()
    table = state.setdefault("reference_table", {})
    device = next(model.parameters()).device
    try:
        for s in range(0, len(data), batch_size):
            rows = [data[i] for i in range(s, min(s + batch_size, len(data)))]
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            logps = sequence_logps_from_model(model, batch)[0].float().cpu()
            table.update(zip(_row_keys(batch), logps.tolist()))
    finally:
        model.train(was_training)


def reference_sequence_logps(model, batch: dict, state: dict) -> torch.Tensor:
    """Summed response log-probs (B,) under π_ref."""
    if state.get("reference_mode") == "precomputed":
        table = state["reference_table"]
        keys = _row_keys(batch)
        missing = sum(k not in table for k in keys)
        if missing:
            raise KeyError(f"{missing} sequence(s) of this batch have no precomputed reference log-prob")
        return torch.tensor([table[k] for k in keys], device=batch["input_ids"].device)
    return _with_reference(model, state, lambda m: sequence_logps_from_model(m, batch)[0])


def reference_token_logps(model, batch: dict, state: dict) -> torch.Tensor:
    """Per-token response log-probs (B, T-1) under π_ref (0 off the response)."""
    return _with_reference(model, state, lambda m: token_logps_from_model(m, batch)[0])
