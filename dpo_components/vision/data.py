"""Image-grounded preference pairs: a builder beside ``preference_dataset`` with the same conventions (``source``,
``data_files``, ``split``, ``format``, ``column_map``, ``max_length``, ``on_bad_row``, held-out parts).

Rows as people publish them:

- RLAIF-V (``openbmb/RLAIF-V-Dataset``): ``image``, ``question``, ``chosen``, ``rejected`` strings; ``question`` is
  read as the prompt when the rows have no ``prompt`` column;
- TRL's vision format (``trl-lib/rlaif-v``, ``HuggingFaceH4/rlaif-v_formatted``): ``images`` (a list) and
  conversational ``prompt`` / ``chosen`` / ``rejected``, the user content holding ``{"type": "image"}`` parts
  where the images go, in order (the implicit form, whole ``chosen`` / ``rejected`` conversations, too);
- local JSON lines whose ``image`` / ``images`` hold paths, relative to the data file's folder.

Images may be PIL images, Hugging Face ``datasets`` Image values (``{"bytes", "path"}``), bytes or paths. In a
string prompt, ``<image>`` or ``<|image|>`` marks where an image goes (LLaVA-style rows); a prompt with no marker
gets its images at the start of its first user turn (RLAIF-V). Each image becomes one ``<|image|>`` token (Llama
3.2 Vision reads the image through cross-attention), so truncation cannot split an image's tokens from its
features: a prompt shortened to ``max_prompt_length`` loses its oldest turns with their images, and a turn whose
text is cut keeps its images (at its start). Bad rows, raised naming file, row and image, or skipped and counted
with ``on_bad_row: skip``: an image that is missing or cannot be decoded, an image value of an unknown kind,
markers and images that differ in number, image parts in a response.

Every image is decoded once while the data is built (so a bad one stops the setup, not a step hours in), then
again, and tiled, each time its pair is drawn: the dataset keeps the rows (memory-mapped by ``datasets``) and each
pair's row position, not the pixels. Tiling is the released processor's (:class:`dpo_components.vision.images
.ImageTiler`); ``tile_size`` and ``max_num_tiles`` must be the model's.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset as HFDataset
from datasets import Image as ImageFeature
from torchtune.data import Message
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from dpo_components.data.collate import PreferenceCollator
from dpo_components.data.dataset import (
    PreferenceDataset,
    _files,
    _line_describer,
    _tokenize_pair,
    check_tokenize_arguments,
    each_row,
    load_rows,
    own_truncation,
    report_skipped,
)
from dpo_components.data.errors import BadRow
from dpo_components.data.formats import FORMATS, detect_format, map_columns
from dpo_components.data.report import DataReport
from dpo_components.vision.collate import VisionPreferenceCollator
from dpo_components.vision.images import ImageTiler, open_image

IMAGE_COLUMNS = ("images", "image")  # TRL's list, RLAIF-V's single image
IMAGE_MARKER = re.compile(r"<\|image\|>|<image>")


def _row_images(row: dict[str, Any], column: str) -> list[Any]:
    """The row's image values, in order (a single image is a list of one; none or null: no images)."""
    value = row.get(column)
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _marked(row: dict[str, Any]) -> dict[str, Any]:
    """The row with every ``{"type": "image"}`` content part written as the text marker ``<|image|>``, so the
    text formats' parser reads it; any other part is left for the parser to judge."""

    def parts(content: Any) -> Any:
        if not isinstance(content, list):
            return content
        return [{"type": "text", "text": "<|image|>"} if isinstance(p, dict) and p.get("type") == "image" else p
                for p in content]  # fmt: skip

    def messages(value: Any) -> Any:
        if isinstance(value, dict):
            return {**value, "content": parts(value.get("content"))} if "content" in value else value
        if isinstance(value, list):
            return [messages(m) for m in value]
        return value

    return {k: messages(v) if k in ("prompt", "chosen", "rejected") else v for k, v in row.items()}


def _with_image_parts(message: Message, next_image: int) -> tuple[Message, int]:
    """``message`` with its text's image markers turned into image parts (``content``: the image's index in the
    row), numbered from ``next_image``; and the next index."""
    content = []
    for part in message.content:
        if part["type"] != "text" or not IMAGE_MARKER.search(part["content"]):
            content.append(part)
            continue
        pieces = IMAGE_MARKER.split(part["content"])
        for k, text in enumerate(pieces):
            if k:
                content.append({"type": "image", "content": next_image})
                next_image += 1
            if text.strip():
                content.append({**part, "content": text})
    return Message(message.role, content, masked=message.masked, ipython=message.ipython, eot=message.eot), next_image


