"""The library entry points: ``train(cfg)`` and ``validate(cfg)``; the CLI and the demo are thin layers over them.

Order matters for users: configuration, data and targets are checked before the model's weights load (a typo costs
seconds, not a model load), and the output directory is written only once everything is known to be valid, so a
failed start leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from tuneforge import __version__
from tuneforge.algorithms import ALGORITHMS
from tuneforge.algorithms._dropout import config_dropout_restored, disable_dropout, dropout_disabled
from tuneforge.algorithms._prefix import enable as share_prompts
from tuneforge.config import ConfigError, RunConfig
from tuneforge.data import build_dataset, collate, collate_packed, collate_preference, pack_rows
from tuneforge.eval.metrics import eval_loss
from tuneforge.methods import (apply_methods, count_parameters, finalize_methods, has_regularizer, has_step_hook,
                               prepare_methods, regularizer, save_adapter, step_methods)
from tuneforge.methods._inject import TargetError
from tuneforge.data.seq2seq import is_encoder_decoder, seq2seq_batch, start_token
from tuneforge.models.arch import task_head_names
from tuneforge.models.labels import save_labels
from tuneforge.models.load import ENCODER_TYPES, load_model, load_tokenizer, meta_model
from tuneforge.safeio import share_like_open
from tuneforge.train.precision import autocast_context, cast_frozen_matmul_weights_, resolve_precision
from tuneforge.train import checkpoint as ckpt
from tuneforge.train import dist as D
from tuneforge.train.loop import Loop, LoopResult

WHOLE_MODEL_METHODS = {"full", "freeze"}
SEQ2SEQ_ALGORITHMS = ("sft", "dpo", "orpo")  # on encoder-decoders: likelihoods of the decoder given the encoder's input
SEQ2SEQ_FORMATS = ("prompt_completion", "preference")


@dataclass
class TrainOutput:
    out_dir: Path
    saved: Path | None  # adapter or model directory
    result: LoopResult


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_targets(cfg: RunConfig, tok=None) -> None:
    """Apply the methods to a weightless (meta-device) copy of the model: a wrong target fails in milliseconds."""
    problems = fusion_problems(cfg)  # before the members' weights are read
    if problems:
        raise ConfigError(problems, "config")
    classify = cfg.algorithm.name == "classification"
    model = meta_model(cfg.model, labels=run_labels(cfg) if classify else None)
    if getattr(model.config, "is_encoder_decoder", False) and cfg.algorithm.name not in SEQ2SEQ_ALGORITHMS:
        raise ConfigError([("algorithm.name", f"{cfg.algorithm.name} does not run on an encoder-decoder model "
                                              f"({model.config.model_type}) yet; it trains with "
                                              f"{', '.join(SEQ2SEQ_ALGORITHMS)} (prompt -> encoder, completion -> "
                                              "decoder)")], "config")
    if getattr(model.config, "is_encoder_decoder", False) and cfg.data.packing:
        raise ConfigError([("data.packing", "an encoder-decoder reads one prompt per row; set packing: false")],
                          "config")
    from tuneforge.methods._soft_prompt import max_positions

    usable = max_positions(model)
    if classify and usable and getattr(model.config, "model_type", None) in ENCODER_TYPES:
        if cfg.data.max_len > usable:
            raise ConfigError([("data.max_len", f"{cfg.data.max_len} tokens, but {cfg.model.path} has {usable} "
                                                "positions; set data.max_len to at most that")], "config")
    if not classify and getattr(model.config, "model_type", None) in ENCODER_TYPES:
        raise ConfigError([("algorithm.name", f"{cfg.algorithm.name} trains a generative model, and {cfg.model.path} "
                                              f"is an encoder ({model.config.model_type}); use algorithm: "
                                              "classification")], "config")
    try:
        apply_methods(model, cfg.method, tokenizer=tok)
    except (TargetError, ValueError) as e:
        raise ConfigError([("method", str(e))], "config") from None
    problems = soft_prompt_problems(cfg, model)
    if problems:
        raise ConfigError(problems, "config")


def fusion_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """AdapterFusion members trained on another base model than this run's (their files record it)."""
    from tuneforge.methods import METHODS_FILE

    out, base = [], base_model_reference(cfg.model)
    for i, m in enumerate(cfg.method):
        if m.name != "adapter_fusion" or m.members is not None:
            continue
        for j, path in enumerate(m.adapters):
            f = Path(path) / METHODS_FILE
            recorded = json.loads(f.read_text()).get("base_model_name_or_path") if f.exists() else None
            if recorded and recorded != base:
                out.append((f"method[{i}].adapters[{j}]", f"{path} was trained on {recorded}, this run's base is "
                            f"{base}; fuse adapters trained on the same base model"))
    return out


