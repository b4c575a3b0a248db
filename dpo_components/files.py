"""Every file a run writes and a later run reads back, under one rule: written whole or not at all (a temporary
name in the same directory, synced, then renamed), listed with its size and BLAKE2b hash in a manifest written
after it, and verified against that manifest before it is read. A write that fails says why the OS refused it
(ENOSPC, EROFS, EDQUOT, ...) and which file (:func:`writing`).

Who uses it: checkpoints (``dpo_components.checkpointing``: one manifest per ``step_<N>``), online DPO's round files
(``dpo_components.online.rounds.RoundFiles``: one manifest per round, extended after each file), the precomputed
reference cache (``dpo_components.reference``: a manifest beside each cache file), and the recipes' metric logs
(:func:`writing` around each write).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

_CHUNK = 8 << 20

# what to do about each cause, after the OS's own words
_FIXES = {
    errno.ENOSPC: "free space on that disk or point output_dir (or the cache_dir) at another one",
    errno.EDQUOT: "your disk quota is used up: free space under it or write elsewhere",
    errno.EROFS: "the file system is mounted read-only: point output_dir (or the cache_dir) at a writable one",
    errno.EACCES: "no permission to write there",
    errno.EFBIG: "the file is larger than the file system or `ulimit -f` allows",
}


class WriteError(OSError):
    """A file that could not be written: the message names the file and the cause the OS gave (``errno``)."""

    def __init__(self, code: int, path: str | Path, what: str = "") -> None:
        super().__init__(code, os.strerror(code), str(path))
        self.message = (f"could not write {what + ' ' if what else ''}{path}: {errno.errorcode.get(code, code)} "
                        f"({os.strerror(code)})" + (f"; {_FIXES[code]}" if code in _FIXES else ""))  # fmt: skip

    def __str__(self) -> str:
        return self.message


# the causes a write fails with that are about the disk, not the code: these are named (others raise as they are)
WRITE_CAUSES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO)
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error (safetensors) shows the errno
_TORCH_LOST_IT = "unexpected pos"  # torch.save given a path, whose write failed: the errno is gone


def os_error_of(error: BaseException, path: str | Path) -> int | None:
    """The errno behind a failed write, when it is one of :data:`WRITE_CAUSES`; else None.

    Looked for where the libraries keep it: an ``OSError`` itself or as an explicit ``__cause__``; each rank's error
    of torch.distributed.checkpoint's ``CheckpointException``; the text ``(os error N)`` of safetensors'
    ``SafetensorError``. Only torch.save's ``unexpected pos`` (which keeps nothing) is explained by the file system
    of ``path``: no space left, or read-only."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno if e.errno in WRITE_CAUSES else None
        todo.append(e.__cause__)
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException, per rank
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        if (match := _OS_ERROR_TEXT.search(str(e))) and int(match.group(1)) in WRITE_CAUSES:
            return int(match.group(1))
        if _TORCH_LOST_IT in str(e):
            return _file_system_says(path)
    return None


def _file_system_says(path: str | Path) -> int | None:
    directory = Path(path)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if stat.f_bavail == 0 or (stat.f_favail == 0 and stat.f_files):
        return errno.ENOSPC
    return None


@contextlib.contextmanager
def writing(path: str | Path, what: str = "") -> Iterator[None]:
    """Run a block that writes ``path``: a failure the OS explains becomes a :class:`WriteError` naming the cause
    and the file (``what``: e.g. "checkpoint"), whatever library wrapped it; anything else is raised as it is."""
    try:
        yield
    except (WriteError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as error:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        code = os_error_of(error, path)
        if code is None:
            raise
        raise WriteError(code, path, what) from error


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system syncs directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | Path, write: Callable[[Path], None], what: str = "") -> Path:
    """``write(temporary_path)``, then sync and rename it to ``path``: ``path`` holds the old content or the whole
    new one, never part of it. A failure removes the temporary file and raises (a :class:`WriteError` where the OS
    said why)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path, what):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    _sync_directory(path.parent)
    return path


def write_text(path: str | Path, text: str, what: str = "") -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write_atomic(path, write, what)


def write_json(path: str | Path, value: Any, what: str = "") -> Path:
    return write_text(path, json.dumps(value, indent=1) + "\n", what)


def write_jsonl(path: str | Path, rows: list[dict[str, Any]], what: str = "") -> Path:
    return write_text(path, "".join(json.dumps(row) + "\n" for row in rows), what)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], what: str = "", **metadata: str) -> Path:
    """A safetensors file, atomically."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or None), what)


