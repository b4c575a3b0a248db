"""Llama 3.2 Vision for preference batches: each pair's images go through the encoder once.

torchtune's ``DeepFusionModel.forward`` runs its encoder on every text row's images, so a [2B, L] DPO batch (chosen
rows, then rejected) would encode each image twice, as TRL, LLaMA-Factory and ms-swift do (they repeat the image
for both responses). :class:`ImagePairFusion` holds the same ``encoder`` and ``decoder`` (same parameter names, so
torchtune's checkpoints and adapters load unchanged) and runs

    embeddings = encoder(images [P, n_img, n_tiles, C, H, W], aspect_ratio [P, n_img, 2])   # once per pair
    decoder(tokens [R, L], encoder_input=embeddings[image_rows], encoder_mask [R, L, S])  # each row its pair's

where ``image_rows`` [R] names each text row's pair (``[0..B-1, 0..B-1]`` for chosen and rejected rows, ``[0..B-1]``
for prefix-shared rows). Gradients of both rows add up in the encoder, as they would with the image repeated. The
encoder call stays inside this root module's ``forward``, so FSDP2's root hooks (unshard, reshard) run around it.
Two fixes of torchtune 0.6.1 come with it. Its LoRA builders of the vision encoder
(``lora_clip_vision_encoder``, ``lora_llama3_2_vision_projection_head``) build the encoder's self-attention with
``is_causal=True`` where the model (``clip_vision_encoder``) and the released weights attend both ways: a LoRA
model would train and score a different encoder than the one it merges into; the encoder's attention is made
bidirectional here. And the decoder's fusion modules get what PyTorch's distributed checkpoint needs to find their
renamed state-dict keys (:func:`_resolvable_state_dict_keys`).
"""

from __future__ import annotations

from torch import Tensor, nn
from torchtune.modules import MultiHeadAttention
from torchtune.modules.model_fusion import DeepFusionModel, FusionEmbedding, FusionLayer


class ImagePairFusion(nn.Module):
    """``DeepFusionModel`` with one encoder pass per pair of text rows (module docstring)."""

    def __init__(self, model: DeepFusionModel) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.encoder = model.encoder
        for module in self.decoder.modules():
            _resolvable_state_dict_keys(module)
        for module in self.encoder.modules():
            if isinstance(module, MultiHeadAttention):  # torchtune's LoRA builders leave the encoder's attention causal
                module.is_causal = False

    @property
    def max_seq_len(self) -> int:
        return self.decoder.max_seq_len

    def forward(
        self,
        tokens: Tensor,
        *,
        mask: Tensor | None = None,
        images: Tensor | None = None,
        aspect_ratio: Tensor | None = None,
        encoder_mask: Tensor | None = None,
        image_rows: Tensor | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        """``tokens`` [R, L]; ``images`` [P, n_img, n_tiles, C, H, W] and ``aspect_ratio`` [P, n_img, 2], one entry
        per pair; ``image_rows`` [R]: the pair of each text row (default: row r is pair r); ``encoder_mask``
        [R, L, n_img * n_tiles * tokens_per_tile], which image tokens each text position attends to."""
        embeddings = None
        if images is not None:
            embeddings = self.encoder(images=images, aspect_ratio=aspect_ratio)
            if image_rows is not None:
                embeddings = embeddings[image_rows]
        return self.decoder(tokens, mask=mask, encoder_input=embeddings, encoder_mask=encoder_mask,
                            input_pos=input_pos)  # fmt: skip


def _resolvable_state_dict_keys(module: nn.Module) -> None:
    """Let PyTorch's distributed checkpoint (DCP) find the parameters behind torchtune's renamed state-dict keys.

    ``FusionLayer`` writes its inner self-attention layer's keys without the ``layer.`` of its module path, and
    ``FusionEmbedding`` its text embedding as ``weight`` (``embedding.weight`` in the module); DCP resolves a key by
    walking attributes and fails on both ("'FusionEmbedding' object has no attribute 'weight'"). DCP reads a
    module's ``_fqn_modifiers()`` (a key component -> the attribute to step into first) for such modules: set here,
    per instance."""
    if isinstance(module, FusionLayer):
        children = [name for name, _ in module.layer.named_children()]
        module._fqn_modifiers = lambda: dict.fromkeys(children, "layer")
    elif isinstance(module, FusionEmbedding):
        module._fqn_modifiers = lambda: {"weight": "embedding"}


def encode_images_once(model: nn.Module) -> nn.Module:
    """A torchtune ``DeepFusionModel`` as :class:`ImagePairFusion`; any other model unchanged."""
    return ImagePairFusion(model) if isinstance(model, DeepFusionModel) else model


def text_decoder(model: nn.Module) -> nn.Module:
    """The module that holds ``norm``, ``output`` and ``unembed``: a vision model's decoder, else the model."""
    return model.decoder if isinstance(model, ImagePairFusion) else model