def soft_prompt_problems(cfg: RunConfig, model) -> list[tuple[str, str]]:
    """What a soft prompt cannot combine with, found before any weight loads: packed rows (one row holds several
    examples, each would need the virtual tokens in front of it), a P-tuning template's tokens after the prompt
    with text rows or a flash-attention model, and virtual tokens + data.max_len past the model's positions."""
    from tuneforge.methods import SOFT_PROMPTS
    from tuneforge.methods._soft_prompt import max_positions

    soft = [(i, m) for i, m in enumerate(cfg.method) if m.name in SOFT_PROMPTS]
    if not soft:
        return []
    out = []
    if cfg.data.packing:
        out.append(("data.packing", f"{soft[0][1].name} puts virtual tokens in front of each row; packed rows hold "
                                    "several examples in one row. Set data.packing: false"))
    from tuneforge.methods.p_tuning import configured_template

    template = configured_template(cfg.method)
    if template is not None and cfg.data.format == "text":
        i = next(i for i, m in soft if m.name == "p_tuning")
        out.append(("data.format", f"method[{i}].template {template.text!r} puts virtual tokens after the prompt; "
                                   "text rows have no prompt. Give prompt/completion or messages rows, or keep the "
                                   "template's tokens in front of {prompt}"))
    attn = str(cfg.model.attn_implementation or "")
    if template is not None and "flash" in attn:  # the model is not loaded yet: the config says what it will run
        i = next(i for i, m in soft if m.name == "p_tuning")
        out.append(("model.attn_implementation", f"method[{i}].template {template.text!r} puts virtual tokens "
                    f"after the prompt, which {attn} cannot run (it unpads rows on the attention mask, where rows "
                    "without the adapter hide the template's slots); use sdpa or eager, or keep the template's "
                    "tokens in front of {prompt}"))
    n = sum(m.num_virtual_tokens for _, m in soft)
    limit = max_positions(model)
    if limit and n + cfg.data.max_len > limit:
        i = soft[0][0]
        out.append((f"method[{i}].num_virtual_tokens", f"{n} virtual tokens + data.max_len {cfg.data.max_len} = "
                    f"{n + cfg.data.max_len} positions, but the model has {limit}; lower data.max_len to "
                    f"{max(1, limit - n)} or use fewer virtual tokens"))
    return out


def validate(cfg: RunConfig) -> None:
    """Everything but training: targets against the real architecture, and every data row."""
    tok = load_tokenizer(cfg.model)
    check_targets(cfg, tok)
    _datasets(cfg, tok)


class PackedView:
    """Bins of rows packed to ``max_len`` behave as dataset items; weights add up over the bin."""

    def __init__(self, ds, max_len: int):
        self.bins = pack_rows(ds.rows, max_len)
        self.ds = ds

    def __len__(self):
        return len(self.bins)

    def __getitem__(self, i):
        return self.bins[i]

    def n_supervised(self, i) -> int:
        return sum(sum(1 for x in r["labels"][1:] if x != -100) for r in self.bins[i])


def run_labels(cfg: RunConfig) -> list[str]:
    """A classification run's class names, in class-id order: ``algorithm.labels``, else the training file's. A
    checkpoint that is already a classifier keeps its own order when its classes are the data's (its head's rows
    are those classes); named classes that differ from the data's are refused rather than silently renamed."""
    import re

    from tuneforge.data.classification import read_labels
    from tuneforge.models.load import checkpoint_labels

    own = checkpoint_labels(cfg.model)
    named = own is not None and not all(re.fullmatch(r"LABEL_\d+", n) for n in own)
    labels = cfg.algorithm.labels
    if labels is not None:
        if named and set(own) == set(labels) and own != labels:
            raise ConfigError([("algorithm.labels", f"{cfg.model.path} classifies {own} in that order; give "
                                                    "algorithm.labels in the same order (its head's rows are those "
                                                    "classes)")], "config")
        return labels
    found = read_labels(cfg.data.train)
    if named and set(own) == set(found):
        return own
    if named:
        raise ConfigError([("algorithm.labels", f"{cfg.model.path} is a classifier of {own}, but {cfg.data.train} "
                                                f"has the labels {found}; set algorithm.labels to map them, or "
                                                "start from its base model")], "config")
    return found


