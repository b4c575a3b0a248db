"""A new user's first run: the mistakes of a first real-model run get messages that name the fix (issue 31, the
parts done so far), and the logged learning rate is the one the step used."""

import json

import pytest
import torch
from helpers import logged
from helpers import run_lora_recipe as run
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

from dpo_components.data import PreferenceDataError, preference_dataset

CONVERSATIONAL = {"prompt": [{"role": "user", "content": "the plot was"}],
                  "chosen": [{"role": "assistant", "content": "great ."}],
                  "rejected": [{"role": "assistant", "content": "dull ."}]}  # fmt: skip


def test_a_hub_split_on_a_local_file_names_its_splits_and_the_key(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "the plot was", "chosen": "great .", "rejected": "dull ."}) + "\n")
    with pytest.raises(PreferenceDataError, match=r"pairs.jsonl \(split 'train_prefs'\): Unknown split "
                                                  r"\"train_prefs\"\. Should be one of \['train'\]\. Set the split "
                                                  r".*dataset.split=train"):  # fmt: skip
        preference_dataset(tokenizer, source="json", data_files=str(path), split="train_prefs")


def test_rows_of_another_format_name_the_format_they_look_like(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(CONVERSATIONAL) for _ in range(3)) + "\n")
    with pytest.raises(PreferenceDataError, match=r"all 3 rows were skipped as bad: .*The rows look like format "
                                                  r"'conversational', not 'implicit': set format=conversational"):
        preference_dataset(tokenizer, source="json", data_files=str(path), format="implicit", on_bad_row="skip",
                           max_length=64)
    assert len(preference_dataset(tokenizer, source="json", data_files=str(path), format="auto", max_length=64)) == 3


def test_the_logged_lr_is_the_rate_the_step_used(recipe_cfg):
    cfg = recipe_cfg(max_steps_per_epoch=4, eval_dataset=None, **{"lr_scheduler.num_warmup_steps": 3})
    run(cfg)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optimizer.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=4)
    used = []
    for _ in range(4):  # the rate each optimizer step applies: read before the scheduler moves on
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    rows = logged(cfg)
    assert [rows[step]["lr"] for step in (1, 2, 3, 4)] == pytest.approx(used)
    assert used[0] == 0.0 and used[3] > used[2]  # the warm-up's first step moves nothing (torchtune's schedule)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_device_cuda_on_a_machine_without_a_gpu_names_device_cpu(recipe_cfg, dtype):
    # torchtune would say "bf16 precision was requested but not available" (bf16) or run on the CPU unasked (fp32)
    from dpo_components.settings import ConfigError, RecipeSettings

    with pytest.raises(ConfigError, match=r"device: cuda, but this machine has no CUDA GPU .* Set device=cpu"):
        RecipeSettings.from_config(recipe_cfg(device="cuda", dtype=dtype))


def test_the_readme_own_data_command_trains_with_a_held_out_share(tiny_setup, tiny_family, tmp_path):
    """The README's "Train on your own data" overrides, as printed there, on a JSONL file of one's own: the shipped
    Qwen3 config (sizes and files swapped for its tiny stand-in) trains and evaluates on disjoint parts of it."""
    from conftest import REPO_ROOT, recipe_config
    from test_configs import swap_for_tiny_stand_ins

    from recipes.lora_dpo_single_device import LoRADPORecipeSingleDevice

    readme = (REPO_ROOT / "README.md").read_text()
    command = readme.split("**Train on your own data**")[1].split("```bash\n")[1].split("```")[0]
    words = command.replace("\\\n", " ").split("#")[0].split()
    config, overrides = words[words.index("--config") + 1], words[words.index("--config") + 2 :]
    pairs = tmp_path / "my_pairs.jsonl"
    rows = (tiny_setup / "data/train.jsonl").read_text().splitlines()[:80]
    pairs.write_text("\n".join(rows) + "\n")
    overrides = [o.replace("my_pairs.jsonl", str(pairs)) for o in overrides]
    cfg = recipe_config(config, overrides)
    swap_for_tiny_stand_ins(cfg, tiny_setup, tiny_family)  # sizes and files only
    cfg.update(output_dir=str(tmp_path / "out"), device="cpu", dtype="fp32", epochs=1, max_steps_per_epoch=1,
               gradient_accumulation_steps=1, eval_every_n_steps=None, save_every_n_steps=None)  # fmt: skip
    recipe = LoRADPORecipeSingleDevice(cfg)
    recipe.setup(cfg)
    assert len(recipe._data.train) == 76 and len(recipe._data.eval) == 4  # 5% held out, the rest trained on
    recipe.train()
    assert recipe.progress.global_step == 1 and recipe.progress.last_eval_step == 1


def test_bf16_forward_has_no_dtype_mismatch_warning_and_the_same_output():
    """torchtune's RMSNorm gives F.rms_norm an fp32 input and a bf16 scale: PyTorch warns on every forward ("Mismatch
    dtype between input and weight ... Cannot dispatch to fused implementation"). The recipes' fix (the scale cast
    to fp32) computes the same and reaches the fused kernel."""
    import warnings

    from dpo_components.models import apply_model_fixes
    from dpo_components.tiny.model import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16)
    tokens = torch.randint(0, 500, (2, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = model(tokens)
    assert any("Mismatch dtype between input and weight" in str(w.message) for w in caught)
    apply_model_fixes(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = model(tokens)
    assert not any("Mismatch dtype" in str(w.message) for w in caught), [str(w.message) for w in caught]
    torch.testing.assert_close(after, before, rtol=0, atol=0.05)  # bf16 logits; the norm itself is fp32 either way


def test_long_setup_phases_say_what_they_do_and_about_how_long(tmp_path, caplog, monkeypatch):
    import logging

    from dpo_components.checkpointing import directory
    from dpo_components.models.quantization import nf4_estimate

    (tmp_path / "model.safetensors").write_bytes(b"x" * 4096)
    monkeypatch.setattr(directory, "HASH_LOG_ABOVE", 1024)  # a real checkpoint's size, from 1 GiB
    with caplog.at_level(logging.INFO):
        directory.files_digest(tmp_path, ["model.safetensors"])
    assert "hashing 0.0 GiB of checkpoint files in" in caplog.text and "about 0 s" in caplog.text
    assert "hashed in" in caplog.text

    base = {"tok_embeddings.weight": torch.zeros(1000, 64), "layers.0.attn.q_proj.weight": torch.zeros(4096, 4096),
            "layers.0.attn.output_proj.weight": torch.zeros(4096, 4096), "norm.scale": torch.zeros(64)}  # fmt: skip
    # the linears only (33.6M parameters), quantized twice at ~8M/s
    assert nf4_estimate(base, torch.device("cpu")) == "(0.03B parameters, twice: about 8 s on one CPU core)"
