"""Image-grounded preference pairs for Llama 3.2 Vision (each module: ``docs/architecture.md``): images read and
tiled as the released processor does (``images``), the dataset builder (``data``), batches holding each pair's
images once (``collate``) and the model that encodes them once per pair (``model``).

``dpo_components.vision.vision_preference_dataset`` is the YAML ``_component_`` of the data.
"""

from dpo_components.vision.collate import VisionPreferenceCollator
from dpo_components.vision.data import VisionPreferenceDataset, vision_preference_dataset
from dpo_components.vision.images import ImageTiler, open_image
from dpo_components.vision.model import ImagePairFusion, encode_images_once

__all__ = [
    "ImagePairFusion", "ImageTiler", "VisionPreferenceCollator", "VisionPreferenceDataset", "encode_images_once",
    "open_image", "vision_preference_dataset",
]  # fmt: skip
