"""Crash-safe training checkpoints: safetensors + JSON only, never pickle.

Layout: ``root/step-00000123/`` holds ``<group>.safetensors`` files, ``state.json``
(loop state), ``manifest.json`` (step, seed, world size, config hash, versions,
sha256 + size of every file) and ``COMPLETE`` (written last, holds the
manifest's sha256).

Why: a checkpoint is assembled in ``root/.tmp-step-...-<pid>/`` and renamed
into place only after every file is fsynced, so a crash at any byte leaves the
old checkpoints (plus at most one complete new one), never a half-written
``step-*`` that resume could pick.  The hashes catch silent corruption at load
time and name the bad file.  Pruning never deletes the newest complete
checkpoint, the one just written, or incomplete directories it did not create.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import tuneforge
from tuneforge.safeio import (ChunkedHashWriter, fsync_dir, iter_safetensors_bytes, load_safetensors, replace_dir,
                              sha256_file)

__all__ = [
    "CheckpointError", "save_checkpoint", "list_checkpoints", "latest_checkpoint", "clean_stale",
    "load_checkpoint", "optimizer_to_tensors", "optimizer_from_tensors", "capture_rng", "restore_rng",
    "ranks_rng_to_tensors", "rank_rng",
]

FORMAT = "tuneforge-checkpoint"
FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
STATE = "state.json"
TMP_PREFIX = ".tmp-"
CHUNK_BYTES = 8 << 20  # write/hash granularity; also the fault_hook granularity
_STEP_RE = re.compile(r"^step-(\d+)$")
_GROUP_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_RESERVED_META = {"format", "format_version", "step", "files", "tuneforge_version", "torch_version"}

FaultHook = Callable[[str, int], None]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or failed verification on load."""


# ---- Writing ----


def step_dir_name(step: int) -> str:
    """Zero-padded so directory listings sort in step order for humans too."""
    return f"step-{step:08d}"


def _dump_json(obj, what: str, **kw) -> str:
    try:
        return json.dumps(obj, **kw)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint {what} must be JSON-serialisable: {exc}") from None


def _validate_save_args(step, tensors, meta, keep_last) -> None:
    """Reject caller mistakes before any byte hits the disk."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or int(keep_last) < 1):
        raise ValueError(f"keep_last must be >= 1 (or None to keep everything), got {keep_last!r}")
    for group, tdict in tensors.items():
        if not isinstance(group, str) or not _GROUP_RE.match(group):
            raise ValueError(f"invalid tensor group name {group!r} (letters, digits, '_', '.', '-')")
        if not isinstance(tdict, dict):
            raise TypeError(f"tensor group {group!r} must be a dict of tensors, got {type(tdict).__name__}")
    clash = _RESERVED_META & set(meta)
    if clash:
        raise ValueError(f"meta keys {sorted(clash)} are reserved for the manifest")
    _dump_json(meta, "meta")


def _build_manifest(step: int, meta: dict, files: dict) -> dict:
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
                "seed": None, "world_size": None, "config_hash": None}
    manifest.update(meta)
    manifest.update({"tuneforge_version": tuneforge.__version__, "torch_version": torch.__version__,
                     "files": files})
    return manifest


def _write_tmp(tmp: Path, step: int, tensors: dict, state_text: str, meta: dict, writer: ChunkedHashWriter) -> None:
    """Fill the temp dir; COMPLETE (holding the manifest hash) is the very last file."""
    if tmp.exists():  # a previous failed attempt of this very process
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    for group, tdict in tensors.items():
        name = f"{group}.safetensors"
        files[name] = writer.write_file(tmp / name, iter_safetensors_bytes(tdict, {"format": "pt"}))
    files[STATE] = writer.write_file(tmp / STATE, [state_text.encode("utf-8")])
    manifest = _dump_json(_build_manifest(step, meta, files), "manifest", indent=2, sort_keys=True)
    manifest_bytes = manifest.encode("utf-8")
    writer.write_file(tmp / MANIFEST, [manifest_bytes])
    marker = {"step": step, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}
    writer.write_file(tmp / COMPLETE, [json.dumps(marker).encode("utf-8")])
    fsync_dir(tmp)


def _publish(tmp: Path, final: Path, writer: ChunkedHashWriter) -> None:
    writer.event("rename")
    replace_dir(tmp, final)


def save_checkpoint(root, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, meta: dict,
                    keep_last: int = 2, fault_hook: FaultHook | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` crash-safely and prune old ones.

    ``fault_hook(stage, nbytes)`` is called before each file (stage = file
    name) and after every written chunk of ``CHUNK_BYTES``, with the running
    byte count of this checkpoint, then once with stage ``"rename"`` just
    before publishing.  Any ``OSError`` (full disk, ...) removes the temp dir
    and becomes a :class:`CheckpointError`; other ``Exception``s also clean
    up and propagate.  A ``BaseException`` that is not an ``Exception``
    (KeyboardInterrupt, a test's simulated crash) leaves the temp dir behind
    exactly like a killed process would, for :func:`clean_stale`.
    """
    root = Path(root)
    _validate_save_args(step, tensors, meta, keep_last)
    state_text = _dump_json(state, "state", indent=2)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    previous = latest_checkpoint(root)
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    writer = ChunkedHashWriter(fault_hook, CHUNK_BYTES)
    try:
        _write_tmp(tmp, step, tensors, state_text, meta, writer)
        _publish(tmp, final, writer)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, OSError):
            raise
        intact = f"the previous checkpoint {previous} is intact" if previous else "no previous checkpoint exists"
        raise CheckpointError(f"could not write checkpoint step {step} to {final}: {exc}; {intact}") from exc
    _prune(root, keep_last, just_written=final)
    return final


