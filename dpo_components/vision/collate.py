"""Batches of image-grounded pairs: the text rows as for any pair, plus each pair's images once.

The text goes through the recipe's own collator (:class:`dpo_components.data.collate.PreferenceCollator`: [2B, L]
chosen then rejected rows, or one [prompt | chosen | rejected] row per pair with ``prefix_sharing``). The images
are added as torchtune's ``padded_collate_tiled_images_and_mask`` lays them out, but once per pair, not per row:

- ``images`` [B, n_img, n_tiles, 3, H, W]: each pair's images, tiles padded with zeros up to the batch's most
  tiles, images padded with all-zero images up to its most images;
- ``aspect_ratio`` [B, n_img, 2] (tiles down, across; (1, 1) for a padding image);
- ``image_rows`` [R]: the pair of each text row (``ImagePairFusion`` feeds row r its pair's encoder output);
- ``encoder_mask`` [R, L, n_img * n_tiles * tokens_per_tile]: text position t of a row attends to image k's own
  tiles from image k's ``<|image|>`` token up to the next one (torchtune's ``VisionCrossAttentionMask`` intervals:
  consecutive image tokens share the text after them); padding tiles and images are never attended to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchtune.modules.transforms import VisionCrossAttentionMask

from dpo_components.data.collate import PreferenceCollator
from dpo_components.data.segments import PADDING


def image_intervals(tokens: list[int], image_token_id: int) -> list[list[int]]:
    """[start, end) of the text positions that attend to each image, in image order (torchtune's rule)."""
    rule = VisionCrossAttentionMask(tile_size=1, patch_size=1, image_token_id=image_token_id)
    return rule._get_image_attention_intervals(tokens)


@dataclass(frozen=True)
class VisionPreferenceCollator:
    """The text collator's batch of pairs plus their images (module docstring)."""

    text: PreferenceCollator
    image_token_id: int
    tokens_per_tile: int

    def __post_init__(self) -> None:
        if self.text.packing:
            raise ValueError("packing does not hold images yet: set packing: false for image-grounded pairs")

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Tensor]:
        out = self.text(batch)
        image_rows = torch.arange(len(batch)) if self.text.prefix_sharing else torch.arange(len(batch)).repeat(2)
        # each row's tokens before padding (a prefix-shared row holds three documents: count them by segment)
        lengths = (out["segments"] != PADDING).sum(-1) if "segments" in out else out["lengths"]
        return {**out, **image_inputs(batch, out["input_ids"], lengths, image_rows, self.image_token_id,
                                      self.tokens_per_tile)}  # fmt: skip

    def data_positions(self, batch: list[dict[str, Any]]) -> int:
        return self.text.data_positions(batch)

    def computed_positions(self, batch: list[dict[str, Any]]) -> int:
        return self.text.computed_positions(batch)


def image_inputs(
    batch: list[dict[str, Any]],
    rows: Tensor,
    lengths: Tensor,
    image_rows: Tensor,
    image_token_id: int,
    tokens_per_tile: int,
) -> dict[str, Tensor]:
    """``images``, ``aspect_ratio``, ``image_rows`` and ``encoder_mask`` (module docstring) for the text ``rows``
    [R, L] (``lengths`` [R] before padding) of ``batch``'s samples (row r holds sample ``image_rows[r]``'s text);
    {} when no sample has an image."""
    n_images = max(len(sample["images"]) for sample in batch)
    if n_images == 0:
        return {}  # text-only pairs: the decoder runs without cross-attention inputs
    n_tiles = max(tiles.shape[0] for sample in batch for tiles in sample["images"])
    tile_shape = next(tiles.shape[1:] for sample in batch for tiles in sample["images"])
    images = torch.zeros(len(batch), n_images, n_tiles, *tile_shape)
    aspect_ratio = torch.ones(len(batch), n_images, 2, dtype=torch.long)
    for p, sample in enumerate(batch):
        for k, (tiles, ratio) in enumerate(zip(sample["images"], sample["aspect_ratios"])):
            images[p, k, : tiles.shape[0]] = tiles
            aspect_ratio[p, k] = ratio
    per_image = n_tiles * tokens_per_tile
    encoder_mask = torch.zeros(len(rows), rows.shape[1], n_images * per_image, dtype=torch.bool)
    for r, p in enumerate(image_rows.tolist()):
        intervals = image_intervals(rows[r, : int(lengths[r])].tolist(), image_token_id)
        sample = batch[p]
        if len(intervals) != len(sample["images"]):  # the data builder checks this; a collator is not trusted
            raise RuntimeError(f"pair {sample.get('index', p)}: {len(intervals)} image tokens in its text row, "
                               f"{len(sample['images'])} images")  # fmt: skip
        for k, (start, end) in enumerate(intervals):
            width = sample["images"][k].shape[0] * tokens_per_tile
            encoder_mask[r, start:end, k * per_image : k * per_image + width] = True
    return {"images": images, "aspect_ratio": aspect_ratio, "image_rows": image_rows, "encoder_mask": encoder_mask}


VISION_KEYS = ("images", "aspect_ratio", "encoder_mask", "image_rows")


def vision_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch's image inputs for ``ImagePairFusion.forward`` ({} for a text batch)."""
    return {key: batch[key] for key in VISION_KEYS if key in batch}