def torch_save(value: Any, path: str | Path) -> None:
    """``torch.save`` through a Python file object, so that a full disk surfaces as the OS's error (given a path,
    torch reports only ``[enforce fail at inline_container.cc] unexpected pos``). Not atomic: for files inside a
    directory that is itself renamed into place."""
    with writing(path), open(path, "wb") as f:
        torch.save(value, f)


# ------------------------------------------------------------------------------------------------- manifests


def file_digest(path: str | Path) -> str:
    """BLAKE2b of every byte of a file, read in 8 MiB chunks (about 0.5 GB/s per core): a same-size edit anywhere
    changes it."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)  # hashlib releases the GIL here: files hash in parallel threads
    return digest.hexdigest()


def digests(paths: list[Path]) -> list[str]:
    """:func:`file_digest` of each path, hashed in parallel threads."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(len(paths), 1))) as pool:
        return list(pool.map(file_digest, paths))


def manifest_entries(directory: str | Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "blake2b"}}`` of the named files of ``directory``."""
    paths = [Path(directory) / n for n in names]
    return {n: {"bytes": p.stat().st_size, "blake2b": h} for n, p, h in zip(names, paths, digests(paths))}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A manifest's content; raises ``FileNotFoundError`` or ``ValueError`` (unreadable, or no ``files``)."""
    try:
        manifest = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{Path(path).name} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{Path(path).name} lists no files")
    for name, entry in manifest["files"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
                and isinstance(entry.get("blake2b"), str)):  # fmt: skip
            raise ValueError(f"{Path(path).name}: the entry of {name} is not {{bytes, blake2b}}")
    return manifest


def entries_problem(directory: str | Path, entries: dict[str, dict[str, Any]]) -> str | None:
    """The first file of ``entries`` (in ``directory``) that is missing, of another size, or of another hash than
    recorded, said in words; None when all match. Sizes are checked before any file is hashed."""
    directory = Path(directory)
    for name, entry in entries.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    for name, file_hash in zip(entries, digests([directory / n for n in entries])):
        if file_hash != entries[name]["blake2b"]:
            return f"{name} does not match its hash in the manifest (changed after it was written)"
    return None


def record_in_manifest(manifest_path: str | Path, names: list[str], **values: Any) -> dict[str, Any]:
    """Add the named files (beside the manifest) to ``manifest_path``, creating it, and set ``values`` at its top
    level; written atomically, after the files themselves. Returns the manifest."""
    manifest_path = Path(manifest_path)
    try:
        manifest = read_manifest(manifest_path)
    except (FileNotFoundError, ValueError):
        manifest = {"files": {}}
    manifest["files"].update(manifest_entries(manifest_path.parent, names))
    manifest.update(values)
    write_json(manifest_path, manifest)
    return manifest


def remove_stale_temporaries(directory: str | Path, pattern: str, min_age_s: float = 0.0) -> list[Path]:
    """Remove what killed writers left in ``directory``: the entries matching ``pattern`` (names ending in
    ``.tmp-<pid>`` or ``.tmp``) whose pid is not a live process on this machine and that were last changed at least
    ``min_age_s`` ago (a directory other machines share, e.g. a cache: their pids mean nothing here). Returns them."""
    removed = []
    for path in sorted(Path(directory).glob(pattern)):
        pid = path.name.rpartition(".tmp-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue  # a write in progress in another process
        try:
            if min_age_s and time.time() - path.stat().st_mtime < min_age_s:
                continue
        except FileNotFoundError:  # renamed into place meanwhile by its writer
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
