"""dpo_components.reference: the reference decided once (none, adapters off, frozen copy, precomputed), its cache
key, and the cache reused without building a reference model. On the tiny model, a few seconds."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dpo_components.checkpointing import files_digest
from dpo_components.data import make_collator, tokenize_rows
from dpo_components.losses import DPOLoss, SimPOLoss
from dpo_components.reference import build_reference, reference_cache_key, reference_variant
from dpo_components.settings import RecipeSettings, ReferenceSettings
from dpo_components.tiny import synthetic
from dpo_components.tiny.model import lora_tiny_llama, tiny_llama


def settings(tmp_path, mode="model", **overrides):
    values = dict(device=torch.device("cpu"), dtype=torch.float32, output_dir=tmp_path, seed=0, batch_size=4,
                  gradient_accumulation_steps=1, epochs=1,
                  reference=ReferenceSettings(mode=mode, cache_dir=tmp_path / "cache", batch_size=4))  # fmt: skip
    return RecipeSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def pairs(tokenizer):
    return tokenize_rows(synthetic.preference_pairs(8, seed=0), tokenizer, source="rows", max_length=96)


def build(tmp_path, pairs, tokenizer, loss, model, *, mode="model", frozen_copy=None, **overrides):
    s = settings(tmp_path, mode, **overrides)
    collate = make_collator(tokenizer.pad_id, model.max_seq_len, 1, False, datasets={"dataset": pairs})
    return build_reference(s, loss, model, has_adapters=frozen_copy is None, frozen_copy=frozen_copy,
                           datasets={"train": pairs, "eval": None}, collate_fn=collate,
                           fingerprint={"base_checkpoint": "digest"})  # fmt: skip


def test_the_kind_follows_the_loss_and_the_policy(tmp_path, pairs, tokenizer):
    lora = lora_tiny_llama(lora_attn_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8)
    assert build(tmp_path, pairs, tokenizer, SimPOLoss(), lora).kind == "none"
    assert build(tmp_path, pairs, tokenizer, DPOLoss(), lora).kind == "adapters_off"
    frozen = tiny_llama()
    full = build(tmp_path, pairs, tokenizer, DPOLoss(), tiny_llama(), frozen_copy=lambda checkpointer: frozen)
    assert full.kind == "frozen_copy" and full.model is frozen


def test_a_precomputed_reference_equals_the_live_one_and_is_reused_without_a_model(tmp_path, pairs, tokenizer):
    torch.manual_seed(0)
    policy, frozen = tiny_llama(), tiny_llama()
    built = []

    def frozen_copy(checkpointer):
        built.append(1)
        return frozen

    live = build(tmp_path, pairs, tokenizer, DPOLoss(), policy, frozen_copy=frozen_copy)
    cached = build(tmp_path, pairs, tokenizer, DPOLoss(), policy, mode="precomputed", frozen_copy=frozen_copy)
    assert cached.kind == "precomputed" and len(built) == 2
    collate = make_collator(tokenizer.pad_id, policy.max_seq_len, 1, False, datasets={"dataset": pairs})
    batch = collate([pairs[i] for i in range(4)])
    with torch.no_grad():
        expected, got = live.logprobs(batch, "train"), cached.logprobs(batch, "train")
    torch.testing.assert_close(got.chosen_logps, expected.chosen_logps.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rejected_logps, expected.rejected_logps.float(), rtol=1e-5, atol=1e-5)
    again = build(tmp_path, pairs, tokenizer, DPOLoss(), policy, mode="precomputed", frozen_copy=frozen_copy)
    assert again.kind == "precomputed" and len(built) == 2  # the cache is read: no reference model built
    assert len(list((tmp_path / "cache").glob("reference_logps_*.safetensors"))) == 1


def test_the_variant_names_what_else_the_cached_values_depend_on(tmp_path):
    assert reference_variant(settings(tmp_path)) == "quantize_base=False,prefix_sharing=False,attention=-"
    shared = settings(tmp_path, prefix_sharing=True, flex_attention=False, quantize_base=True)
    assert reference_variant(shared) == "quantize_base=True,prefix_sharing=True,attention=sdpa"
    packed = settings(tmp_path, packing=True, packing_row_tokens=512)
    assert reference_variant(packed) == "quantize_base=False,prefix_sharing=False,attention=flex,packing_row_tokens=512"


def test_reference_cache_key_covers_every_byte_of_the_checkpoint(tmp_path: Path, pairs):
    tensors = {f"layer{i}": torch.randn(256, 1024, generator=torch.Generator().manual_seed(i)) for i in range(6)}
    save_file(tensors, tmp_path / "model.safetensors")  # 6 MiB: the middle is outside the first and last MiB
    key = lambda: reference_cache_key(pairs, files_digest(tmp_path, ["model.safetensors"]), torch.float32)
    before = key()
    tensors["layer3"] = tensors["layer3"] * 1.5  # same size, middle of the file
    save_file(tensors, tmp_path / "model.safetensors")
    assert key() != before
    assert json.dumps(before) and key() == key()  # and stable for the same bytes
    assert reference_cache_key(pairs, "digest", torch.float32) != reference_cache_key(pairs, "digest", torch.bfloat16)
