"""recipe_configs/tiny/lora_dpo_vision.yaml as shipped (sizes shrunk) through the LoRA recipes: a run killed with
SIGKILL resumes to the uninterrupted run's weights bit for bit, its merged model loads back (torchtune, transformers),
two FSDP2 ranks take one process's step, and what cannot take images yet is refused."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT, recipe_config, run_distributed_in_process
from helpers import logged, run_lora_recipe
from safetensors.torch import load_file
from test_full_dpo_distributed import Cfg, torchrun

from dpo_components.logprobs import concatenated_logprobs
from dpo_components.settings import ConfigError
from dpo_components.tiny.shapes_task import image_control, load_vision_model
from recipes.lora_dpo_distributed import LoRADPORecipeDistributed

CONFIG = "recipe_configs/tiny/lora_dpo_vision.yaml"
ADAPTER = "adapter/adapter_model.torchtune.safetensors"
MERGED = "model-00001-of-00001.safetensors"


def vision_args(task, out, **extra):
    """key=value arguments: the shipped config on the tests' small task (its prepare step's own output), 4 pairs a
    step, 2 steps an epoch, no eval."""
    settings = {"prepare.out_dir": task, "prepare.train_pairs": 16, "prepare.eval_pairs": 16,
                "prepare.caption_steps": 40, "prepare.caption_batch_size": 4, "output_dir": out, "batch_size": 4,
                "max_steps_per_epoch": 2, "eval_every_n_steps": "null", "log_every_n_steps": 1,
                "lr_scheduler.num_warmup_steps": 0, **extra}  # fmt: skip
    return [f"{key}={value}" for key, value in settings.items()]


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_runs_weights(tiny_family, tmp_path):
    task = tiny_family("llama3_2_vision")
    args = vision_args(task, tmp_path / "killed", epochs=4, save_every_n_steps=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "recipes/lora_dpo_single_device.py", "--config", CONFIG, *args],
                               cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "killed/step_3/manifest.json").exists():  # a complete checkpoint of step 3
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed/step_8").exists()  # killed mid-run
    run_lora_recipe(recipe_config(CONFIG, [*args, "resume_from_checkpoint=true"]))
    uninterrupted = vision_args(task, tmp_path / "uninterrupted", epochs=4, save_every_n_steps=8)
    recipe = run_lora_recipe(recipe_config(CONFIG, uninterrupted))
    for name in (ADAPTER, MERGED):
        assert_bitwise_equal(load_file(tmp_path / "killed/step_8" / name),
                             load_file(tmp_path / "uninterrupted/step_8" / name))  # fmt: skip
    losses = logged(Cfg(tmp_path / "uninterrupted"))
    assert losses[8]["loss"] < losses[1]["loss"]  # it learns from the pictures' pairs
    adapter = load_file(tmp_path / "uninterrupted/step_8" / ADAPTER)
    moved = [k for k, v in adapter.items() if "lora_b" in k and v.abs().max() > 0]
    assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("decoder.") for k in moved)
    # the image control's scoring (a loaded merged model against the loaded captioned model) agrees with the
    # recipe's own eval (the LoRA model against itself with adapters off)
    control = image_control(tmp_path / "uninterrupted/step_8", task, beta=recipe._loss_fn.beta)
    recipe._metric_logger = None  # closed by the run's cleanup
    own = recipe.evaluate()
    assert control["heldout_accuracy"] == pytest.approx(own["eval/rewards/accuracies"], abs=1e-6)
    assert control["heldout_margin"] == pytest.approx(own["eval/rewards/margins"], rel=1e-3, abs=1e-4)
    assert 0.0 <= control["shuffled_images_accuracy"] <= 1.0
    # the merged HF-layout model loads back through torchtune's checkpointer (every key) with the policy's log-probs
    merged = load_vision_model(tmp_path / "uninterrupted/step_8")
    batch = recipe._data.collate([recipe._data.eval[i] for i in range(4)])
    with torch.no_grad():
        ours, loaded = concatenated_logprobs(recipe._model.eval(), batch), concatenated_logprobs(merged, batch)
    torch.testing.assert_close(loaded.chosen_logps, ours.chosen_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loaded.rejected_logps, ours.rejected_logps, rtol=1e-5, atol=1e-4)
    # ... and in transformers' MllamaForConditionalGeneration, whose text path gives our logits (its vision path
    # differs by torchtune's design: docs/vision.md, "The merged model in transformers")
    from transformers import MllamaForConditionalGeneration

    load = lambda path: MllamaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    merged_hf = load(tmp_path / "uninterrupted/step_8")
    tokens = batch["input_ids"][:2, :12]
    with torch.no_grad():
        torch.testing.assert_close(merged_hf(input_ids=tokens).logits, recipe._model(tokens), rtol=1e-4, atol=1e-4)
    # the PEFT adapter on the base model in peft gives the merged model's logits, images and all
    from peft import PeftModel
    from peft.tuners.lora import torchao as peft_torchao

    with pytest.MonkeyPatch.context() as patch:  # PEFT refuses torchao < 0.16 (torchtune's); no torchao layer here
        patch.setattr(peft_torchao, "is_torchao_available", lambda: False)
        with_adapter = PeftModel.from_pretrained(load(task / "captioned_model"),
                                                 tmp_path / "uninterrupted/step_8/adapter").eval()  # fmt: skip
        inputs = hf_image_inputs(batch)
        with torch.no_grad():
            expected = merged_hf(**inputs).logits
            torch.testing.assert_close(with_adapter(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
            assert (load(task / "captioned_model")(**inputs).logits - expected).abs().max() > 1e-2  # it moved


def hf_image_inputs(batch):
    """Our collated batch (first two chosen rows) as transformers' Mllama takes it: pixel values, aspect-ratio ids
    and masks, the cross-attention mask per image and tile."""
    from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

    images, ratios = batch["images"][:2], batch["aspect_ratio"][:2]
    supported = [tuple(r) for r in get_all_supported_aspect_ratios(images.shape[2])]
    ids = torch.tensor([[supported.index(tuple(r.tolist())) + 1 for r in row] for row in ratios])
    tile_mask = (torch.arange(images.shape[2]) < ratios.prod(-1).unsqueeze(-1)).long()
    rows, length = 2, batch["input_ids"].shape[1]
    cross = batch["encoder_mask"][:rows].view(rows, length, images.shape[1], images.shape[2], -1).any(-1).long()
    return {"input_ids": batch["input_ids"][:rows], "pixel_values": images, "aspect_ratio_ids": ids,
            "aspect_ratio_mask": tile_mask, "cross_attention_mask": cross}  # fmt: skip


def test_two_fsdp2_ranks_take_the_step_of_one_process_with_the_whole_batch(tiny_family, tmp_path):
    task = tiny_family("llama3_2_vision")
    sgd = {"optimizer._component_": "torch.optim.SGD", "optimizer.lr": 0.5, "~optimizer.weight_decay": None,
           "max_steps_per_epoch": 1, "save_every_n_steps": "null", "fsdp_reshard_after_forward": "true",
           "consolidate_every_save": "false"}  # fmt: skip
    to_args = lambda out, **extra: [a.removesuffix("=None") for a in vision_args(task, out, **sgd, **extra)]
    torchrun(to_args(tmp_path / "two", batch_size=2), recipe="recipes/lora_dpo_distributed.py", config=CONFIG)
    run_distributed_in_process(LoRADPORecipeDistributed, recipe_config(CONFIG, to_args(tmp_path / "one")),
                               tmp_path / "pg")  # fmt: skip
    two, one = logged(Cfg(tmp_path / "two")), logged(Cfg(tmp_path / "one"))
    assert abs(two[1]["loss"] - one[1]["loss"]) < 1e-6
    a, b = load_file(tmp_path / "one/step_1" / ADAPTER), load_file(tmp_path / "two/step_1" / ADAPTER)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7, msg=key)
    for room in ("encoder.", "decoder."):  # the step moved the adapters of both (the images count)
        assert max(float(v.abs().max()) for k, v in a.items() if k.startswith(room) and "lora_b" in k) > 1e-4, room


def test_what_cannot_take_images_yet_is_refused_at_setup(tiny_family, tmp_path):
    """Packing (the recipes' data setup) and sampling at eval refuse image-grounded pairs, saying so."""
    from torchtune import config

    from dpo_components.data.recipe_data import load_recipe_data
    from dpo_components.samples import eval_sampling
    from dpo_components.settings import RecipeSettings

    cfg = recipe_config(CONFIG, [*vision_args(tiny_family("llama3_2_vision"), tmp_path / "out"), "packing=true"])
    tokenizer = config.instantiate(cfg.tokenizer)
    with pytest.raises(ConfigError, match="packing does not hold images yet: set packing=false"):
        load_recipe_data(cfg, RecipeSettings.from_config(cfg), tokenizer, max_seq_len=512)
    cfg.packing, cfg.eval_samples = False, 4
    data = load_recipe_data(cfg, RecipeSettings.from_config(cfg), tokenizer, max_seq_len=512)
    assert "images" in data.collate([data.train[0], data.train[1]])  # the batches carry their pictures
    with pytest.raises(ConfigError, match="eval_samples does not sample with images yet"):
        eval_sampling(cfg, data.eval, tokenizer, seed=0)
