"""``tuneforge`` command line: thin wrappers over the library; every error a user can fix exits 2 with its message."""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _user_errors() -> tuple[type[BaseException], ...]:
    from tuneforge.config import ConfigError
    from tuneforge.data import DataError
    from tuneforge.export.gguf import GgufExportError
    from tuneforge.methods import AdapterError
    from tuneforge.methods._bottleneck import NotMergeableError
    from tuneforge.methods._inject import TargetError
    from tuneforge.models.load import ModelLoadError
    from tuneforge.safeio import UnsafeFileError
    from tuneforge.train.checkpoint import CheckpointError
    from tuneforge.algorithms.rewards import RewardError
    from tuneforge.train.loop import TrainingAborted

    return (ConfigError, DataError, TargetError, ModelLoadError, UnsafeFileError, CheckpointError, TrainingAborted,
            RewardError, AdapterError, FileNotFoundError, GgufExportError, NotMergeableError)


# ------------------------------------------------------------------------------------------------------ commands
def cmd_train(a) -> int:
    from tuneforge.api import train
    from tuneforge.config import load_config

    cfg = load_config(a.config, a.overrides)
    out = train(cfg, resume=a.resume, allow_config_change=a.allow_config_change)
    print(f"saved {out.saved}\nlogs {out.out_dir / 'metrics.jsonl'} (TensorBoard: {out.out_dir / 'tensorboard'})")
    return 0


def cmd_validate(a) -> int:
    from tuneforge.api import validate
    from tuneforge.config import load_config

    cfg = load_config(a.config, a.overrides)
    if not a.no_data:
        validate(cfg)
        if a.show_sample:
            from tuneforge.models.load import load_tokenizer

            from tuneforge.methods.p_tuning import configured_template

            _show_sample(cfg.data.train, load_tokenizer(cfg.model), cfg.data.format, cfg.data.max_len,
                         configured_template(cfg.method))
    print(f"{a.config}: OK (methods: {', '.join(m.name for m in cfg.method)}; algorithm: {cfg.algorithm.name})")
    return 0


def _model_and_adapter(a):
    from types import SimpleNamespace

    from tuneforge.methods import load_adapter
    from tuneforge.models.load import load_model

    from tuneforge.models.labels import adapter_labels

    mcfg = SimpleNamespace(path=a.model, dtype=a.dtype, trust_remote_code=False, revision=None,
                           attn_implementation="sdpa")
    labels = adapter_labels(a.adapter) if a.adapter else None  # a classification adapter: its head's classes
    model, tok = load_model(mcfg, labels=labels)
    if a.adapter:
        load_adapter(model, a.adapter)
    model.eval()
    return model, tok


def cmd_generate(a) -> int:
    from tuneforge.train.rollout import generate

    model, tok = _model_and_adapter(a)
    # an encoder-decoder reads text prompts whatever its tokenizer carries (seq2seq rows have no chat turns)
    chat = bool(getattr(tok, "chat_template", None)) and not a.raw and not model.config.is_encoder_decoder
    sampling = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                    seed=a.seed, stop=a.stop)
    if a.prompt is not None:  # one prompt: a user turn through the chat template (unless --raw), streamed
        from tuneforge.serve.stream import stream_generate

        prompt = [{"role": "user", "content": a.prompt}] if chat else a.prompt
        stream_generate(model, tok, prompt, lambda piece: print(piece, end="", flush=True), **sampling)
        print()
        return 0
    prompts = [_prompt_of(ln, chat) for ln in Path(a.file).read_text().splitlines() if ln.strip()]
    outs = generate(model, tok, prompts, **sampling)
    for p, o in zip(prompts, outs):
        print(json.dumps({"prompt": p, "completion": o}))
    return 0


