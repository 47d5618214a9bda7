"""P-tuning templates (Liu et al. 2021, sec. 3): virtual tokens before and after the prompt. Slot ids sit exactly
where the template says in every row format, the adapter's logits equal a hand-built ``inputs_embeds`` forward with
the encoder's outputs spliced in, generation and reloads agree, a front-only template is plain P-tuning, rows
without the adapter read the prompt as if the template were absent, and bad templates fail at config time."""

import json

import pytest
import torch
from conftest import base_config, write_jsonl

from tuneforge.data import IGNORE, DataError, build_dataset
from tuneforge.data.template import SLOT_BASE, PromptTemplate, without_slots
from tuneforge.data.tokenize import encode_chat_prompt, encode_prompt_text
from tuneforge.methods import METHODS_FILE, adapter_scope, apply_methods, load_adapter, save_adapter
from tuneforge.methods import _soft_prompt as SP
from tuneforge.methods import p_tuning
from tuneforge.methods._inject import trainable_parameters
from tuneforge.models.tiny import build_tiny
from tuneforge.train.rollout import encode_prompt, generate, sample

TEMPLATE = "[P:3] {prompt} [P:2]"
S0, S1 = SLOT_BASE, SLOT_BASE + 1


def _model(preset="llama", template=TEMPLATE, encoder="lstm", seed=3, **kw):
    model, tok = build_tiny(preset)
    cfg = p_tuning.Config(template=template, encoder=encoder, encoder_hidden_size=8, **kw)
    torch.manual_seed(seed)  # the encoder's initial weights
    apply_methods(model, [cfg])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), tok, cfg


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _chat(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# ------------------------------------------------------------------------------------------------ the ids
def test_prompt_completion_rows_hold_the_slots_between_prompt_and_completion(tmp_path):
    model, tok, cfg = _model()
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "copy: ab\n", "completion": "ab"}])
    row = build_dataset(path, tok, template=cfg.prompt_template())[0]
    prompt = _ids(tok, "copy: ab\n")
    assert row["input_ids"] == prompt + [S0, S1] + _ids(tok, "ab") + [tok.eos_token_id]
    assert row["labels"] == [IGNORE] * (len(prompt) + 2) + _ids(tok, "ab") + [tok.eos_token_id]
    # generation starts from exactly the row's head, slots included
    assert encode_prompt(tok, "copy: ab\n", cfg.prompt_template()) == row["input_ids"][:len(prompt) + 2]
    plain = build_dataset(path, tok)[0]
    assert without_slots(row["input_ids"]) == plain["input_ids"]
    from tuneforge.algorithms._online import split_row

    assert split_row(row) == (prompt + [S0, S1], _ids(tok, "ab") + [tok.eos_token_id])  # GRPO/PPO's prompt


def test_messages_rows_open_every_assistant_turn_with_the_slots(tmp_path):
    """{prompt} is everything before an answer, the chat template's generation prompt included: the slots follow
    ``<|assistant|>`` in every assistant turn, and a generation prompt of the same history has them in the same
    places."""
    _, tok, cfg = _model()
    t = cfg.prompt_template()
    turns = _chat(("user", "hi"), ("assistant", "yo"), ("user", "ab"), ("assistant", "ba"))
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}])
    row = build_dataset(path, tok, template=t)[0]
    A, E = tok.convert_tokens_to_ids("<|assistant|>"), tok.eos_token_id
    U = tok.convert_tokens_to_ids("<|user|>")
    want = ([U] + _ids(tok, "hi") + [E, A, S0, S1] + _ids(tok, "yo") + [E, U] + _ids(tok, "ab") + [E, A, S0, S1]
            + _ids(tok, "ba") + [E])
    assert row["input_ids"] == want
    sup = [i for i, x in enumerate(row["labels"]) if x != IGNORE]
    assert [row["input_ids"][i] for i in sup] == _ids(tok, "yo") + [E] + _ids(tok, "ba") + [E]
    last = sup[-1] - len(_ids(tok, "ba"))  # where the last answer starts
    assert encode_chat_prompt(tok, turns[:3], t) == row["input_ids"][:last]
    assert encode_prompt(tok, turns[:3], t) == row["input_ids"][:last]


