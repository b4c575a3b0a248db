"""Qwen3 dense models (0.6B-8B), which torchtune 0.6.1 predates, built from torchtune's own modules.

What differs from Qwen2.5 (and how it is handled here):

- **per-head q/k RMSNorm before RoPE**: torchtune 0.6.1's ``MultiHeadAttention`` takes ``q_norm``/``k_norm`` but
  applies them *after* the rotation; a norm's per-channel scale does not commute with it, so
  :class:`Qwen3Attention` runs the released order (as ``transformers``' ``Qwen3Attention`` and torchtune's later
  ``Qwen3Attention`` do). No QKV bias; ``head_dim`` 128 at every size (for 0.6B, 16 heads x 128 > the 1024 width).
- **tied embeddings** for 0.6B, 1.7B and 4B; 8B has its own ``lm_head``.
- **checkpoints**: :class:`Qwen3HFCheckpointer` is torchtune's ``FullModelHFCheckpointer`` on its Qwen2 key table
  plus the q/k norms (``model_type: QWEN3`` in YAML); ``transformers``' ``Qwen3ForCausalLM`` loads what it writes.
- **chat format** (:class:`Qwen3Tokenizer`): ChatML as Qwen2.5 (each turn encoded in one piece, as the
  template's text: :func:`~dpo_components.models.chat_formats.chatml_tokenize`; tools as
  :mod:`dpo_components.data.tools` says), in one of the template's two modes:
  - ``enable_thinking=False`` (the default, and the shipped configs): the generation prompt ends with an empty
    ``<think>\n\n</think>\n\n`` block (part of the masked prompt, so generation starts after it); a response that
    holds a ``<think>`` block is refused (it would follow a think block of its own);
  - ``enable_thinking=True``: the generation prompt is ``<|im_start|>assistant\n`` and the response is trained as
    the template renders a final thinking turn: ``<think>\n{reasoning}\n</think>\n\n{answer}`` (an empty block
    when the response has none), so chosen and rejected each carry their own reasoning.
  In both, assistant turns before the last user turn lose their ``<think>...</think>`` block (and the newlines
  after it) as the template drops them; a turn without one is kept as written."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from torchtune.data import Message
from torchtune.models.qwen2 import _convert_weights as qwen2_convert
from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
from torchtune.models.qwen2._tokenizer import ENDOFTEXT, IM_END
from torchtune.models.qwen2_5._tokenizer import QWEN2_5_SPECIAL_TOKENS, Qwen2_5Tokenizer
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)
from torchtune.modules.common_utils import reparametrize_as_dtype_state_dict_post_hook
from torchtune.modules.peft import DoRALinear, LoRALinear
from torchtune.modules.transforms.tokenizers import parse_hf_tokenizer_json
from torchtune.training import FullModelHFCheckpointer

from dpo_components.data.tools import with_text
from dpo_components.models.chat_formats import chatml_tokenize, chatml_turns
from dpo_components.settings import ConfigError

# ---------------------------------------------------------------------------------------------------- the model


class Qwen3Attention(MultiHeadAttention):
    """torchtune's ``MultiHeadAttention`` in Qwen3's order: q and k are RMS-normalised per head, then rotated."""

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        mask: Any = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, s_x, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s_x, self.num_heads, self.head_dim))
        q = self.pos_embeddings(q, input_pos=input_pos).transpose(1, 2)  # [b, heads, s, head_dim]
        if y is None:  # decoding from the KV cache
            if self.kv_cache is None or not self.cache_enabled:
                raise ValueError("Must provide y input or use kv_cache to enable streaming decoding")
            k, v = self.kv_cache.k_cache, self.kv_cache.v_cache
        else:
            k = self.k_norm(self.k_proj(y).view(b, y.shape[1], self.num_kv_heads, self.head_dim))
            k = self.pos_embeddings(k, input_pos=input_pos).transpose(1, 2)
            v = self.v_proj(y).view(b, y.shape[1], self.num_kv_heads, self.head_dim).transpose(1, 2)
            if self.kv_cache is not None and self.cache_enabled:
                k, v = self.kv_cache.update(k, v)
        if self.num_heads != self.num_kv_heads:  # grouped-query attention: each kv head serves a run of q heads
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        output = self._attention_call(q, k, v, mask=mask, dropout_p=self.attn_dropout if self.training else 0.0,
                                      is_causal=self.kv_cache is None and mask is None and self.is_causal)  # fmt: skip
        return self.output_proj(output.transpose(1, 2).reshape(b, s_x, -1))


def qwen3(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    head_dim: int,
    max_seq_len: int = 40_960,
    norm_eps: float = 1e-6,
    rope_base: float = 1_000_000.0,
    tie_word_embeddings: bool = False,
    lora: dict[str, Any] | None = None,
) -> TransformerDecoder:
    """A Qwen3 dense decoder. ``lora``: the arguments of :func:`lora_qwen3` (None: no adapters)."""
    lora = lora or {}
    targets = set(lora.get("lora_attn_modules", []))
    targets |= {"w1", "w2", "w3"} if lora.get("apply_lora_to_mlp") else set()
    targets |= {"output"} if lora.get("apply_lora_to_output") else set()

    def linear(name: str, in_dim: int, out_dim: int) -> nn.Module:
        if name not in targets:
            return nn.Linear(in_dim, out_dim, bias=False)
        adapter = DoRALinear if lora.get("use_dora") else LoRALinear
        return adapter(in_dim, out_dim, rank=lora["lora_rank"], alpha=lora["lora_alpha"],
                       dropout=lora.get("lora_dropout", 0.0),
                       quantize_base=lora.get("quantize_base", False))  # fmt: skip

    rope = Qwen2RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)
    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = Qwen3Attention(
            embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            q_proj=linear("q_proj", embed_dim, num_heads * head_dim),
            k_proj=linear("k_proj", embed_dim, num_kv_heads * head_dim),
            v_proj=linear("v_proj", embed_dim, num_kv_heads * head_dim),
            output_proj=linear("output_proj", num_heads * head_dim, embed_dim),
            pos_embeddings=rope, q_norm=RMSNorm(head_dim, eps=norm_eps), k_norm=RMSNorm(head_dim, eps=norm_eps),
            max_seq_len=max_seq_len,
        )  # fmt: skip
        mlp = FeedForward(gate_proj=linear("w1", embed_dim, intermediate_dim),
                          down_proj=linear("w2", intermediate_dim, embed_dim),
                          up_proj=linear("w3", embed_dim, intermediate_dim))  # fmt: skip
        layers.append(TransformerSelfAttentionLayer(attn=attn, mlp=mlp, sa_norm=RMSNorm(embed_dim, eps=norm_eps),
                                                    mlp_norm=RMSNorm(embed_dim, eps=norm_eps)))  # fmt: skip
    tok_embeddings = nn.Embedding(vocab_size, embed_dim)
    if tie_word_embeddings and "output" in targets:
        raise ConfigError("apply_lora_to_output needs an output projection of its own; this Qwen3 size ties it "
                          "to the embeddings")  # fmt: skip
    output = TiedLinear(tok_embeddings) if tie_word_embeddings else linear("output", embed_dim, vocab_size)
    model = TransformerDecoder(tok_embeddings=tok_embeddings, layers=layers, max_seq_len=max_seq_len,
                               num_heads=num_heads, head_dim=head_dim, norm=RMSNorm(embed_dim, eps=norm_eps),
                               output=output)  # fmt: skip
    if lora.get("quantize_base"):  # QLoRA: state_dict() gives the NF4 weights back in the model's dtype
        model._register_state_dict_hook(
            partial(reparametrize_as_dtype_state_dict_post_hook, dtype=tok_embeddings.weight.dtype, offload_to_cpu=True)
        )
    return model


def lora_qwen3(
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    **size: Any,
) -> TransformerDecoder:
    """A Qwen3 decoder with LoRA/DoRA adapters (``size``: the arguments of :func:`qwen3`); NF4 base weights under
    the adapters with ``quantize_base`` (QLoRA)."""
    lora = dict(lora_attn_modules=lora_attn_modules, apply_lora_to_mlp=apply_lora_to_mlp,
                apply_lora_to_output=apply_lora_to_output, lora_rank=lora_rank, lora_alpha=lora_alpha,
                lora_dropout=lora_dropout, use_dora=use_dora, quantize_base=quantize_base)  # fmt: skip
    return qwen3(**size, lora=lora)


# The released models' config.json (Qwen/Qwen3-<size>; the -Base models have the same shapes).
_COMMON = dict(vocab_size=151_936, num_kv_heads=8, head_dim=128, norm_eps=1e-6, rope_base=1_000_000.0)
QWEN3_SIZES = {
    "0.6B": dict(num_layers=28, num_heads=16, embed_dim=1024, intermediate_dim=3072, tie_word_embeddings=True),
    "1.7B": dict(num_layers=28, num_heads=16, embed_dim=2048, intermediate_dim=6144, tie_word_embeddings=True),
    "4B": dict(num_layers=36, num_heads=32, embed_dim=2560, intermediate_dim=9728, tie_word_embeddings=True),
    "8B": dict(num_layers=36, num_heads=32, embed_dim=4096, intermediate_dim=12_288, tie_word_embeddings=False),
}


def qwen3_0_6b() -> TransformerDecoder:
    return qwen3(**_COMMON, **QWEN3_SIZES["0.6B"])


def qwen3_1_7b() -> TransformerDecoder:
    return qwen3(**_COMMON, **QWEN3_SIZES["1.7B"])


def qwen3_4b() -> TransformerDecoder:
    return qwen3(**_COMMON, **QWEN3_SIZES["4B"])


def qwen3_8b() -> TransformerDecoder:
    return qwen3(**_COMMON, **QWEN3_SIZES["8B"])


def lora_qwen3_0_6b(lora_attn_modules: list[str], apply_lora_to_mlp: bool = False, lora_rank: int = 8,
                    lora_alpha: float = 16, lora_dropout: float = 0.0, use_dora: bool = False,
                    quantize_base: bool = False) -> TransformerDecoder:  # fmt: skip
    return lora_qwen3(**locals(), **_COMMON, **QWEN3_SIZES["0.6B"])


def lora_qwen3_1_7b(lora_attn_modules: list[str], apply_lora_to_mlp: bool = False, lora_rank: int = 8,
                    lora_alpha: float = 16, lora_dropout: float = 0.0, use_dora: bool = False,
                    quantize_base: bool = False) -> TransformerDecoder:  # fmt: skip
    return lora_qwen3(**locals(), **_COMMON, **QWEN3_SIZES["1.7B"])


def lora_qwen3_4b(lora_attn_modules: list[str], apply_lora_to_mlp: bool = False, lora_rank: int = 8,
                  lora_alpha: float = 16, lora_dropout: float = 0.0, use_dora: bool = False,
                  quantize_base: bool = False) -> TransformerDecoder:  # fmt: skip
    return lora_qwen3(**locals(), **_COMMON, **QWEN3_SIZES["4B"])


def lora_qwen3_8b(lora_attn_modules: list[str], apply_lora_to_mlp: bool = False, apply_lora_to_output: bool = False,
                  lora_rank: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0, use_dora: bool = False,
                  quantize_base: bool = False) -> TransformerDecoder:  # fmt: skip
    return lora_qwen3(**locals(), **_COMMON, **QWEN3_SIZES["8B"])


# ----------------------------------------------------------------------------------------- Hugging Face weights

# Qwen3's keys beyond Qwen2's (torchtune's Qwen2 table has the rest: same names, no q/k permutation, tying).
_QK_NORM_KEYS = {
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attn.q_norm.scale",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attn.k_norm.scale",
}


@contextmanager
def _qwen2_table_with_qk_norms() -> Iterator[None]:
    """torchtune's Qwen2 key table with Qwen3's q/k norms, while a Qwen3 state dict is converted."""
    qwen2_convert._FROM_HF.update(_QK_NORM_KEYS)
    try:
        yield
    finally:
        for key in _QK_NORM_KEYS:
            qwen2_convert._FROM_HF.pop(key, None)


def qwen3_hf_to_tune(state_dict: dict[str, torch.Tensor], **config: Any) -> dict[str, torch.Tensor]:
    """HF -> torchtune names (``config``: ``qwen2_hf_to_tune``'s num_heads, num_kv_heads, dim,
    tie_word_embeddings)."""
    with _qwen2_table_with_qk_norms():
        return qwen2_convert.qwen2_hf_to_tune(state_dict, **config)


def qwen3_tune_to_hf(state_dict: dict[str, torch.Tensor], **config: Any) -> dict[str, torch.Tensor]:
    """torchtune -> HF names (tied models: no ``lm_head.weight``; ``transformers`` ties it on load)."""
    with _qwen2_table_with_qk_norms():
        return qwen2_convert.qwen2_tune_to_hf(state_dict, **config)


class Qwen3HFCheckpointer(FullModelHFCheckpointer):
    """torchtune's ``FullModelHFCheckpointer`` for Qwen3 checkpoints (``model_type: QWEN3``): its Qwen2 path with
    the q/k norm keys added. Everything else (sharding like the source, config and tokenizer files copied, the
    PEFT adapter) is torchtune's."""

    def __init__(self, *args: Any, model_type: str = "QWEN3", **kwargs: Any) -> None:
        if model_type != "QWEN3":
            raise ConfigError(f"Qwen3HFCheckpointer reads Qwen3 checkpoints (model_type: QWEN3), not {model_type}")
        super().__init__(*args, model_type="QWEN2", **kwargs)

    def load_checkpoint(self) -> dict[str, Any]:
        with _qwen2_table_with_qk_norms():
            return super().load_checkpoint()

    def save_checkpoint(self, state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        with _qwen2_table_with_qk_norms():
            super().save_checkpoint(state_dict, *args, **kwargs)


# ------------------------------------------------------------------------------------------------ the tokenizer

QWEN3_SPECIAL_TOKENS = {**QWEN2_5_SPECIAL_TOKENS, "<tool_response>": 151_665, "</tool_response>": 151_666,
                        "<think>": 151_667, "</think>": 151_668}  # fmt: skip
EMPTY_THINK = "<think>\n\n</think>\n\n"


class Qwen3Tokenizer(Qwen2_5Tokenizer):
    """Qwen2.5's tokenizer with Qwen3's special tokens and chat template (see the module docstring)."""

    def __init__(self, *args: Any, enable_thinking: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.enable_thinking = enable_thinking

    def tokenize_messages(self, messages: list[Message], *, add_eos: bool = True,
                          tools: list[dict[str, Any]] | None = None) -> tuple[list[int], list[bool]]:  # fmt: skip
        return chatml_tokenize(self, chatml_turns(qwen3_turns(messages, self.enable_thinking), tools), add_eos=add_eos)

    def generation_prompt(self, prompt: list[Message], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt's turns and the assistant header, ``<|im_start|>assistant\n`` (+ the empty think block in
        non-thinking mode): Qwen3's ``add_generation_prompt``. The turns are rendered as in prompt + response (a
        prompt ending with an assistant turn keeps it as an inner turn), so this is a prefix of what is trained."""
        turns = chatml_turns(qwen3_turns(prompt, self.enable_thinking, response_last=False), tools)
        tokens, _ = chatml_tokenize(self, turns, add_eos=False, response_last=False)
        header = "assistant\n" + ("" if self.enable_thinking else EMPTY_THINK)
        return [*tokens, self.im_start_id, *self.encode(header, add_bos=False, add_eos=False)]


def _split_think(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant turn as Qwen3's template reads it; reasoning None without ``</think>``."""
    if "</think>" not in text:
        return None, text
    reasoning, answer = text.split("</think>")[0], text.split("</think>")[-1]
    return reasoning.rstrip("\n").split("<think>")[-1].lstrip("\n"), answer.lstrip("\n")


def qwen3_turns(messages: list[Message], enable_thinking: bool = False, response_last: bool = True) -> list[Message]:
    """``messages`` as Qwen3's chat template renders them: assistant turns before the last user turn lose their
    ``<think>`` block; later ones keep a non-empty block, normalised to ``<think>\n{reasoning}\n</think>\n\n``.

    A turn the model writes (the final one with ``response_last``, and in non-thinking mode every unmasked
    assistant turn, i.e. every turn of a multi-turn response) is written as it is generated: in non-thinking mode
    after the generation prompt's empty think block (its ``prefill``, not trained; a ``<think>`` block of its own
    is refused); in thinking mode the final turn carries its block (empty when it has none).

    The released template is not prefix-consistent here: its generation prompt ends with the empty block, but it
    writes an earlier tool-call turn of the conversation without one. The rule above keeps every trained turn
    exactly as the model produced it after its generation prompt; a *prompt* that holds such a turn (the context of
    a later turn) is written as the template writes it."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    out = []
    for i, message in enumerate(messages):
        prefill, think, text = "", "", message.text_content
        if message.role == "assistant":
            reasoning, answer = _split_think(text)
            final = response_last and i == len(messages) - 1
            if not enable_thinking and (final or not message.masked):
                if reasoning is not None or "<think>" in text:
                    raise ValueError("a response with a <think> block under enable_thinking=False: set "
                                     "tokenizer.enable_thinking=true to train thinking turns, or remove the block")
                prefill, text = EMPTY_THINK, answer.lstrip("\n")
            elif i < last_user:
                text = answer
            elif final or reasoning:  # the template keeps a non-empty block after the last user turn
                think, text = f"<think>\n{(reasoning or '').strip(chr(10))}\n</think>\n\n", answer.lstrip("\n")
            else:
                text = answer
        turn = with_text(message, text)
        turn.prefill, turn.think = prefill, think  # read by chatml_turns
        out.append(turn)
    return out


def qwen3_tokenizer(
    path: str,
    merges_file: str,
    special_tokens_path: str | None = None,
    max_seq_len: int | None = None,
    enable_thinking: bool = False,
) -> Qwen3Tokenizer:
    """Qwen3's tokenizer from ``vocab.json`` and ``merges.txt`` (and ``tokenizer.json`` for its special tokens, as
    ``qwen2_5_tokenizer``); EOS ``<|im_end|>``, pad ``<|endoftext|>``; ``enable_thinking`` as the template's."""
    special_tokens = (
        QWEN3_SPECIAL_TOKENS if special_tokens_path is None else parse_hf_tokenizer_json(special_tokens_path)
    )
    return Qwen3Tokenizer(path=path, merges_file=merges_file, special_tokens=special_tokens, max_seq_len=max_seq_len,
                          eos_token=IM_END, pad_token=ENDOFTEXT, enable_thinking=enable_thinking)  # fmt: skip