def _classification_datasets(cfg: RunConfig, tok):
    """Train and held-out classification rows, both mapped through one label set (the config's or the training
    file's)."""
    from tuneforge.data.classification import build_classification_dataset
    from tuneforge.data.report import DataError

    d = cfg.data
    if d.packing:
        raise ConfigError([("data.packing", "classification reads one text per row; set packing: false")], "config")
    labels = run_labels(cfg)
    if len(labels) < 2:
        raise DataError(f"{d.train}: classification needs at least two classes, the file has "
                        f"{len(labels)} ({', '.join(labels) or 'none'})")
    kw = dict(labels=labels, max_len=d.max_len, truncation=d.truncation, skip_bad_rows=d.skip_bad_rows)
    train_ds = build_classification_dataset(d.train, tok, **kw)
    eval_ds = build_classification_dataset(d.eval, tok, **kw) if d.eval else None
    if eval_ds is None and d.eval_fraction > 0:
        train_ds, eval_ds = train_ds.split(d.eval_fraction, seed=cfg.train.seed)
    return train_ds, eval_ds


def _refuse_classification_rows(cfg: RunConfig) -> None:
    """Rows with a label (and a text) given to a generative algorithm: most likely meant for classification."""
    from tuneforge.data.classification import is_classification_row
    from tuneforge.data.readers import iter_raw_rows

    if cfg.data.format != "auto":
        return
    first = next((r for r in iter_raw_rows(cfg.data.train) if r.value is not None), None)
    if first is not None and is_classification_row(first.value):
        raise ConfigError([("data.train", f"{cfg.data.train}:{first.line}: classification rows (a text and a "
                                          f"label), but algorithm {cfg.algorithm.name!r} trains a generative model "
                                          "on text; use algorithm: classification (or give data.format)")], "config")


def _datasets(cfg: RunConfig, tok):
    from tuneforge.methods.p_tuning import configured_template

    if cfg.algorithm.name == "classification":
        return _classification_datasets(cfg, tok)
    _refuse_classification_rows(cfg)
    d = cfg.data
    kw = dict(format=d.format, max_len=d.max_len, truncation=d.truncation, skip_bad_rows=d.skip_bad_rows,
              template=configured_template(cfg.method))  # a P-tuning template's slots go in every prompt
    train_ds = build_dataset(d.train, tok, **kw)
    wanted = ALGORITHMS[cfg.algorithm.name].DATA_FORMATS
    if train_ds.report.format not in wanted:
        raise ConfigError([("data.train", f"{d.train} has {train_ds.report.format!r} rows, but algorithm "
                                          f"{cfg.algorithm.name!r} trains on {' / '.join(wanted)} rows")], "config")
    eval_ds = build_dataset(d.eval, tok, **kw) if d.eval else None
    if eval_ds is None and d.eval_fraction > 0:
        train_ds, eval_ds = train_ds.split(d.eval_fraction, seed=cfg.train.seed)
    return train_ds, eval_ds


def _check_seq2seq_rows(cfg: RunConfig, train_ds, eval_ds) -> None:
    """An encoder-decoder reads each row's prompt with its encoder: prompt/completion or preference rows, each with
    a prompt left after truncation (checked before any step, so a run never fails half-way on a row)."""
    for key, ds in (("data.train", train_ds), ("data.eval", eval_ds)):
        if ds is None:
            continue
        if ds.report.format not in SEQ2SEQ_FORMATS:
            raise ConfigError([(key, f"{ds.path} has {ds.report.format!r} rows; an encoder-decoder trains on "
                                     "prompt/completion rows (the prompt is its encoder's input) or preference rows")],
                              "config")
        empty = [r["line"] for r in ds.rows if r["labels"][0] != -100]
        if empty:
            raise ConfigError([(key, f"{ds.path}: {len(empty)} row(s) have no prompt tokens left for the encoder "
                                     f"(lines {', '.join(map(str, empty[:10]))}); give them a prompt, or use "
                                     "truncation: right so prompts are kept")], "config")