def test_preference_rows_put_the_slots_after_the_shared_prompt(tmp_path):
    _, tok, cfg = _model()
    t = cfg.prompt_template()
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "rev: ab\n", "chosen": "ba", "rejected": "ab"}])
    row = build_dataset(path, tok, template=t)[0]
    head = _ids(tok, "rev: ab\n") + [S0, S1]
    assert row["input_ids"][:len(head)] == head == row["rejected_input_ids"][:len(head)]
    assert row["labels"][:len(head)] == [IGNORE] * len(head)
    conv = write_jsonl(tmp_path / "c.jsonl", [{"prompt": _chat(("user", "ab")),
                                               "chosen": [{"role": "assistant", "content": "ba"}],
                                               "rejected": [{"role": "assistant", "content": "ab"}]}])
    row = build_dataset(conv, tok, template=t)[0]
    head = encode_chat_prompt(tok, _chat(("user", "ab")), t)
    assert head[-3:] == [tok.convert_tokens_to_ids("<|assistant|>"), S0, S1]
    assert row["input_ids"][:len(head)] == head == row["rejected_input_ids"][:len(head)]


def test_a_sentencepiece_tokenizer_keeps_its_seam_and_bos():
    from _tokenizers import llama2_like

    tok = llama2_like()
    t = PromptTemplate.parse(TEMPLATE)
    ids = encode_prompt_text(tok, "Answer: yes", template=t)
    assert ids == encode_prompt_text(tok, "Answer: yes") + [S0, S1] and ids[0] == tok.bos_token_id


def test_text_rows_have_no_prompt_for_the_slots(tmp_path):
    _, tok, cfg = _model()
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}])
    with pytest.raises(DataError, match="text.*template"):
        build_dataset(path, tok, template=cfg.prompt_template())
    build_dataset(path, tok, template=PromptTemplate.parse("[P:4] {prompt}"))  # front only: nothing to place


# ----------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("preset, template", [("llama", TEMPLATE), ("gpt2", TEMPLATE), ("llama", "{prompt} [P:2]")])
def test_logits_equal_a_hand_built_forward_with_the_encoder_outputs_spliced_in(preset, template):
    model, _, cfg = _model(preset, template)
    front = cfg.prompt_template().front
    ids = torch.tensor([[1, 10, 11, 12, S0, S1, 20, 21], [1, 13, 14, 15, S0, S1, 22, 23]])
    mod = SP.modules_of(model, "p_tuning", "default")
    v = mod.produce().detach()  # (n, d): the LSTM ran over all n, in template order
    emb = model.get_input_embeddings()(ids.clamp(max=50))
    by_hand = torch.cat([v[:front].expand(2, -1, -1), emb[:, :4], v[front:].expand(2, -1, -1), emb[:, 6:]], 1)
    ours = model(ids).logits
    with adapter_scope(model, None):
        theirs = model(inputs_embeds=by_hand).logits[:, front:]
    assert ours.shape[:2] == ids.shape
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("preset, train", [("llama", False), ("gpt2", True)])
def test_one_encoder_pass_feeds_the_prefix_and_the_slots(preset, train):
    """The tokens in front and after the prompt come from one run of the encoder (its dropout draws once), also
    when each training row runs the prefix with its own decoder dropout (gpt2)."""
    model, _, _ = _model(preset, encoder_dropout=0.5)
    model.train(train)
    mod = SP.modules_of(model, "p_tuning", "default")
    calls = []
    real = mod.produce
    mod.produce = lambda: calls.append(1) or real()
    model(torch.tensor([[1, 10, 11, S0, S1, 20]] * 2)).logits.sum().backward()
    assert len(calls) == 1 and mod.held is None
    assert all(p.grad is not None for p in trainable_parameters(model).values())