def _prune(root: Path, keep_last: int | None, just_written: Path) -> list[Path]:
    """Delete complete checkpoints beyond ``keep_last``, newest-by-step and just-written protected.

    Each victim is first renamed to a ``.tmp-`` name so a crash mid-delete
    leaves something :func:`clean_stale` removes, never a broken ``step-*``.
    Failures only warn: the new checkpoint is already safely on disk.
    """
    if keep_last is None:
        return []
    complete = list_checkpoints(root)
    protected = set(complete[-int(keep_last):]) | {just_written}
    removed = []
    for ckpt in complete:
        if ckpt in protected:
            continue
        doomed = ckpt.with_name(f"{TMP_PREFIX}prune-{ckpt.name}-{os.getpid()}")
        try:
            os.rename(ckpt, doomed)
            shutil.rmtree(doomed)
            removed.append(ckpt)
        except OSError as exc:
            warnings.warn(f"could not prune old checkpoint {ckpt}: {exc}", stacklevel=3)
    return removed


# ---- Discovery ----


def list_checkpoints(root) -> list[Path]:
    """Complete checkpoints (COMPLETE marker and manifest present), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_RE.match(entry.name)
        if match and entry.is_dir() and (entry / COMPLETE).is_file() and (entry / MANIFEST).is_file():
            found.append((int(match.group(1)), entry))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root) -> Path | None:
    complete = list_checkpoints(root)
    return complete[-1] if complete else None


def clean_stale(root) -> list[Path]:
    """Remove ``.tmp-*`` leftovers of crashed writers.

    Call at start-up, from the single writing process, before any save:
    it cannot tell a crashed writer's temp dir from a live one's.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for entry in sorted(root.iterdir()):
        if not entry.name.startswith(TMP_PREFIX):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    return removed


# ---- Loading and verification ----


def _read_manifest(path: Path) -> dict:
    """Read the manifest and check it against the hash stored in COMPLETE."""
    marker_path, manifest_path = path / COMPLETE, path / MANIFEST
    if not marker_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {COMPLETE} marker missing")
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        expected = marker["manifest_sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{marker_path}: {COMPLETE} marker is corrupt ({exc})") from None
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path}: missing")
    raw = manifest_path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != expected:
        raise CheckpointError(f"{manifest_path}: sha256 does not match the one recorded in {marker_path}; "
                              f"{MANIFEST} or {COMPLETE} is corrupt")
    manifest = json.loads(raw)
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: unsupported checkpoint format "
                              f"{manifest.get('format')!r} v{manifest.get('format_version')}")
    return manifest