def _collate_fn(cfg: RunConfig, tok, fmt: str | None = None, model=None):
    """How micro-batches are built; for an encoder-decoder ``model``, split into encoder and decoder parts
    (``data/seq2seq.py``)."""
    base = _decoder_collate_fn(cfg, tok, fmt)
    if model is None or not is_encoder_decoder(model):
        return base
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    start = start_token(model, tok)
    return lambda rows: seq2seq_batch(base(rows), start, pad)


def _decoder_collate_fn(cfg: RunConfig, tok, fmt: str | None = None):
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if fmt == "classification":
        from tuneforge.data.classification import collate_classification

        return lambda rows: collate_classification(rows, pad)
    if fmt == "preference":
        return lambda rows: collate_preference(rows, pad)
    if cfg.data.packing:
        return lambda bins: collate_packed(bins, pad)
    return lambda rows: collate(rows, pad)


def train(cfg: RunConfig, resume: str | None = None, allow_config_change: bool = False, hooks: dict | None = None,
          extra_eval=None) -> TrainOutput:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with ``cfg.method`` and ``cfg.algorithm``; returns where it saved."""
    d = D.init()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    tok = load_tokenizer(cfg.model)
    check_targets(cfg, tok)
    train_ds, eval_ds = _datasets(cfg, tok)
    if d.main:
        print(train_ds.report.summary(), flush=True)
    seed_everything(cfg.train.seed)  # (a new classification head is drawn from it)
    model, tok = load_model(cfg.model, labels=getattr(train_ds, "labels", None))
    apply_methods(model, cfg.method, tokenizer=tok)
    model.to(d.device)
    share_prompts(model, cfg.train.share_prompts)
    if is_encoder_decoder(model):
        _check_seq2seq_rows(cfg, train_ds, eval_ds)
    coll = _collate_fn(cfg, tok, train_ds.report.format, model)
    plain = _collate_fn(cfg, tok, None, model) if is_encoder_decoder(model) else (lambda rows: collate(rows, pad))
    data = PackedView(train_ds, cfg.data.max_len) if cfg.data.packing else train_ds
    algo, algo_state = ALGORITHMS[cfg.algorithm.name], {"tokenizer": tok, "data_path": cfg.data.train}
    if dropout_disabled(cfg.train.disable_dropout, algo):  # after the methods: their own dropout goes too
        disable_dropout(model)
    if hasattr(algo, "prepare"):  # before resume loads trained weights: DPO's reference is the starting model
        algo.prepare(model, cfg.algorithm, algo_state)  # (and before the loop collects the trainable parameters)
    prepare_methods(model, cfg.method, lambda: _calibration_losses(model, cfg, data, coll, d.device, algo_state))
    adapters_only = not any(m.name in WHOLE_MODEL_METHODS for m in cfg.method)
    if cfg.train.frozen_bf16 and adapters_only and resolve_precision(cfg.train.precision, d.device) == "bf16":
        cast_frozen_matmul_weights_(model)  # the base is not saved, so its fp32 copy has no further use
    if hasattr(algo, "precompute"):  # e.g. DPO's precomputed reference log-probs, from the starting weights
        with autocast_context(resolve_precision(cfg.train.precision, d.device), d.device):
            algo.precompute(model, cfg.algorithm, algo_state, data, coll, cfg.train.batch_size)
    out = Path(cfg.train.output_dir)
    resume_path = _resume_path(resume, out / "checkpoints")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def eval_fn(m):
        res = {}
        if eval_ds is not None and hasattr(algo, "evaluate"):  # the algorithm's own held-out metrics
            res.update(algo.evaluate(m, eval_ds, coll, cfg.train.batch_size, d.device))
        elif eval_ds is not None:
            r = eval_loss(m, eval_ds, plain, cfg.train.batch_size, d.device)
            res.update(loss=r["loss"], ppl=r["ppl"])
        if extra_eval is not None:
            res.update(extra_eval(m, tok))
        return res

    has_eval = eval_ds is not None or extra_eval is not None
    if d.main:
        _write_run_files(out, cfg, model)
    loop = Loop(model, algo, cfg.algorithm, data, cfg.train, out, coll, dist=d, algo_state=algo_state,
                eval_fn=eval_fn if has_eval else None, meta={"config_hash": cfg.hash(), "config": cfg.trajectory(), "tuneforge": __version__},
                hooks=hooks, regularizer=(lambda m: regularizer(m, cfg.method)) if has_regularizer(cfg.method) else None,
                on_step=(lambda m, s, t: step_methods(m, cfg.method, s, t)) if has_step_hook(cfg.method) else None)
    result = loop.run(resume_path, allow_config_change)
    finalize_methods(model, cfg.method)
    saved = _save_final(model, tok, cfg, out) if d.main else None
    if d.main:
        _plot_loss(result.history, out / "loss.png")
    D.barrier(d)
    return TrainOutput(out, saved, result)


def _calibration_losses(model, cfg: RunConfig, data, coll, device, algo_state: dict):
    """The algorithm's loss on the first training batches in dataset order (the same on every rank), for methods
    that choose what to train from gradients (sparse fine-tuning's Fisher selection)."""
    from tuneforge.train.loop import StepContext

    algo, bs = ALGORITHMS[cfg.algorithm.name], cfg.train.batch_size
    state: dict = dict(algo_state)  # one algorithm state for the whole pass (DPO builds its reference once)
    model.eval()  # no dropout: the selection must not depend on the noise
    try:
        for start in range(0, len(data), bs):
            rows = list(range(start, min(start + bs, len(data))))
            ctx = StepContext(normaliser=0.0, step=0, algo_state=state, seed=cfg.train.seed, micro_batch=bs)
            if hasattr(algo, "make_experience"):  # online: score the policy's own rollouts of these prompts
                exp = algo.make_experience(model, [data[i] for i in rows], cfg.algorithm, ctx)
                ctx.normaliser = exp.weights[0] if exp.weights else 1.0
                for batch in (exp.updates[0] if exp.updates else []):
                    yield algo.step(model, batch, cfg.algorithm, ctx)[0]
                continue
            batch = {k: v.to(device) for k, v in coll([data[i] for i in rows]).items()}
            weight = getattr(algo, "row_weight", None)
            ctx.normaliser = float(sum(weight(data, i) for i in rows)) if weight else float(len(rows))
            yield algo.step(model, batch, cfg.algorithm, ctx)[0]
    finally:
        model.train()


def _resume_path(resume: str | None, root: Path) -> Path | None:
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        found = ckpt.latest_checkpoint(root)
        if found is None and D.init().main:
            print(f"--resume auto: no checkpoint in {root}; starting from step 0", flush=True)
        return found
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
    return path


def _write_run_files(out: Path, cfg: RunConfig, model) -> None:
    out.mkdir(parents=True, exist_ok=True)
    trainable, total = count_parameters(model)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    (out / "run.json").write_text(json.dumps({"tuneforge": __version__, "torch": torch.__version__,
                                              "trainable_params": trainable, "total_params": total,
                                              "config_hash": cfg.hash()}, indent=2))


def base_model_reference(mcfg) -> str:
    """What an adapter's ``base_model_name_or_path`` records: a preset or packaged name as written, a GGUF file
    (a folder plus ``gguf_file``: the file itself) or a folder as an absolute path."""
    from tuneforge.models.gguf import is_packaged

    if mcfg.path.startswith("tiny:") or is_packaged(mcfg.path):
        return mcfg.path
    path = os.path.join(mcfg.path, mcfg.gguf_file) if mcfg.gguf_file else mcfg.path
    return os.path.abspath(path)


def _save_final(model, tok, cfg: RunConfig, out: Path) -> Path:
    """Adapter methods -> ``adapter/`` (PEFT layout where PEFT has the method); full/freeze -> ``model/``."""
    whole = all(m.name in WHOLE_MODEL_METHODS for m in cfg.method)
    final = out / ("model" if whole else "adapter")
    tmp = out / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if whole:
        heads = {n: model._modules.pop(n) for n in ("reward_head", "value_head") if n in model._modules}
        try:  # the reward head is saved on its own below, not as an unknown HF weight; PPO's critic is not kept
            with config_dropout_restored(model):  # the model's own dropout rates, not the training run's zeros
                model.save_pretrained(tmp, safe_serialization=True)
        finally:
            for n, h in heads.items():
                setattr(model, n, h)
    else:
        heads = task_head_names(model) if cfg.algorithm.name == "classification" else None
        save_adapter(model, cfg.method, tmp, base_path=base_model_reference(cfg.model), modules_to_save=heads)
    if cfg.algorithm.name == "classification":
        save_labels(model, tmp)
    tok.save_pretrained(tmp)
    from tuneforge.algorithms.reward import has_head, save_head

    if has_head(model) and cfg.algorithm.name == "reward":
        save_head(model, tmp)
    share_like_open(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    return final


def _plot_loss(history: list[dict], path: Path) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1)
    ev = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
