"""Checkpoints in Hugging Face layout, written atomically, read back for an exact resume without pickle: the run's
output_dir and manifest, the run's fingerprint, the resume state, PEFT adapters, the single-device writer and the
FSDP2 writer/reader (each module: ``docs/architecture.md``).

The names below are the package's public API.
"""

from dpo_components.checkpointing.directory import (
    MANIFEST_FILE,
    RECIPE_STATE_FILE,
    CheckpointError,
    checkpoint_fingerprint,
    checkpoint_problem,
    claim_output_dir,
    files_digest,
    latest_checkpoint,
    prepare_output_dir,
    remove_stale_temporaries,
    resume_checkpoint,
    save_failed,
    step_dirs,
    write_manifest,
)
from dpo_components.checkpointing.fingerprint import FINGERPRINT_KEYS, check_same_run, run_fingerprint
from dpo_components.checkpointing.hf import save_checkpoint_dir, save_lora_checkpoint, write_hf_files
from dpo_components.checkpointing.peft import (
    ADAPTER_DIR,
    PEFT_FILES,
    TUNE_ADAPTER_FILE,
    adapter_state_dict,
    fused_peft_adapter,
    load_peft_adapter,
    lora_settings,
    merge_lora_state,
    merged_lora_state_dict,
    mllama_peft_adapter,
    peft_adapter_config,
    peft_layout,
)
from dpo_components.checkpointing.sharded import (
    full_model_files,
    load_sharded_checkpoint,
    lora_model_files,
    save_sharded_checkpoint,
)
from dpo_components.checkpointing.state import (
    load_recipe_state,
    load_state_file,
    restore_training_state,
    rng_state,
    set_rng_state,
    training_state,
)
from dpo_components.files import file_digest

__all__ = [
    "ADAPTER_DIR", "FINGERPRINT_KEYS", "MANIFEST_FILE", "PEFT_FILES", "RECIPE_STATE_FILE", "TUNE_ADAPTER_FILE",
    "CheckpointError", "adapter_state_dict", "check_same_run", "checkpoint_fingerprint", "checkpoint_problem",
    "claim_output_dir", "file_digest", "files_digest", "full_model_files", "fused_peft_adapter", "latest_checkpoint",
    "load_peft_adapter", "load_recipe_state", "load_sharded_checkpoint", "load_state_file", "lora_model_files",
    "lora_settings", "merge_lora_state", "merged_lora_state_dict", "mllama_peft_adapter", "peft_adapter_config",
    "peft_layout",
    "prepare_output_dir", "remove_stale_temporaries", "restore_training_state", "resume_checkpoint", "rng_state",
    "run_fingerprint", "save_checkpoint_dir", "save_failed", "save_lora_checkpoint", "save_sharded_checkpoint",
    "set_rng_state", "step_dirs", "training_state", "write_hf_files", "write_manifest",
]  # fmt: skip
