"""The data audit as a command, on any config, before training (``dpo_components.audit`` has what it computes).

    python -m dpo_components.tools.audit --config recipe_configs/tiny/lora_dpo_single_device.yaml [key=value ...]
                                         [--top 20] [--out FILE]

For every pair of the config's ``dataset``, one no-grad forward of the reference model (the config's base
checkpoint, or ``reference.checkpointer``) gives its CHES score; with the edit distance and shared prefix of its
responses in tokens. Writes the JSON report (default ``<output_dir>/data_audit.json``: the summary, the ``--top``
most similar pairs with their text, and every pair's figures by dataset index and source row) and prints the
summary. A run with ``reference.mode: precomputed`` writes the same report at setup, from its reference pass.
The command builds the model on one device (``device`` of the config): for a model that needs several GPUs, use
the precomputed reference pass of the FSDP2 recipes instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torchtune import config, training

from dpo_components.audit import audit_pairs, audit_report, describe, write_audit
from dpo_components.data import make_collator
from dpo_components.models.builders import full_or_lora_model
from dpo_components.settings import RecipeSettings, prepare_and_check_inputs


def audit(cfg: DictConfig, top: int = 20, out: str | Path | None = None) -> dict[str, Any]:
    """The audit of ``cfg``'s dataset under its reference model (module docstring); returns the report and
    writes it to ``out`` (default ``<output_dir>/data_audit.json``)."""
    prepare_and_check_inputs(cfg)
    settings = RecipeSettings.from_config(cfg)
    source = (cfg.get("reference") or {}).get("checkpointer") or cfg.checkpointer
    state = config.instantiate(source, resume_from_checkpoint=False).load_checkpoint()[training.MODEL_KEY]
    model = full_or_lora_model(cfg.model, settings, state)  # LoRA adapters start at 0: the base model's outputs
    tokenizer = config.instantiate(cfg.tokenizer)
    dataset = config.instantiate(cfg.dataset, tokenizer)
    if getattr(dataset, "data_kind", "pairs") != "pairs":
        raise ValueError(f"the data audit compares a pair's two responses; {dataset.source} holds unpaired rows "
                         "(prompt, completion, label), which have no pair to compare")  # fmt: skip
    collate = make_collator(tokenizer.pad_id, model.max_seq_len, datasets={"dataset": dataset})
    started = time.perf_counter()
    values = audit_pairs(model, dataset, collate, settings.reference.batch_size, settings.device,
                         settings.logprob_chunk_size)  # fmt: skip
    report = {**audit_report(dataset, values, tokenizer, top), "seconds": time.perf_counter() - started}
    write_audit(Path(out) if out else settings.output_dir / "data_audit.json", report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a recipe config (its dataset, model and checkpointer)")
    parser.add_argument("--top", type=int, default=20, help="how many of the most similar pairs to list")
    parser.add_argument("--out", default=None, help="the JSON report (default <output_dir>/data_audit.json)")
    args, overrides = parser.parse_known_args(argv)
    cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(overrides))
    print(describe(audit(cfg, args.top, args.out)))


if __name__ == "__main__":
    main(sys.argv[1:])