def test_front_only_template_is_plain_p_tuning_and_saves_for_peft(tmp_path):
    plain, _, pcfg = _model(template=None, num_virtual_tokens=5)
    front, _, fcfg = _model(template="[P:5] {prompt}")
    assert pcfg.num_virtual_tokens == fcfg.num_virtual_tokens == 5
    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain(ids).logits, front(ids).logits)
    save_adapter(front, [fcfg], tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["peft_type"] == "P_TUNING"
    assert json.loads((tmp_path / "ad" / METHODS_FILE).read_text())["tuneforge_method"][0]["template"] == \
        "[P:5] {prompt}"
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(build_tiny("llama")[0], str(tmp_path / "ad")).eval()
    assert torch.allclose(pm(input_ids=ids).logits[:, 5:], plain(ids).logits, atol=1e-5)


def test_save_and_load_keep_the_logits_in_tuneforges_layout(tmp_path):
    model, _, cfg = _model()
    ids = torch.tensor([[1, 10, 11, 12, S0, S1, 20, 21]])
    ours = model(ids).logits
    save_adapter(model, [cfg], tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert "peft_type" not in config and config["tuneforge_method"][0]["template"] == TEMPLATE
    with pytest.raises(ValueError, match="no PEFT layout"):
        p_tuning.peft_config(model, cfg, None)
    fresh, _ = build_tiny("llama")
    (again,) = load_adapter(fresh, tmp_path / "ad")
    assert again.template == TEMPLATE and p_tuning.prompt_template(fresh.eval()).back == 2
    assert torch.equal(fresh(ids).logits, ours)


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_left_padded_batched_generation_equals_one_by_one(preset):
    model, tok, cfg = _model(preset)
    t = cfg.prompt_template()
    prompts = ["ab", "copy: hello\n", "x", "copy: hello\n"]  # a repeated prompt: its prefill is shared
    enc = [encode_prompt(tok, p, t) for p in prompts]
    batch = sample(model, enc, pad_id=0, max_new_tokens=6)
    for i, p in enumerate(enc):
        alone = sample(model, [p], pad_id=0, max_new_tokens=6)
        assert batch.tokens[i].tolist() == alone.tokens[0].tolist(), i
    assert generate(model, tok, prompts, max_new_tokens=6) == generate(model, tok, prompts, max_new_tokens=6,
                                                                       batch_size=1)
    assert generate(model, tok, prompts[:1], max_new_tokens=6)[0] == tok.decode(batch.completion_ids(0),
                                                                                    skip_special_tokens=True)


def test_without_the_adapter_the_slots_are_absent():
    """DPO/PPO's reference (adapters off) and rows of a mixed batch without the adapter read the prompt as if the
    template had no tokens after it: each slot is a hidden copy of the token before it, so the last slot's logits
    predict the answer as the last prompt token does."""
    model, tok, _ = _model()
    ids = torch.tensor([[1, 10, 11, 12, S0, S1, 20, 21]])
    keep = [0, 1, 2, 3, 5, 6, 7]  # the last slot stands for token 3
    with adapter_scope(model, None):
        off = model(ids).logits
        plain = model(torch.tensor([[1, 10, 11, 12, 20, 21]])).logits
    assert torch.allclose(off[:, keep], plain[:, [0, 1, 2, 3, 3, 4, 5]], atol=1e-5)
    with adapter_scope(model, ["default", None]):
        mixed = model(ids.repeat(2, 1)).logits
    assert torch.allclose(mixed[:1], model(ids).logits, atol=1e-5)
    assert torch.allclose(mixed[1:], off, atol=1e-5)
    enc = [encode_prompt(tok, p) for p in ("ab", "copy: hi\n", "ab")]
    with adapter_scope(model, None):  # generation through the KV cache, a shared prefill included
        slotted = sample(model, [e + [S0, S1] for e in enc], pad_id=0, max_new_tokens=5)
        bare = sample(model, enc, pad_id=0, max_new_tokens=5)
    assert torch.equal(slotted.tokens, bare.tokens)


def test_a_model_without_the_adapter_refuses_slots_with_the_reason():
    model, tok = build_tiny("llama")
    with pytest.raises(ValueError, match="no P-tuning adapter with a template"):
        sample(model, [[1, 10, S0, S1]], pad_id=0, max_new_tokens=2)
    with pytest.raises(IndexError):  # a raw forward: ids far outside the embedding table
        model(torch.tensor([[1, 10, S0]]))
    with pytest.raises(ValueError, match="slot 1.*puts 1 token"):
        m, _, _ = _model(template="{prompt} [P:1]")
        m(torch.tensor([[1, 10, S0, S1]]))


def test_training_moves_the_encoder_and_leaves_the_base_alone():
    model, _, _ = _model()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = trainable_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    ids = torch.tensor([[1, 10, 11, 12, S0, S1, 20, 21, 2]])
    labels = torch.tensor([[IGNORE] * 6 + [20, 21, 2]])
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(p, before[n]) for n, p in params.items()), "every encoder tensor trains"
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert set(base) == {n for n, p in model.named_parameters() if not p.requires_grad}


def test_generate_eval_and_show_sample_on_the_command_line_apply_the_template(tmp_path, capsys):
    """``tuneforge eval`` (loss and --exact-match) and ``generate --file`` read the template off the loaded adapter;
    ``validate --show-sample`` shows the slots."""
    import yaml

    from tuneforge.cli import main
    from tuneforge.data import collate
    from tuneforge.eval.metrics import eval_loss, exact_match

    model, tok, cfg = _model()
    ad = str(save_adapter(model, [cfg], tmp_path / "ad"))
    rows = [{"prompt": f"copy {w}:", "completion": w} for w in ("ab", "cd", "efg")]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)

    def cli(*argv):
        with pytest.raises(SystemExit) as e:
            main(list(argv))
        out = capsys.readouterr()
        assert e.value.code == 0, out.err
        return out.out

    res = json.loads(cli("eval", "--model", "tiny:llama", "--adapter", ad, "--data", data, "--exact-match",
                         "--max-new-tokens", "4"))
    t = cfg.prompt_template()
    assert res["loss"] == pytest.approx(eval_loss(model, build_dataset(data, tok, template=t),
                                                  lambda r: collate(r, 0), 8)["loss"], rel=1e-5)
    assert res["loss"] != pytest.approx(eval_loss(model, build_dataset(data, tok), lambda r: collate(r, 0), 8)["loss"],
                                        rel=1e-5)
    assert res["exact_match"] == exact_match(model, tok, rows, max_new_tokens=4)["exact_match"]
    out = [json.loads(x)["completion"] for x in cli("generate", "--model", "tiny:llama", "--adapter", ad, "--file",
                                                     data, "--max-new-tokens", "5").splitlines()]
    by_hand = sample(model, [encode_prompt(tok, r["prompt"], t) for r in rows], pad_id=0, max_new_tokens=5)
    assert out == [tok.decode(by_hand.completion_ids(i), skip_special_tokens=True) for i in range(3)]
    conf = base_config(tmp_path, data)
    conf["method"] = [{"name": "p_tuning", "template": TEMPLATE}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(conf))
    assert "copy ab:<P0><P1>[[ab</s>]]" in cli("validate", str(tmp_path / "c.yaml"), "--show-sample")


