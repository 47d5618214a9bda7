"""What commands that train one recipe many times share (``intrinsic-dim``, ``compare``): a variant of the recipe
with another method, output folder or learning rate, and the held-out metric of what a run saved.

Held-out metrics are a registry (``METRICS``, a plain dict): each entry says how to compute the metric on a loaded
model, whether higher is better, and whether a recipe's ``data.eval`` file supports it. ``pick_metric`` takes the
first entry, in dict order, that the file supports, so a more specific metric (exact match needs reference answers)
comes before the one every file supports (held-out loss). Adding a metric is one function and one dict entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tuneforge.config import ModelConfig, RunConfig

EXACT_MATCH_NEW_TOKENS = 32


@dataclass(frozen=True)
class Metric:
    compute: Callable  # (model, tokenizer, cfg) -> float, on cfg.data.eval
    higher_is_better: bool
    supports: Callable  # (cfg) -> bool: whether cfg.data.eval can be scored this way
    label: str  # what a report calls it
    percent: bool = False  # a share of rows, shown as a percentage


def _exact_match(model, tok, cfg: RunConfig) -> float:
    from tuneforge.eval.examples import answer_examples
    from tuneforge.eval.metrics import exact_match

    examples = answer_examples(cfg.data.eval)
    return exact_match(model, tok, examples, max_new_tokens=EXACT_MATCH_NEW_TOKENS)["exact_match"]


def _has_answers(cfg: RunConfig) -> bool:
    """Whether the eval file has rows with a reference answer (prompt/completion, or chat rows ending in one)."""
    from tuneforge.data import DataError
    from tuneforge.eval.examples import answer_examples

    try:
        return bool(cfg.data.eval) and bool(answer_examples(cfg.data.eval))
    except DataError:
        return False


def _loss(model, tok, cfg: RunConfig) -> float:
    from tuneforge.data import build_dataset, collate
    from tuneforge.eval.metrics import eval_loss
    from tuneforge.methods.p_tuning import configured_template

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ds = build_dataset(cfg.data.eval, tok, max_len=cfg.data.max_len, template=configured_template(cfg.method))
    coll = lambda rows: collate(rows, pad)  # noqa: E731
    if getattr(model.config, "is_encoder_decoder", False):  # prompt -> encoder, completion -> decoder
        from tuneforge.data.seq2seq import seq2seq_batch, start_token

        coll = lambda rows: seq2seq_batch(collate(rows, pad), start_token(model, tok), pad)  # noqa: E731
    return eval_loss(model, ds, coll, cfg.train.batch_size)["loss"]


def _eval_format(cfg: RunConfig) -> str | None:
    """The eval file's row format: the recipe's ``data.format``, else the first row's."""
    from tuneforge.data import DataError
    from tuneforge.data.readers import iter_raw_rows
    from tuneforge.data.schema import detect_format

    if cfg.data.format != "auto":
        return cfg.data.format
    try:
        return next((detect_format(r.value) for r in iter_raw_rows(cfg.data.eval) if isinstance(r.value, dict)),
                    None)
    except DataError:
        return None


def _preference_accuracy(model, tok, cfg: RunConfig) -> float:
    from tuneforge.data import build_dataset
    from tuneforge.eval.metrics import preference_accuracy

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ds = build_dataset(cfg.data.eval, tok, max_len=cfg.data.max_len)
    return preference_accuracy(model, ds, pad, cfg.train.batch_size)["preference_accuracy"]


def _has_token_loss(cfg: RunConfig) -> bool:
    return bool(cfg.data.eval) and _eval_format(cfg) != "preference"


def _classification(cfg: RunConfig) -> bool:
    return cfg.algorithm.name == "classification" and bool(cfg.data.eval)


def _classification_metric(name: str):
    """Held-out accuracy or macro-F1 of a classifier on the eval file's labelled rows."""
    def compute(model, tok, cfg: RunConfig) -> float:
        from tuneforge.eval.classify import classify_file

        return classify_file(model, tok, cfg.data.eval, cfg.train.batch_size, cfg.data.max_len)[1][name]
    return compute


