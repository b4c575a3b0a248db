"""Image-grounded pairs (dpo_components.vision): encode-once equals torchtune's encode-per-row path, image tiling
as the released processor does it, and the vision preference data's bad rows."""

import json
import re

import pytest
import torch
from datasets import Dataset
from PIL import Image
from torchtune.data import padded_collate_tiled_images_and_mask
from torchtune.modules.transforms import VisionCrossAttentionMask

from dpo_components.data.collate import preference_collator
from dpo_components.data.dataset import IGNORE_INDEX
from dpo_components.data.errors import PreferenceDataError
from dpo_components.logprobs import concatenated_logprobs, full_logits_sequence_logprobs
from dpo_components.losses import DPOLoss, IPOLoss, KTOLoss, SequenceLogProbs, SimPOLoss
from dpo_components.models import apply_model_fixes
from dpo_components.tiny.tokenizer import tiny_tokenizer
from dpo_components.tiny.vision_model import TINY_VISION_ENCODER_ARGS, tiny_llama_vision
from dpo_components.vision.collate import VisionPreferenceCollator
from dpo_components.vision.data import vision_preference_dataset
from dpo_components.vision.images import CLIP_MEAN, CLIP_STD, ImageTiler
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
    # rtol 1e-5, atol 1e-5 of the model's largest gradient: a gradient summed over many positions (a gate's) rounds
    # with the size of its terms, not of the sum
    scale = max(float(g.abs().max()) for g in grads_per_row.values())
    for name in grads_once:
        torch.testing.assert_close(grads_once[name], grads_per_row[name], rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------- image tiling


@pytest.mark.parametrize("size", [(1, 1), (90, 30), (30, 90), (500, 1), (1, 500), (56, 56), (57, 56), (300, 200)])
def test_tiles_and_aspect_ratio_follow_the_best_canvas_and_clip_normalisation(size):
    from torchtune.modules.transforms.vision_utils.get_canvas_best_fit import (
        find_supported_resolutions,
        get_canvas_best_fit,
    )

    tiler = ImageTiler(tile_size=56, max_num_tiles=2)
    tiles, ratio = tiler(Image.new("RGB", size, (255, 0, 0)))
    # torchtune's CLIPImageTransform picks the canvas with get_canvas_best_fit (resize_to_max_canvas=False)
    resolutions = torch.tensor(find_supported_resolutions(2, 56))
    canvas = get_canvas_best_fit(torch.empty(3, size[1], size[0]), resolutions, False)
    assert ratio.tolist() == [canvas[0] // 56, canvas[1] // 56]
    assert tiles.shape == (int(ratio.prod()), 3, 56, 56)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    red = (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    torch.testing.assert_close(tiles[0, :, 0, 0], red, rtol=1e-4, atol=1e-4)  # top-left is image, not padding
    if size == (90, 30):  # resized to 112 x 37 on a 112 x 56 canvas: the bottom rows are padding (zeros)
        torch.testing.assert_close(tiles[0, :, -1, 0], -mean / std, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "I;16", "I", "F"])
def test_every_image_mode_is_converted_to_rgb_as_the_released_processor_does(mode):
    tiler = ImageTiler(tile_size=56, max_num_tiles=2)
    rgb = Image.new("RGB", (40, 40), (10, 200, 30))
    image = Image.new("RGBA", (40, 40), (10, 200, 30, 0)) if mode in ("RGBA", "LA") else rgb.convert(mode)
    if mode == "LA":
        image = image.convert("LA")
    tiles, ratio = tiler(image)
    assert tiles.shape == (1, 3, 56, 56) and torch.isfinite(tiles).all()
    if mode in ("RGBA", "LA"):  # fully transparent: composited on white, as transformers' convert_to_rgb does
        white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        torch.testing.assert_close(tiles[0, :, 0, 0], white, rtol=1e-4, atol=1e-4)
    else:
        expected, _ = tiler(image.convert("RGB"))
        torch.testing.assert_close(tiles, expected)


# ------------------------------------------------------------------------------------ image-grounded data


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _build(data_files, source="json", **kwargs):
    settings = {"tile_size": 56, "max_num_tiles": 2, "max_length": 96, **kwargs}
    return vision_preference_dataset(tiny_tokenizer(), source=source, data_files=data_files, **settings)


@pytest.fixture
def image_dir(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (90, 30), (255, 0, 0)).save(tmp_path / "img/red.png")
    Image.new("P", (20, 20), 3).save(tmp_path / "img/palette.png")
    return tmp_path


def test_rlaif_v_rows_with_relative_paths_and_trl_rows_with_embedded_images_read_their_images(image_dir):
    tokenizer = tiny_tokenizer()
    rlaif_v = _write_jsonl(image_dir / "rlaif_v.jsonl", [
        {"image": "img/red.png", "question": "what colour is it?", "chosen": "red", "rejected": "blue"},
        {"image": "img/palette.png", "question": "and this one?", "chosen": "dark", "rejected": "light"},
    ])  # fmt: skip
    data = _build(rlaif_v)
    first = data[0]
    assert first["prompt_ids"].count(tokenizer.image_id) == 1 and len(first["images"]) == 1
    assert first["aspect_ratios"][0].tolist() == [1, 2] and first["images"][0].shape == (2, 3, 56, 56)
    # the image opens the user turn, before the question's text
    assert first["prompt_ids"].index(tokenizer.image_id) < len(first["prompt_ids"]) - 5

    part = lambda text: {"type": "text", "text": text}
    trl = Dataset.from_list([{
        "images": [Image.new("RGB", (30, 30), (0, 255, 0)), Image.new("L", (60, 20), 90)],
        "prompt": [{"role": "user", "content": [{"type": "image"}, part("first, then"), {"type": "image"},
                                                 part("second: which is green?")]}],
        "chosen": [{"role": "assistant", "content": [part("the first")]}],
        "rejected": [{"role": "assistant", "content": [part("the second")]}],
    }])  # fmt: skip
    trl.to_parquet(image_dir / "trl.parquet")
    sample = _build(str(image_dir / "trl.parquet"), source="parquet")[0]
    ids = sample["prompt_ids"]
    assert ids.count(tokenizer.image_id) == 2 and [t.shape[0] for t in sample["images"]] == [1, 2]
    between = ids[ids.index(tokenizer.image_id) + 1 : len(ids) - ids[::-1].index(tokenizer.image_id) - 1]
    assert tokenizer.decode(between).strip() == "first, then"  # each image where its part was


def test_images_change_the_content_hash(image_dir):
    rows = [{"image": "img/red.png", "question": "colour?", "chosen": "red", "rejected": "blue"}]
    before = _build(_write_jsonl(image_dir / "a.jsonl", rows)).content_hash()
    Image.new("RGB", (90, 30), (250, 0, 0)).save(image_dir / "img/red.png")
    assert _build(_write_jsonl(image_dir / "a.jsonl", rows)).content_hash() != before


@pytest.mark.parametrize("case, message", [
    ("missing", r"row 1 \(line 2\): image 0: image .*img/nowhere.png does not exist"),
    ("truncated", r"row 1 \(line 2\): image 0: image img/truncated.png cannot be (read|decoded)"),
    ("not_an_image", r"row 1 \(line 2\): image 0: image img/notes.png cannot be read"),
    ("unknown_kind", r"row 1 \(line 2\): image 0: an image must be a PIL image, a path, bytes"),
    ("two_markers", r"row 1 \(line 2\): the prompt has 2 image placeholder\(s\) and the row 1 image\(s\)"),
    ("image_in_response", r"row 1 \(line 2\): the chosen response holds an image"),
])  # fmt: skip
def test_a_bad_image_or_row_is_named_by_file_row_and_image(image_dir, case, message):
    red = (image_dir / "img/red.png").read_bytes()
    (image_dir / "img/truncated.png").write_bytes(red[: len(red) // 2])
    (image_dir / "img/notes.png").write_text("not a picture")
    good = {"image": "img/red.png", "question": "colour?", "chosen": "red", "rejected": "blue"}
    bad = {
        "missing": {**good, "image": "img/nowhere.png"},
        "truncated": {**good, "image": "img/truncated.png"},
        "not_an_image": {**good, "image": "img/notes.png"},
        "unknown_kind": {**good, "image": 7},
        "two_markers": {**good, "question": "<image> or <image>?"},
        "image_in_response": {**good, "chosen": "<image> red"},
    }[case]  # fmt: skip
    path = _write_jsonl(image_dir / f"{case}.jsonl", [good, bad])
    with pytest.raises(PreferenceDataError, match=f"{re.escape(path)} .*{message}"):
        _build(path)
    skipped = _build(path, on_bad_row="skip")
    assert len(skipped) == 1 and sum(skipped.skipped.values()) == 1


def test_a_shortened_prompt_loses_its_oldest_turns_with_their_images_and_never_splits_an_image_from_its_token(
    image_dir,
):
    tokenizer = tiny_tokenizer()
    Image.new("RGB", (20, 20), (0, 0, 255)).save(image_dir / "img/blue.png")
    prompt = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is this one? " * 4}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this other one, please?"}]},
    ]  # fmt: skip
    row = {"images": ["img/red.png", "img/blue.png"], "prompt": prompt,
           "chosen": [{"role": "assistant", "content": "blue"}], "rejected": [{"role": "assistant", "content": "red"}]}
    path = _write_jsonl(image_dir / "long.jsonl", [row])
    full = _build(path, max_length=256)[0]
    assert full["prompt_ids"].count(tokenizer.image_id) == 2 and len(full["images"]) == 2
    short = _build(path, max_prompt_length=len(full["prompt_ids"]) - 10, max_length=len(full["prompt_ids"]))[0]
    assert short["prompt_ids"].count(tokenizer.image_id) == 1 and short["image_ids"] == [1]  # the blue one kept
    torch.testing.assert_close(short["images"][0], full["images"][1])
    # cut further, into the latest turn's text: its image stays, in front of the text that is left
    shortest = _build(path, max_prompt_length=16, max_length=24)[0]
    assert shortest["prompt_ids"].count(tokenizer.image_id) == 1 and shortest["image_ids"] == [1]