def test_unload_takes_the_slot_hooks_away():
    model, _, _ = _model()
    p_tuning.unload(model)
    dec = model.base_model
    assert not dec._forward_pre_hooks and not dec._forward_hooks and not p_tuning.handles_slots(model)


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("template, reason", [
    ("[P:3]", "has 0 {prompt}"), ("{prompt} {prompt} [P:1]", "has 2 {prompt}"), ("{prompt}", "no \\[P:k\\]"),
    ("[P:0] {prompt}", "at least one"), ("[P:2] Question: {prompt}", "'Question:'"), ("", "empty template")])
def test_bad_templates_are_config_errors_naming_the_key(tmp_path, template, reason):
    from tuneforge.config import ConfigError, load_config

    d = base_config(tmp_path, str(tmp_path / "x.jsonl"))
    d["method"] = [{"name": "p_tuning", "template": template}]
    with pytest.raises(ConfigError, match=rf"method.0.template: .*{reason}"):
        load_config(d, check_files=False)


def test_num_virtual_tokens_comes_from_the_template():
    from pydantic import ValidationError

    assert p_tuning.Config(template="[P:2] [P:1] {prompt} [P:4]").num_virtual_tokens == 7
    assert p_tuning.Config(template=TEMPLATE, num_virtual_tokens=5).num_virtual_tokens == 5
    with pytest.raises(ValidationError, match=r"num_virtual_tokens 4 disagrees with template .*\(3 \+ 2 = 5"):
        p_tuning.Config(template=TEMPLATE, num_virtual_tokens=4)
    again = p_tuning.Config.model_validate(p_tuning.Config(template=TEMPLATE).model_dump())
    assert again.num_virtual_tokens == 5 and not again.peft_layout()


