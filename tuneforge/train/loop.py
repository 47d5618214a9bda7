"""The training loop: the one place for accumulation, normalisation, clipping, precision, logging, checkpointing,
the non-finite guard and data parallelism. It knows nothing about any algorithm: it asks the algorithm module for
``row_weight`` (to build the step's normaliser) and ``step`` (the loss of one micro-batch).

One optimizer step = one global batch of ``batch_size x grad_accum x world`` rows. The normaliser (e.g. supervised
tokens) is summed over the whole global batch *before* the first forward, so every micro-batch loss is already
divided by the step total; summing gradients over micro-batches and ranks then gives exactly the full-batch mean.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tuneforge.train import checkpoint as ckpt
from tuneforge.train import dist as D
from tuneforge.train.log import RunLogger
from tuneforge.train.precision import autocast_context, resolve_precision
from tuneforge.train.optim import lr_factor, make_optimizer, set_lr, warmup_steps
from tuneforge.train.sampler import GlobalOrder, Position, micro_batches, row_length


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (non-finite values); the message says where and what was kept."""


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    offset: int = 0
    skipped_steps: int = 0
    bad_streak: int = 0
    tokens: int = 0


@dataclass
class StepContext:
    """What an algorithm's ``step`` (and an online algorithm's ``make_experience``) may use besides the batch."""

    normaliser: float
    step: int
    algo_state: dict = field(default_factory=dict)
    seed: int = 0
    micro_batch: int = 1
    dist: D.Dist = field(default_factory=D.Dist)


@dataclass
class Experience:
    """What an online algorithm's ``make_experience`` returns for one loop step (one batch of prompts).

    ``updates``: optimizer updates to run on this experience, each a list of micro-batches (dicts of tensors on the
    device) for the algorithm's ``step`` -- PPO runs several epochs of minibatches over one rollout batch.
    ``weights``: per update, this process's share of the update's normaliser (responses, tokens...); the loop sums
    it over processes so every micro-batch loss is divided by the global total. ``metrics``: sums over this
    process's ``samples`` rollouts (mean reward, KL, ...); the loop divides the global sums by the global count.
    """

    updates: list[list[dict]]
    weights: list[float]
    metrics: dict = field(default_factory=dict)
    samples: int = 0


@dataclass
class LoopResult:
    state: LoopState
    history: list[dict]
    checkpoint: Path | None


def total_steps(tcfg, order: GlobalOrder) -> int:
    return tcfg.max_steps or max(1, math.ceil(tcfg.epochs * order.steps_per_epoch))


