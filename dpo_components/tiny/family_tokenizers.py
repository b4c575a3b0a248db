"""Tiny tokenizers of every torchtune 0.6.1 model family, trained here on the synthetic task's text.

Each is loaded by that family's own torchtune builder (``qwen2_5_tokenizer``, ``mistral_tokenizer``, ...) from
files in the family's format, so a test exercises the real class and chat format with a small vocabulary:

- SentencePiece ``tokenizer.model`` (Llama 2, Mistral, Gemma, Phi-3), trained with the ``sentencepiece`` package,
  with the family's control tokens as user-defined symbols and its BOS/EOS/PAD/UNK ids;
- byte-level BPE ``vocab.json`` + ``merges.txt`` (Qwen2, Qwen2.5, Qwen3, Phi-4), trained with ``tokenizers``;
- the special tokens with small ids right after the vocabulary, in a ``tokenizer.json``-style file
  (``added_tokens``) that torchtune's ``special_tokens_path`` reads, in the order of the family's own table.

    python -m dpo_components.tiny.family_tokenizers OUT_DIR   # writes OUT_DIR/<family>/ for every family
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import ByteLevelBPETokenizer
from torchtune.models.gemma import gemma_tokenizer
from torchtune.models.llama2 import llama2_tokenizer
from torchtune.models.mistral import mistral_tokenizer
from torchtune.models.phi3 import phi3_mini_tokenizer
from torchtune.models.phi3._tokenizer import PHI3_SPECIAL_TOKENS
from torchtune.models.phi4 import phi4_tokenizer
from torchtune.models.phi4._tokenizer import PHI4_SPECIAL_TOKENS
from torchtune.models.qwen2 import qwen2_tokenizer
from torchtune.models.qwen2._tokenizer import QWEN2_SPECIAL_TOKENS
from torchtune.models.qwen2_5 import qwen2_5_tokenizer
from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from dpo_components.models.chat_formats import gemma2_tokenizer, mistral_v0_3_tokenizer, qwen2_5_instruct_tokenizer
from dpo_components.models.chat_formats import phi4_tokenizer as shipped_phi4_tokenizer
from dpo_components.models.qwen3 import QWEN3_SPECIAL_TOKENS, qwen3_tokenizer
from dpo_components.tiny.synthetic import corpus_lines

FAMILIES = ("llama2", "mistral", "gemma", "phi3", "qwen2", "qwen2_5", "qwen3", "phi4")
SENTENCEPIECE_VOCAB = 512
BPE_VOCAB = 600
CHAT_WORDS = "You are a helpful assistant. Write a review. Sure, here is one: the film was great ! ? , ."

# SentencePiece families: (control tokens as single pieces, ids and normalizer settings), as in the released models
# (Llama's: text kept as is but for a leading "▁"; "\n" falls back to its byte).
_LLAMA_IDS = dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
                  remove_extra_whitespaces=False)  # fmt: skip
_SENTENCEPIECE = {
    "llama2": ([], _LLAMA_IDS),
    "mistral": (["[INST]", "[/INST]"], _LLAMA_IDS),
    "gemma": (
        ["<start_of_turn>", "<end_of_turn>"],
        dict(
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
        ),  # Gemma keeps text as is ("\n" is a piece, no leading "▁")
    ),
    "phi3": ([], _LLAMA_IDS),
}
_SPECIAL_TOKENS = {"phi3": PHI3_SPECIAL_TOKENS, "qwen2": QWEN2_SPECIAL_TOKENS, "qwen2_5": QWEN2_5_SPECIAL_TOKENS,
                   "qwen3": QWEN3_SPECIAL_TOKENS, "phi4": PHI4_SPECIAL_TOKENS}  # fmt: skip


def _corpus() -> list[str]:
    return [*corpus_lines(seed=0, n=2000), CHAT_WORDS, "user assistant system model"]


def _write_sentencepiece(out: Path, family: str) -> None:
    symbols, ids = _SENTENCEPIECE[family]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=SENTENCEPIECE_VOCAB, model_type="bpe",
        byte_fallback=True, user_defined_symbols=symbols, character_coverage=1.0, num_threads=1,
        minloglevel=2, **ids,
    )  # fmt: skip
    (out / "tokenizer.model").write_bytes(model.getvalue())


def _write_bpe(out: Path) -> None:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False)
    bpe.save_model(str(out))  # vocab.json + merges.txt


def _write_special_tokens(out: Path, family: str, first_id: int) -> dict[str, int]:
    """The family's special tokens renumbered from ``first_id`` in their table's id order."""
    names = sorted(_SPECIAL_TOKENS[family], key=_SPECIAL_TOKENS[family].get)
    tokens = {name: first_id + i for i, name in enumerate(names)}
    added = [{"id": i, "content": name, "special": True} for name, i in tokens.items()]
    (out / "special_tokens.json").write_text(json.dumps({"added_tokens": added}, indent=1))
    return tokens


def write_family_tokenizer(out_dir: str | Path, family: str) -> Path:
    """Write ``family``'s tiny tokenizer files into ``out_dir`` (deterministic; about a second); returns it."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family in _SENTENCEPIECE:
        _write_sentencepiece(out, family)
        if family == "phi3":
            _write_special_tokens(out, family, SENTENCEPIECE_VOCAB)
    else:
        _write_bpe(out)
        vocab = json.loads((out / "vocab.json").read_text())
        _write_special_tokens(out, family, len(vocab))
    return out


# What the configs ship where torchtune's format differs from the released template (dpo_components.models.chat_formats)
SHIPPED_BUILDERS = {"gemma": gemma2_tokenizer, "mistral": mistral_v0_3_tokenizer, "qwen2_5": qwen2_5_instruct_tokenizer,
                    "phi4": shipped_phi4_tokenizer, "qwen3": qwen3_tokenizer}  # fmt: skip
TORCHTUNE_BUILDERS = {"llama2": llama2_tokenizer, "mistral": mistral_tokenizer, "gemma": gemma_tokenizer,
                      "phi3": phi3_mini_tokenizer, "qwen2": qwen2_tokenizer, "qwen2_5": qwen2_5_tokenizer,
                      "phi4": phi4_tokenizer}  # fmt: skip


def family_tokenizer(files: str | Path, family: str, torchtune_class: bool = False, **kwargs: Any) -> ModelTokenizer:
    """The tokenizer the configs of ``family`` use, on the files of :func:`write_family_tokenizer`: torchtune's own
    builder, or ours where torchtune's chat format differs from the model's (``torchtune_class`` forces torchtune's).
    ``kwargs``: e.g. ``max_seq_len``."""
    files = Path(files)
    use_ours = family in SHIPPED_BUILDERS and not (torchtune_class and family in TORCHTUNE_BUILDERS)
    builder = SHIPPED_BUILDERS[family] if use_ours else TORCHTUNE_BUILDERS[family]
    if family in _SENTENCEPIECE:
        special = {"special_tokens_path": str(files / "special_tokens.json")} if family == "phi3" else {}
        return builder(str(files / "tokenizer.model"), **special, **kwargs)
    return builder(str(files / "vocab.json"), str(files / "merges.txt"),
                   special_tokens_path=str(files / "special_tokens.json"), **kwargs)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    args = parser.parse_args()
    for family in FAMILIES:
        print(write_family_tokenizer(Path(args.out_dir) / family, family))


if __name__ == "__main__":
    main()