@pytest.mark.parametrize("data, key", [({"packing": True}, "data.packing"), ({"format": "text"}, "data.format")])
def test_impossible_combinations_are_config_errors(tmp_path, pc_file, data, key):
    from tuneforge import api
    from tuneforge.config import ConfigError, RunConfig

    d = base_config(tmp_path, pc_file)
    d["method"] = [{"name": "p_tuning", "template": TEMPLATE}]
    d["data"].update(data)
    with pytest.raises(ConfigError, match=key):
        api.check_targets(RunConfig.model_validate(d), build_tiny("llama")[1])


# ------------------------------------------------------------------------------------- review fixes
def _build_pair(tmp_path, rows, tok, t, name="rows.jsonl", **kw):
    return build_dataset(write_jsonl(tmp_path / name, rows), tok, template=t, **kw)


@pytest.mark.parametrize("kind", ["prompt_completion", "preference", "messages"])
def test_left_truncation_keeps_a_prompt_token_before_the_slots_or_drops_the_row(tmp_path, kind):
    """A left cut that would start on a slot ([S1] or [S0, S1] without the prompt) drops the row and says why; one
    more token of room keeps the last prompt token in front of both slots, and the adapters-off reference (DPO's,
    PPO's) reads every kept row."""
    from tuneforge.data import collate
    from tuneforge.data.report import SLOTS_CUT

    model, tok, cfg = _model()
    t = cfg.prompt_template()
    long = {"prompt_completion": {"prompt": "copy: abcdef\n", "completion": "abcdef"},
            "preference": {"prompt": "rev: abcdef\n", "chosen": "fedcba", "rejected": "abcdef"},
            "messages": {"messages": _chat(("user", "copy: abcdef"), ("assistant", "abcdef"))}}[kind]
    short = {"prompt_completion": {"prompt": "x", "completion": "y"},
             "preference": {"prompt": "x", "chosen": "y", "rejected": "z"},
             "messages": {"messages": _chat(("user", "x"), ("assistant", "y"))}}[kind]
    full = _build_pair(tmp_path, [long], tok, t)[0]["input_ids"]
    after = len(full) - 1 - max(i for i, x in enumerate(full) if x == S1)  # the answer after the last slot
    for room, kept in ((1, False), (2, False), (3, True)):
        ds = _build_pair(tmp_path, [long, short], tok, t, max_len=after + room, truncation="left")
        if not kept:
            assert len(ds) == 1 and ds.report.dropped == {SLOTS_CUT: 1}, room
            assert f"dropped 1 row(s): {SLOTS_CUT}" in ds.report.summary()
            continue
        row = ds[0]
        assert row["input_ids"] == full[-(after + 3):] and row["input_ids"][1:3] == [S0, S1]
        assert SLOTS_CUT not in ds.report.dropped
        seqs = [row["input_ids"]] + ([row["rejected_input_ids"]] if kind == "preference" else [])
        for ids in seqs:
            b = collate([{"input_ids": ids, "labels": ids}], 0)
            with adapter_scope(model, None), torch.no_grad():
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])  # no "starts with slots"


def test_an_empty_prompt_needs_a_start_token_before_the_slots(tmp_path):
    from _chartok import char_tokenizer

    t = PromptTemplate.parse(TEMPLATE)
    bare, with_bos = char_tokenizer(bos=False), char_tokenizer()
    for rows in ([{"prompt": "", "chosen": "ab", "rejected": "ba"}, {"prompt": "q", "chosen": "ab", "rejected": "ba"}],
                 [{"prompt": "", "completion": "ab"}, {"prompt": "q", "completion": "ab"}]):
        path = write_jsonl(tmp_path / "e.jsonl", rows)
        with pytest.raises(DataError, match="e.jsonl:1: prompt: .*the template's tokens after the prompt need a "
                                            "token before them"):
            build_dataset(path, bare, template=t)
        ds = build_dataset(path, bare, template=t, skip_bad_rows=True)
        assert len(ds) == 1 and ds[0]["input_ids"][:3] == [bare.convert_tokens_to_ids("q"), S0, S1]
        bos = build_dataset(path, with_bos, template=t)[0]  # bos stands before the slots
        assert bos["input_ids"][:3] == [with_bos.bos_token_id, S0, S1]
    with pytest.raises(DataError, match="need a token before them"):  # generation: the user's error, not a crash
        encode_prompt(bare, "", t)
    assert encode_prompt(bare, "", None) == []  # untemplated: unchanged (sample() refuses an empty prompt itself)


