"""Tests for tuneforge.train.checkpoint: round trips, crash safety (CK-3), integrity (CK-4),
disk-full handling (CK-6) and pruning (CK-7)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tuneforge
from tuneforge import safeio
from tuneforge.safeio import load_safetensors
from tuneforge.train import checkpoint as ck
from tuneforge.train.checkpoint import (
    CheckpointError,
    capture_rng,
    clean_stale,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    restore_rng,
    save_checkpoint,
)

META = {"seed": 1234, "world_size": 1, "config_hash": "cfg-aaa"}
FILES = ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", "manifest.json", "COMPLETE"]


class SimulatedCrash(BaseException):
    """Not an Exception, so save_checkpoint leaves its temp dir behind exactly like a killed process."""


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        x, y = torch.randn(8, 4), torch.randn(8, 2)  # data and dropout both draw from the torch RNG
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> tuple[dict, dict]:
    opt_tensors, opt_info = optimizer_to_tensors(opt)
    rng_tensors, rng_info = capture_rng()
    tensors = {"model": model.state_dict(), "optimizer": opt_tensors, "rng": rng_tensors}
    return tensors, {"step": step, "optimizer": opt_info, "rng": rng_info}


def trained_snapshot(step: int, seed: int = 0) -> tuple[dict, dict]:
    model = make_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    return snapshot(model, opt, step)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for group in a:
        assert a[group].keys() == b[group].keys(), group
        for name in a[group]:
            assert torch.equal(a[group][name], b[group][name]), f"{group}/{name}"


def tmp_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------- round trips


# RELIABILITY.md CK-5
def test_training_resume_is_bitwise_identical(tmp_path):
    torch.manual_seed(42)
    model_a = make_model(0)
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-2, weight_decay=0.1)
    train(model_a, opt_a, 3)
    tensors, state = snapshot(model_a, opt_a, 3)
    path = save_checkpoint(tmp_path, 3, tensors, state, META)
    train(model_a, opt_a, 3)  # the uninterrupted run

    torch.rand(100), random.random(), np.random.rand(3)  # a restarted process has other RNG state
    model_b = make_model(99)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2, weight_decay=0.1)
    loaded, st, manifest = load_checkpoint(path, expected_config_hash="cfg-aaa")
    model_b.load_state_dict(loaded["model"])
    optimizer_from_tensors(opt_b, loaded["optimizer"], st["optimizer"])
    restore_rng(loaded["rng"], st["rng"])
    assert st["step"] == manifest["step"] == 3
    train(model_b, opt_b, 3)

    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    for idx in sa["state"]:
        for key, value in sa["state"][idx].items():
            assert torch.equal(value, sb["state"][idx][key]), (idx, key)


@pytest.mark.parametrize(
    "make_opt",
    [
        pytest.param(lambda ps: torch.optim.SGD(
            [{"params": ps[:2], "lr": 0.1}, {"params": ps[2:], "lr": 0.01, "weight_decay": 0.1}],
            momentum=0.9, nesterov=True), id="sgd-two-groups"),
        pytest.param(lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95), amsgrad=True), id="adam-amsgrad"),
        pytest.param(lambda ps: torch.optim.Adam(ps, lr=torch.tensor(0.01), foreach=False), id="adam-tensor-lr"),
    ],
)
def test_optimizer_round_trip_variants(tmp_path, make_opt):
    model_a = make_model(0)
    opt_a = make_opt(list(model_a.parameters()))
    train(model_a, opt_a, 2)
    opt_tensors, info = optimizer_to_tensors(opt_a)
    path = save_checkpoint(tmp_path, 1, {"model": model_a.state_dict(), "optimizer": opt_tensors},
                           {"optimizer": info}, META)
    loaded, st, _ = load_checkpoint(path)
    model_b = make_model(5)
    model_b.load_state_dict(loaded["model"])
    opt_b = make_opt(list(model_b.parameters()))
    optimizer_from_tensors(opt_b, loaded["optimizer"], st["optimizer"])

    groups_a, groups_b = opt_a.state_dict()["param_groups"], opt_b.state_dict()["param_groups"]
    for ga, gb in zip(groups_a, groups_b):
        for key, value in ga.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, gb[key])
            else:
                assert value == gb[key] and type(value) is type(gb[key]), key
    state = torch.get_rng_state()
    train(model_a, opt_a, 2)
    torch.set_rng_state(state)
    train(model_b, opt_b, 2)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_optimizer_layout_change_is_refused():
    model = make_model(0)
    opt = torch.optim.AdamW(model.parameters())
    train(model, opt, 1)
    tensors, info = optimizer_to_tensors(opt)
    other = torch.optim.AdamW(list(model.parameters())[:2])
    with pytest.raises(CheckpointError, match="layout changed"):
        optimizer_from_tensors(other, tensors, info)


def test_rng_round_trip(tmp_path):
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.randn()  # ... and in numpy's
    tensors, info = capture_rng()
    path = save_checkpoint(tmp_path, 1, {"rng": tensors}, {"rng": info}, META)

    def draw():
        return (torch.rand(5), torch.randn(3), random.random(), random.gauss(0, 1),
                np.random.rand(4), np.random.randn(2))

    expected = draw()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    loaded, st, _ = load_checkpoint(path)
    restore_rng(loaded["rng"], st["rng"])
    got = draw()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]
    assert np.array_equal(got[4], expected[4]) and np.array_equal(got[5], expected[5])


def test_rng_restore_warns_when_cuda_devices_are_missing():
    tensors, info = capture_rng()
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    tensors["torch.cuda.0"] = torch.get_rng_state()
    info["cuda_device_count"] = 1
    with pytest.warns(UserWarning, match="1 CUDA devices but 0"):
        restore_rng(tensors, info)


def test_only_safetensors_and_json_are_written(tmp_path):
    tensors, state = trained_snapshot(1)
    path = save_checkpoint(tmp_path, 1, tensors, state, META)
    assert sorted(p.name for p in path.iterdir()) == sorted(FILES)
    for p in path.iterdir():
        if p.suffix == ".safetensors":
            load_safetensors(p)
        else:
            json.loads(p.read_text())
    assert tmp_dirs(tmp_path) == []


# ---------------------------------------------------------------- CK-3: crash safety


def _file_spans(tensors, state, tmp_path) -> dict[str, tuple[int, int]]:
    """Byte range [start, end) of every file in the running count, from a dry run."""
    events = []
    save_checkpoint(tmp_path / "dry-run", 2, tensors, state, META, fault_hook=lambda s, n: events.append((s, n)))
    spans = {}
    for stage, n in events:
        lo, hi = spans.get(stage, (n, n))
        spans[stage] = (min(lo, n), max(hi, n))
    return spans


def test_ck3_crash_at_ten_offsets_keeps_previous_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "CHUNK_BYTES", 256)  # many hook calls, so crashes land mid-file
    root = tmp_path / "run"
    tensors1, state1 = trained_snapshot(1, seed=1)
    first = save_checkpoint(root, 1, tensors1, state1, META)
    tensors2, state2 = trained_snapshot(2, seed=2)
    spans = _file_spans(tensors2, state2, tmp_path)
    offsets = [(name, (spans[name][0] + spans[name][1]) // 2) for name in FILES]
    offsets += [(name, spans[name][0] + 1) for name in FILES[:4]]
    assert len({off for _, off in offsets}) == 10

    for name, offset in offsets + [("rename", None)]:
        crashed_in = []

        def hook(stage, nbytes):
            if (offset is None and stage == "rename") or (offset is not None and nbytes >= offset):
                crashed_in.append(stage)
                raise SimulatedCrash(stage)

        with pytest.raises(SimulatedCrash):
            save_checkpoint(root, 2, tensors2, state2, META, fault_hook=hook)
        assert crashed_in == [name]
        assert len(tmp_dirs(root)) == 1  # the crash left its temp dir, as a kill would
        assert latest_checkpoint(root) == first
        assert list_checkpoints(root) == [first]
        loaded, st, _ = load_checkpoint(first)
        assert_same_tensors(loaded, tensors1)
        assert st == json.loads(json.dumps(state1))
        assert clean_stale(root) and tmp_dirs(root) == []

    second = save_checkpoint(root, 2, tensors2, state2, META)
    assert latest_checkpoint(root) == second


def test_ck3_sigkill_during_large_save(tmp_path):
    root = tmp_path / "run"
    tensors1, state1 = trained_snapshot(1)
    first = save_checkpoint(root, 1, tensors1, state1, META)
    child_code = textwrap.dedent(f"""
        import sys, time, torch
        from tuneforge.train import checkpoint as ck
        ck.CHUNK_BYTES = 1 << 20
        big = {{"model": {{"w": torch.ones(50_000_000)}}}}  # 200 MB
        hook = lambda stage, nbytes: time.sleep(0.005)  # slow the writer so the kill lands mid-file
        ck.save_checkpoint(sys.argv[1], 2, big, {{"step": 2}}, {META!r}, fault_hook=hook)
        print("finished")
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(tuneforge.__file__).resolve().parents[1]))
    child = subprocess.Popen([sys.executable, "-c", child_code, str(root)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        target = root / f".tmp-step-00000002-{child.pid}" / "model.safetensors"
        deadline = time.monotonic() + 60
        while not (target.exists() and target.stat().st_size > 64 << 20):
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "child never got going"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        out, _ = child.communicate()
    assert child.returncode == -signal.SIGKILL and b"finished" not in out
    assert latest_checkpoint(root) == first
    assert not (root / "step-00000002").exists()
    loaded, _, _ = load_checkpoint(first)
    assert_same_tensors(loaded, tensors1)
    assert clean_stale(root) == [target.parent] and tmp_dirs(root) == []


def test_replacing_a_step_is_atomic(tmp_path, monkeypatch):
    tensors_a, state_a = trained_snapshot(5, seed=1)
    tensors_b, state_b = trained_snapshot(5, seed=2)
    path = save_checkpoint(tmp_path, 5, tensors_a, state_a, META)

    def crash(stage, nbytes):
        if stage == "rename":
            raise SimulatedCrash

    with pytest.raises(SimulatedCrash):
        save_checkpoint(tmp_path, 5, tensors_b, state_b, META, fault_hook=crash)
    assert_same_tensors(load_checkpoint(path)[0], tensors_a)
    clean_stale(tmp_path)
    assert save_checkpoint(tmp_path, 5, tensors_b, state_b, META) == path
    assert_same_tensors(load_checkpoint(path)[0], tensors_b)
    monkeypatch.setattr(safeio, "exchange_dirs", lambda a, b: False)  # portable fallback path
    save_checkpoint(tmp_path, 5, tensors_a, state_a, META)
    assert_same_tensors(load_checkpoint(path)[0], tensors_a)
    assert list_checkpoints(tmp_path) == [path] and tmp_dirs(tmp_path) == []


def test_clean_stale_only_touches_temps(tmp_path):
    (tmp_path / ".tmp-step-00000003-123").mkdir()
    (tmp_path / ".tmp-step-00000003-123" / "model.safetensors").write_bytes(b"x")
    (tmp_path / ".tmp-stray-file").write_text("x")
    (tmp_path / "step-00000002").mkdir()  # incomplete, but not a temp: left alone
    (tmp_path / "notes.txt").write_text("keep")
    removed = clean_stale(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-step-00000003-123", ".tmp-stray-file"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "step-00000002"]
    assert clean_stale(tmp_path / "missing") == []
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None


# ---------------------------------------------------------------- CK-4: manifest and integrity


@pytest.fixture
def pristine(tmp_path):
    tensors, state = trained_snapshot(7)
    return save_checkpoint(tmp_path / "src", 7, tensors, state, dict(META, run_name="demo")), tensors


def test_ck4_manifest_contents(pristine):
    path, _ = pristine
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 7 and manifest["seed"] == 1234 and manifest["world_size"] == 1
    assert manifest["config_hash"] == "cfg-aaa" and manifest["run_name"] == "demo"
    assert manifest["tuneforge_version"] == tuneforge.__version__
    assert manifest["torch_version"] == torch.__version__
    assert sorted(manifest["files"]) == sorted(FILES[:4])
    for name, info in manifest["files"].items():
        data = (path / name).read_bytes()
        assert info == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["manifest_sha256"] == hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()


def _corrupt(file: Path, how: str) -> None:
    data = bytearray(file.read_bytes())
    if how == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data[len(data) // 2] ^= 0x01
        file.write_bytes(data)
    else:
        file.unlink()


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("name", FILES)
def test_ck4_corruption_is_refused_naming_the_file(pristine, tmp_path, name, how):
    src, _ = pristine
    path = tmp_path / "copy" / src.name
    shutil.copytree(src, path)
    _corrupt(path / name, how)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert name in str(info.value)


def test_ck4_config_hash_mismatch(pristine):
    path, tensors = pristine
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, expected_config_hash="cfg-bbb")
    assert "cfg-aaa" in str(info.value) and "cfg-bbb" in str(info.value)
    assert "allow_config_change" in str(info.value)
    with pytest.warns(UserWarning, match="cfg-aaa.*cfg-bbb"):
        loaded, _, _ = load_checkpoint(path, expected_config_hash="cfg-bbb", allow_config_change=True)
    assert_same_tensors(loaded, tensors)
    load_checkpoint(path, expected_config_hash="cfg-aaa")


# ---------------------------------------------------------------- CK-6: disk full


def _enospc_after(limit: int):
    def hook(stage, nbytes):
        if nbytes >= limit:
            raise OSError(errno.ENOSPC, "No space left on device")
    return hook


def test_ck6_enospc_gives_clear_error_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "CHUNK_BYTES", 512)
    tensors1, state1 = trained_snapshot(1, seed=1)
    first = save_checkpoint(tmp_path, 1, tensors1, state1, META)
    tensors2, state2 = trained_snapshot(2, seed=2)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path, 2, tensors2, state2, META, fault_hook=_enospc_after(2000))
    msg = str(info.value)
    assert "step 2" in msg and "No space left on device" in msg
    assert str(tmp_path / "step-00000002") in msg and f"previous checkpoint {first} is intact" in msg
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert tmp_dirs(tmp_path) == [] and list_checkpoints(tmp_path) == [first]
    assert_same_tensors(load_checkpoint(first)[0], tensors1)


def test_ck6_enospc_without_previous_checkpoint(tmp_path):
    tensors, state = trained_snapshot(1)
    with pytest.raises(CheckpointError, match="no previous checkpoint exists"):
        save_checkpoint(tmp_path, 1, tensors, state, META, fault_hook=_enospc_after(100))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- CK-7: pruning


def test_ck7_failing_newest_save_never_prunes_newest_complete(tmp_path):
    tensors, state = trained_snapshot(0)
    p1, p2, p3 = (save_checkpoint(tmp_path, s, tensors, state, META, keep_last=2) for s in (1, 2, 3))
    assert list_checkpoints(tmp_path) == [p2, p3] and not p1.exists()
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path, 4, tensors, state, META, keep_last=2, fault_hook=_enospc_after(1000))
    assert list_checkpoints(tmp_path) == [p2, p3] and latest_checkpoint(tmp_path) == p3
    load_checkpoint(p3)
    p4 = save_checkpoint(tmp_path, 4, tensors, state, META, keep_last=2)
    assert list_checkpoints(tmp_path) == [p3, p4]


