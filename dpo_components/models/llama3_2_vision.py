"""torchtune 0.6.1's Llama 3.2 Vision builders, importable without torchvision.

``torchtune.models.llama3_2_vision`` imports ``torchtune.models.clip``, whose ``_transform`` module imports
torchvision at import time for ``CLIPImageTransform``, the image tiling of torchtune's own SFT data. Where
torchvision does not import (PyPI's wheels are built against CUDA torch: beside the CPU torch 2.13 build they fail
with "operator torchvision::nms does not exist"), nothing of the vision family imports: not the model builders
(torch only), not the HF checkpointer's ``LLAMA3_VISION`` weight conversion. A meta-path finder
(``dpo_components._tune_hook``, installed at interpreter start by the package's ``.pth`` file, and again by
:func:`import_vision_family`) answers for that one module with a stand-in (``_tune_hook.clip_transform_stand_in``)
whose
``CLIPImageTransform`` raises when constructed and names ours (``dpo_components.vision.images.ImageTiler``, the
released Hugging Face processor's tiling, PIL and numpy only). Where torchvision imports, torchtune's own module
loads.

YAML configs may name the builders here (``dpo_components.models.llama3_2_vision.lora_llama3_2_vision_11b``): the
same functions as torchtune's.
"""

from __future__ import annotations

import importlib
import types


def import_vision_family() -> types.ModuleType:
    """``torchtune.models.llama3_2_vision``, with the finder of the stand-in in place (module docstring)."""
    from dpo_components import _tune_hook

    _tune_hook.install()  # already there when the package's .pth file ran at start-up
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
