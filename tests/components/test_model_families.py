"""Every model family's tiny stand-in (dpo_components.tiny.families), through the same code paths as the real
models: Hugging Face weights in and out (torchtune's checkpointer, Qwen3's own), logits against `transformers`, and
LoRA adapters against `peft` with adapters far from zero (after one training step lora_B is so small that a wrong
adapter layout hides under any tolerance: that is how Qwen's PEFT adapters shipped wrong)."""

import pytest
import torch
from helpers import assert_peft_logits_equal
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torchtune import training
from torchtune.generation import generate
from torchtune.modules import local_kv_cache
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from dpo_components.checkpointing import (
    TUNE_ADAPTER_FILE,
    load_peft_adapter,
    lora_settings,
    peft_layout,
    save_checkpoint_dir,
    save_lora_checkpoint,
)
from dpo_components.models.dora import unscale_dora_bias
from dpo_components.tiny.families import FAMILIES, hf_checkpointer, lora_tiny_model, tiny_model

PEFT_FAMILIES = ("qwen2_5", "qwen3", "mistral", "gemma2")  # torchtune exports these; Phi-3/Phi-4 (fused) are ours


def load_base(family, files, out):
    checkpointer = hf_checkpointer(family, files, ["model.safetensors"], out)
    return checkpointer, checkpointer.load_checkpoint()[training.MODEL_KEY]


def transformers_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_round_trip_and_match_transformers(family, tiny_family, tmp_path):
    files = tiny_family(family)
    checkpointer, state = load_base(family, files, tmp_path)
    ours = tiny_model(family).eval()
    ours.load_state_dict(state)
    theirs = transformers_model(files)
    assert type(theirs).__name__ == FAMILIES[family]["hf"]["architectures"][0]
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)

    # torchtune -> HF: the written checkpoint holds the source's tensors under the source's names
    out = save_checkpoint_dir(checkpointer, tmp_path / "step_0", model_state=ours.state_dict())
    source, written = load_file(files / "model.safetensors"), load_file(out / "model-00001-of-00001.safetensors")
    assert written.keys() == source.keys()
    for key in source:
        torch.testing.assert_close(written[key], source[key], rtol=0, atol=0)


def lora_model_far_from_zero(family, state, dora):
    model = lora_tiny_model(family, ["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
                            lora_rank=4, lora_alpha=8, use_dora=dora)  # fmt: skip
    model.load_state_dict(state, strict=False)
    unscale_dora_bias(model)  # as the recipes build it
    torch.manual_seed(0)
    for name, param in get_adapter_params(model).items():
        if "lora_b" in name:
            param.data.normal_(0.0, 0.05)
    for module in model.modules():  # DoRA: magnitudes start at the base's row norms, then move apart per row
        if hasattr(module, "initialize_dora_magnitude"):
            module.initialize_dora_magnitude()
            module.magnitude.data.mul_(torch.empty_like(module.magnitude).uniform_(0.5, 1.5))
    return model.eval()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_checkpoint_holds_merged_model_and_adapter(family, dora, tiny_family, tmp_path):
    """LoRA and DoRA: the checkpoint's merged model computes what the trained model did, and its PEFT adapter on
    the base computes the same (torchtune's export gets q/k rows wrong for Qwen's lora_B and for every other
    family's DoRA magnitude; Qwen's q/k/v biases are scaled by torchtune's DoRA, not by DoRA's definition)."""
    files = tiny_family(family)
    checkpointer, state = load_base(family, files, tmp_path)
    model = lora_model_far_from_zero(family, state, dora)
    cfg = {"lora_rank": 4, "lora_alpha": 8, "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
           "apply_lora_to_mlp": True, "use_dora": dora}  # fmt: skip
    out = save_lora_checkpoint(
        checkpointer, tmp_path / "step_1", model, lora_settings(OmegaConf.create(cfg)), torch.float32, {}
    )

    # the adapter reads back (resume) into the same tensors
    adapter = load_peft_adapter(out, **peft_layout(checkpointer))
    expected = get_adapter_params(model)
    assert adapter.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(adapter[key], value.detach(), rtol=0, atol=0)

    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = transformers_model(out)(ids).logits
        torch.testing.assert_close(merged, model(ids), rtol=1e-4, atol=1e-4)  # merged = base + adapter, ours
        assert (merged - transformers_model(files)(ids).logits).abs().max() > 0.1  # the adapter matters
    if family not in PEFT_FAMILIES:  # Phi: torchtune's names for resume, and our fused PEFT export for LoRA
        assert (out / "adapter" / TUNE_ADAPTER_FILE).is_file()
    if family in PEFT_FAMILIES or not dora:
        assert_peft_logits_equal(out, files)  # the PEFT adapter on the base = the merged model
    else:
        assert not (out / "adapter" / "adapter_config.json").exists()


def test_qwen3_kv_cached_generation_equals_full_forward(tiny_family, tmp_path):
    """Qwen3Attention's decoding path (KV cache, q/k norms before RoPE at each new position) gives the greedy tokens
    that full forwards over the growing sequence give."""
    _, state = load_base("qwen3", tiny_family("qwen3"), tmp_path)
    model = tiny_model("qwen3").eval()
    model.load_state_dict(state)
    prompt = torch.randint(0, 500, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), local_kv_cache(model, batch_size=1, device=torch.device("cpu"), dtype=torch.float32):
        cached, _ = generate(model, prompt, max_generated_tokens=8, temperature=0.0, top_k=None)
    sequence = prompt
    with torch.no_grad():
        for _ in range(8):
            sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached.tolist() == sequence.tolist()


def test_qwen3_qlora_keeps_nf4_base_and_trains_the_adapters(tiny_family, tmp_path):
    """dpo_components.models.qwen3's QLoRA variant: NF4 weights under the adapters, a state dict in the model's dtype
    (what the checkpointer writes), logits near the bf16-free base's, gradients on the adapters only."""
    from torchao.dtypes.nf4tensor import NF4Tensor

    _, state = load_base("qwen3", tiny_family("qwen3"), tmp_path)
    base = tiny_model("qwen3").eval()
    base.load_state_dict(state)
    qlora = lora_tiny_model("qwen3", ["q_proj", "v_proj"], apply_lora_to_mlp=True, quantize_base=True)
    qlora.load_state_dict(state, strict=False)
    assert isinstance(qlora.layers[0].attn.q_proj.weight, NF4Tensor)
    assert isinstance(qlora.layers[0].mlp.w1.weight, NF4Tensor)
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for v in qlora.state_dict().values())
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gap = (qlora(ids) - base(ids)).abs().max()
    assert 0 < gap < 0.5  # NF4 rounding only (logits ~1.5): lora_B starts at zero
    set_trainable_params(qlora, get_adapter_params(qlora))  # as the recipe does
    qlora(ids).logsumexp(-1).mean().backward()
    trained = {n for n, p in qlora.named_parameters() if p.grad is not None}
    assert trained == set(get_adapter_params(qlora)) and qlora.layers[0].mlp.w1.lora_b.weight.grad.abs().sum() > 0
