"""Encoder-decoder batches (T5), made from the rows every algorithm already has.

A prompt/completion row (or each response of a preference row) is tokenized as for a decoder: the prompt's tokens
carry label -100, the completion's carry themselves. For an encoder-decoder model the prompt is what the *encoder*
reads and the completion is what the *decoder* writes (Raffel et al. 2020, "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer", https://arxiv.org/abs/1910.10683, sec. 2.1 and 3.1.2), so
``seq2seq_batch`` splits each collated row at its first supervised token:

    encoder_input_ids = the prompt                      (B, S)
    input_ids         = [start, y_1, ..., y_n]          (B, n+1)  the decoder's inputs (teacher forcing)
    labels            = [-100,  y_1, ..., y_n]          (B, n+1)

which keeps the convention of every log-prob helper (``algorithms/_logps.py``): labels are unshifted and position
t's logits predict token t+1, so decoder position 0 (the start token) predicts y_1. SFT, DPO and ORPO then score an
encoder-decoder with the same code as a decoder; ``model_inputs`` maps the batch to the model's keyword arguments.
"""

from __future__ import annotations

import torch

IGNORE = -100
ENCODER_KEYS = ("encoder_input_ids", "encoder_attention_mask")


def is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def seq2seq_batch(batch: dict, start_id: int, pad_id: int) -> dict:
    """A collated decoder batch (right-padded ``input_ids``/``attention_mask``/``labels``) -> the encoder-decoder
    layout above; every other key (a preference batch's pair indices) is kept. A row must have a prompt (an encoder
    input) and a completion."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    B = ids.shape[0]
    lengths = mask.sum(1).tolist()
    supervised = labels != IGNORE
    starts = [int(supervised[b, :lengths[b]].nonzero()[0]) if supervised[b, :lengths[b]].any() else lengths[b]
              for b in range(B)]
    if any(s == 0 for s in starts):
        raise ValueError("an encoder-decoder row needs a prompt for the encoder: a row whose first token is "
                         "supervised has none (use prompt/completion rows)")
    enc_w = max(starts)
    dec_w = 1 + max(n - s for n, s in zip(lengths, starts))
    enc = torch.full((B, enc_w), pad_id, dtype=ids.dtype)
    enc_mask = torch.zeros((B, enc_w), dtype=mask.dtype)
    dec = torch.full((B, dec_w), pad_id, dtype=ids.dtype)
    dec_mask = torch.zeros((B, dec_w), dtype=mask.dtype)
    dec_labels = torch.full((B, dec_w), IGNORE, dtype=labels.dtype)
    for b, (n, s) in enumerate(zip(lengths, starts)):
        enc[b, :s], enc_mask[b, :s] = ids[b, :s], 1
        dec[b, 0], dec_mask[b, :n - s + 1] = start_id, 1
        dec[b, 1:n - s + 1] = ids[b, s:n]
        dec_labels[b, 1:n - s + 1] = labels[b, s:n]
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels", "position_ids")}
    out.update(input_ids=dec, attention_mask=dec_mask, labels=dec_labels, encoder_input_ids=enc,
               encoder_attention_mask=enc_mask)
    return out


def model_inputs(batch: dict) -> dict:
    """The model's keyword arguments for a batch: a decoder's ``input_ids``/``attention_mask``/``position_ids``, or
    for a ``seq2seq_batch`` the encoder's input and the decoder's (``decoder_input_ids``...)."""
    if "encoder_input_ids" in batch:
        return {"input_ids": batch["encoder_input_ids"], "attention_mask": batch["encoder_attention_mask"],
                "decoder_input_ids": batch["input_ids"], "decoder_attention_mask": batch["attention_mask"]}
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def start_token(model, tok) -> int:
    """The decoder's start token (T5: the pad token)."""
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        start = tok.pad_token_id if tok.pad_token_id is not None else tok.bos_token_id
    return int(start)
