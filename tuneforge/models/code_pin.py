"""What ``model.revision`` pins when a checkpoint's own code is trusted (SE-3).

``trust_remote_code`` imports the Python files that ship inside a model folder. On the hub, ``revision`` picks the
commit whose files are fetched, so pinning it pins the code. For a *local* folder transformers ignores
``revision`` altogether: whatever ``configuration_*.py`` / ``modeling_*.py`` sit in the folder today are run. A
pin that nothing checks protects nobody, so tuneforge checks it itself, before any loader sees the folder:

* ``sha256:<64 hex>`` — the digest of every ``*.py`` file under the folder (path and contents; ``code_digest``).
  It works for any folder (a copy, a git checkout, an unpacked archive) and changes when any code file is edited,
  added, renamed or removed. The refusal message prints the folder's current digest, so after reviewing the code
  the user pins exactly what they reviewed.
* a 40-hex commit — only for a Hugging Face cache snapshot (``.../snapshots/<commit>/``) whose folder name is that
  commit; each code file there must be a link to the blob named by its git object id, and that id is recomputed
  from the file's bytes (``git_blob_id``), so an edited file in the cache is caught.

A git checkout is deliberately not verified through ``git``: running git in a folder one does not trust can itself
run code (``core.fsmonitor`` in its ``.git/config``), which is the thing being guarded against. Pin such folders
by content. The check happens before transformers copies the files to its module cache; a folder that someone
rewrites between the check and the copy (a race on one's own disk) is outside what a pin can promise.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

SHA256_PIN = re.compile(r"sha256:[0-9a-f]{64}")
COMMIT_PIN = re.compile(r"[0-9a-f]{40}")


class CodePinError(ValueError):
    """The folder's code does not match ``model.revision``; the message says what to pin."""


def code_files(folder: Path) -> list[Path]:
    """Every ``*.py`` below ``folder`` (hidden folders such as ``.git`` excluded), sorted by relative path."""
    out = []
    for file in folder.rglob("*.py"):
        rel = file.relative_to(folder)
        if not any(part.startswith(".") for part in rel.parts[:-1]) and file.is_file():
            out.append(file)
    return sorted(out, key=lambda f: f.relative_to(folder).as_posix())


def code_digest(folder: Path) -> str:
    """``sha256:<hex>`` over (relative path, sha256 of contents) of every code file: renames and deletions count."""
    h = hashlib.sha256()
    for file in code_files(folder):
        h.update(file.relative_to(folder).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(file.read_bytes()).hexdigest().encode() + b"\n")
    return "sha256:" + h.hexdigest()


def git_blob_id(data: bytes) -> str:
    """Git's object id of a file's contents (sha1 of ``blob <size>\\0<bytes>``): what the hub cache names it by."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def pin_format_error(revision: str | None) -> str | None:
    """Why ``revision`` cannot pin code (for the config validator), or None when its form is valid."""
    if revision is None or SHA256_PIN.fullmatch(revision) or COMMIT_PIN.fullmatch(revision):
        return None
    return (f"model.revision {revision!r} cannot pin checkpoint code: use sha256:<64 hex> (the digest of the "
            "folder's .py files, printed when it does not match) or the 40-hex commit of a hub cache snapshot")


def verify_code_pin(folder: Path, revision: str) -> None:
    """Raise ``CodePinError`` unless the code in ``folder`` is exactly what ``revision`` pins."""
    digest = code_digest(folder)
    how = (f"review the .py files in {folder}, then set model.revision: {digest} (their digest now)")
    if SHA256_PIN.fullmatch(revision):
        if revision != digest:
            raise CodePinError(f"{folder}: the checkpoint's code does not match model.revision: its .py files hash "
                               f"to {digest}, the recipe pins {revision}. The code changed since it was pinned; "
                               f"{how}")
        return
    if COMMIT_PIN.fullmatch(revision):
        _verify_snapshot(folder, revision, how)
        return
    raise CodePinError(f"{folder}: {pin_format_error(revision)}; {how}")


def _verify_snapshot(folder: Path, commit: str, how: str) -> None:
    resolved = folder.resolve()
    if resolved.parent.name != "snapshots" or resolved.name != commit:
        raise CodePinError(f"{folder}: model.revision {commit} is a commit, but this folder is not the hub cache "
                           f"snapshot of that commit, and transformers ignores revision for local folders, so "
                           f"nothing would pin the code; {how}")
    for file in code_files(folder):
        blob = Path(file).readlink().name if file.is_symlink() else None
        if blob != git_blob_id(file.read_bytes()):
            raise CodePinError(f"{file}: this code file is not the blob of commit {commit} (edited or replaced in "
                               f"the cache); {how}")