def _prompt_of(line: str, chat: bool):
    """A prompt file's line: a JSON row's ``messages`` (up to the last assistant turn, which is the answer and never
    part of the prompt) or its ``prompt`` (a string goes in raw, as training and ``eval`` feed prompt/completion
    rows; a message list as it is), else the line itself, which becomes a user turn on a chat model."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        row = line
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        turns = row["messages"]
        last = max((i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("role") == "assistant"),
                   default=len(turns))
        return turns[:last]
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        return row["prompt"]  # a prompt/completion row: raw, as training and eval feed it
    text = row.get("prompt", line) if isinstance(row, dict) else line
    return [{"role": "user", "content": text}] if chat and isinstance(text, str) else text


def cmd_chat(a) -> int:
    from tuneforge.serve.chat import chat_loop

    model, tok = _model_and_adapter(a)
    chat_loop(model, tok, system=a.system, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
              top_p=a.top_p, top_k=a.top_k, seed=a.seed)
    return 0


def cmd_eval(a) -> int:
    from tuneforge.data import build_dataset, collate
    from tuneforge.eval.examples import answer_examples
    from tuneforge.eval.metrics import eval_loss, exact_match

    from tuneforge.train.rollout import model_template

    from tuneforge.eval.classify import classify_file, is_classifier

    model, tok = _model_and_adapter(a)
    if is_classifier(model):  # classification rows: loss, accuracy and macro-F1
        _, metrics = classify_file(model, tok, a.data, a.batch_size, a.max_len)
        if metrics is None:
            raise FileNotFoundError(f"{a.data}: rows without a label column cannot be scored; use tuneforge classify")
        print(json.dumps({"file": a.data, **metrics}))
        return 0
    ds = build_dataset(a.data, tok, max_len=a.max_len, template=model_template(model))
    pad = tok.pad_token_id
    coll = lambda r: collate(r, pad)  # noqa: E731
    if getattr(model.config, "is_encoder_decoder", False):  # prompt -> encoder, completion -> decoder
        from tuneforge.data.seq2seq import seq2seq_batch, start_token

        coll = lambda r: seq2seq_batch(collate(r, pad), start_token(model, tok), pad)  # noqa: E731
    res = {"file": a.data, **eval_loss(model, ds, coll, a.batch_size)}
    if a.exact_match:  # prompt/completion rows, and chat rows answered after their last assistant turn's context
        res.update(exact_match(model, tok, answer_examples(a.data), max_new_tokens=a.max_new_tokens))
    print(json.dumps(res))
    return 0


def cmd_classify(a) -> int:
    from tuneforge.data import DataError
    from tuneforge.eval.classify import classify_file, classify_texts, is_classifier
    from tuneforge.safeio import atomic_write_text

    model, tok = _model_and_adapter(a)
    if not is_classifier(model):
        raise DataError(f"{a.model}{' + ' + a.adapter if a.adapter else ''} is not a classifier (no labelled "
                        "classification head); train one with algorithm: classification")
    if a.text is not None:
        print(json.dumps(classify_texts(model, tok, [a.text], [a.text_b] if a.text_b else None,
                                        max_len=a.max_len)[0]))
        return 0
    preds, metrics = classify_file(model, tok, a.file, a.batch_size, a.max_len)
    if a.out:
        atomic_write_text(Path(a.out), "".join(json.dumps(p) + "\n" for p in preds))
    else:
        for p in preds:
            print(json.dumps(p))
    if metrics is not None:
        print(json.dumps({"file": a.file, **metrics}), file=sys.stderr if not a.out else sys.stdout)
    return 0


def cmd_score(a) -> int:
    from tuneforge.algorithms.reward import load_head, score_dataset
    from tuneforge.data import build_dataset

    from tuneforge.train.rollout import model_template

    model, tok = _model_and_adapter(a)
    load_head(model, a.adapter or a.model)
    ds = build_dataset(a.data, tok, max_len=a.max_len, template=model_template(model))
    results = score_dataset(model, ds, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    for row, r in zip(ds.rows, results):
        if not isinstance(r, tuple):
            shown = {"score": r}
        else:  # a pair, or a ranking's K scores best first
            shown = {"chosen": r[0], "rejected": r[1]} if len(r) == 2 else {"scores": list(r)}
        print(json.dumps({"line": row["line"], **shown}))
    if results and isinstance(results[0], tuple):
        # every ordered pair of a row (a ranking's K-choose-2), each row counting once as in training's loss
        per_row = [[s[i] > s[j] for i, j in combinations(range(len(s)), 2)] for s in results]
        acc = sum(sum(p) / len(p) for p in per_row) / len(per_row)
        print(json.dumps({"file": a.data, "rows": len(results), "pairs": sum(map(len, per_row)),
                          "pairwise_accuracy": acc}))
    return 0


def cmd_label(a) -> int:
    """RLAIF labelling: a judge LM (or function) turns response pairs into preference rows for reward/dpo."""
    import os

    from pydantic import ValidationError

    from tuneforge.algorithms.rlaif import Judge, build_judge, label_rows, read_response_pairs
    from tuneforge.config import ConfigError
    from tuneforge.tasks import write_jsonl

    kw = {"model": a.judge_model, "adapter": a.judge_adapter, "function": a.judge_function}
    if a.template:
        kw["template"] = a.template
    if a.choices:
        kw["choices"] = tuple(a.choices.split(",", 1))
    try:
        judge_cfg = Judge(**kw)
    except ValidationError as e:
        raise ConfigError([(".".join(map(str, x["loc"])) or "judge", x["msg"]) for x in e.errors()], "label")
    rows = read_response_pairs(a.data)
    labelled, ties = label_rows(build_judge(judge_cfg), rows)
    tmp = f"{a.out}.tmp-{os.getpid()}"
    write_jsonl(labelled, tmp)
    os.replace(tmp, a.out)
    print(json.dumps({"file": a.data, "pairs": len(rows), "labelled": len(labelled), "ties_skipped": ties,
                      "out": a.out}))
    return 0


def cmd_merge(a) -> int:
    from tuneforge.methods import merge_methods, read_adapter_config
    from tuneforge.safeio import share_like_open

    model, tok = _model_and_adapter(a)
    merge_methods(model, read_adapter_config(a.adapter))
    model.save_pretrained(a.out, safe_serialization=True)
    tok.save_pretrained(a.out)
    share_like_open(a.out)
    print(f"merged model written to {a.out}")
    return 0


def cmd_export_gguf(a) -> int:
    """GGUF for llama.cpp/Ollama: the model with its adapter merged, or (``--lora``) the adapter as a GGUF LoRA.

    The file goes to a temporary name beside ``--out`` and is renamed into place when complete (export/gguf.py).
    A model loaded from a GGUF file (``--model x.gguf`` or a packaged name) gets that file's tokenizer metadata."""
    from tuneforge.export.gguf import GgufExportError, check_lora_methods, write_lora_gguf, write_model_gguf
    from tuneforge.methods import merge_methods, read_adapter_config
    from tuneforge.models.gguf import gguf_file

    if a.lora and not a.adapter:
        raise GgufExportError("--lora writes the adapter alone: name it with --adapter")
    cfgs = read_adapter_config(a.adapter) if a.adapter else []
    if a.lora:
        check_lora_methods(cfgs)  # before any weights load
    model, tok = _model_and_adapter(a)
    name = Path(a.out).stem
    if a.lora:
        out = write_lora_gguf(model, "default", a.out, a.type, methods=cfgs, name=name)
    else:
        if cfgs:
            merge_methods(model, cfgs)
        out = write_model_gguf(model, tok, a.out, a.type, source_gguf=gguf_file(a.model), name=name)
    print(f"{'LoRA adapter' if a.lora else 'model'} written to {out} ({a.type})")
    return 0