def test_prune_keeps_newest_and_just_written_and_ignores_incomplete(tmp_path):
    tensors, state = trained_snapshot(0)
    incomplete = tmp_path / "step-00000000"
    incomplete.mkdir(parents=True)
    (incomplete / "model.safetensors").write_bytes(b"partial")
    p10 = save_checkpoint(tmp_path, 10, tensors, state, META, keep_last=1)
    p20 = save_checkpoint(tmp_path, 20, tensors, state, META, keep_last=1)
    assert not p10.exists()
    p15 = save_checkpoint(tmp_path, 15, tensors, state, META, keep_last=1)  # resumed from an older step
    assert list_checkpoints(tmp_path) == [p15, p20]
    assert incomplete.exists() and latest_checkpoint(tmp_path) == p20
    p_big = save_checkpoint(tmp_path, 123_456_789, tensors, state, META, keep_last=None)
    assert list_checkpoints(tmp_path) == [p15, p20, p_big]  # numeric, not lexical, order


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"step": -1}, ValueError),
        ({"keep_last": 0}, ValueError),
        ({"tensors": {"../evil": {}}}, ValueError),
        ({"state": {"x": object()}}, TypeError),
        ({"meta": {"files": {}}}, ValueError),
        ({"tensors": {"model": {"w": torch.ones(2).to_sparse()}}}, ValueError),
    ],
)
def test_bad_arguments_fail_without_leaving_files(tmp_path, kwargs, error):
    args = dict(root=tmp_path / "run", step=1, tensors={"model": {"w": torch.ones(2)}}, state={}, meta=META)
    args.update(kwargs)
    with pytest.raises(error):
        save_checkpoint(**args)
    root = tmp_path / "run"
    assert not root.exists() or list(root.iterdir()) == []


def test_rng_state_per_rank_round_trips_and_old_shared_state_still_restores():
    from tuneforge.train.checkpoint import capture_rng, rank_rng, ranks_rng_to_tensors, restore_rng

    torch.manual_seed(1)
    r0 = capture_rng()
    torch.manual_seed(2)
    r1 = capture_rng()
    tensors, info = ranks_rng_to_tensors([r0, r1])
    for rank, (want, _) in enumerate([r0, r1]):
        got, got_info = rank_rng(tensors, info, rank)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        restore_rng(got, got_info)
        assert torch.equal(torch.get_rng_state(), want["torch.cpu"])
    shared, shared_info = rank_rng(*r0, rank=1)  # a checkpoint written before per-rank states: one state for all
    assert shared is r0[0] and shared_info is r0[1]
    with pytest.raises(CheckpointError, match="2 process"):
        rank_rng(tensors, info, 2)
