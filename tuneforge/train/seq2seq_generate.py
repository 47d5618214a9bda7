"""Generation for encoder-decoder models (T5): the prompt is the encoder's input, the answer the decoder's output.

The rollout engine (``rollout.py``) is a decoder-only KV-cache loop; an encoder-decoder runs its encoder once and
then decodes with cross-attention, which ``transformers``' own ``generate`` already does well, so this wraps it
with the engine's options and output (new text only, cut at the first stop string). Prompts are encoded exactly as
training encodes them for the encoder (``rollout.encode_prompt``: the tokenizer's leading specials, no end-of-source
token), so generation reads what training taught. Sampling seeds each batch from ``(seed, first row)``, so results
depend on the batch size here, unlike the engine's per-row streams.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def generate_seq2seq(model, tokenizer, prompts: list, *, max_new_tokens: int = 64, temperature: float = 0.0,
                     top_p: float = 1.0, top_k: int = 0, seed: int | None = 0, stop: list[str] | None = None,
                     batch_size: int = 32) -> list[str]:
    from tuneforge.train.rollout import encode_prompt, request_seed

    if any(not isinstance(p, str) for p in prompts):
        raise ValueError("an encoder-decoder model takes text prompts (it has no chat template)")
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} \
        if temperature > 0 else {"do_sample": False}
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids_list = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
            width = max(len(x) for x in ids_list)  # the prompt's tokens exactly as training gave them to the encoder
            enc = {"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids_list], device=dev),
                   "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids_list],
                                                  device=dev)}
            if seed is not None and temperature > 0:
                torch.manual_seed(request_seed(seed, start) % 2**63)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id, **sampling)
            for row in ids:
                text = tokenizer.decode(row, skip_special_tokens=True)
                for s in stop or []:
                    if s in text:
                        text = text[:text.index(s)]
                out.append(text)
    finally:
        model.train(was)
    return out