def test_slots_inside_a_multi_turn_response_carry_no_loss(tmp_path):
    """A conversational pair whose responses hold a later assistant turn: the slots that open it are input, never
    labels, so DPO/ORPO and eval gather no slot id from the vocabulary and the report counts only real tokens."""
    from tuneforge.algorithms._logps import token_logps_from_model
    from tuneforge.data import collate_preference
    from tuneforge.data.collate import preference_responses

    model, tok, cfg = _model()
    t = cfg.prompt_template()
    row = {"prompt": _chat(("user", "ab")),
           "chosen": _chat(("assistant", "ba"), ("user", "cd"), ("assistant", "dc")),
           "rejected": _chat(("assistant", "ab"), ("user", "cd"), ("assistant", "cd"))}
    ds = _build_pair(tmp_path, [row], tok, t)
    A = tok.convert_tokens_to_ids("<|assistant|>")
    for ids, labels in preference_responses(ds[0]):
        at = [i for i, x in enumerate(ids) if x == S0]
        assert len(at) == 2 and all(ids[i - 1] == A and ids[i + 1] == S1 for i in at)  # both turns opened
        assert not any(x >= SLOT_BASE for x in labels if x != IGNORE)
        assert all(labels[i] == labels[i + 1] == IGNORE for i in at)
        head = len(encode_chat_prompt(tok, row["prompt"], t))
        assert [x for x in labels[head:] if x != IGNORE] == without_slots(ids[head:])  # the rest is supervised
    real = sum(len(without_slots(ids)) for ids, _ in preference_responses(ds[0]))
    head = len(encode_chat_prompt(tok, row["prompt"], t))
    assert ds.report.supervised_tokens == real - 2 * (head - 2)  # every real token but the prompts'
    batch = collate_preference(list(ds), 0)
    per_token, keep = token_logps_from_model(model, {k: batch[k] for k in ("input_ids", "attention_mask",
                                                                            "labels")})
    assert torch.isfinite(per_token).all() and int(keep.sum()) == ds.report.supervised_tokens


@pytest.mark.parametrize("other", [{"template": None, "num_virtual_tokens": 4}, {"template": "[P:4] {prompt}"}])
def test_a_mixed_batch_with_a_p_tuning_adapter_that_has_no_tokens_after_the_prompt(other):
    """Templated "a" beside a plain (or front-only) P-tuning "b": prompts are encoded for "a", and b's row reads the
    slots as hidden copies, so every row generates what it generates alone under its own adapter."""
    model, tok = build_tiny("llama")
    torch.manual_seed(3)
    apply_methods(model, [p_tuning.Config(template=TEMPLATE, encoder_hidden_size=8)], adapter="a")
    apply_methods(model, [p_tuning.Config(encoder_hidden_size=8, **other)], adapter="b")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    prompts = ["copy: ab\n", "xy", "copy: hello\n"]
    names = ["a", "b", "b"]
    with adapter_scope(model, names):
        assert p_tuning.prompt_template(model).text == TEMPLATE
        mixed = generate(model, tok, prompts, max_new_tokens=5)
    alone = []
    for p, name in zip(prompts, names):
        with adapter_scope(model, name):
            alone += generate(model, tok, [p], max_new_tokens=5)
    assert mixed == alone
    with adapter_scope(model, "b"):
        assert p_tuning.prompt_template(model) is None  # alone, b's prompts have no slots


