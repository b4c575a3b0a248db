"""A new user's first run: the mistakes of a first real-model run get messages that name the fix (issue 31, the
parts done so far), and the logged learning rate is the one the step used."""

import json

import pytest
import torch
from test_lora_dpo_recipe import logged, run
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
