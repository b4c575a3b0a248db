"""What hashing every byte costs: the run fingerprint hashes the base checkpoint at each start, and every save
writes a manifest (hash of each file) that resume verifies.

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_hashing.py --gib 2 --shards 4

Writes ``--gib`` GiB of random bytes once as one file and once as ``--shards`` files (as a sharded HF checkpoint)
in a temporary directory, then prints seconds and GiB/s for ``file_digest`` (one file, one thread) and
``files_digest`` (the shards, hashed in parallel threads). The second read of a file may come from the page cache,
as it does right after a save; the first timing of each row drops the cache where the OS lets us.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from dpo_components.checkpointing import file_digest, files_digest


def write_random(path: Path, size: int) -> None:
    block = os.urandom(64 << 20)
    with open(path, "wb") as f:
        for start in range(0, size, len(block)):
            f.write(block[: min(len(block), size - start)])
            block = block[1:] + block[:1]  # not the same block twice


def drop_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temporary directory)")
    args = parser.parse_args()
    size = int(args.gib * (1 << 30))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        single = tmp / "model.safetensors"
        write_random(single, size)
        shard_names = [f"model-{i + 1:05d}-of-{args.shards:05d}.safetensors" for i in range(args.shards)]
        for name in shard_names:
            write_random(tmp / name, size // args.shards)
        rows = []
        for label, paths, fn in [
            ("one file, file_digest", [single], lambda: file_digest(single)),
            (f"{args.shards} shards, files_digest", [tmp / n for n in shard_names],
             lambda: files_digest(tmp, shard_names)),
        ]:  # fmt: skip
            drop_page_cache(paths)
            cold = timed(fn)
            warm = timed(fn)
            rows.append((label, cold, warm))
    print(f"{args.gib:g} GiB, {os.cpu_count()} CPUs\n")
    print("| what | first read (s) | GiB/s | again (s) | GiB/s |")
    print("|---|---|---|---|---|")
    for label, cold, warm in rows:
        print(f"| {label} | {cold:.1f} | {args.gib / cold:.2f} | {warm:.1f} | {args.gib / warm:.2f} |")


if __name__ == "__main__":
    main()
