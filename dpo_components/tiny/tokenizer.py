"""The tiny model's tokenizer: a byte-level BPE trained on the synthetic task, in Llama-3 format.

No tokenizer can be downloaded here, so the project trains its own and ships the result in
``dpo_components/tiny/assets/tiny_tokenizer/`` (regenerate with ``python -m dpo_components.tiny.tokenizer``).
It is written twice, with identical token ids:

- ``tokenizer.model``: tiktoken format (``base64(bytes) rank`` per line), read by torchtune's stock
  ``torchtune.models.llama3.llama3_tokenizer(path=..., special_tokens_path=.../tokenizer.json)``, which gives the
  Llama-3 chat format, ``pad_id`` and ``tokenize_messages`` with no custom code;
- ``tokenizer.json`` + ``tokenizer_config.json``: Hugging Face ``tokenizers`` format with the same vocabulary,
  merges and Llama-3 special tokens, so a saved checkpoint also loads in ``transformers`` and vLLM.

Ids equal tiktoken ranks: the 256 bytes first, then one id per BPE merge in merge order, then the special tokens.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dpo_components.tiny.synthetic import corpus_lines

ASSET_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")

# The regex Llama 3 (and torchtune's Llama3Tokenizer) splits text with before BPE.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Every name torchtune's Llama3Tokenizer looks up; ids follow the BPE vocabulary in this order.
SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>", "<|video|>",
)  # fmt: skip
# Llama 3's chat template, as the Instruct models' tokenizer_config.json has it (without the tool-calling parts).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def train_tiny_tokenizer(
    out_dir: str | Path = ASSET_DIR, vocab_size: int = 563, seed: int = 0, corpus: Iterable[str] | None = None
) -> Path:
    """Train the BPE on ``corpus`` (default: the synthetic sentiment task's) and write the three tokenizer files to
    ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    byte_chars = _byte_level_alphabet()

    draft = Tokenizer(models.BPE())
    draft.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=list(byte_chars.values()), show_progress=False
    )
    draft.train_from_iterator(corpus if corpus is not None else corpus_lines(seed, turns_apart=True), trainer=trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in
              json.loads(draft.to_str())["model"]["merges"]]  # fmt: skip

    # Renumber so that id == tiktoken rank: bytes, then merges in the order BPE learned them.
    vocab = {byte_chars[b]: b for b in range(256)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    bos = SPECIAL_TOKENS[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    tokenizer.save(str(out_dir / "tokenizer.json"))

    char_bytes = {c: b for b, c in byte_chars.items()}
    with open(out_dir / "tokenizer.model", "w") as f:
        for token, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
            raw = bytes(char_bytes[c] for c in token)
            f.write(f"{base64.b64encode(raw).decode()} {rank}\n")

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def tiny_tokenizer(max_seq_len: int | None = None, path: str | Path = ASSET_DIR):
    """torchtune's Llama-3 tokenizer over the shipped tiny tokenizer files (a YAML ``_component_``).

    tiktoken caches every file it loads under ``$TMPDIR/data-gym-cache``, keyed by the *path*, so a tokenizer
    regenerated at the same path would be read stale; the cache is switched off for this load.
    """
    from torchtune.models.llama3 import llama3_tokenizer

    path = Path(path)
    with no_tiktoken_cache():
        return llama3_tokenizer(
            path=str(path / "tokenizer.model"),
            special_tokens_path=str(path / "tokenizer.json"),
            max_seq_len=max_seq_len,
        )


@contextlib.contextmanager
def no_tiktoken_cache() -> Iterator[None]:
    """tiktoken's file cache off for the block (it keys files by path: a file rewritten in place reads stale)."""
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # "" disables tiktoken's cache
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(ASSET_DIR))
    args = parser.parse_args()
    print(f"wrote {train_tiny_tokenizer(args.out_dir)}")


if __name__ == "__main__":
    main()
