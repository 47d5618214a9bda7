"""The generation engine: greedy output equals ``transformers``' ``generate`` (left padding, three architectures),
seeded sampling is reproducible per request and independent of the batch (DT-5), stop strings and eos end rows,
and the returned log-probs equal a training forward's."""

import pytest
import torch

from tuneforge.algorithms._logps import token_logps_from_model
from tuneforge.data import collate
from tuneforge.models.tiny import build_tiny
from tuneforge.train.rollout import (_left_pad, encode_prompt, eos_ids_of, filter_logits, generate, pad_id_of,
                                     request_seed, sample, sample_tokens)

PROMPTS = ["copy abc:", "rev hello there:", "x", "sort qwertyuiop:"]


def _model(preset, seed=1):
    model, tok = build_tiny(preset, seed=seed)
    return model.eval(), tok


@pytest.mark.parametrize("preset", ["llama", "gpt2", "gpt_neox"])
def test_greedy_equals_transformers_generate(preset):
    model, tok = _model(preset)
    enc = [encode_prompt(tok, p) for p in PROMPTS]
    ours = sample(model, enc, pad_id=pad_id_of(tok), eos_ids=eos_ids_of(model, tok), max_new_tokens=24,
                  tokenizer=tok)
    ids, mask = _left_pad(enc, pad_id_of(tok))
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                         pad_token_id=pad_id_of(tok), eos_token_id=tok.eos_token_id)[:, ids.shape[1]:]
    for i in range(len(PROMPTS)):
        got = ours.completion_ids(i)
        assert got == ref[i, :len(got)].tolist()
        if not ours.finished[i]:
            assert len(got) == 24


def test_seeded_sampling_is_per_request_and_batch_invariant():
    """DT-5: a request's sample depends only on its prompt and seed, not on the other rows or the batch size."""
    model, tok = _model("llama")
    kw = dict(pad_id=pad_id_of(tok), eos_ids=eos_ids_of(model, tok), max_new_tokens=16, temperature=1.0,
              tokenizer=tok)
    enc = [encode_prompt(tok, p) for p in PROMPTS]
    batch = sample(model, enc, seeds=[11, 12, 13, 14], **kw)
    for i in range(len(PROMPTS)):
        alone = sample(model, [enc[i]], seeds=[11 + i], **kw)
        assert alone.completion_ids(0) == batch.completion_ids(i)
    again = sample(model, enc[::-1], seeds=[14, 13, 12, 11], **kw)
    assert again.completion_ids(3) == batch.completion_ids(0)
    other = sample(model, enc, seeds=[21, 22, 23, 24], **kw)
    assert any(other.completion_ids(i) != batch.completion_ids(i) for i in range(4))
    # generate(): prompt i keeps its stream whatever the batch size
    assert generate(model, tok, PROMPTS, temperature=1.0, seed=5, batch_size=4) == \
        generate(model, tok, PROMPTS, temperature=1.0, seed=5, batch_size=1)


def test_logprobs_and_rows_match_a_training_forward():
    model, tok = _model("llama")
    enc = [encode_prompt(tok, p) for p in PROMPTS]
    r = sample(model, enc, pad_id=pad_id_of(tok), eos_ids=eos_ids_of(model, tok), max_new_tokens=10,
               temperature=0.7, seeds=[1, 2, 3, 4], tokenizer=tok)
    rows = r.training_rows()
    assert [row["input_ids"][:len(p)] for row, p in zip(rows, enc)] == enc
    with torch.no_grad():  # sampling-time log-probs are under the temperature: log softmax(z / 0.7)
        full = model(**{k: v for k, v in collate(rows, pad_id_of(tok)).items() if k != "labels"}).logits
    for i, p in enumerate(enc):
        n = int(r.mask[i].sum())
        lp = (full[i, len(p) - 1:len(p) - 1 + n] / 0.7).log_softmax(-1)
        picked = lp.gather(-1, torch.tensor(r.completion_ids(i))[:, None]).squeeze(-1)
        assert torch.allclose(picked, r.logprobs[i, :n], atol=1e-4)
    greedy = sample(model, enc, pad_id=pad_id_of(tok), eos_ids=eos_ids_of(model, tok), max_new_tokens=10,
                    tokenizer=tok)
    logps, mask = token_logps_from_model(model, collate(greedy.training_rows(), pad_id_of(tok)))
    for i in range(len(enc)):
        n = int(greedy.mask[i].sum())
        assert torch.allclose(logps[i][mask[i].bool()], greedy.logprobs[i, :n], atol=1e-4)


def test_stop_strings_and_eos_end_rows():
    model, tok = _model("llama")
    enc = [encode_prompt(tok, "copy abc:")]
    free = sample(model, enc, pad_id=pad_id_of(tok), max_new_tokens=12, tokenizer=tok)
    text = free.texts[0]
    assert len(text) >= 3
    stop = text[2]
    cut = sample(model, enc, pad_id=pad_id_of(tok), max_new_tokens=12, tokenizer=tok, stop=[stop])
    assert cut.finished[0] and stop not in cut.texts[0] and len(cut.completion_ids(0)) == text.index(stop) + 1
    first = free.completion_ids(0)[0]  # make the first token the "eos": the row ends after one token
    one = sample(model, enc, pad_id=pad_id_of(tok), eos_ids={first}, max_new_tokens=12, tokenizer=tok)
    assert one.completion_ids(0) == [first] and one.finished[0] and one.mask.shape[1] == 1


