"""Evaluation: token loss / perplexity on a dataset, and exact match of greedy generations.

Loss is the token-weighted mean over the whole dataset (not a mean of batch means), so it does not depend on the
batch size and equals the training loss definition.
"""

from __future__ import annotations

import math

import torch

from tuneforge.algorithms._logps import token_cross_entropy_sum
from tuneforge.tasks import exact_match as _match
from tuneforge.train.rollout import generate


@torch.no_grad()
def eval_loss(model, dataset, collate, batch_size: int = 8, device=None) -> dict:
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        ce, k = token_cross_entropy_sum(model, {k: v.to(device) for k, v in batch.items()})
        total, n = total + float(ce), n + k
    model.train(was_training)
    loss = total / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": n}


def exact_match(model, tokenizer, examples: list, max_new_tokens: int = 16, batch_size: int = 64) -> dict:
    """Share of examples whose greedy completion matches the answer exactly: ``eval.examples.Example`` (a text or
    chat prompt; chat prompts go through the chat template) or ``{"prompt", "completion"}`` dicts."""
    pairs = [(e["prompt"], e["completion"]) if isinstance(e, dict) else (e.prompt, e.answer) for e in examples]
    if not pairs:
        raise ValueError("exact_match needs at least one example (a metric over zero rows means nothing)")
    preds = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens, batch_size=batch_size)
    hits = sum(_match(pred, answer) for pred, (_, answer) in zip(preds, pairs))
    return {"exact_match": hits / len(pairs), "n": len(pairs)}


@torch.no_grad()
def preference_accuracy(model, dataset, pad_id: int, batch_size: int = 32, device=None) -> dict:
    """On preference rows: how often the model gives the chosen response a higher log-probability than the rejected
    one, and the mean log-prob margin (chosen − rejected), summed over response tokens."""
    from tuneforge.algorithms._logps import sequence_logps_from_model
    from tuneforge.data import collate_preference
    from tuneforge.data.collate import pair_index

    was = model.training
    model.eval()
    wins, margin, n = 0, 0.0, 0
    try:
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collate_preference(rows, pad_id)
            if getattr(model.config, "is_encoder_decoder", False):  # prompt -> encoder, responses -> decoder
                from tuneforge.data.seq2seq import seq2seq_batch

                start_id = model.config.decoder_start_token_id
                batch = seq2seq_batch(batch, pad_id if start_id is None else start_id, pad_id)
            batch = {k: v.to(device) if device else v for k, v in batch.items()}
            lp, _ = sequence_logps_from_model(model, batch)
            c, r, _ = pair_index(batch)  # every pair of every row (a ranking has K-choose-2)
            diff = lp[c] - lp[r]
            wins += int((diff > 0).sum())
            margin += float(diff.sum())
            n += int(c.numel())
    finally:
        model.train(was)
    return {"preference_accuracy": wins / max(n, 1), "logp_margin": margin / max(n, 1), "pairs": n}