def cmd_ls(a) -> int:
    from tuneforge.algorithms import ALGORITHMS
    from tuneforge.methods import METHODS

    def first_line(mod):
        return (mod.__doc__ or "").strip().splitlines()[0]

    print("methods:")
    for name, mod in METHODS.items():
        print(f"  {name:12s} {first_line(mod)}")
    print("algorithms:")
    for name, mod in ALGORITHMS.items():
        print(f"  {name:12s} {first_line(mod)}")
    print(f"recipes ({RECIPES}):")
    for p in sorted(RECIPES.glob("*.yaml")):
        print(f"  {p.stem}")
    if a.model:
        _ls_model(a.model)
    return 0


def _ls_model(path: str) -> None:
    from tuneforge.methods import METHODS, apply_methods, count_parameters
    from tuneforge.models.tiny import PRESETS  # noqa: F401  (validates the import path early)
    from types import SimpleNamespace

    from tuneforge.models.load import meta_model

    mcfg = SimpleNamespace(path=path, dtype="float32", trust_remote_code=False, revision=None,
                           attn_implementation="sdpa")
    n = count_parameters(meta_model(mcfg))[1]
    print(f"trainable parameters on {path} ({n:,d} parameters):")
    # methods without a meaningful all-default configuration
    shown = {"freeze": {"top_k": 1}, "intrinsic": {"dimension": 1000}, "adapter_drop": {"drop_layers": 1}}
    before = {"adapter_drop": [METHODS["houlsby"].Config()]}  # what it acts on (its own count is 0)
    for name, mod in METHODS.items():
        if name == "adapter_fusion":
            print(f"  {name:16s} {'n/a':>14s}  (fuses adapters trained before: Q, K, V, 3 (d² + d) per sub-layer "
                  "they adapt, with them frozen)")
            continue
        cfg = mod.Config(**shown.get(name, {}))
        model = meta_model(mcfg)
        try:
            apply_methods(model, before.get(name, []) + [cfg])
        except ValueError as exc:
            if name != "bitfit":  # e.g. no default targets for this architecture
                print(f"  {name:16s} {'n/a':>14s}  ({str(exc).splitlines()[0]})")
                continue
            cfg = mod.Config(add_bias=True)  # bias-free model: the documented alternative
            model = meta_model(mcfg)
            apply_methods(model, [cfg])
        t, _ = count_parameters(model)
        with_ = f" with {', '.join(c.name for c in before[name])}" if name in before else ""
        print(f"  {name:16s} {t:>14,d} ({100 * t / n:8.3f}% of the model)  {cfg.model_dump(exclude={'name'})}{with_}")