class Loop:
    """Holds what one run needs; ``run()`` trains. Hooks (for tests and callers): ``after_backward(loop)``, ``after_clip(loop)``."""

    def __init__(self, model, algorithm, algo_cfg, train_ds, tcfg, out_dir, collate: Callable, *,
                 dist: D.Dist = D.Dist(), eval_fn: Callable | None = None, meta: dict | None = None,
                 hooks: dict | None = None, regularizer: Callable | None = None, algo_state: dict | None = None,
                 on_step: Callable | None = None):
        self.model, self.algo, self.algo_cfg, self.ds, self.tcfg = model, algorithm, algo_cfg, train_ds, tcfg
        self.out, self.collate, self.dist, self.eval_fn = Path(out_dir), collate, dist, eval_fn
        self.meta, self.hooks = dict(meta or {}), hooks or {}
        self.regularizer = regularizer  # a method's penalty (diff pruning's L0), once per optimizer step
        self.on_step = on_step  # (model, step, total) before each step: a method's schedule (diff pruning's projection)
        self.algo_state = {} if algo_state is None else algo_state  # kept across steps (DPO's reference, ...)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.opt = make_optimizer(self.params, tcfg, model)  # the methods decide which tensors decay
        lengths = [row_length(train_ds[i]) for i in range(len(train_ds))] if tcfg.group_by_length else None
        self.order = GlobalOrder(len(train_ds), tcfg.batch_size * tcfg.grad_accum * dist.world, tcfg.seed,
                                 lengths=lengths)
        self.total = total_steps(tcfg, self.order)
        self.warmup = warmup_steps(tcfg, self.total)
        self.precision = resolve_precision(tcfg.precision, dist.device)
        self.state = LoopState()
        self.ckpt_root = self.out / "checkpoints"

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        path = None
        rngs = D.all_gather_object(ckpt.capture_rng(), self.dist)  # every process's generators, for exact resume
        if self.dist.main:
            model_t = {n: p.detach().cpu() for n, p in self.params.items()}
            opt_t, opt_info = ckpt.optimizer_to_tensors(self.opt)
            rng_t, rng_info = ckpt.ranks_rng_to_tensors(rngs)
            state = {"loop": asdict(self.state), "optimizer": opt_info, "rng": rng_info}
            meta = {**self.meta, "seed": self.tcfg.seed, "world_size": self.dist.world}
            path = ckpt.save_checkpoint(self.ckpt_root, self.state.step, {"model": model_t, "optimizer": opt_t,
                                                                          "rng": rng_t}, state, meta,
                                        keep_last=self.tcfg.keep_last)
        D.barrier(self.dist)
        return path

    def resume(self, path: Path, allow_config_change: bool = False) -> None:
        tensors, state, manifest = ckpt.load_checkpoint(path, self.meta.get("config_hash"), allow_config_change,
                                                          self.meta.get("config"))
        world = manifest.get("world_size") or self.dist.world
        if world != self.dist.world:
            raise ckpt.CheckpointError(
                f"{path} was written by {world} process(es), this run has {self.dist.world}; the per-rank "
                "micro-batch split would change the arithmetic, so tuneforge refuses rather than continue inexactly")
        with torch.no_grad():
            for n, p in self.params.items():
                if n not in tensors["model"]:
                    raise ckpt.CheckpointError(f"{path}: model.safetensors lacks trainable tensor {n}")
                p.copy_(tensors["model"][n])
        ckpt.optimizer_from_tensors(self.opt, tensors["optimizer"], state["optimizer"])
        ckpt.restore_rng(*ckpt.rank_rng(tensors["rng"], state["rng"], self.dist.rank))
        self.state = LoopState(**state["loop"])
        if self.dist.main:  # which checkpoint, so a user of --resume auto knows where the run picked up
            print(f"resuming from {path} (step {self.state.step} of {self.total}, epoch {self.state.epoch})",
                  flush=True)

    # ---------------------------------------------------------------------------------------------- one step
    def _normaliser(self, rows: list[int]) -> float:
        weight = getattr(self.algo, "row_weight", None)
        return float(sum(weight(self.ds, i) for i in rows)) if weight else float(len(rows))

    def _context(self, norm: float) -> StepContext:
        return StepContext(normaliser=norm, step=self.state.step, algo_state=self.algo_state, seed=self.tcfg.seed,
                           micro_batch=self.tcfg.batch_size, dist=self.dist)

    def _micro_batches(self, rows: list[int]):
        for ids in micro_batches(rows, self.tcfg.batch_size, self.dist.rank, self.dist.world):
            yield {k: v.to(self.dist.device) for k, v in self.collate([self.ds[i] for i in ids]).items()}

    def _forward_backward(self, batches, norm: float) -> tuple[float, dict]:
        loss_sum, metrics = 0.0, {}
        ctx = self._context(norm)
        for batch in batches:
            with autocast_context(self.precision, self.dist.device):
                loss, m = self.algo.step(self.model, batch, self.algo_cfg, ctx)
            loss.backward()
            loss_sum += float(loss.detach())
            mask = batch.get("attention_mask")
            m["input_tokens"] = int(mask.sum()) if mask is not None and mask.dim() == 2 else batch["input_ids"].numel()
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0) + v
        if self.regularizer is not None:  # gradients are summed over ranks, so only rank 0 adds it
            reg = self.regularizer(self.model) if self.dist.main else None
            if reg is not None:
                reg.backward()
                loss_sum += float(reg.detach())
            metrics["regularizer"] = float(reg.detach()) if reg is not None else 0.0
        return loss_sum, metrics

    def _grad_norm(self) -> float:
        params = [p for p in self.params.values() if p.grad is not None]
        if not params:
            return 0.0
        clip = self.tcfg.max_grad_norm if self.tcfg.max_grad_norm else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, clip, foreach=True))

    def _first_bad_param(self) -> str:
        for n, p in self.params.items():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return n
        return "(no gradient is non-finite; the loss is)"

    def _handle_nonfinite(self, loss: float, rows: list[int]) -> bool:
        """Apply ``nan_policy``; return True when the optimizer step must be skipped."""
        policy = self.tcfg.nan_policy
        where = (f"step {self.state.step + 1}: loss {loss}, first non-finite gradient in {self._first_bad_param()}; "
                 f"batch rows {rows[:32]}{' ...' if len(rows) > 32 else ''}")
        if policy == "ignore":
            return False
        if policy == "raise":
            raise TrainingAborted(f"non-finite values at {where} (nan_policy=raise)")
        self.state.skipped_steps += 1
        self.state.bad_streak += 1
        self.logger.message(f"skipping optimizer step: non-finite values at {where}")
        if self.state.bad_streak >= self.tcfg.max_bad_steps:
            self.state.step += 1
            path = self.save()
            raise TrainingAborted(f"{self.state.bad_streak} consecutive non-finite steps, last at {where}. "
                                  f"The last good weights are saved in {path}.")
        return True

    def train_step(self, rows: list[int]) -> dict:
        t0 = time.perf_counter()
        if self.on_step is not None:
            self.on_step(self.model, self.state.step, self.total)
        set_lr(self.opt, self.tcfg.learning_rate * lr_factor(self.state.step, self.total, self.warmup,
                                                             self.tcfg.scheduler, self.tcfg.min_lr_ratio))
        if hasattr(self.algo, "make_experience"):
            loss, metrics, gnorm = self._online_updates(rows)
        else:
            loss, metrics = self._forward_backward(self._micro_batches(rows), self._normaliser(rows))
            loss, metrics, gnorm = self._apply_update(loss, metrics, rows)
        self.state.step += 1
        tokens = int(metrics.pop("input_tokens", 0))
        self.state.tokens += tokens
        dt = time.perf_counter() - t0
        return {"step": self.state.step, "loss": loss, "lr": self.opt.param_groups[0]["lr"], "grad_norm": gnorm,
                "epoch": self.state.epoch, **{k: (int(v) if float(v).is_integer() else v) for k, v in metrics.items()},
                "tokens_per_s": round(tokens / dt, 1), "step_s": round(dt, 4),
                "skipped_steps": self.state.skipped_steps}

    def _online_updates(self, rows: list[int]) -> tuple[float, dict, float]:
        """Online algorithms: roll out on this step's prompts, then run the experience's optimizer updates.
        Checkpoints fall between loop steps, so no rollout buffer outlives a step: resuming replays none."""
        mine = [i for ids in micro_batches(rows, self.tcfg.batch_size, self.dist.rank, self.dist.world) for i in ids]
        self.model.eval()
        try:
            with autocast_context(self.precision, self.dist.device):
                exp = self.algo.make_experience(self.model, [self.ds[i] for i in mine], self.algo_cfg,
                                                self._context(0.0))
        finally:
            self.model.train()
        keys = sorted(exp.metrics)
        sums = D.all_reduce_sum_(torch.tensor([float(exp.samples)] + [float(exp.metrics[k]) for k in keys] +
                                              [float(w) for w in exp.weights], dtype=torch.float64), self.dist)
        n = max(float(sums[0]), 1.0)
        out = {k: float(v) / n for k, v in zip(keys, sums[1:1 + len(keys)].tolist())}
        norms = sums[1 + len(keys):].tolist()
        losses, gnorm, tokens, per_update = [], 0.0, 0, {}
        for batches, norm in zip(exp.updates, norms):
            if norm == 0:  # no token of this update on any process (the sum is global, so all skip alike): no step,
                continue  # as AdamW's momentum and decay would still move weights on an all-zero gradient
            loss, metrics = self._forward_backward(batches, norm)
            # a process whose share of this update is empty (every sample skipped) still joins the collectives
            metrics = {k: metrics.get(k, 0) for k in D.union_keys(metrics, self.dist)}
            loss, metrics, gnorm = self._apply_update(loss, metrics, rows)
            losses.append(loss)
            tokens += int(metrics.pop("input_tokens", 0))
            for k, v in metrics.items():
                per_update[k] = per_update.get(k, 0.0) + v
        # per-update metrics (PPO's policy/value loss...) averaged over the updates that stepped, as the loss is
        out.update({k: v / max(len(losses), 1) for k, v in per_update.items()})
        out.update(samples=int(sums[0]), updates=len(losses), input_tokens=tokens)
        return (sum(losses) / len(losses) if losses else 0.0), out, gnorm

    def _apply_update(self, loss: float, metrics: dict, rows: list[int]) -> tuple[float, dict, float]:
        """Sum gradients and metrics over processes, clip, guard against non-finite values, step the optimizer."""
        if "after_backward" in self.hooks:
            self.hooks["after_backward"](self)
        D.all_reduce_grads_(list(self.params.values()), self.dist)
        sums = D.all_reduce_sum_(torch.tensor([loss] + list(metrics.values()), dtype=torch.float64), self.dist)
        loss, metrics = float(sums[0]), dict(zip(metrics, sums[1:].tolist()))
        gnorm = self._grad_norm()
        if "after_clip" in self.hooks:
            self.hooks["after_clip"](self)
        skip = not (math.isfinite(loss) and math.isfinite(gnorm)) and self._handle_nonfinite(loss, rows)
        if not skip:
            self.opt.step()
            self.state.bad_streak = 0
        self.opt.zero_grad(set_to_none=True)
        return loss, metrics, gnorm

    # ----------------------------------------------------------------------------------------------- the run
    def run(self, resume: Path | None = None, allow_config_change: bool = False) -> LoopResult:
        if self.dist.main:
            ckpt.clean_stale(self.ckpt_root)
        if resume is not None:
            self.resume(resume, allow_config_change)
        self.logger = RunLogger(self.out, self.total, self.state.step, self.dist.main, self.tcfg.tensorboard,
                                self.tcfg.progress)
        history, last_ckpt, saved_at = [], None, None
        self.model.train()
        try:
            while self.state.step < self.total:
                rows, pos = self.order.next(Position(self.state.epoch, self.state.offset))
                self.state.epoch, self.state.offset = pos.epoch, pos.offset
                record = self.train_step(rows)
                self.logger.ledger(record["step"], rows)
                self._periodic(record)
                self.logger.log(record, show=record["step"] % self.tcfg.log_every == 0 or
                                record["step"] == self.total)
                history.append(record)
                if self.tcfg.save_every and self.state.step % self.tcfg.save_every == 0:
                    last_ckpt, saved_at = self.save(), self.state.step
            if saved_at != self.state.step:  # decided from state every rank shares: save() holds a barrier
                last_ckpt = self.save()
        finally:
            self.logger.close()
        return LoopResult(self.state, history, last_ckpt)

    def _periodic(self, record: dict) -> None:
        every = self.tcfg.eval_every
        if self.eval_fn is not None and every and (record["step"] % every == 0 or record["step"] == self.total):
            self.model.eval()
            with torch.no_grad(), autocast_context(self.precision, self.dist.device):
                record.update({f"eval_{k}": v for k, v in self.eval_fn(self.model).items()})
            self.model.train()