METRICS: dict[str, Metric] = {
    "accuracy": Metric(_classification_metric("accuracy"), True, _classification, "held-out accuracy", True),
    "macro_f1": Metric(_classification_metric("macro_f1"), True, _classification, "held-out macro-F1", True),
    "exact_match": Metric(_exact_match, True, _has_answers, "held-out exact match (greedy answers)", True),
    "preference_accuracy": Metric(_preference_accuracy, True, lambda cfg: bool(cfg.data.eval) and
                                  _eval_format(cfg) == "preference",
                                  "held-out preference accuracy (chosen above rejected)", True),
    "loss": Metric(_loss, False, _has_token_loss, "held-out loss"),
}


def pick_metric(cfg: RunConfig) -> str | None:
    """The first registered metric the recipe's eval file supports (None: none does)."""
    return next((name for name, m in METRICS.items() if m.supports(cfg)), None)


def load_saved(cfg: RunConfig, saved: Path | None):
    """The recipe's model with ``saved`` on it: the base model (None), an adapter directory or a saved full model."""
    from tuneforge.methods import load_adapter
    from tuneforge.models.load import load_model

    from tuneforge.models.labels import adapter_labels

    whole = saved is not None and not (Path(saved) / "adapter_config.json").exists()
    mcfg = ModelConfig(**{**cfg.model.model_dump(), "path": str(saved), "gguf_file": None}) if whole else cfg.model
    labels = adapter_labels(saved) if saved is not None and not whole else None  # a classifier adapter's classes
    if labels is None and saved is None and cfg.algorithm.name == "classification":
        from tuneforge.data.classification import read_labels as file_labels

        labels = cfg.algorithm.labels or file_labels(cfg.data.train)  # the untrained model: a new head
    model, tok = load_model(mcfg, labels=labels)
    if saved is not None and not whole:
        load_adapter(model, saved)
    model.eval()
    return model, tok


def score_all(cfg: RunConfig, saved: Path | None, metrics: list[str], extra: tuple[str, ...] = ()) -> dict:
    """Several metrics of one saved run, loading the model once. ``extra`` metrics are side information (a
    tie-break): one the eval file does not support, or that fails on it, is NaN instead of an error."""
    model, tok = load_saved(cfg, saved)
    out = {name: float(METRICS[name].compute(model, tok, cfg)) for name in metrics}
    for name in extra:
        try:
            out[name] = float(METRICS[name].compute(model, tok, cfg)) if METRICS[name].supports(cfg) else math.nan
        except Exception:  # noqa: BLE001 - side information only; the run's own metric above did not fail
            out[name] = math.nan
    return out


def score(cfg: RunConfig, saved: Path | None, metric: str) -> float:
    return score_all(cfg, saved, [metric])[metric]


def variant(cfg: RunConfig, method: list[dict], out: Path, lr: float | None = None, **train) -> RunConfig:
    """The recipe with another method list, output folder and (optionally) learning rate or train settings;
    no periodic checkpoints unless ``train`` asks for them."""
    d = cfg.model_dump(mode="json")
    d["method"] = method
    d["train"]["output_dir"] = str(out)
    d["train"]["save_every"] = 0
    d["train"].update(train)
    if lr is not None:
        d["train"]["learning_rate"] = lr
    return RunConfig.model_validate(d)


def better(a: float, b: float, metric: str) -> bool:
    """Whether metric value ``a`` beats ``b``; a diverged run's NaN or inf loses to any finite value, so the order
    of the runs compared cannot decide the result."""
    if not math.isfinite(a):
        return False
    if not math.isfinite(b):
        return True
    return a > b if METRICS[metric].higher_is_better else a < b


def finite(v: float | None) -> float | None:
    """JSON has no NaN: a diverged run's metric is written as null."""
    return v if v is not None and math.isfinite(v) else None