def _verify_files(path: Path, manifest: dict) -> None:
    files = manifest.get("files", {})
    if STATE not in files:
        raise CheckpointError(f"{path / MANIFEST}: does not list {STATE}")
    for name, info in files.items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise CheckpointError(f"{path / MANIFEST}: refuses file entry {name!r} outside the checkpoint")
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{file}: size {size} bytes, manifest says {info['size']} (truncated or modified)")
        if sha256_file(file, CHUNK_BYTES) != info["sha256"]:
            raise CheckpointError(f"{file}: sha256 mismatch with {MANIFEST} (file is corrupt)")


def config_diff(old, new, prefix: str = "") -> list[str]:
    """Dotted ``key: old -> new`` lines between two JSON-like configs (lists compared element-wise)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [line for k in keys for line in config_diff(old.get(k, "<unset>"), new.get(k, "<unset>"),
                                                           f"{prefix}{k}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [line for i, (a, b) in enumerate(zip(old, new)) for line in config_diff(a, b, f"{prefix}{i}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _check_config(path: Path, manifest: dict, expected: str | None, allow_change: bool,
                  current: dict | None = None) -> None:
    saved = manifest.get("config_hash")
    if expected is None or saved == expected:
        return
    msg = (f"checkpoint {path} was written with config hash {saved!r}, "
           f"but the current config hash is {expected!r}")
    if current is not None and isinstance(manifest.get("config"), dict):
        diff = config_diff(manifest["config"], current)
        if diff:
            msg += " (changed: " + "; ".join(diff) + ")"
    if allow_change:
        warnings.warn(f"{msg}; resuming anyway because allow_config_change=True", stacklevel=3)
        return
    raise CheckpointError(f"{msg}. Resuming under a different config would silently change the run; "
                          f"pass allow_config_change=True to resume anyway, or start a fresh run.")


def load_checkpoint(path, expected_config_hash: str | None = None, allow_config_change: bool = False,
                    current_config: dict | None = None) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """Verify then load a checkpoint: ``(tensors by group, state, manifest)``.

    Every file's size and sha256 are checked before anything is loaded, so a
    corrupt checkpoint is refused with the offending file's name. A config-hash mismatch is refused (or, with
    ``allow_config_change``, warned about) and, when the manifest holds the config, the changed keys are listed.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    _check_config(path, manifest, expected_config_hash, allow_config_change, current_config)
    _verify_files(path, manifest)
    suffix = ".safetensors"
    tensors = {name[:-len(suffix)]: load_safetensors(path / name)
               for name in manifest["files"] if name.endswith(suffix)}
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    return tensors, state, manifest


# ---- Optimizer state <-> flat tensors + JSON ----