def test_a_lora_vision_model_scores_what_its_merged_weights_score():
    """torchtune's LoRA builders make the encoder's attention causal (the model's is not): ImagePairFusion undoes
    that, so a LoRA policy trains the encoder it merges into."""
    from dpo_components.checkpointing.peft import merged_lora_state_dict
    from dpo_components.tiny.vision_model import lora_tiny_llama_vision

    torch.manual_seed(0)
    base = tiny_llama_vision(gate_init=1.0)
    lora = lora_tiny_llama_vision(["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, lora_rank=4,
                                  lora_alpha=8)  # fmt: skip
    lora.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_b" in name:
                param.normal_(std=0.05)
    live = apply_model_fixes(lora)
    merged = tiny_llama_vision()
    merged.load_state_dict(merged_lora_state_dict(live, 4, 8, torch.float32), strict=True)
    tokenizer, samples = _pairs()
    samples = [{k: v for k, v in s.items() if k != "desirable"} for s in samples]
    batch = VisionPreferenceCollator(preference_collator(tokenizer.pad_id), tokenizer.image_id, TOKENS_PER_TILE)(
        samples)
    with torch.no_grad():
        ours, theirs = concatenated_logprobs(live, batch), concatenated_logprobs(apply_model_fixes(merged), batch)
    torch.testing.assert_close(ours.chosen_logps, theirs.chosen_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.rejected_logps, theirs.rejected_logps, rtol=1e-5, atol=1e-4)


def test_llama_3_2_vision_imports_without_torchvision_and_clip_transform_names_our_tiler():
    """torchtune's CLIP transform module imports torchvision; where that fails, the package's import hook gives it
    a stand-in, so the vision builders import, and torchtune's image transform says what to use instead."""
    from dpo_components._tune_hook import _torchvision_imports

    if _torchvision_imports():
        pytest.skip("torchvision imports here: torchtune's own module is used")
    from torchtune.models.clip import CLIPImageTransform
    from torchtune.models.llama3_2_vision import lora_llama3_2_vision_11b  # noqa: F401 (it imports)

    with pytest.raises(ImportError, match="ImageTiler"):
        CLIPImageTransform()
