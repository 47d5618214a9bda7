"""Batching and packing: packed forwards must give every example exactly the loss it gets alone.

Tiny random Llama / GPT-2 / GPT-NeoX models (hidden 32, 2 layers) in fp32 with sdpa and eager attention: the summed
token loss of each example, read out of a packed forward, must match the example run unpacked to 1e-5.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

from _chartok import char_tokenizer
from tuneforge.data import IGNORE, build_dataset, collate, collate_packed, pack_rows

VOCAB = 128  # the char tokenizer has 104 ids


def row(ids, labels=None):
    return {"input_ids": list(ids), "labels": list(labels if labels is not None else ids)}


def test_pack_rows_is_greedy_and_order_preserving():
    rows = [row(range(n)) for n in (5, 9, 3, 12, 7, 4)]
    bins = pack_rows(rows, 20)
    assert [[len(r["input_ids"]) for r in b] for b in bins] == [[5, 9, 3], [12, 7], [4]]
    assert [r for b in bins for r in b] == rows
    with pytest.raises(ValueError, match="more than the packing max_len=4"):
        pack_rows(rows, 4)


def test_collate_right_pads_and_masks_labels_even_when_pad_is_a_real_label():
    eos = 2
    batch = collate([row([1, 5, eos]), row([1, eos])], pad_id=eos)
    assert batch["input_ids"].tolist() == [[1, 5, eos], [1, eos, eos]]
    assert batch["labels"].tolist() == [[1, 5, eos], [1, eos, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["attention_mask"].dtype == torch.long


def test_collate_packed_layout():
    bins = [[row([1, 5, 6], [IGNORE, 5, 6]), row([1, 7], [1, 7])], [row([1, 8])]]
    b = collate_packed(bins, pad_id=0, mask_dtype=torch.bool)
    assert b["input_ids"].tolist() == [[1, 5, 6, 1, 7], [1, 8, 0, 0, 0]]
    # The first label of every example is -100: in a packed row it would be predicted from the previous example.
    assert b["labels"].tolist() == [[IGNORE, 5, 6, IGNORE, 7], [IGNORE, 8, IGNORE, IGNORE, IGNORE]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    assert b["attention_mask"].shape == (2, 1, 5, 5)
    assert b["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert b["attention_mask"][1, 0].int().tolist()[2:] == [[0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    additive = collate_packed(bins, pad_id=0)["attention_mask"]
    assert additive.dtype == torch.float32
    assert torch.equal(additive == 0, b["attention_mask"])
    assert additive.min().item() == torch.finfo(torch.float32).min


# --- loss equivalence on real architectures -------------------------------------------------------------------------

CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                               bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5),
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Real rows from build_dataset: a mix of prompt/completion lengths, so some labels are masked."""
    path = tmp_path_factory.mktemp("pack") / "d.jsonl"
    specs = [("What is 2+2?", " 4"), ("Hi", " there, friend"), ("x" * 20, "y"), ("Name a colour:", " blue"),
             ("", "just text"), ("One more", " row")]
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in specs))
    return build_dataset(str(path), char_tokenizer(), max_len=32).rows


@functools.lru_cache(maxsize=None)
def model_for(arch: str, attn: str):
    """Built once per module run: several tests reuse each model (they never modify it)."""
    torch.manual_seed(0)
    cfg = CONFIGS[arch]()
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()


_ALONE: dict[tuple, list[float]] = {}


def alone_losses(model, rows) -> list[float]:
    """Summed loss of each row run on its own (memoised per model)."""
    key = (id(model), len(rows))
    if key not in _ALONE:
        with torch.no_grad():
            _ALONE[key] = [summed_loss(model(input_ids=torch.tensor([r["input_ids"]])).logits[0], r["labels"])
                           for r in rows]
    return _ALONE[key]


def summed_loss(logits: torch.Tensor, labels: list[int]) -> float:
    """Summed CE of one example: logits (n, V) at its own positions, UNshifted labels (n,)."""
    target = torch.tensor(labels[1:])
    return F.cross_entropy(logits[:-1], target, ignore_index=IGNORE, reduction="sum").item()


def packed_losses(model, rows, bins, **kw) -> tuple[list[float], list[float]]:
    alone = alone_losses(model, rows)
    with torch.no_grad():
        batch = collate_packed(bins, pad_id=0, mask_dtype=kw.pop("mask_dtype", torch.float32))
        labels = batch.pop("labels")
        if kw.pop("position_ids_only", False):
            batch.pop("attention_mask")
        logits = model(**batch, **kw).logits  # (B, T, V)
    packed = []
    for b, members in enumerate(bins):
        start = 0
        for r in members:
            n = len(r["input_ids"])
            packed.append(summed_loss(logits[b, start : start + n], labels[b, start : start + n].tolist()))
            start += n
    return alone, packed


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_packed_loss_equals_unpacked_loss(arch, attn, rows):
    bins = pack_rows(rows, 40)
    assert len(bins) < len(rows) and any(len(b) > 1 for b in bins)
    alone, packed = packed_losses(model_for(arch, attn), rows, bins)
    assert packed == pytest.approx(alone, abs=1e-5)
    assert all(x > 0 for x in alone)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_bool_mask_works_with_sdpa(arch, rows):
    alone, packed = packed_losses(model_for(arch, "sdpa"), rows, pack_rows(rows, 40), mask_dtype=torch.bool)
    assert packed == pytest.approx(alone, abs=1e-5)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_position_ids_alone_work_only_without_cache(arch, rows):
    """Documents the flash-attention route: no attention_mask, position_ids + use_cache=False."""
    model, bins = model_for(arch, "sdpa"), pack_rows(rows, 40)
    alone, packed = packed_losses(model, rows, bins, position_ids_only=True, use_cache=False)
    assert packed == pytest.approx(alone, abs=1e-5)
    _, leaky = packed_losses(model, rows, bins, position_ids_only=True, use_cache=True)
    assert leaky != pytest.approx(alone, abs=1e-5)  # with a cache, transformers does not detect the packing


def test_hf_builtin_loss_on_packed_batch_matches_unpacked(rows):
    """model(**batch).loss (mean over supervised tokens) is the same packed or padded."""
    model = model_for("llama", "sdpa")
    with torch.no_grad():
        padded = model(**collate(rows, pad_id=0)).loss
        packed = model(**collate_packed(pack_rows(rows, 40), pad_id=0)).loss
    assert packed.item() == pytest.approx(padded.item(), abs=1e-5)