def test_filters_and_inverse_cdf_sampling():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = torch.isfinite(filter_logits(logits, top_p=0.7)[0]).tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7 needs the second token; 0.8 covers it
    assert torch.isfinite(filter_logits(logits, top_p=0.01)[0]).tolist() == [True, False, False, False]
    u = torch.tensor([0.0, 0.49, 0.51, 0.79, 0.81, 0.999])
    picks = sample_tokens(logits.expand(6, 4), u).tolist()
    assert picks == [0, 0, 1, 1, 2, 3]


def test_request_seeds_are_stable_and_distinct():
    assert request_seed(0, 1, 2, 3) == request_seed(0, 1, 2, 3)
    seeds = {request_seed(0, s, r, j) for s in range(5) for r in range(5) for j in range(5)}
    assert len(seeds) == 125 and all(0 <= s < 2**62 for s in seeds)


@pytest.mark.parametrize("method", [{"name": "lora", "rank": 4}, {"name": "lora", "rank": 4, "dora": True},
                                    {"name": "lokr", "rank": 2}, {"name": "ia3"}], ids=["lora", "dora", "lokr", "ia3"])
def test_onednn_linears_agree_with_f_linear_and_are_restored(method):
    """Additive adapters (LoRA, LoKr) are folded into the packed weight; DoRA and IA3 run around a packed base."""
    from tuneforge.methods import METHODS, apply_methods
    from tuneforge.train.rollout import onednn_linears

    model, tok = _model("llama")
    apply_methods(model, [METHODS[method["name"]].Config(**{k: v for k, v in method.items() if k != "name"})])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ids = torch.tensor([encode_prompt(tok, "sort qwertyuiop:")])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with onednn_linears(model, 1) as n:
            fast = model(input_ids=ids).logits
        assert n > 0 and torch.allclose(fast, ref, atol=1e-4)
        assert all("forward" not in vars(m) and "base_forward" not in vars(m) for m in model.modules())
        assert torch.equal(model(input_ids=ids).logits, ref)
    kw = dict(pad_id=pad_id_of(tok), eos_ids=eos_ids_of(model, tok), max_new_tokens=12, temperature=1.0,
              seeds=[3], tokenizer=tok)
    enc = [encode_prompt(tok, "copy abc:")]
    assert sample(model, enc, **kw).completion_ids(0) == sample(model, enc, fast_linear=False, **kw).completion_ids(0)


def test_onednn_linears_in_bf16_match_autocast():
    """bf16-stored frozen weights under bf16 autocast (train.precision: bf16): packed in bf16, LoRA folded in."""
    from tuneforge.methods import METHODS, apply_methods
    from tuneforge.train.precision import cast_frozen_matmul_weights_
    from tuneforge.train.rollout import onednn_linears

    model, tok = _model("llama")
    apply_methods(model, [METHODS["lora"].Config(rank=4)])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    assert cast_frozen_matmul_weights_(model) > 0
    ids = torch.tensor([encode_prompt(tok, "sort qwertyuiop:")])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(input_ids=ids).logits.float()
        with onednn_linears(model, 1) as n:
            fast = model(input_ids=ids).logits.float()
    from tuneforge.train.rollout import onednn_bf16_supported

    # packed in bf16 where the CPU supports it; an AVX2-only CPU keeps every bf16 layer on its own forward
    assert n > 0 if onednn_bf16_supported() else n == 0
    assert (fast - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 rounding of a folded vs a split matmul


@pytest.mark.parametrize("preset", ["llama", "gpt2", "gpt_neox"])
def test_repeated_prompts_are_prefilled_once_with_the_same_samples(preset, monkeypatch):
    """A GRPO group (one prompt, G seeds) prefills the prompt once and repeats its cache rows: the same tokens and
    log-probs as prefilling every row, and one prefill row per distinct prompt."""
    import tuneforge.train.rollout as R

    model, tok = _model(preset)
    a, b = encode_prompt(tok, PROMPTS[1]), encode_prompt(tok, PROMPTS[3])
    prompts, seeds = [a, a, b, a, b], [11, 12, 13, 14, 15]
    kw = dict(pad_id=pad_id_of(tok), eos_ids=(), max_new_tokens=12, temperature=1.0, seeds=seeds)
    rows_seen, real_next = [], R._next_logits

    def spy(model, ids, *args, **kw2):
        rows_seen.append(ids.shape)
        return real_next(model, ids, *args, **kw2)

    monkeypatch.setattr(R, "_next_logits", spy)
    once = sample(model, prompts, **kw)
    assert rows_seen[0][0] == 2 and all(s[0] == 5 for s in rows_seen[1:])  # 2 distinct prompts prefilled
    monkeypatch.setattr(R, "_prefill", lambda model, p, ids, mask, pos, names: real_next(model, ids, mask, pos,
                                                                                            None, names))
    every = sample(model, prompts, **kw)
    assert torch.equal(once.tokens, every.tokens)
    torch.testing.assert_close(once.logprobs, every.logprobs, atol=1e-5, rtol=0)
