"""A run's output directory: who owns it, the manifest that makes a checkpoint complete, and which checkpoint a
resume continues from.

A checkpoint is one directory, ``<output_dir>/step_<N>/``, written under a temporary name (``.step_<N>.tmp*``) and
renamed into place when whole; ``manifest.json``, written last, records every other file's size and BLAKE2b hash and
the run's fingerprint. Resume takes the newest checkpoint whose files match its manifest (a truncated or missing file
is named, and the one before it is used).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from torchtune.utils import get_logger

from dpo_components.files import (
    digests,
    entries_problem,
    manifest_entries,
    read_manifest,
    writing,
)
from dpo_components.files import remove_stale_temporaries as remove_stale_files
from dpo_components.settings import ConfigError

RECIPE_STATE_FILE = "recipe_state.pt"  # written by dpo_components.checkpointing.state
MANIFEST_FILE = "manifest.json"


_STEP_DIR = re.compile(r"^step_(\d+)$")


log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or no complete one to resume from; the message says which and why."""

    __module__ = "dpo_components.checkpointing"  # its public home (re-exported there), as tracebacks name it


HASH_LOG_ABOVE = 2**30  # say what is being hashed (and about how long it takes) for checkpoints from 1 GiB


def files_digest(directory: str | Path, names: list[str]) -> str:
    """One hash over the named files of ``directory`` (e.g. a model's safetensors shards), by name and content.
    Large ones (from 1 GiB) get a log line first, with an estimate, and one with the time taken."""
    names = sorted(names)
    paths = [Path(directory) / n for n in names]
    size = sum(p.stat().st_size for p in paths if p.is_file())
    log = get_logger("INFO")  # torchtune's logger, which a `tune run` shows (this module's INFO lines it would not)
    if size >= HASH_LOG_ABOVE:  # ~0.4 GiB/s per shard and core (benchmarks/checkpoint_hashing.py)
        estimate = size / 2**30 / (0.4 * min(len(paths), os.cpu_count() or 1, 8))
        log.info(f"hashing {size / 2**30:.1f} GiB of checkpoint files in {directory} (every byte: the run's "
                 f"fingerprint and the reference cache key), about {estimate:.0f} s ...")  # fmt: skip
    start = time.perf_counter()
    digest = hashlib.blake2b(digest_size=16)
    for name, file_hash in zip(names, digests(paths)):
        digest.update(f"{name}:{file_hash};".encode())
    if size >= HASH_LOG_ABOVE:
        log.info(f"hashed in {time.perf_counter() - start:.0f} s")
    return digest.hexdigest()


def remove_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Remove the ``.step_<N>.tmp*`` directories that a killed or failed save left in ``output_dir``; returns them.

    They are never checkpoints (a save is renamed into place only when whole) and hold a full copy of the weights
    each. One whose name carries the pid of a live process on this machine (a save in progress) is kept.
    """
    removed = remove_stale_files(output_dir, ".step_*.tmp*")
    if removed:
        log.warning("removed %d unfinished checkpoint(s): %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def step_dirs(output_dir: str | Path) -> list[Path]:
    """The ``step_<N>`` directories of ``output_dir``, newest (largest N) first."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("step_*") if (m := _STEP_DIR.match(p.name))]
    return [path for _, path in sorted(found, reverse=True)]


def claim_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """A run owns its ``output_dir``. A fresh run (not ``resume``) refuses one that holds another run's
    ``step_<N>`` checkpoints, since a later resume would continue from them; with ``overwrite`` it deletes them
    and that run's metric logs and samples (the content-keyed reference cache stays)."""
    old = step_dirs(output_dir)
    if resume or not old:
        return
    names = ", ".join(p.name for p in old[:5]) + (", ..." if len(old) > 5 else "")
    if not overwrite:
        raise ConfigError(
            f"output_dir {output_dir} holds checkpoints of an earlier run ({names}). Set "
            "resume_from_checkpoint=true to continue that run, overwrite_output_dir=true to delete them and start "
            "over, or choose another output_dir."
        )
    for path in old:
        shutil.rmtree(path)
    for pattern in ("log_*.txt", "events.out.tfevents.*", "samples.jsonl"):
        for path in Path(output_dir).rglob(pattern):
            path.unlink()
    log.warning("overwrite_output_dir: deleted the earlier run's checkpoints (%s) and logs in %s", names, output_dir)


