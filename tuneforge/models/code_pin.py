"""What ``model.revision`` pins when a checkpoint's own code is trusted (SE-3).

``trust_remote_code`` imports the Python files that ship inside a model folder. On the hub, ``revision`` picks the
commit whose files are fetched, so pinning it pins the code. For a *local* folder transformers ignores
``revision`` altogether: whatever ``configuration_*.py`` / ``modeling_*.py`` sit in the folder today are run. A
pin that nothing checks protects nobody, so tuneforge checks it itself, before any loader sees the folder.

What runs is decided by two things, and a pin covers both: the ``*.py`` files, and the ``auto_map`` entries of the
folder's JSON files (``config.json``, ``tokenizer_config.json``, processor configs), which name the module and
class each Auto* loader imports. An ``auto_map`` entry may name code *outside* the folder (``other/repo--mod.Cls``,
or an absolute path before the ``--``), which no digest of the folder covers, so such entries are refused; every
entry must name a module whose file is inside the folder and hashed.

* ``sha256:<64 hex>`` — the digest of every ``*.py`` file under the folder (relative path and contents; symlinked
  files and folders are followed and their targets' bytes hashed) and of every ``auto_map`` (``code_digest``).
  It works for any folder (a copy, a git checkout, an unpacked archive) and changes when any code file is edited,
  added, renamed or removed, or an ``auto_map`` is changed. The refusal message prints the folder's current digest,
  so after reviewing the code the user pins exactly what they reviewed. This is the pin to use.
* a 40-hex commit — accepted only for a Hugging Face cache snapshot (``.../snapshots/<commit>/``) whose folder
  name is that commit; each code file, and each JSON file with an ``auto_map``, must be a link to the blob named by
  its git object id, and that id is recomputed from the file's bytes (``git_blob_id``), so a file edited in the
  cache is caught. Its limit: the cache keeps no record of which blobs a commit contains (no tree objects), so
  someone who can write to the cache can store a different file under its own blob id and relink the snapshot to
  it. A commit pin therefore trusts the cache's bookkeeping; a ``sha256`` pin trusts nothing but the bytes.

A git checkout is deliberately not verified through ``git``: running git in a folder one does not trust can itself
run code (``core.fsmonitor`` in its ``.git/config``), which is the thing being guarded against. Pin such folders
by content. The check happens before transformers copies the files to its module cache; a folder that someone
rewrites between the check and the copy (a race on one's own disk) is outside what a pin can promise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

SHA256_PIN = re.compile(r"sha256:[0-9a-f]{64}")
COMMIT_PIN = re.compile(r"[0-9a-f]{40}")


class CodePinError(ValueError):
    """The folder's code does not match ``model.revision``; the message says what to pin."""


def code_files(folder: Path) -> list[Path]:
    """Every ``*.py`` below ``folder`` (hidden folders such as ``.git`` excluded), sorted by relative path.

    Symlinked folders are walked too (``Path.rglob`` would skip them, leaving their modules unhashed yet importable);
    a folder reached twice through links is walked once."""
    out, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root) / f for f in files if f.endswith(".py") and (Path(root) / f).is_file())
    return sorted(out, key=lambda f: f.relative_to(folder).as_posix())


def auto_maps(folder: Path) -> dict[str, dict]:
    """``{json file name: its auto_map}`` for the folder's top-level JSON files that have one."""
    out = {}
    for file in sorted(folder.glob("*.json")):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not a config transformers could read either
        if not isinstance(data, dict) or data.get("auto_map") is None:
            continue
        auto_map = data["auto_map"]
        if isinstance(auto_map, (list, tuple)):  # the legacy tokenizer form [slow, fast] transformers still reads
            auto_map = {"AutoTokenizer": list(auto_map)}
        out[file.name] = auto_map if isinstance(auto_map, dict) else {"?": repr(auto_map)}  # refused as malformed
    return out


def _references(auto_map: dict) -> list[str]:
    refs = []
    for value in auto_map.values():
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                refs.append(v if isinstance(v, str) else repr(v))
    return refs


MODULE_REF = re.compile(r"[A-Za-z_]\w*\.[A-Za-z_]\w*")  # transformers splits "module.Class" on its one dot


def outside_references(folder: Path) -> list[str]:
    """``auto_map`` entries that would import code a digest of ``folder`` does not cover: another repository or
    path (``repo--module.Class``), a malformed reference, or a module with no ``.py`` file in the folder."""
    hashed = {f.relative_to(folder).as_posix() for f in code_files(folder)}
    bad = []
    for name, auto_map in auto_maps(folder).items():
        for ref in _references(auto_map):
            if "--" in ref or not MODULE_REF.fullmatch(ref) or f"{ref.split('.')[0]}.py" not in hashed:
                bad.append(f"{name}: {ref}")
    return bad


def code_digest(folder: Path) -> str:
    """``sha256:<hex>`` over (relative path, sha256 of contents) of every code file, and every ``auto_map``:
    renames, deletions and a re-pointed loader count."""
    h = hashlib.sha256()
    for file in code_files(folder):
        h.update(file.relative_to(folder).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(file.read_bytes()).hexdigest().encode() + b"\n")
    for name, auto_map in auto_maps(folder).items():
        h.update(b"auto_map\0" + name.encode() + b"\0" + json.dumps(auto_map, sort_keys=True).encode() + b"\n")
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
    outside = outside_references(folder)
    if outside:
        raise CodePinError(f"{folder}: auto_map names code that is not a .py file inside the folder, which no pin "
                           f"of the folder covers: {'; '.join(outside)}. Copy that code into the folder and point "
                           f"auto_map at it as module.Class")
    digest = code_digest(folder)
    how = (f"review the .py files and auto_map entries in {folder}, then set model.revision: {digest} (their "
           f"digest now)")
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
    mapped = [folder / name for name in auto_maps(folder)]
    for file in [*code_files(folder), *mapped]:
        blob = Path(file).readlink().name if file.is_symlink() else None
        if blob != git_blob_id(file.read_bytes()):
            raise CodePinError(f"{file}: this code file is not the blob of commit {commit} (edited or replaced in "
                               f"the cache); {how}")
