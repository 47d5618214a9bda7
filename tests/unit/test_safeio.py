"""Tests for tuneforge.safeio: safetensors writing/reading, header limits (SE-2), atomic writes."""

from __future__ import annotations

import io
import os
import struct
import time
import tracemalloc

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from tuneforge import safeio
from tuneforge.safeio import (
    UnsafeFileError,
    atomic_write_text,
    check_safetensors_header,
    load_safetensors,
    load_torch_weights,
    save_safetensors,
)


def _forbid_materialising(monkeypatch):
    """Make any attempt to let safetensors parse the file fail loudly."""
    calls = []

    def boom(*args, **kwargs):
        calls.append(args)
        raise AssertionError("safetensors was asked to load a file that should have been rejected")

    monkeypatch.setattr(safetensors.torch, "load_file", boom)
    return calls


# ---------------------------------------------------------------- round trips


def test_round_trip_many_dtypes_and_layouts(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tied = torch.randn(5, 3)
    tensors = {
        "f32": torch.randn(3, 4),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2).bfloat16(),
        "f64": torch.randn(2).double(),
        "i64": torch.arange(5),
        "i32": torch.arange(5, dtype=torch.int32),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "transposed": base.t(),  # non-contiguous
        "slice": base[1:3],  # view with storage offset
        "emb": tied,
        "lm_head": tied,  # shared storage (tied weights)
        "grad": torch.randn(3, requires_grad=True),
        "f8": torch.randn(6).to(torch.float8_e4m3fn),
        "c64": torch.randn(2, dtype=torch.complex64),
    }
    path = tmp_path / "w.safetensors"
    save_safetensors(tensors, path, metadata={"format": "pt", "note": "x"})
    loaded = load_safetensors(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        raw = loaded[name].reshape(-1).view(torch.uint8)  # bitwise, so NaNs and float8 compare too
        assert raw.tolist() == t.detach().reshape(-1).view(torch.uint8).tolist(), name
    loaded["emb"].add_(1)  # tied tensors come back as independent copies
    assert not torch.equal(loaded["emb"], loaded["lm_head"])
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt", "note": "x"}
    assert list(tmp_path.iterdir()) == [path]  # no temp files left


def test_writer_is_byte_identical_to_reference_serializer():
    tensors = {"b": torch.ones(3, dtype=torch.bfloat16), "a": torch.arange(10.0), "i": torch.arange(3),
               "s": torch.tensor(2.0), "m": torch.tensor([True])}
    for metadata in (None, {"format": "pt"}):
        buf = io.BytesIO()
        safeio.write_safetensors_stream(tensors, buf.write, metadata)
        assert buf.getvalue() == safetensors.torch.save(tensors, metadata)


def test_save_rejects_bad_input_without_creating_files(tmp_path):
    with pytest.raises(TypeError):
        save_safetensors({"a": [1, 2]}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError):
        save_safetensors({"a": torch.ones(1)}, tmp_path / "x.safetensors", metadata={"k": 1})
    with pytest.raises(ValueError):
        save_safetensors({"a": torch.ones(2).to_sparse()}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.zeros(4)}, path)
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safeio.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        save_safetensors({"a": torch.ones(4)}, path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_atomic_write_text(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "twö")
    assert path.read_text(encoding="utf-8") == "twö"
    assert list(tmp_path.iterdir()) == [path]


def test_load_torch_weights_plain_state_dict(tmp_path):
    sd = {"w": torch.randn(3, 3), "b": torch.zeros(3), "meta": {"step": 3, "names": ["a"]}}
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    loaded = load_torch_weights(path)
    assert torch.equal(loaded["w"], sd["w"]) and loaded["meta"] == sd["meta"]


# ---------------------------------------------------------------- SE-2: header limits


def _timed_rejection(path, monkeypatch, trace_memory=True, **limits):
    """Reject ``path``; return (message, seconds, peak traced bytes) and prove nothing was materialised."""
    calls = _forbid_materialising(monkeypatch)
    load = (lambda: check_safetensors_header(path, **limits)) if limits else (lambda: load_safetensors(path))
    t0 = time.perf_counter()
    with pytest.raises(UnsafeFileError) as info:
        load()
    elapsed = time.perf_counter() - t0
    peak = None
    if trace_memory:  # separate pass: tracing slows Python code, so it is not timed
        tracemalloc.start()
        try:
            with pytest.raises(UnsafeFileError):
                load()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert calls == []
    return str(info.value), elapsed, peak


def _many_tensors_file(path, n, key="data_offsets"):
    entries = ",".join(f'"t{i}":{{"dtype":"F32","shape":[1],"{key}":[{4 * i},{4 * i + 4}]}}' for i in range(n))
    blob = ("{" + entries + "}").encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(4 * n))
    return path


