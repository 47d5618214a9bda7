"""Text generation for evaluation, ``tuneforge generate`` and (later) online algorithms' rollouts.

Prompts are encoded exactly as training rows encode them (bos + prompt tokens, or the chat template with the
generation prompt for message lists) so a fine-tuned model sees at inference what it saw in training. Batches are
left-padded so every row's next token sits at the last position. Sampling is seeded per call for reproducibility.
"""

from __future__ import annotations

import torch


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt string (with bos when the tokenizer has one) or a chat message list."""
    if isinstance(prompt, list):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def _cut(text: str, stop: list[str] | None) -> str:
    for s in stop or []:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = 0, stop: list[str] | None = None,
             batch_size: int = 32) -> list[str]:
    """Complete each prompt; greedy when temperature == 0. Returns the new text only."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if seed is not None:
        torch.manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [encode_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
        ids, mask = _left_pad(chunk, pad)
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad,
                  eos_token_id=tokenizer.eos_token_id)
        if temperature > 0:
            kw.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
        for row in gen[:, ids.shape[1]:]:
            out.append(_cut(tokenizer.decode(row, skip_special_tokens=True), stop))
    model.train(was_training)
    return out