def _jsonable(value, where: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    raise TypeError(f"optimizer value {where} of type {type(value).__name__} cannot be checkpointed")


def optimizer_to_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten ``optimizer.state_dict()`` into safetensors-able tensors plus JSON.

    Tensors are named ``state.<param_index>.<key>`` (scalar ones such as
    Adam's ``step`` included) and ``param_groups.<i>.<key>`` for tensor
    hyper-parameters.  They alias the live state (no copy), so save them
    before the next ``optimizer.step()``.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    info: dict = {"format_version": 1, "param_groups": [], "group_sizes": [], "state": {}}
    for i, group in enumerate(sd["param_groups"]):
        saved = {}
        for key, value in group.items():
            if key == "params":
                continue
            if isinstance(value, torch.Tensor):
                tensors[f"param_groups.{i}.{key}"] = value
            else:
                saved[key] = _jsonable(value, f"param_groups[{i}][{key!r}]")
        info["param_groups"].append(saved)
        info["group_sizes"].append(len(group["params"]))
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                info["state"].setdefault(str(idx), {})[key] = _jsonable(value, f"state[{idx}][{key!r}]")
    return tensors, info


def optimizer_from_tensors(optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Exact inverse of :func:`optimizer_to_tensors` into a freshly built optimizer."""
    live = optimizer.state_dict()["param_groups"]
    sizes = [len(g["params"]) for g in live]
    if sizes != info["group_sizes"]:
        raise CheckpointError(f"optimizer param groups have sizes {sizes} but the checkpoint has "
                              f"{info['group_sizes']}; the model or optimizer layout changed")
    groups = []
    for saved, current in zip(info["param_groups"], live):
        group = {k: tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list) else v
                 for k, v in saved.items()}
        group["params"] = current["params"]
        groups.append(group)
    state: dict[int, dict] = {int(idx): dict(extra) for idx, extra in info["state"].items()}
    for name, tensor in tensors.items():
        kind, idx, key = name.split(".", 2)
        if kind == "param_groups":
            groups[int(idx)][key] = tensor
        elif kind == "state":
            state.setdefault(int(idx), {})[key] = tensor
        else:
            raise CheckpointError(f"unexpected optimizer tensor {name!r} in checkpoint")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- RNG state ----


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """Python, numpy (global), torch CPU and every CUDA device's RNG state."""
    version, mt, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    tensors = {
        "python.mt": torch.tensor(mt, dtype=torch.int64),
        "numpy.keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "torch.cpu": torch.get_rng_state(),
    }
    info = {
        "format_version": 1,
        "python": {"version": version, "gauss_next": gauss_next},
        "numpy": {"name": np_name, "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                  "cached_gaussian": float(np_cached)},
        "cuda_device_count": 0,
    }
    if torch.cuda.is_available():
        cuda_states = torch.cuda.get_rng_state_all()
        for i, s in enumerate(cuda_states):
            tensors[f"torch.cuda.{i}"] = s
        info["cuda_device_count"] = len(cuda_states)
    return tensors, info


def ranks_rng_to_tensors(states: list[tuple[dict[str, torch.Tensor], dict]]) -> tuple[dict[str, torch.Tensor], dict]:
    """Every process's ``capture_rng()`` in one checkpoint entry: tensors prefixed ``rank<r>.``, infos in rank order.

    Why per rank: each process draws its own dropout masks (and samples) from its own generators, and they drift
    apart as soon as ranks see batches of different shapes; restoring rank 0's state everywhere makes a resumed
    multi-process run differ from the uninterrupted one (CK-1/CK-8 at world size > 1)."""
    tensors = {f"rank{r}.{k}": t for r, (ts, _) in enumerate(states) for k, t in ts.items()}
    return tensors, {"format_version": 2, "per_rank": [info for _, info in states]}


def rank_rng(tensors: dict[str, torch.Tensor], info: dict, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    """This rank's ``(tensors, info)`` for ``restore_rng``; a checkpoint from before per-rank states (one shared
    state) gives that state to every rank."""
    if "per_rank" not in info:
        return tensors, info
    if rank >= len(info["per_rank"]):
        raise CheckpointError(f"checkpoint holds RNG state for {len(info['per_rank'])} process(es), not rank {rank}")
    prefix = f"rank{rank}."
    return {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}, info["per_rank"][rank]


def restore_rng(tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Inverse of :func:`capture_rng`; warns if the CUDA device count changed."""
    py = info["python"]
    random.setstate((py["version"], tuple(tensors["python.mt"].tolist()), py["gauss_next"]))
    npi = info["numpy"]
    keys = tensors["numpy.keys"].numpy().astype(np.uint32)
    np.random.set_state((npi["name"], keys, npi["pos"], npi["has_gauss"], npi["cached_gaussian"]))
    torch.set_rng_state(tensors["torch.cpu"].contiguous())
    saved = int(info.get("cuda_device_count", 0))
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved != present and saved:
        warnings.warn(f"checkpoint has RNG state for {saved} CUDA devices but {present} are visible; "
                      f"restoring the first {min(saved, present)}", stacklevel=2)
    for i in range(min(saved, present)):
        torch.cuda.set_rng_state(tensors[f"torch.cuda.{i}"].contiguous(), i)
