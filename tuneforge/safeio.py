"""Safe weight I/O: the only place tuneforge reads or writes weight files.

Why a dedicated module:

* Pickle-based checkpoints (``.bin``/``.pt``) execute arbitrary code when
  unpickled, so they are only ever opened with ``torch.load(...,
  weights_only=True)``; anything that needs more is refused outright.
* A safetensors file starts with an 8-byte header length chosen by whoever
  wrote the file.  A hostile value can make a parser allocate gigabytes or
  spend minutes on millions of tensor entries, so the header is bounded and
  counted *before* safetensors sees the file.
* Writes go through a temp file + fsync + ``os.replace`` so a crash never
  leaves a half-written file under the final name.

The safetensors writer is our own streaming implementation of the (simple)
format: it hands out the bytes tensor by tensor, which lets the checkpoint
code hash, count and fault-inject while writing without first building the
whole file in memory.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

__all__ = [
    "UnsafeFileError",
    "check_safetensors_header",
    "load_safetensors",
    "save_safetensors",
    "load_torch_weights",
    "atomic_write_text",
    "temp_file_beside",
    "share_like_open",
    "write_safetensors_stream",
    "iter_safetensors_bytes",
    "fsync_dir",
    "sha256_file",
    "exchange_dirs",
    "replace_dir",
    "ChunkedHashWriter",
]

DEFAULT_MAX_HEADER_BYTES = 16 * 2**20
DEFAULT_MAX_TENSORS = 100_000

# torch dtype -> safetensors dtype code (format spec names).
_DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _name, _code in [
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("uint64", "U64"),
    ("uint32", "U32"),
    ("uint16", "U16"),
]:
    if hasattr(torch, _name):
        _DTYPE_CODES[getattr(torch, _name)] = _code


class UnsafeFileError(ValueError):
    """A weight file was refused because reading it could be unsafe.

    Subclasses ValueError so callers that already treat malformed input as a
    ValueError keep working.
    """


# ---- Reading ----


def _count_pairs_hook(pairs: list) -> tuple[int, bool]:
    """json object hook that replaces every object by (n_keys, has_metadata).

    Why: we only need the number of top-level entries.  Returning a tiny
    tuple instead of building a dict per tensor keeps a 16 MiB header from
    turning into hundreds of MiB of Python objects.
    """
    return len(pairs), any(k == "__metadata__" for k, _ in pairs)


def check_safetensors_header(
    path,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_tensors: int = DEFAULT_MAX_TENSORS,
) -> None:
    """Reject a safetensors file whose header is oversized or lists too many tensors.

    Reads only the 8-byte little-endian length and then the header JSON, so
    a hostile file costs at most ``max_header_bytes`` of memory and well under
    a second, and never reaches safetensors' own parser.
    """
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise UnsafeFileError(f"{path}: not a safetensors file ({file_size} bytes, need at least 8)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > max_header_bytes:
            raise UnsafeFileError(
                f"{path}: safetensors header size {header_len} bytes exceeds the limit of "
                f"{max_header_bytes} bytes; refusing to read it"
            )
        if header_len > file_size - 8:
            raise UnsafeFileError(
                f"{path}: safetensors header size {header_len} bytes is larger than the file "
                f"({file_size} bytes); the file is truncated or corrupt"
            )
        header = fh.read(header_len)
    n_tensors = _count_header_entries(path, header, max_tensors)
    if n_tensors > max_tensors:
        raise UnsafeFileError(
            f"{path}: safetensors header lists {n_tensors} tensors, more than the limit of "
            f"{max_tensors}; refusing to load it"
        )


def _count_header_entries(path: Path, header: bytes, max_tensors: int) -> int:
    """Number of tensor entries in a header, without materialising it.

    A byte count of ``"data_offsets"`` keys (every entry has one) rejects a
    bloated header in milliseconds; the exact JSON count behind it catches
    headers that spell the key with escapes to dodge the quick check, and
    decides near the limit, where the quick count may be off by a few.
    """
    quick = header.count(b'"data_offsets"')
    if quick > max_tensors + 1024:  # margin: names/metadata may spell "data_offsets" too
        return quick
    try:
        parsed = json.loads(header.decode("utf-8"), object_pairs_hook=_count_pairs_hook)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UnsafeFileError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(parsed, tuple):
        raise UnsafeFileError(f"{path}: safetensors header is not a JSON object")
    n_keys, has_metadata = parsed
    return n_keys - int(has_metadata)


def load_safetensors(path, device="cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file after the header sanity check."""
    from safetensors.torch import load_file

    check_safetensors_header(path)
    return load_file(str(path), device=device)