def _place_images(
    prompt: list[Message], chosen: list[Message], rejected: list[Message], n_images: int
) -> list[Message]:
    """The prompt with image parts where its markers are (or the images at the start of its first user turn when
    it has none); refuses markers in a response and markers that do not match the row's images."""
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if any(IMAGE_MARKER.search(m.text_content) for m in response):
            raise BadRow(f"the {name} response holds an image; images belong in the prompt",
                         "an image in a response")  # fmt: skip
    placed, next_image = [], 0
    for message in prompt:
        message, next_image = _with_image_parts(message, next_image)
        placed.append(message)
    if next_image == 0 and n_images:
        first_user = next((i for i, m in enumerate(placed) if m.role == "user"), None)
        if first_user is None:
            raise BadRow("the row has images and its prompt no user turn to put them in")
        m = placed[first_user]
        images = [{"type": "image", "content": k} for k in range(n_images)]
        placed[first_user] = Message(m.role, images + m.content, masked=m.masked, ipython=m.ipython, eot=m.eot)
    elif next_image != n_images:
        raise BadRow(f"the prompt has {next_image} image placeholder(s) and the row {n_images} image(s)",
                     "image placeholders and images differ in number")  # fmt: skip
    return placed


def _image_digest(value: Any, base_dir: Path | None) -> str:
    """SHA-256 of the image's file bytes (or a PIL image's pixels): what the fingerprint and reference cache key."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        data = value["bytes"]
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, (str, Path)) or isinstance(value, dict):
        path = Path(value["path"] if isinstance(value, dict) else value)
        data = (path if path.is_absolute() or base_dir is None else base_dir / path).read_bytes()
    else:  # a PIL image
        buffer = io.BytesIO()
        buffer.write(f"{value.mode}{value.size}".encode())
        buffer.write(value.tobytes())
        data = buffer.getvalue()
    return hashlib.sha256(data).hexdigest()


class VisionPreferenceDataset(PreferenceDataset):
    """Tokenized image-grounded pairs. Item i is :class:`PreferenceDataset`'s item plus ``images`` (each image's
    tiles [n_tiles, 3, tile_size, tile_size]) and ``aspect_ratios`` (each [2]: tiles down, across), decoded and
    tiled on access from the rows kept (module docstring)."""

    def __init__(
        self,
        samples: list[dict[str, Any]],
        source: str,
        rows: HFDataset,
        image_column: str,
        tiler: ImageTiler,
        base_dir: Path | None,
        image_token_id: int,
        skipped: Counter | None = None,
        row_numbers: list[int] | None = None,
    ) -> None:
        super().__init__(samples, source, skipped, row_numbers)
        self._rows, self._image_column, self.tiler, self._base_dir = rows, image_column, tiler, base_dir
        self.image_token_id = image_token_id

    def with_images(self, text_collator: PreferenceCollator) -> VisionPreferenceCollator:
        """The collator of these pairs: ``text_collator``'s batches plus each pair's images, once
        (``dpo_components.data.collate.make_collator`` asks every dataset for it)."""
        return VisionPreferenceCollator(text_collator, self.image_token_id, self.tiler.tokens_per_tile)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        values = _row_images(self._rows[sample["row_position"]], self._image_column)
        tiled = [self.tiler(open_image(values[k], self._base_dir)) for k in sample["image_ids"]]
        return {**sample, "images": [t for t, _ in tiled], "aspect_ratios": [r for _, r in tiled]}

    def content_hash(self) -> str:
        """The text's hash (:meth:`PreferenceDataset.content_hash`) with each pair's image bytes and the tiling."""
        if self._content_hash is None:
            digest = hashlib.sha256(PreferenceDataset.content_hash(self).encode())
            digest.update(json.dumps([self.tiler.tile_size, self.tiler.max_num_tiles,
                                      [s["image_digests"] for s in self._samples]]).encode())  # fmt: skip
            self._content_hash = digest.hexdigest()
        return self._content_hash


def _undecoded(rows: HFDataset, column: str) -> HFDataset:
    """``rows`` with the image column's ``datasets`` Image feature (alone or in a list) left undecoded: values
    stay ``{"bytes", "path"}`` until a pair is drawn."""
    feature = rows.features.get(column)
    inner = getattr(feature, "feature", None)
    if isinstance(feature, ImageFeature):
        return rows.cast_column(column, ImageFeature(decode=False))
    if isinstance(inner, ImageFeature):
        undecoded = copy.deepcopy(feature)
        undecoded.feature = ImageFeature(decode=False)
        return rows.cast_column(column, undecoded)
    return rows


def vision_preference_dataset(
    tokenizer: ModelTokenizer,
    *,
    source: str,
    data_files: str | list[str] | None = None,
    split: str = "train",
    format: str = "auto",
    column_map: dict[str, str] | None = None,
    image_column: str | None = None,
    tile_size: int = 560,
    max_num_tiles: int = 4,
    patch_size: int = 14,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
    holdout_fraction: float = 0.0,
    part: Literal["train", "heldout"] = "train",
    holdout_seed: int = 0,
    **load_dataset_kwargs: Any,
) -> VisionPreferenceDataset:
    """Load image-grounded preference pairs (a YAML ``_component_``; module docstring for the formats).

    Args are :func:`dpo_components.data.preference_dataset`'s, plus:
        image_column: the column with the images (default: ``images``, else ``image``).
        tile_size, max_num_tiles, patch_size: the model's tiling (Llama 3.2 Vision 11B Instruct: 560, 4, 14).
    """
    image_id = getattr(tokenizer, "image_id", None)
    if image_id is None:
        raise TypeError(f"{type(tokenizer).__name__} has no image token (image_id): image-grounded pairs need a "
                        "Llama 3.2 Vision tokenizer (torchtune.models.llama3_2_vision.llama3_2_vision_transform's "
                        "tokenizer, or llama3_tokenizer with <|image|>)")  # fmt: skip
    max_length = check_tokenize_arguments(tokenizer, FORMATS, format, column_map, max_length, max_prompt_length,
                                          on_bad_row)  # fmt: skip
    rows, numbers, where = load_rows(source, data_files, split, column_map, holdout_fraction, part, holdout_seed,
                                     **load_dataset_kwargs)  # fmt: skip
    column_map = dict(column_map or {})
    if "prompt" not in column_map and "prompt" not in rows.column_names and "question" in rows.column_names:
        column_map["prompt"] = "question"  # RLAIF-V
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMNS if c in rows.column_names), None)
        if image_column is None:
            raise ValueError(f"{where}: no image column among {list(IMAGE_COLUMNS)} (columns: {rows.column_names}); "
                             "set image_column")  # fmt: skip
    elif image_column not in rows.column_names:
        raise ValueError(f"{where}: image_column '{image_column}' is not among the columns {rows.column_names}")
    rows = _undecoded(rows, image_column)
    files = _files(data_files)
    base_dir = Path(files[0]).parent if len(files) == 1 and Path(files[0]).is_file() else None
    tiler = ImageTiler(tile_size, max_num_tiles, patch_size=patch_size)

    def tokenize(position_and_row: tuple[int, dict[str, Any]]) -> tuple[dict[str, Any], Any]:
        position, raw = position_and_row
        values = _row_images(raw, image_column)
        row = map_columns(_marked(raw), column_map)
        fmt = detect_format(row) if format == "auto" else format
        if fmt is None:
            raise BadRow(f"cannot detect the preference format from columns {sorted(row)}; set format to one of "
                         f"{FORMATS}, and column_map if the columns are named differently",
                         "the preference format cannot be detected")  # fmt: skip
        digests = []
        for k, value in enumerate(values):
            try:
                open_image(value, base_dir)
                digests.append(_image_digest(value, base_dir))
            except BadRow as bad:
                raise BadRow(f"image {k}: {bad}", bad.summary) from None
        sample, cuts = _tokenize_pair(tokenizer, row, fmt, max_length, max_prompt_length,
                                      place_images=lambda p, c, r: _place_images(p, c, r, len(values)))  # fmt: skip
        kept = sample["prompt_ids"].count(image_id)  # a shortened prompt loses its oldest turns, images with them
        if any(image_id in sample[f"{side}_response_ids"] for side in ("chosen", "rejected")):
            raise BadRow("a response holds the image token; images belong in the prompt", "an image in a response")
        first = len(values) - kept
        return {**sample, "row_position": position, "image_ids": list(range(first, len(values))),
                "image_digests": digests[first:]}, cuts  # fmt: skip

    skipped = Counter()
    with own_truncation(tokenizer):
        results, kept_rows = each_row(list(enumerate(rows)), numbers, tokenize, source=where, on_bad_row=on_bad_row,
                                      describe_row=_line_describer(data_files), skipped=skipped)  # fmt: skip
    report_skipped(skipped, len(results), rows, where, lambda: "")
    samples = [sample for sample, _ in results]
    text = PreferenceDataset(samples, where, skipped, kept_rows)
    dataset = VisionPreferenceDataset(samples, where, rows, image_column, tiler, base_dir, image_id, skipped,
                                      kept_rows)
    dataset.report = DataReport.of(text, len(rows), [cuts for _, cuts in results], max_length)
    return dataset