def cmd_data_check(a) -> int:
    from tuneforge.data import check_file
    from tuneforge.models.load import load_tokenizer
    from types import SimpleNamespace

    tok = load_tokenizer(SimpleNamespace(path=a.model, trust_remote_code=False, revision=None)) if a.model else None
    report = check_file(a.file, tok, format=a.format, max_len=a.max_len, truncation=a.truncation,
                        report_path=a.report)
    print(report.summary())
    if a.show_sample and tok is not None:
        _show_sample(a.file, tok, a.format, a.max_len)
    return 1 if report.bad_rows else 0


def _show_sample(path: str, tok, fmt: str = "auto", max_len: int = 512, template=None) -> None:
    from tuneforge.data import build_dataset
    from tuneforge.data.report import render_sample

    ds = build_dataset(path, tok, format=fmt, max_len=max_len, skip_bad_rows=True, template=template)
    print(f"first usable row ({path}:{ds.rows[0]['line']}):\n{render_sample(ds.rows[0], tok)}")


def cmd_estimate(a) -> int:
    from tuneforge import estimate as est

    try:
        if a.mode == "can-it-run-llm":
            print(est.format_can_it_run(est.can_it_run_llm(a.model, lora_pct=a.lora_pct)))
            p = est.resolve_model(a.model)
            n = p if isinstance(p, int) else est.param_counts(p)["total"]
            print(f"serving rule M = P x 4 B / (32/{a.bits}) x 1.2 = {est.serving_rule_gb(n, a.bits):.2f} GB "
                  f"(decimal, all {n:,} parameters)")
            return 0
        targets = [t for t in a.targets.split(",") if t] if a.targets else None
        e = est.estimate(a.model, method=a.method, bits=a.bits, batch=a.batch, seq=a.seq, optimizer=a.optimizer,
                         rank=a.rank, targets=targets, top_k=a.top_k, device=a.device,
                         virtual_tokens=a.virtual_tokens, bottleneck=a.bottleneck, intrinsic_dim=a.intrinsic_dim,
                         projection=a.projection, said=a.said, drop_layers=a.drop_layers,
                         fusion_adapters=a.fusion_adapters, adapter_method=a.adapter_method, gate=a.gate)
    except est.EstimateError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(e.to_dict()) if a.json else est.format_estimate(e))
    return 0