def write_manifest(checkpoint_dir: str | Path, run: dict[str, Any] | None = None) -> None:
    """Record every file of ``checkpoint_dir`` (size and BLAKE2b) and the run's fingerprint in ``manifest.json``;
    call it last."""
    checkpoint_dir = Path(checkpoint_dir)
    names = sorted(p.relative_to(checkpoint_dir).as_posix() for p in checkpoint_dir.rglob("*")
                   if p.is_file() and p.name != MANIFEST_FILE)  # fmt: skip
    with writing(checkpoint_dir / MANIFEST_FILE):
        (checkpoint_dir / MANIFEST_FILE).write_text(
            json.dumps({"files": manifest_entries(checkpoint_dir, names), "run": run}, indent=1) + "\n"
        )  # inside the checkpoint's temporary directory, which is renamed into place after it


def checkpoint_problem(checkpoint_dir: str | Path) -> str | None:
    """What is wrong with ``checkpoint_dir`` against its manifest (the first bad file), or None if it is complete."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        entries = read_manifest(checkpoint_dir / MANIFEST_FILE)["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE} (an unfinished save, or a checkpoint of an older version)"
    except (ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST_FILE} is unreadable ({error})"
    if RECIPE_STATE_FILE not in entries:
        return f"it has no {RECIPE_STATE_FILE} (not a checkpoint to resume from)"
    return entries_problem(checkpoint_dir, entries)


def checkpoint_fingerprint(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The fingerprint of the run that wrote ``checkpoint_dir``, from its manifest."""
    return json.loads((Path(checkpoint_dir) / MANIFEST_FILE).read_text())["run"] or {}


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete ``step_<N>`` of ``output_dir`` (its files match its manifest), or None. Each newer one
    that is not complete is skipped with a warning naming the bad file."""
    for path in step_dirs(output_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def resume_checkpoint(output_dir: str | Path) -> Path:
    """The checkpoint ``resume_from_checkpoint`` continues from: :func:`latest_checkpoint`; a ``ConfigError`` if
    there is none, a ``CheckpointError`` naming every checkpoint and what is wrong with it if none is complete."""
    path = latest_checkpoint(output_dir)
    if path is not None:
        return path
    problems = [f"  {p.name}: {checkpoint_problem(p)}" for p in step_dirs(output_dir)]
    if not problems:
        raise ConfigError(f"resume_from_checkpoint is true but {output_dir} holds no step_<N> checkpoint")
    raise CheckpointError(f"resume_from_checkpoint is true but no checkpoint in {output_dir} is complete:\n"
                          + "\n".join(problems))  # fmt: skip


def save_failed(path: Path, error: BaseException, last_good: Path | None) -> CheckpointError:
    """The one message a failed save ends a run with: what failed, where, and the checkpoint to resume from."""
    last = (f"the last good checkpoint is {last_good} (resume_from_checkpoint=true continues from it)"
            if last_good else "no checkpoint of this run was written before")  # fmt: skip
    return CheckpointError(f"could not write checkpoint {path} ({type(error).__name__}: {error}); nothing of it "
                           f"was kept, {last}")  # fmt: skip


def prepare_output_dir(output_dir: str | Path, resume: bool, overwrite: bool) -> Path | None:
    """The start of every run: claim ``output_dir`` (:func:`claim_output_dir`), remove what killed saves left
    (:func:`remove_stale_temporaries`), and return the checkpoint to resume from (:func:`resume_checkpoint`), or
    None for a fresh run."""
    claim_output_dir(output_dir, resume, overwrite)
    remove_stale_temporaries(output_dir)
    return resume_checkpoint(output_dir) if resume else None
