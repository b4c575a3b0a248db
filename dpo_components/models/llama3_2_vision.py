"""torchtune 0.6.1's Llama 3.2 Vision builders, importable without torchvision.

``torchtune.models.llama3_2_vision`` imports ``torchtune.models.clip``, whose ``_transform`` module imports
torchvision at import time for ``CLIPImageTransform``, the image tiling of torchtune's own SFT data. Where
torchvision does not import (PyPI's wheels are built against CUDA torch: beside the CPU torch 2.13 build they fail
with "operator torchvision::nms does not exist"), nothing of the vision family imports, not even the model
builders, which need only torch. :func:`import_vision_family` registers a stand-in for that one module, whose
``CLIPImageTransform`` raises when constructed and names ours (``dpo_components.vision.images.ImageTiler``, the
released Hugging Face processor's tiling, PIL and numpy only); the builders then import unchanged. Where
torchvision imports, nothing is replaced.

YAML configs name the builders here (``dpo_components.models.llama3_2_vision.lora_llama3_2_vision_11b``): the
same functions as torchtune's, reached through this module so the stand-in is in place first.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_TRANSFORM_MODULE = "torchtune.models.clip._transform"


class _CLIPImageTransformWithoutTorchvision:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ImportError(
            "torchtune's CLIPImageTransform needs torchvision, which does not import here; the preference data "
            "builders tile images with dpo_components.vision.images.ImageTiler (transformers' "
            "MllamaImageProcessorPil: PIL and numpy)"
        )


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or RuntimeError from a wheel built for another torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # a half-imported package would fail differently on the next import
        return False
    return True


def import_vision_family() -> types.ModuleType:
    """``torchtune.models.llama3_2_vision``, imported with the stand-in for CLIP's transform module when
    torchvision does not import (module docstring)."""
    if _TRANSFORM_MODULE not in sys.modules and not _torchvision_imports():
        stand_in = types.ModuleType(_TRANSFORM_MODULE)
        stand_in.CLIPImageTransform = _CLIPImageTransformWithoutTorchvision
        stand_in.__doc__ = f"Stand-in registered by {__name__} (torchvision does not import)."
        sys.modules[_TRANSFORM_MODULE] = stand_in
    return importlib.import_module("torchtune.models.llama3_2_vision")


_family = import_vision_family()
llama3_2_vision_11b = _family.llama3_2_vision_11b
lora_llama3_2_vision_11b = _family.lora_llama3_2_vision_11b
qlora_llama3_2_vision_11b = _family.qlora_llama3_2_vision_11b
llama3_2_vision_90b = _family.llama3_2_vision_90b
lora_llama3_2_vision_90b = _family.lora_llama3_2_vision_90b
qlora_llama3_2_vision_90b = _family.qlora_llama3_2_vision_90b
llama3_2_vision_encoder = _family.llama3_2_vision_encoder
llama3_2_vision_decoder = _family.llama3_2_vision_decoder
lora_llama3_2_vision_encoder = _family.lora_llama3_2_vision_encoder
lora_llama3_2_vision_decoder = _family.lora_llama3_2_vision_decoder