def test_a_templated_reward_model_scores_a_conversation_as_its_training_rows_read(tmp_path, monkeypatch):
    """The online algorithms hand a chat row's turns to the reward model, which encodes the conversation and the
    completion (an assistant turn) through its chat template with its own slots after every assistant opener: the
    sequence its conversational preference rows trained it on, not a flat text with slots at the end only."""
    from types import SimpleNamespace

    from tuneforge.algorithms import _online as O
    from tuneforge.algorithms import reward as RW
    from tuneforge.algorithms import rewards as R

    model, tok, cfg = _model()
    t = cfg.prompt_template()
    RW.attach_head(model)
    save_adapter(model, [cfg], tmp_path / "rm")
    RW.save_head(model, tmp_path / "rm")
    scorer = R.build(R.RewardModel(path=str(tmp_path / "rm"), base="tiny:llama"))
    seen = []
    real = RW.scores
    monkeypatch.setattr(RW, "scores", lambda m, batch: (seen.append(batch["input_ids"].tolist()), real(m, batch))[1])
    turns = _chat(("user", "hi"), ("assistant", "yo"), ("user", "copy ab"), ("assistant", "ab"))
    rows = list(_build_pair(tmp_path, [{"messages": turns}], tok, None, name="m.jsonl"))  # an untemplated policy
    assert rows[0]["prompt_messages"] == turns[:3]
    p_ids, _ = O.split_row(rows[0])
    c_ids = _ids(tok, "ab") + [tok.eos_token_id]
    roll = SimpleNamespace(prompt_ids=[p_ids], texts=["ab"], completion_ids=lambda i: c_ids)
    ctx = SimpleNamespace(algo_state={"tokenizer": tok, "data_path": "m.jsonl"})
    O.score(roll, rows, [0], [("rm", 1.0, scorer)], ctx)
    pair = {"prompt": turns[:3], "chosen": [turns[3]], "rejected": [{"role": "assistant", "content": "ba"}]}
    trained = _build_pair(tmp_path, [pair], tok, t, name="pair.jsonl")[0]["input_ids"]
    assert seen[0][0] == trained
    A = tok.convert_tokens_to_ids("<|assistant|>")
    assert [i for i, x in enumerate(trained) if x == S0] == [i + 1 for i, x in enumerate(trained) if x == A]