def cmd_intrinsic_dim(a) -> int:
    from tuneforge.config import ConfigError, load_config
    from tuneforge.intrinsic_dim import search

    try:
        dims = [int(x) for x in a.dims.split(",") if x.strip()]
    except ValueError:
        raise ConfigError([("--dims", f"{a.dims!r}: give comma-separated integers, e.g. 10,100,1000")],
                          "arguments") from None
    try:
        factors = tuple(float(x) for x in a.lr_factors.split(",") if x.strip())
    except ValueError:
        raise ConfigError([("--lr-factors", f"{a.lr_factors!r}: give comma-separated numbers, e.g. 0.5,1,2")],
                          "arguments") from None
    cfg = load_config(a.config, a.overrides)
    out = a.out or str(Path(cfg.train.output_dir) / "intrinsic_dim")
    s = search(cfg, dims, out, threshold=a.threshold, metric=a.metric, full_lr=a.full_lr, refine=a.refine,
               log=lambda line: print(line, flush=True), lr_scale=a.lr_scale, lr_factors=factors)
    print(f"results {Path(out) / 'intrinsic_dim.json'}\nplot    {s['plot']}")
    return 0


def cmd_compare(a) -> int:
    """One recipe, several methods, one report (``eval/compare.py``); a bad argument is one ``error:`` line."""
    from tuneforge.config import load_config
    from tuneforge.eval.compare import CompareError, parse_lr, parse_methods, prepare, run_compare
    from tuneforge.eval.compare_report import direction_text, markdown_table

    try:
        entries, lr = parse_methods(a.methods), parse_lr(a.lr)
        cfg = load_config(a.config, a.overrides + a.override)
        cfg, metric = prepare(cfg, entries, a.steps, a.metric)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out or cfg.train.output_dir)
    s = run_compare(cfg, entries, out, lr=lr, metric=metric, log=lambda line: print(line, flush=True),
                    recipe=a.config)
    print(f"\n{direction_text(s)}:\n{markdown_table(s)}")
    print(f"\nreport {s['files']['html']}\njson   {s['files']['json']}")
    return 0 if all(r.get("status") == "ok" for r in s["runs"]) else 1


def cmd_demo(a) -> int:
    if a.tiny or a.quick:
        from tuneforge.demo import run_demo

        run_demo(out_dir=a.out, quick=a.quick)
        return 0
    from tuneforge.models.gguf import GgufError
    from tuneforge.models.load import ModelLoadError
    from tuneforge.real_demo import run_real_demo

    try:
        run_real_demo(out_dir=a.out)
    except GgufError as e:  # the model package is missing: say how to install it, or run the tiny demo
        raise ModelLoadError(f"{e}; or run the tiny from-scratch demo: tuneforge demo --tiny") from None
    return 0


