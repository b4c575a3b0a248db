"""One rule for every file a later run reads back (``dpo_components.files``): written whole or not at all, verified
against a manifest, and a write the OS refuses names the cause (ENOSPC, EROFS, EDQUOT) and the file, for every
writer the recipes use: on a real full tmpfs where the machine allows one, and with the wrapped errors injected."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from dpo_components import files
from dpo_components.data.dataset import load_rows
from dpo_components.data.formats import PreferenceDataError
from dpo_components.online import RoundFiles
from dpo_components.reference import cache_manifest, cache_problem, write_cache


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = files.write_text(tmp_path / "state.json", "old\n")

    def half_then_fail(tmp):
        tmp.write_text("ne")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        files.write_atomic(path, half_then_fail)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_os_cause_is_found_under_what_the_libraries_wrap(tmp_path):
    """torch.save given a path says only "[enforce fail at inline_container.cc] unexpected pos" (``torch_save``
    writes through a file object, which keeps the OSError); DCP wraps each rank's error in a CheckpointException;
    safetensors keeps only the text. Errors that are not the disk's are left alone."""
    if Path("/dev/full").is_char_device():  # a real ENOSPC from the kernel
        with pytest.raises(files.WriteError, match=r"could not write /dev/full: ENOSPC \(No space left on device\)"):
            files.torch_save({"w": torch.zeros(10_000)}, "/dev/full")
    dcp = CheckpointException("failed", {1: (OSError(errno.EDQUOT, "Disk quota exceeded"), None)})
    assert files.os_error_of(dcp, tmp_path) == errno.EDQUOT
    for text, code in (("No space left on device (os error 28)", errno.ENOSPC),
                       ("Disk quota exceeded (os error 122)", errno.EDQUOT)):  # fmt: skip
        assert files.os_error_of(SafetensorError(f"Error while serializing: I/O error: {text}"), tmp_path) == code
    # not the disk's doing (and tmp_path has room): None, so the error is raised as it is
    assert files.os_error_of(RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 1"), tmp_path) \
        is None  # fmt: skip
    try:
        try:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        except FileNotFoundError:
            raise ValueError("a bug while handling it") from None
    except ValueError as bug:
        assert files.os_error_of(bug, tmp_path) is None
    assert files.os_error_of(FileNotFoundError(errno.ENOENT, "missing"), tmp_path) is None
    with pytest.raises(files.WriteError, match=r"could not write the metric log .*/log.txt: EDQUOT \(Disk quota"):
        with files.writing(tmp_path / "log.txt", "the metric log"):
            raise dcp
    with pytest.raises(KeyError):  # not a write failure (and the disk has room): raised as it is
        with files.writing(tmp_path / "x"):
            raise KeyError("a bug")


def test_a_manifest_names_a_cut_an_edited_and_a_missing_file(tmp_path):
    for name, text in (("a.jsonl", "1\n2\n"), ("b.jsonl", "3\n")):
        files.write_text(tmp_path / name, text)
    files.record_in_manifest(tmp_path / "manifest.json", ["a.jsonl", "b.jsonl"], complete=True)
    entries = files.read_manifest(tmp_path / "manifest.json")["files"]
    assert files.entries_problem(tmp_path, entries) is None
    (tmp_path / "a.jsonl").write_text("1\n")
    assert files.entries_problem(tmp_path, entries) == "a.jsonl has 2 bytes, the manifest says 4"
    (tmp_path / "a.jsonl").write_text("1\n3\n")
    assert files.entries_problem(tmp_path, entries) == ("a.jsonl does not match its hash in the manifest (changed "
                                                        "after it was written)")  # fmt: skip
    (tmp_path / "a.jsonl").write_text("1\n2\n")
    (tmp_path / "b.jsonl").unlink()
    assert files.entries_problem(tmp_path, entries) == "b.jsonl is missing"


def test_round_files_are_read_only_as_recorded_and_a_rewrite_forgets_what_follows(tmp_path):
    round_files = RoundFiles(tmp_path, 1)
    round_files.write("samples.jsonl", [{"prompt_index": 0}])
    assert round_files.kept("samples.jsonl") and not round_files.kept("scores.jsonl")
    assert round_files.incomplete() == f"{round_files.manifest} does not mark the round complete"
    round_files.write("scores.jsonl", [{"rewards": [1.0, 0.0]}])
    round_files.write("reference_logps.safetensors", {"chosen_logps": torch.ones(2)})
    round_files.write("round.json", {"round": 1})
    assert round_files.incomplete() is None
    (round_files.directory / "samples.jsonl").write_text('{"prompt_index": 7}\n')  # same size, other content
    assert round_files.incomplete() == "samples.jsonl does not match its hash in the manifest (changed after it " \
                                       "was written)"  # fmt: skip
    round_files.write("samples.jsonl", [{"prompt_index": 0}])  # made again: the files after it are made again too
    assert not round_files.kept("scores.jsonl") and not round_files.kept("round.json")
    assert round_files.problem("scores.jsonl") == (f"scores.jsonl is not in {round_files.manifest} (written, but not "
                                                   "recorded: killed between the two)")  # fmt: skip


def test_a_reference_cache_is_read_only_when_it_matches_its_manifest(tmp_path):
    path = tmp_path / "reference_logps_abc.safetensors"
    values = {"chosen_logps": torch.arange(8.0), "rejected_logps": -torch.arange(8.0)}
    write_cache(path, values)
    assert cache_problem(path) is None and torch.equal(load_file(path)["chosen_logps"], values["chosen_logps"])
    save_file({**values, "chosen_logps": torch.arange(8.0).flip(0)}, path)  # same size, other values
    assert cache_problem(path) == f"{path.name} does not match its hash in the manifest (changed after it was written)"
    write_cache(path, values)
    path.write_bytes(path.read_bytes()[:-8])  # cut
    assert cache_problem(path).startswith(f"{path.name} has ")
    write_cache(path, values)
    cache_manifest(path).unlink()  # a kill between the cache and its manifest
    assert cache_problem(path).startswith("it has no manifest reference_logps_abc.manifest.json")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_line_that_does_not_parse_names_the_file_and_line(tmp_path, suffix):
    """It used to end in datasets' DatasetGenerationError; the file and line were only in a log line before it."""
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".csv":
        path.write_text("prompt,chosen,rejected\np,a,b\np,a,b\np,a,b,c\n")
        expected = f"{path} line 4: 4 fields, the header has 3"
    elif suffix == ".json":  # a JSON array, pretty-printed
        path.write_text(json.dumps([row, row], indent=1).replace('"b"', '"b', 1))  # an unclosed string
        expected = rf"{path} line 5: not valid JSON \(Invalid control character at"
    else:
        path.write_text(json.dumps(row) + "\n\n" + json.dumps(row)[:-1] + "\n" + json.dumps(row) + "\n")
        expected = rf"{path} line 3: not valid JSON \(Expecting ',' delimiter, column 47\)"
    with pytest.raises(PreferenceDataError, match=expected):
        load_rows(suffix.strip(".").replace("jsonl", "json"), str(path), "train", None, 0.0, "train", 0)


# --------------------------------------------------------------------------------- a real full disk, every writer


EVERY_WRITER = r"""
import json, os, subprocess, sys, torch
from pathlib import Path
full = Path(sys.argv[1]); sft_model = sys.argv[2]
(full / "step_1").mkdir(); (full / "logs").mkdir(); (full / "dcp").mkdir()
from torchtune.training import FullModelHFCheckpointer
from torchtune.training.metric_logging import DiskLogger
checkpointer = FullModelHFCheckpointer(checkpoint_dir=sft_model, checkpoint_files=["model.safetensors"],
                                       model_type="LLAMA3", output_dir=str(full / "hf"))
weights = checkpointer.load_checkpoint()["model"]
logger = DiskLogger(log_dir=str(full / "logs"))
from dpo_components import files
from dpo_components.checkpointing import save_checkpoint_dir, save_sharded_checkpoint, write_manifest
from dpo_components.online import RoundFiles
from dpo_components.reference import write_cache
from dpo_components.run import LoggedWrites
from dpo_components.samples import log_samples
import torch.distributed as dist
dist.init_process_group("gloo", init_method=f"file://{full.parent}/pg", rank=0, world_size=1)
model = torch.nn.Linear(256, 256)
optimizer = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 256)).sum().backward(); optimizer.step()
(full / "step_1" / "recipe_state.pt").write_bytes(b"x")
fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk to the last byte
try:
    while os.write(fd, b"\0" * 512):
        pass
except OSError:
    os.close(fd)
writers = {
    "recipe state": lambda: files.torch_save({"optimizer": torch.zeros(50_000)}, full / "step_1/recipe_state.pt"),
    "checkpoint": lambda: save_checkpoint_dir(checkpointer, full / "step_2", weights, recipe_state={"run": {}}),
    "DCP shards": lambda: save_sharded_checkpoint(full / "step_3", model, optimizer, {"run": {}}),
    "manifest": lambda: write_manifest(full / "step_1", run={"seed": 0, "big": "x" * 100_000}),
    "round file": lambda: RoundFiles(full, 0).write("samples.jsonl", [{"x": "y" * 100_000}]),
    "reference cache": lambda: write_cache(full / "reference_logps_k.safetensors", {"a": torch.zeros(100_000)}),
    "run.json": lambda: files.write_json(full / "rounds/run.json", {"x": "y" * 100_000}),
    "metric log": lambda: LoggedWrites(logger).log_dict({"loss": 1.0, "x" * 100_000: 2.0}, step=1),
    "eval samples": lambda: log_samples(LoggedWrites(logger), [{"prompt": "p" * 100_000}], step=1),
}
out = {}
for name, write in writers.items():
    try:
        write()
        out[name] = "written"
    except Exception as error:
        out[name] = f"{type(error).__name__}: {error}"
out["left"] = sorted(p.name for p in full.rglob(".*tmp*"))
print(json.dumps(out))
"""


def _full_tmpfs_available() -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


def test_every_writer_names_enospc_and_the_file_on_a_full_disk(tiny_setup, tmp_path):
    """A 1 MiB tmpfs (in a user namespace: no root needed), filled to the last byte; then each writer the recipes
    use: the recipe state, a whole HF checkpoint, FSDP2's DCP shards (1-rank group), a manifest, a round file, the
    reference cache, the rounds' run.json, the metric log and the eval samples. Each names ENOSPC and its file, and
    leaves no temporary file behind."""
    if not shutil.which("unshare") or not _full_tmpfs_available():
        pytest.skip("this machine lets no user mount a tmpfs (unshare -rm); the injected errors above still run")
    full = tmp_path / "full"
    full.mkdir()
    script = tmp_path / "writers.py"
    script.write_text(EVERY_WRITER)
    shell = (f"mount -t tmpfs -o size=1m tmpfs {full} && {sys.executable} {script} {full} "
             f"{tiny_setup / 'sft_model'}")  # fmt: skip
    done = subprocess.run(["unshare", "-rm", "sh", "-c", shell], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.pop("left") == []
    for name, message in out.items():
        assert "ENOSPC (No space left on device)" in message and str(full) in message, (name, message)
    assert out["checkpoint"].startswith(f"WriteError: could not write the Hugging Face files of {full}/.step_2.tmp")
    assert out["DCP shards"].startswith(f"WriteError: could not write checkpoint shards {full}/.step_3.tmp/dcp")
    assert out["recipe state"].startswith(f"WriteError: could not write {full}/step_1/recipe_state.pt: ENOSPC")
    assert out["metric log"].startswith(f"WriteError: could not write the metric log {full}/logs/log_")
