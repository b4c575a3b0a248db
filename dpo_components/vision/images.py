"""Images in, tiles out: what the preference data builder reads and what the encoder takes.

:func:`open_image` reads an image however a dataset holds it (a PIL image, a Hugging Face ``datasets`` Image value
``{"bytes", "path"}``, raw bytes, or a path, relative paths against the data file's folder) and decodes it fully,
so a missing, truncated or unreadable image fails here, naming itself, and not mid-run.

:class:`ImageTiler` is Llama 3.2 Vision's preprocessing as the released processor does it, by that processor:
transformers' ``MllamaImageProcessorPil`` (PIL and numpy; torchtune's ``CLIPImageTransform`` needs torchvision).
Any mode is converted to RGB as it does (alpha composited on white; palette, grayscale, CMYK, 16-bit converted by
PIL), the image is resized without distortion onto the best canvas of up to ``max_num_tiles`` tiles, padded, scaled
to [0, 1], normalised with the CLIP mean and std, and cut into ``tile_size`` tiles. The result is torchtune's layout:
tiles [n_tiles, 3, tile_size, tile_size] (only the image's own tiles; the collator pads) and the aspect ratio
(tiles down, tiles across).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from dpo_components.data.errors import BadRow

# The released Llama 3.2 Vision Instruct processor's settings (preprocessor_config.json), torchtune's defaults too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def describe_image(value: Any) -> str:
    """A short name of an image value for messages: its path, or its kind and size."""
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, dict):
        if value.get("path"):
            return str(value["path"])
        return f"embedded bytes ({len(value.get('bytes') or b'')} B)"
    if isinstance(value, (bytes, bytearray)):
        return f"embedded bytes ({len(value)} B)"
    if isinstance(value, Image.Image):
        return f"a PIL image ({value.mode}, {value.width}x{value.height})"
    return f"a {type(value).__name__}"


def open_image(value: Any, base_dir: str | Path | None = None) -> Image.Image:
    """The image ``value`` holds, fully decoded (module docstring); :class:`BadRow` naming it otherwise."""
    if isinstance(value, Image.Image):
        image = value
    else:
        try:
            if isinstance(value, dict) and value.get("bytes") is not None:
                image = Image.open(io.BytesIO(value["bytes"]))
            elif isinstance(value, (bytes, bytearray)):
                image = Image.open(io.BytesIO(value))
            elif isinstance(value, (str, Path)) or (isinstance(value, dict) and value.get("path")):
                path = Path(value["path"] if isinstance(value, dict) else value)
                if not path.is_absolute() and base_dir is not None:
                    path = Path(base_dir) / path
                if not path.is_file():
                    raise BadRow(f"image {path} does not exist", "a missing image file")
                image = Image.open(path)
            else:
                raise BadRow(f"an image must be a PIL image, a path, bytes or {{'bytes', 'path'}}; got "
                             f"{describe_image(value)}", "an image value of an unknown kind")  # fmt: skip
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise BadRow(f"image {describe_image(value)} cannot be read: {error}", "an unreadable image") from None
    try:
        image.load()  # decode now: a truncated file fails here, not in a training step
    except (OSError, ValueError, SyntaxError) as error:
        raise BadRow(f"image {describe_image(value)} cannot be decoded: {error}", "an undecodable image") from None
    if image.width < 1 or image.height < 1:
        raise BadRow(f"image {describe_image(value)} is empty ({image.width}x{image.height})", "an empty image")
    return image


class ImageTiler:
    """One image -> (tiles [n_tiles, 3, tile_size, tile_size] float32, aspect ratio [2]: tiles down, across), as
    the released Llama 3.2 Vision processor makes them (module docstring). ``tile_size`` 560 and
    ``max_num_tiles`` 4 are the 11B Instruct model's."""

    def __init__(
        self,
        tile_size: int = 560,
        max_num_tiles: int = 4,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
        patch_size: int = 14,
    ) -> None:
        from transformers import MllamaImageProcessorPil
        from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

        if tile_size % patch_size:
            raise ValueError(f"tile_size {tile_size} is not a multiple of patch_size {patch_size}")
        self.tile_size, self.max_num_tiles, self.patch_size = tile_size, max_num_tiles, patch_size
        self.processor = MllamaImageProcessorPil(
            size={"height": tile_size, "width": tile_size}, max_image_tiles=max_num_tiles,
            image_mean=list(image_mean), image_std=list(image_std), do_convert_rgb=True, resample=2,
        )  # fmt: skip
        self._aspect_ratios = [tuple(r) for r in get_all_supported_aspect_ratios(max_num_tiles)]  # id - 1 -> (h, w)

    def __call__(self, image: Image.Image) -> tuple[Tensor, Tensor]:
        out = self.processor([[image]], return_tensors="pt")
        n_tiles = int(out["num_tiles"][0][0])
        down, across = self._aspect_ratios[int(out["aspect_ratio_ids"][0, 0]) - 1]
        if down * across != n_tiles:  # the processor's own bookkeeping disagrees: never train on that
            raise RuntimeError(f"aspect ratio {down}x{across} and {n_tiles} tiles disagree")
        tiles = out["pixel_values"][0, 0, :n_tiles].to(torch.float32).contiguous()
        return tiles, torch.tensor([down, across])

    @property
    def tokens_per_tile(self) -> int:
        """Encoder tokens of one tile: its patches and the CLS token."""
        return (self.tile_size // self.patch_size) ** 2 + 1