def load_torch_weights(path) -> dict:
    """Load a ``.bin``/``.pt`` state dict with the weights-only unpickler.

    Why refuse instead of falling back: a pickle that needs more than tensors
    and containers can run arbitrary code, and a training library has no
    business executing code shipped inside a weight file.
    """
    path = Path(path)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"{path}: refusing to load; the pickle needs more than tensors and plain containers "
            f"({_unpickler_reason(str(exc))}). If the file comes from a source you trust, convert it "
            f"to safetensors in a separate environment and load that instead."
        ) from None


def _unpickler_reason(message: str) -> str:
    """The useful part of torch's weights-only error (which global/opcode was refused).

    torch's full message suggests retrying with the unsafe loader, which is
    exactly the advice we must not pass on.
    """
    match = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\n|\. Please|$)", message, re.S)
    reason = " ".join(match.group(1).split()) if match else ""
    return reason or "unsupported pickle content"


# ---- Writing ----


def fsync_dir(path) -> None:
    """fsync a directory so a rename/create inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path, chunk_bytes: int = 8 << 20) -> str:
    """Streamed sha256, so verifying a multi-GB file needs only one chunk of memory."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            sha.update(chunk)
    return sha.hexdigest()


def exchange_dirs(a, b) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE).

    Returns False when the platform or filesystem cannot do it, so callers
    can fall back to a two-step rename; other failures raise OSError.
    Why: replacing a non-empty directory is otherwise never atomic.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_dir(src, dst) -> None:
    """Move directory ``src`` to ``dst``, atomically replacing an existing ``dst``.

    Uses an atomic exchange where available; elsewhere the old ``dst`` is
    renamed aside (to a ``.tmp-replaced-*`` sibling, which checkpoint
    clean-up removes) first, leaving a brief window where ``dst`` is absent.
    The replaced content is deleted and the parent directory fsynced.
    """
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.rename(src, dst)
    elif exchange_dirs(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the replaced content
    else:
        aside = dst.with_name(f".tmp-replaced-{dst.name}-{os.getpid()}")
        os.rename(dst, aside)
        try:
            os.rename(src, dst)
        except OSError:
            os.rename(aside, dst)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(dst.parent)


class ChunkedHashWriter:
    """Writes files chunk by chunk, hashing as it goes and reporting progress.

    Why: hashing while writing avoids re-reading multi-GB files for a
    manifest, and the progress callback ``(stage, total_bytes)`` - called
    before each file and after each chunk - lets tests crash a write at a
    chosen byte offset.
    """

    def __init__(self, progress: Callable[[str, int], None] | None = None, chunk_bytes: int = 8 << 20):
        self.progress = progress
        self.chunk_bytes = chunk_bytes
        self.total = 0

    def event(self, stage: str) -> None:
        if self.progress is not None:
            self.progress(stage, self.total)

    def write_file(self, path, pieces: Iterable) -> dict:
        """Create ``path`` (must not exist) from byte pieces, fsync it; return sha256 and size."""
        path = Path(path)
        self.event(path.name)
        sha, size, step = hashlib.sha256(), 0, self.chunk_bytes
        with open(path, "xb") as fh:
            for piece in pieces:
                view = memoryview(piece).cast("B")
                for start in range(0, len(view), step):
                    chunk = view[start:start + step]
                    fh.write(chunk)
                    sha.update(chunk)
                    size += len(chunk)
                    self.total += len(chunk)
                    self.event(path.name)
            fh.flush()
            os.fsync(fh.fileno())
        return {"sha256": sha.hexdigest(), "size": size}


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Little-endian raw bytes of a tensor, copying only when unavoidable.

    Each tensor is serialised from its own elements, so tensors that share
    storage (tied embeddings) or are views of a bigger buffer are written as
    independent copies - the same result as cloning them first.
    """
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)
    flat = t.view(torch.uint8)
    if sys.byteorder != "little" and t.element_size() > 1:
        flat = flat.reshape(-1, t.element_size()).flip(1).reshape(-1).contiguous()
    return memoryview(flat.numpy()).cast("B")


def _build_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """Header bytes (length prefix + padded JSON) and the order to write data in.

    Tensors are ordered by decreasing element size so every tensor starts at
    an offset aligned to its element size, as the reference writer does.
    """
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"expected dict[str, Tensor], got entry {name!r}: {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"tensor {name!r} is {t.layout}; only dense tensors can be saved")
        if t.dtype not in _DTYPE_CODES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; bad keys: {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_CODES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, order


def iter_safetensors_bytes(tensors: dict[str, torch.Tensor],
                           metadata: dict[str, str] | None = None) -> Iterator[memoryview | bytes]:
    """Yield a safetensors file piece by piece: header first, then each tensor.

    Only one tensor is ever converted at a time, so GPU tensors are staged
    through host memory one by one rather than all at once.
    """
    header, order = _build_header(tensors, metadata)
    yield header
    for name in order:
        yield _tensor_bytes(tensors[name])


def write_safetensors_stream(tensors: dict[str, torch.Tensor], write: Callable[[bytes], object],
                             metadata: dict[str, str] | None = None) -> None:
    """Serialise ``tensors`` in safetensors format through ``write``.

    ``write`` receives bytes-like pieces (possibly large memoryviews); the
    caller decides how to chunk, hash or fsync them.
    """
    for piece in iter_safetensors_bytes(tensors, metadata):
        write(piece)


def temp_file_beside(path: Path) -> tuple[int, str]:
    """A new temporary file next to ``path`` (same filesystem, so ``os.replace`` is atomic), as ``(fd, name)``.

    Why the chmod: ``mkstemp`` creates files 0600, so every adapter, checkpoint and export would be unreadable to
    the other users of a shared machine or to a server running under another account. Files get the mode ``open``
    would give them, 0666 less the process umask."""
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except OSError:  # best effort: some mounts (vfat, CIFS) refuse chmod; the file stays 0600 there
        pass
    return fd, tmp


def share_like_open(folder) -> None:
    """Give every file below ``folder`` the mode ``open`` would (0666 less the umask): ``safetensors.save_file``
    (under ``save_pretrained``) writes 0600, which leaves a merged model, a full fine-tune or the shared GGUF cache
    unreadable to other users of the machine. Best effort, like ``temp_file_beside``."""
    mode = 0o666 & ~_umask()
    for f in Path(folder).rglob("*"):
        if f.is_file() and not f.is_symlink():
            try:
                os.chmod(f, mode)
            except OSError:
                pass


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``): ``os.umask`` can
    only be read by setting it, and setting it even for a moment lets a file another thread creates then come out
    with the wrong mode. Elsewhere it falls back to setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _atomic_write(path, fill: Callable[[object], None]) -> None:
    """Create ``path`` atomically: temp file in the same dir, fsync, replace, fsync dir."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(parent)


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``tensors`` as a safetensors file.

    Non-contiguous tensors are packed and shared-storage tensors are written
    as independent copies, so callers can pass a model's state dict as is.
    """
    _build_header(tensors, metadata)  # validate before creating any file
    _atomic_write(path, lambda fh: write_safetensors_stream(tensors, fh.write, metadata))


def atomic_write_text(path, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    data = text.encode("utf-8")
    _atomic_write(path, lambda fh: fh.write(data))