_SYSTEM_LAST = ("{% for m in messages %}{% if loop.last and m.role == 'user' %}<|system|>be brief</s>{% endif %}"
                "{{ '<|' + m.role + '|>' + m.content + eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
_COUNTED = ("{{ messages | length }}:{% for m in messages %}{{ '<|' + m.role + '|>' + m.content + eos_token }}"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_a_chat_template_that_is_not_prefix_stable_places_the_slots_turn_by_turn(tmp_path, capsys, monkeypatch):
    """A template that puts a system text before the *last* user turn (as Mistral-7B-Instruct-v0.3's does) renders
    the history before an earlier assistant turn differently: each turn's slots still go after its own
    ``<|assistant|>``; ``generate`` and ``chat`` run; a template that gives no place at all is one ``error:`` line
    and exit 2, never a traceback."""
    import io

    from tuneforge.cli import main
    from tuneforge.models.tiny import save_tiny
    from tuneforge.serve.chat import chat_loop

    model, tok, cfg = _model()
    t = cfg.prompt_template()
    tok.chat_template = _SYSTEM_LAST
    turns = _chat(("user", "hi"), ("assistant", "yo"), ("user", "hi"), ("assistant", "yo2"), ("user", "ab"))
    A, U, E = (tok.convert_tokens_to_ids(x) for x in ("<|assistant|>", "<|user|>", tok.eos_token))
    Y = tok.convert_tokens_to_ids("<|system|>")
    want = ([U] + _ids(tok, "hi") + [E, A, S0, S1] + _ids(tok, "yo") + [E, U] + _ids(tok, "hi") + [E, A, S0, S1]
            + _ids(tok, "yo2") + [E, Y] + _ids(tok, "be brief") + [E, U] + _ids(tok, "ab") + [E, A, S0, S1])
    assert encode_prompt(tok, turns, t) == want
    lines = iter(["hi", "again", "/exit"])
    history = chat_loop(model, tok, read=lambda _: next(lines), write=lambda s: None, max_new_tokens=3)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]

    base, ad = tmp_path / "base", tmp_path / "ad"
    save_tiny("llama", base)
    save_adapter(model, [cfg], ad)
    data = write_jsonl(tmp_path / "p.jsonl", [{"messages": turns + [{"role": "assistant", "content": "ba"}]}])

    def cli(*argv):
        with pytest.raises(SystemExit) as e:
            main(["generate", "--model", str(base), "--adapter", str(ad), "--max-new-tokens", "3", *argv])
        return e.value.code, capsys.readouterr()

    (base / "chat_template.jinja").write_text(_SYSTEM_LAST)
    code, out = cli("--file", data)
    assert code == 0, out.err
    assert json.loads(out.out)["prompt"] == turns
    (base / "chat_template.jinja").write_text(_COUNTED)  # the message count in front: no turn keeps its place
    code, out = cli("--file", data)
    err = [ln for ln in out.err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(err) == 1 and "Traceback" not in out.err
    assert "messages[1]" in err[0] and "P-tuning" in err[0]
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nagain\n"))
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", str(base), "--adapter", str(ad), "--max-new-tokens", "2"])
    out = capsys.readouterr()
    assert e.value.code == 2 and "Traceback" not in out.err and out.err.count("error:") == 1


def test_demo_held_out_loss_reads_the_adapters_template(tmp_path):
    """``demo._accuracy`` (the method-learning benchmarks' held-out loss) builds its rows with the loaded
    adapter's template, as ``tuneforge eval`` does."""
    from tuneforge.config import ModelConfig
    from tuneforge.data import collate
    from tuneforge.demo import _accuracy
    from tuneforge.eval.metrics import eval_loss
    from tuneforge.models.load import load_model
    from tuneforge.models.tiny import save_tiny

    save_tiny("llama", tmp_path / "base")
    model, tok, cfg = _model()
    save_adapter(model, [cfg], tmp_path / "ad")
    fresh, tok = load_model(ModelConfig(path=str(tmp_path / "base")))
    load_adapter(fresh, tmp_path / "ad")
    fresh.eval()
    rows = [{"prompt": f"copy {w}:", "completion": w} for w in ("ab", "cd")]
    data = write_jsonl(tmp_path / "ev.jsonl", rows)
    _, loss = _accuracy(str(tmp_path / "base"), str(tmp_path / "ad"), rows, data)
    t = cfg.prompt_template()
    want = eval_loss(fresh, build_dataset(data, tok, max_len=64, template=t), lambda r: collate(r, 0), 64)["loss"]
    assert loss == pytest.approx(want, rel=1e-5)


def test_flash_attention_refuses_tokens_after_the_prompt(tmp_path):
    """flash_attention_2 unpads on the 2D mask, where rows without the adapter hide their slots: a template with
    tokens after the prompt is refused when applied and when a forward meets slots; front-only templates are not
    affected."""
    from tuneforge import api
    from tuneforge.config import ConfigError, RunConfig

    model, _ = build_tiny("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2.*sdpa"):
        apply_methods(model, [p_tuning.Config(template=TEMPLATE)])
    apply_methods(model, [p_tuning.Config(template="[P:3] {prompt}")])  # a key/value prefix only: fine
    model, _, _ = _model()
    model.config._attn_implementation = "flash_attention_2"  # switched after the adapter went on
    with pytest.raises(ValueError, match="flash_attention_2"):
        model(torch.tensor([[1, 10, 11, S0, S1, 20]]))
    d = base_config(tmp_path, str(tmp_path / "x.jsonl"))
    d["method"] = [{"name": "p_tuning", "template": TEMPLATE}]
    d["model"]["attn_implementation"] = "flash_attention_2"
    with pytest.raises(ConfigError, match="model.attn_implementation: .*flash_attention_2 cannot run"):
        api.check_targets(RunConfig.model_validate(d), build_tiny("llama")[1])


def test_a_count_that_disagrees_with_the_template_is_reported_at_num_virtual_tokens(tmp_path):
    from tuneforge.config import ConfigError, load_config

    d = base_config(tmp_path, str(tmp_path / "x.jsonl"))
    d["method"] = [{"name": "p_tuning", "template": TEMPLATE, "num_virtual_tokens": 4}]
    with pytest.raises(ConfigError, match=r"method.0.num_virtual_tokens: .*4 disagrees with template"):
        load_config(d, check_files=False)
