"""Everything that fixes or extends torchtune 0.6.1's model families, and the recipes' model builders (each module:
``docs/architecture.md``; YAML ``_component_`` paths point at them).

Every torchtune internal this project patches or works around, and where (fixes live on our side, never in
site-packages; torchtune's own code is subclassed or wrapped, not edited):

- ``torchtune.models.gemma2``: ``Gemma2FinalNorm`` caps the hidden states, not the logits -> the output projection
  is wrapped in a soft-capping module (``gemma2.cap_logits_like_gemma2``).
- ``torchtune.models.phi3`` builders with Phi-3's RoPE base for Phi-4 -> ``phi4.phi4_14b`` passes 250,000.
- ``torchtune.modules.peft.DoRALinear.forward`` scales a bias by the magnitude -> replaced per instance on layers
  with a bias (``dora.unscale_dora_bias``, in ``apply_model_fixes``).
- ``torchtune.modules.RMSNorm.forward`` passes a bf16 scale with an fp32 input to ``F.rms_norm`` (a warning per
  forward and the unfused path) -> replaced per instance with the scale in fp32 (``norms.fused_rms_norm``, applied
  with the DoRA fix by ``apply_model_fixes``, which every recipe calls on a model it builds).
- ``torchtune.modules.MultiHeadAttention`` applies q/k norms after RoPE -> ``qwen3.Qwen3Attention``;
  ``torchtune.models.qwen2._convert_weights._FROM_HF`` lacks Qwen3's q/k norm keys -> extended only while a Qwen3
  state dict is converted (``qwen3._qwen2_table_with_qk_norms``).
- Tokenizers (``GemmaTokenizer``, ``MistralTokenizer``, ``Qwen2_5Tokenizer``, ``Phi4Tokenizer``'s pre-tokenizer)
  -> subclasses in ``chat_formats``; the end-of-sequence switch named ``add_end_tokens`` or ``add_eos`` per
  family, Phi-4's list-returning ``decode`` and the end-of-turn stop tokens torchtune leaves out ->
  ``dpo_components.data.chat``.
- ``torchtune.modules.attention_utils.flex_attention_compiled`` (compiled with ``dynamic=False``: a recompile per
  row length) -> each attention module's ``_attention_call`` wrapped per instance to run a ``BlockMask`` through a
  ``dynamic=True`` compile, back to torchtune's call on a compiler error; torchtune's module global is left as it
  is (``attention_masks.flex_attention_any_length``, in ``apply_model_fixes``).
- ``torchtune.modules.MultiHeadAttention._attention_call`` (SDPA with the dense mask of a prefix-shared or packed
  row computes every masked score) -> wrapped per instance to take a ``DocumentMask`` one document at a time
  (``document_attention.document_attention``, in ``apply_model_fixes``).
- ``torchtune.training.FullModelHFCheckpointer``: its ``_output_dir`` is pointed at a temporary directory during a
  save and its log level lowered, its pickled ``adapter_model.pt`` deleted (``dpo_components.checkpointing.hf``);
  its PEFT export permutes every q/k ``lora_B`` and no DoRA magnitude, and has no export for Phi's fused
  projections -> ``dpo_components.checkpointing.peft`` arranges the rows before it and writes Phi's adapter.
- ``torchtune.modules.peft.get_merged_lora_ckpt`` merges in place -> fed CPU copies
  (``checkpointing.peft.merge_lora_state``; torchtune's recipes merge into the live weights on CPU).
- torchtune's distributed LoRA init draws each rank's shard from that rank's RNG -> ``dpo_components.distributed
  .initial_adapter_state`` gives every world size the same start; NF4 under FSDP2 on one rank is refused there.
- ``torchtune.models.clip._transform`` imports torchvision at import time, so no Llama 3.2 Vision builder imports
  where torchvision does not -> a stand-in for that one module while importing the family, only when torchvision
  fails to import (``llama3_2_vision.import_vision_family``); ``DeepFusionModel.forward`` encodes the images of
  every text row -> ``dpo_components.vision.model.ImagePairFusion`` (the same encoder and decoder, one encoder
  pass per pair; in ``apply_model_fixes``), which also makes the encoder's attention bidirectional (torchtune's
  ``lora_clip_vision_encoder`` and ``lora_llama3_2_vision_projection_head`` build it causal, unlike the model they
  adapt) and gives ``FusionLayer`` / ``FusionEmbedding`` (keys renamed in their state dicts) the
  ``_fqn_modifiers`` PyTorch's distributed checkpoint resolves keys with; ``padded_collate_tiled_images_and_mask``
  scrambles the masks of batches with several images (a view without moving the image axis) -> our collator
  (``dpo_components.vision.collate``); DCP's ``ignore_frozen_params`` looks parameters up by module path ->
  ``checkpointing.sharded`` keeps the trainable ones itself, ``distributed.state_dict_key`` names adapters.
- ``tune run recipes/x.py`` imports the ``recipes`` package of torchtune's wheel -> ``dpo_components._tune_hook``
  (a meta-path finder for this project's ``recipes/``), which also drops torchao 0.15's C++-extension skip line.
"""

from torch import nn

from dpo_components.models.attention_masks import flex_attention_any_length
from dpo_components.models.document_attention import document_attention
from dpo_components.models.dora import unscale_dora_bias
from dpo_components.models.norms import fused_rms_norm
from dpo_components.vision.model import encode_images_once


def apply_model_fixes(model: nn.Module) -> nn.Module:
    """The per-instance fixes of torchtune's modules, applied by every recipe to a model it has just built: DoRA's
    bias outside the magnitude scaling, RMSNorm on PyTorch's fused kernel under bf16, attention that takes the
    documents of prefix-shared and packed rows one at a time, FlexAttention compiled once for every row length; a
    vision model (torchtune's ``DeepFusionModel``) becomes ``ImagePairFusion``, which encodes each pair's images
    once. Returns the model (the same one, or its ``ImagePairFusion``)."""
    model = document_attention(flex_attention_any_length(fused_rms_norm(unscale_dora_bias(model))))
    return encode_images_once(model)
