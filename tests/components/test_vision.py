"""Image-grounded pairs (dpo_components.vision): encode-once equals torchtune's encode-per-row path, image tiling
as the released processor does it, and the vision preference data's bad rows."""

import pytest
import torch
from PIL import Image
from torchtune.data import padded_collate_tiled_images_and_mask
from torchtune.modules.transforms import VisionCrossAttentionMask

from dpo_components.data.collate import preference_collator
from dpo_components.data.dataset import IGNORE_INDEX
from dpo_components.logprobs import concatenated_logprobs, full_logits_sequence_logprobs
from dpo_components.losses import DPOLoss, IPOLoss, KTOLoss, SequenceLogProbs, SimPOLoss
from dpo_components.models import apply_model_fixes
from dpo_components.tiny.tokenizer import tiny_tokenizer
from dpo_components.tiny.vision_model import TINY_VISION_ENCODER_ARGS, tiny_llama_vision
from dpo_components.vision.collate import VisionPreferenceCollator
from dpo_components.vision.images import ImageTiler
from dpo_components.vision.model import ImagePairFusion

TILE, PATCH = TINY_VISION_ENCODER_ARGS["tile_size"], TINY_VISION_ENCODER_ARGS["patch_size"]
TOKENS_PER_TILE = (TILE // PATCH) ** 2 + 1


def _pairs(n_pairs=3, seed=0):
    """Pairs whose prompts hold 1-2 images of different sizes (1 or 2 tiles), the image token where it falls."""
    tokenizer, tiler = tiny_tokenizer(), ImageTiler(TILE, TINY_VISION_ENCODER_ARGS["max_num_tiles"])
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n_pairs):
        n_images = 1 + i % 2
        images, ratios = [], []
        for k in range(n_images):
            size = (30 + 40 * ((i + k) % 2), 30)  # wide images take 2 tiles
            pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
            tiles, ratio = tiler(Image.fromarray(pixels))
            images.append(tiles)
            ratios.append(ratio)
        text = lambda s: tokenizer.encode(s, add_bos=False, add_eos=False)
        prompt = [tokenizer.bos_id] + [tokenizer.image_id] * n_images + text(f"what is in picture {i}?")
        chosen, rejected = text("a red circle" + " big" * i), text("a blue square")
        samples.append({
            "prompt_ids": prompt, "chosen_response_ids": chosen, "chosen_labels": chosen,
            "rejected_response_ids": rejected, "rejected_labels": rejected[:-1] + [IGNORE_INDEX],
            "images": images, "aspect_ratios": ratios, "index": i, "desirable": bool(i % 2),
        })  # fmt: skip
    return tokenizer, samples


def _encode_per_row(model, tokenizer, samples):
    """torchtune's own path: every text row carries its images (repeated for chosen and rejected), collated by
    ``padded_collate_tiled_images_and_mask``, through ``DeepFusionModel.forward``; the naive log-softmax."""
    masks = VisionCrossAttentionMask(tile_size=TILE, patch_size=PATCH, image_token_id=tokenizer.image_id)
    rows = []
    for side in ("chosen", "rejected"):
        for s in samples:
            tokens = s["prompt_ids"] + s[f"{side}_response_ids"]
            row = {"tokens": tokens, "labels": [IGNORE_INDEX] * len(s["prompt_ids"]) + s[f"{side}_labels"],
                   "encoder_input": {"images": s["images"], "aspect_ratio": s["aspect_ratios"]}}  # fmt: skip
            rows.append(masks(row))
    batch = padded_collate_tiled_images_and_mask(rows, padding_idx=tokenizer.pad_id, ignore_idx=IGNORE_INDEX,
                                                 pad_direction="right")  # fmt: skip
    # torchtune 0.6.1 views its [R, n_img, L, S] masks as [R, L, n_img * S] without moving the image axis first,
    # which scrambles them when a row has more than one image: concatenate each image's mask along S instead.
    per_image = batch["encoder_input"]["images"].shape[2] * TOKENS_PER_TILE
    encoder_mask = torch.zeros(len(rows), batch["tokens"].shape[1], batch["encoder_mask"].shape[-1], dtype=torch.bool)
    for r, row in enumerate(rows):
        for k, mask in enumerate(row["encoder_mask"]):
            encoder_mask[r, : mask.shape[0], k * per_image : k * per_image + mask.shape[1]] = mask
    logits = model(batch["tokens"], encoder_input=batch["encoder_input"], encoder_mask=encoder_mask)
    return full_logits_sequence_logprobs(logits, batch["labels"])


@pytest.mark.parametrize("loss_fn", [DPOLoss(beta=0.1), IPOLoss(beta=0.1), SimPOLoss(beta=2.0, gamma=0.5),
                                     KTOLoss(beta=0.1)], ids=["dpo", "ipo", "simpo", "kto"])  # fmt: skip
@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["rows", "prefix_shared"])
def test_each_pairs_images_are_encoded_once_and_give_the_per_row_logprobs_and_gradients(loss_fn, prefix_sharing):
    torch.manual_seed(0)
    fusion = tiny_llama_vision(gate_init=1.0)  # torchtune's DeepFusionModel; gates open so the images count
    model = apply_model_fixes(fusion)
    assert isinstance(model, ImagePairFusion) and model.encoder is fusion.encoder
    tokenizer, samples = _pairs()
    unpaired = loss_fn.data_kind == "unpaired"
    if not unpaired:
        samples = [{k: v for k, v in s.items() if k != "desirable"} for s in samples]
    collate = VisionPreferenceCollator(preference_collator(tokenizer.pad_id, prefix_sharing=prefix_sharing),
                                       tokenizer.image_id, TOKENS_PER_TILE)  # fmt: skip
    reference = None
    if loss_fn.needs_reference:
        with torch.no_grad():
            reference = SequenceLogProbs.from_concatenated(*_encode_per_row(fusion, tokenizer, samples),
                                                           collate(samples).get("desirable"))  # fmt: skip

    calls = []
    hook = fusion.encoder.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["images"].shape[0]),
                                                with_kwargs=True)  # fmt: skip
    once = concatenated_logprobs(model, collate(samples))
    hook.remove()
    assert calls == [len(samples)]  # one encoder pass for the batch, one entry per pair
    loss_fn(once, reference).losses.mean().backward()
    grads_once = {n: p.grad.clone() for n, p in fusion.named_parameters() if p.grad is not None}
    fusion.zero_grad()

    per_row = SequenceLogProbs.from_concatenated(*_encode_per_row(fusion, tokenizer, samples),
                                                 collate(samples).get("desirable"))  # fmt: skip
    loss_fn(per_row, reference).losses.mean().backward()
    grads_per_row = {n: p.grad.clone() for n, p in fusion.named_parameters() if p.grad is not None}

    for field in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(once, field), getattr(per_row, field), rtol=1e-5, atol=1e-5)
    assert grads_once.keys() == grads_per_row.keys()
    assert any(n.startswith("encoder.") and g.abs().sum() > 0 for n, g in grads_once.items())  # images matter
    for name in grads_once:  # rtol 1e-5; atol 1e-5 of the tensor's largest gradient (sums over many rows round)
        scale = float(grads_per_row[name].abs().max())
        torch.testing.assert_close(grads_once[name], grads_per_row[name], rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")