# ------------------------------------------------------------------------------------------------------- parser
def _model_args(p, adapter=True):
    p.add_argument("--model", required=True, help="local HF model directory, a .gguf file, a packaged model "
                   "(smollm2) or tiny:<preset>")
    if adapter:
        p.add_argument("--adapter", help="adapter directory written by tuneforge (or PEFT)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])


def _sampling_args(p, max_new_tokens: int):
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tuneforge", description="Adapt pretrained language models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fine-tune from a YAML recipe")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    t.add_argument("--resume", default=None, help="auto (latest complete checkpoint) or a checkpoint directory")
    t.add_argument("--allow-config-change", action="store_true")
    t.set_defaults(fn=cmd_train)
    v = sub.add_parser("validate", help="check a recipe (all errors at once), its targets and its data")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--no-data", action="store_true", help="skip reading the data files")
    v.add_argument("--show-sample", action="store_true", help="print the first row as tokenized, loss marked")
    v.set_defaults(fn=cmd_validate)
    g = sub.add_parser("generate", help="complete a prompt or a file of prompts")
    _model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--file", help="text file (one prompt per line) or JSONL with prompt/messages")
    _sampling_args(g, max_new_tokens=64)
    g.add_argument("--stop", action="append", default=None)
    g.add_argument("--raw", action="store_true", help="send --prompt / text lines as they are, without the chat "
                   "template (applied by default when the tokenizer has one)")
    g.set_defaults(fn=cmd_generate)
    ch = sub.add_parser("chat", help="a terminal chat with the model (history kept; /reset, /exit)")
    _model_args(ch)
    ch.add_argument("--system", help="a system message opening the conversation")
    _sampling_args(ch, max_new_tokens=256)
    ch.set_defaults(fn=cmd_chat)
    e = sub.add_parser("eval", help="loss, perplexity and exact match on a dataset")
    _model_args(e)
    e.add_argument("--data", required=True)
    e.add_argument("--max-len", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--exact-match", action="store_true", help="greedy-generate and compare with `completion`, or "
                   "with a chat row's last assistant turn (the turns before it are the prompt)")
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.set_defaults(fn=cmd_eval)
    cl = sub.add_parser("classify", help="a classifier's label and class probabilities for a text or every row of "
                        "a file (scored when the rows have labels)")
    _model_args(cl)
    src = cl.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="one text to classify")
    src.add_argument("--file", help="JSONL/CSV/TSV/Parquet rows with text (or text_a + text_b), label optional")
    cl.add_argument("--text-b", help="the second text of a pair (with --text)")
    cl.add_argument("--out", help="write the predictions here as JSONL (else stdout)")
    cl.add_argument("--max-len", type=int, default=512)
    cl.add_argument("--batch-size", type=int, default=32)
    cl.set_defaults(fn=cmd_classify)
    sc = sub.add_parser("score", help="score (prompt, response) rows, or preference pairs, with a reward model")
    _model_args(sc)
    sc.add_argument("--data", required=True, help="JSONL/CSV/Parquet of prompt/completion or prompt/chosen/rejected")
    sc.add_argument("--max-len", type=int, default=1024)
    sc.set_defaults(fn=cmd_score)
    lb = sub.add_parser("label", help="RLAIF: a judge model labels response pairs as preference rows")
    lb.add_argument("--data", required=True, help='JSONL of {"prompt", "responses": [a, b]}')
    lb.add_argument("--out", required=True, help="preference rows {prompt, chosen, rejected, judge_p} to write")
    lb.add_argument("--judge-model", help="local judge model directory (or tiny:<preset>)")
    lb.add_argument("--judge-adapter", help="adapter to load on the judge model")
    lb.add_argument("--judge-function", help="module:function or file.py:function returning P(a better)")
    lb.add_argument("--template", help="judge rubric with {prompt}, {a}, {b}")
    lb.add_argument("--choices", help="the two answer tokens, comma-separated (default A,B)")
    lb.set_defaults(fn=cmd_label)
    m = sub.add_parser("merge", help="fold an adapter into the base and save a plain HF model")
    _model_args(m)
    m.add_argument("--out", required=True)
    m.set_defaults(fn=cmd_merge)
    ex = sub.add_parser("export", help="write a model or adapter for another runtime")
    exsub = ex.add_subparsers(dest="export_cmd", required=True)
    eg = exsub.add_parser("gguf", help="llama.cpp/Ollama GGUF: the merged model, or the adapter alone (--lora)")
    _model_args(eg)
    eg.add_argument("--out", required=True, help="the .gguf file to write")
    eg.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0"],
                    help="tensor type: norms and biases stay f32; q8_0 falls back to f16 for rows not a multiple of 32")
    eg.add_argument("--lora", action="store_true", help="write --adapter as a GGUF LoRA (llama.cpp --lora) on the "
                    "base GGUF instead of merging it")
    eg.set_defaults(fn=cmd_export_gguf)
    ls = sub.add_parser("ls", help="list methods, algorithms and recipes")
    ls.add_argument("--model", help="also print each method's trainable parameters on this model")
    ls.set_defaults(fn=cmd_ls)
    dm = sub.add_parser("demo", help="LoRA-tune SmolLM2-135M-Instruct on a task it cannot do; accuracy before/after")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--tiny", action="store_true", help="instead: pretrain a tiny model in code, then LoRA-tune it "
                    "(needs no model package)")
    dm.add_argument("--quick", action="store_true", help="the tiny demo, much shorter (for smoke tests)")
    dm.set_defaults(fn=cmd_demo)
    idim = sub.add_parser("intrinsic-dim", help="search the smallest random-subspace dimension reaching 90%% of "
                          "full fine-tuning (d90), with a plot")
    idim.add_argument("config", help="YAML recipe (its data.eval scores every run; an intrinsic entry in its "
                      "method list gives the projection options)")
    idim.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    idim.add_argument("--dims", default="10,100,1000,10000", help="dimensions to try, comma-separated")
    idim.add_argument("--threshold", type=float, default=0.9, help="share of full fine-tuning's metric (0.9: d90)")
    idim.add_argument("--metric", default="exact_match", choices=["exact_match", "loss"])
    idim.add_argument("--full-lr", type=float, default=None, help="the full fine-tuning run's learning rate "
                      "(default: the recipe's, which suits the subspace runs; full usually wants ~100x less)")
    idim.add_argument("--refine", type=int, default=2, help="bisection steps between the last miss and first hit")
    idim.add_argument("--lr-scale", default="sqrt", choices=["sqrt", "none"], help="sqrt: the run at d uses "
                      "lr * sqrt(d_ref / d), d_ref the recipe's intrinsic dimension (1000 without one), so every d "
                      "moves the weights by the same step; none: the recipe's rate for every d")
    idim.add_argument("--lr-factors", default="1", help="multiples of each d's rate to try, keeping the best "
                      "(e.g. 0.5,1,2: a per-d sweep, one run per factor)")
    idim.add_argument("--out", default=None, help="default: <train.output_dir>/intrinsic_dim")
    idim.set_defaults(fn=cmd_intrinsic_dim)
    cm = sub.add_parser("compare", help="train one recipe with several methods (same data, steps, seed) and "
                        "report metric, trainable share, memory and time side by side")
    cm.add_argument("config", help="YAML recipe; its data.eval scores every run")
    cm.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    cm.add_argument("-o", "--override", action="append", default=[], help="one dotted override (repeatable)")
    cm.add_argument("--methods", required=True, help="comma-separated: name, name:key=value[:key=value], "
                    "name:{key: value}, a+b (composed), label=spec; e.g. full,lora,lora:rank=4,ia3")
    cm.add_argument("--out", default=None, help="default: the recipe's train.output_dir; the report goes to "
                    "<out>/compare/")
    cm.add_argument("--lr", default=None, help="auto (a short sweep per method around its usual rate), default "
                    "(each method's usual rate, no sweep) or one rate for every method (default: the recipe's)")
    cm.add_argument("--steps", type=int, default=None, help="optimizer steps per run (train.max_steps)")
    cm.add_argument("--metric", default=None, help="exact_match or loss (default: exact match when the eval "
                    "rows have answers, else held-out loss)")
    cm.set_defaults(fn=cmd_compare)
    es = sub.add_parser("estimate", help="memory to serve or fine-tune a model (no weights loaded)")
    es.add_argument("--model", required=True, help="model directory (config.json), preset (llama-3-8b, tiny:llama, "
                    "...) or parameter count (7b, 70e9)")
    es.add_argument("--method", default="full", help="none, full, freeze, lora, qlora, ia3, bitfit, "
                    "prompt_tuning, p_tuning, prefix_tuning, p_tuning_v2, houlsby, pfeiffer, parallel, scaled_parallel, "
                    "compacter, compacter_pp, adapter_bias, adapter_drop, adapter_fusion, intrinsic, unipelt. The "
                    "options below belong to the methods they name; another method refuses them")
    es.add_argument("--virtual-tokens", type=int, default=None, help="soft prompts and unipelt: n virtual tokens "
                    "(default 20; unipelt's prefix 10)")
    es.add_argument("--bottleneck", type=int, default=None, help="bottleneck adapters (and adapter_drop's, "
                    "adapter_fusion's, unipelt's): m (default hidden / 16; compacter: hidden / 32)")
    es.add_argument("--gate", action=argparse.BooleanOptionalAction, default=None, help="lora, qlora, the "
                    "bottleneck adapters but adapter_bias (and adapter_drop's, adapter_fusion's members): UniPELT's "
                    "per-token gate; unipelt has it unless --no-gate")
    es.add_argument("--intrinsic-dim", type=int, default=None, help="intrinsic: d, the trained numbers (required)")
    es.add_argument("--projection", default=None, choices=["fastfood", "dense"], help="intrinsic: P's form "
                    "(default fastfood)")
    es.add_argument("--said", action="store_true", default=None, help="intrinsic: a learned scale per target "
                    "layer (SAID)")
    es.add_argument("--drop-layers", type=int, default=None, help="adapter_drop: k, no adapters in blocks 0 .. k-1 "
                    "(required)")
    es.add_argument("--fusion-adapters", type=int, default=None, help="adapter_fusion: N, the frozen adapters fused "
                    "(default 2)")
    es.add_argument("--adapter-method", default=None, help="the bottleneck adapter adapter_drop acts on (default "
                    "houlsby) or adapter_fusion fuses (default pfeiffer)")
    es.add_argument("--rank", type=int, default=None, help="lora, qlora, unipelt: LoRA rank (default 8)")
    es.add_argument("--targets", help="lora, qlora, intrinsic, unipelt: the adapted layers, comma-separated "
                    "(default: every block projection; unipelt: the query and value projections)")
    es.add_argument("--top-k", type=int, default=None, help="freeze: train the top k blocks (default 1)")
    es.add_argument("--bits", type=int, default=16, choices=[32, 16, 8, 4])
    es.add_argument("--batch", type=int, default=1)
    es.add_argument("--seq", type=int, default=512)
    es.add_argument("--optimizer", default="adamw", help="adamw, adamw8bit, sgd")
    es.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="sizes the optimizer's temporaries")
    es.add_argument("--mode", default="detailed", choices=["detailed", "can-it-run-llm"])
    es.add_argument("--lora-pct", type=float, default=2.0, help="can-it-run-llm: %% of parameters LoRA trains")
    es.add_argument("--json", action="store_true", help="print the breakdown (bytes) as JSON")
    es.set_defaults(fn=cmd_estimate)
    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dc = dsub.add_parser("check", help="validate every row of a data file; writes nothing but --report")
    dc.add_argument("file")
    dc.add_argument("--model", help="tokenizer to check lengths and templates with")
    dc.add_argument("--format", default="auto")
    dc.add_argument("--max-len", type=int, default=512)
    dc.add_argument("--truncation", default="right")
    dc.add_argument("--report", help="write the full report (every bad row) as JSON here")
    dc.add_argument("--show-sample", action="store_true", help="print the first row as tokenized, loss marked")
    dc.set_defaults(fn=cmd_data_check)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