def test_se2_oversized_header_length_rejected_fast(tmp_path, monkeypatch):
    path = tmp_path / "huge_header.safetensors"
    claimed = 20 * 2**20
    path.write_bytes(struct.pack("<Q", claimed) + b"{" + b" " * 1000)
    msg, elapsed, peak = _timed_rejection(path, monkeypatch)
    assert str(path) in msg and str(claimed) in msg and "header size" in msg
    assert elapsed < 1.0
    assert peak < 1 * 2**20  # the claimed 20 MiB were never allocated


def test_se2_too_many_tensors_rejected_fast(tmp_path):
    n = 150_000
    path = _many_tensors_file(tmp_path / "many.safetensors", n)
    # control: the file is well-formed, only the count is the problem
    check_safetensors_header(path, max_tensors=n)
    with safe_open(str(path), framework="pt") as fh:
        assert len(fh.keys()) == n
    with pytest.MonkeyPatch.context() as monkeypatch:
        msg, elapsed, peak = _timed_rejection(path, monkeypatch)
    assert str(path) in msg and f"{n} tensors" in msg and "100000" in msg
    assert elapsed < 1.0
    assert peak < 32 * 2**20  # about the raw header bytes: no per-tensor objects, no tensors


def test_se2_escaped_keys_cannot_dodge_the_count(tmp_path, monkeypatch):
    # "data\u005foffsets" is the same JSON key spelled so a byte search misses it
    path = _many_tensors_file(tmp_path / "sneaky.safetensors", 150_000, key="data\\u005foffsets")
    msg, elapsed, _ = _timed_rejection(path, monkeypatch, trace_memory=False)
    assert "150000 tensors" in msg
    assert elapsed < 5.0  # generous sanity bound; about 0.5 s on a laptop


def test_tensor_count_limit_is_exact_near_the_boundary(tmp_path, monkeypatch):
    path = _many_tensors_file(tmp_path / "edge.safetensors", 10)
    check_safetensors_header(path, max_tensors=10)
    msg, _, _ = _timed_rejection(path, monkeypatch, trace_memory=False, max_tensors=9)
    assert "10 tensors" in msg


@pytest.mark.parametrize(
    "content, fragment",
    [
        pytest.param(b"\x01\x02", "not a safetensors file", id="too-short"),
        pytest.param(struct.pack("<Q", 4096) + b"{}", "larger than the file", id="header-past-eof"),
        pytest.param(struct.pack("<Q", 8) + b"not json", "not valid JSON", id="not-json"),
        pytest.param(struct.pack("<Q", 8) + b"[1,2,3] ", "not a JSON object", id="not-object"),
        pytest.param(struct.pack("<Q", 200_000) + b"[" * 200_000, "not valid JSON", id="recursion-bomb"),
    ],
)
def test_malformed_headers_rejected(tmp_path, content, fragment):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(UnsafeFileError) as info:
        load_safetensors(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_metadata_entry_not_counted_as_tensor(tmp_path):
    path = tmp_path / "m.safetensors"
    save_safetensors({"a": torch.ones(1), "b": torch.ones(1)}, path, metadata={"format": "pt"})
    check_safetensors_header(path, max_tensors=2)
    with pytest.raises(UnsafeFileError):
        check_safetensors_header(path, max_tensors=1)


def test_header_size_limit_is_configurable(tmp_path):
    path = tmp_path / "x.safetensors"
    save_safetensors({"a": torch.ones(1)}, path)
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    check_safetensors_header(path, max_header_bytes=header_len)
    with pytest.raises(UnsafeFileError, match=str(header_len)):
        check_safetensors_header(path, max_header_bytes=header_len - 1)
    assert os.path.getsize(path) > header_len


def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    """Adapters, checkpoints and exports must be readable by a server running as another user."""
    import os

    from tuneforge.safeio import atomic_write_text, save_safetensors

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    for name in ("a.json", "w.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_temp_file_beside_survives_a_mount_that_refuses_chmod(tmp_path, monkeypatch):
    from tuneforge import safeio

    def refuse(*a):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(safeio.os, "fchmod", refuse)
    safeio.atomic_write_text(tmp_path / "a.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_reading_the_umask_never_changes_it(monkeypatch):
    from tuneforge import safeio

    real = os.umask(0o027)
    os.umask(real)
    calls = []
    monkeypatch.setattr(safeio.os, "umask", lambda m: calls.append(m) or real)
    assert safeio._umask() == real and calls == []  # setting it, even to read it, races other threads' files


def test_share_like_open_gives_saved_folders_the_umask_mode(tmp_path):
    from safetensors.torch import save_file

    from tuneforge.safeio import share_like_open

    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o600  # what safetensors writes
    old = os.umask(0o022)
    try:
        share_like_open(tmp_path)
    finally:
        os.umask(old)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644
