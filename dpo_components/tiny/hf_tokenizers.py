"""Hugging Face tokenizers for the tiny family tokenizers, with each family's released chat template.

:func:`write_hf_tokenizer` adds ``tokenizer.json`` (BPE families, built with ``tokenizers`` from the same
``vocab.json``/``merges.txt`` and the family's pre-tokenizer regex) or lets ``transformers`` convert the same
SentencePiece ``tokenizer.model``, plus ``tokenizer_config.json`` with the family's chat template, so that
``AutoTokenizer.from_pretrained(dir).apply_chat_template(...)`` can be compared token for token with what our data
builder makes of the same messages with torchtune's tokenizer class (``tests/components/test_chat_templates.py``).

The templates are the released models' ``chat_template`` (``tokenizer_config.json`` of the Instruct repos named
below) without their tool-calling branches, which preference data does not use. Llama 3's is the tiny tokenizer's
own (``dpo_components/tiny/assets/tiny_tokenizer``); Llama 2 and Phi-3 are left out: their configs are not shipped and
torchtune's formats for them are not their templates'.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from torchtune.models.phi4._tokenizer import CL100K_PATTERN
from torchtune.models.qwen2._tokenizer import PRETOKENIZE_REGEX as QWEN2_PATTERN

# Qwen/Qwen2.5-*-Instruct: a default system turn when the conversation has none.
QWEN2_5 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen/Qwen3-*: reasoning of turns before the last user turn is dropped; turns after it carry a <think> block
# (empty when there is no reasoning); enable_thinking=False puts the empty block in the generation prompt.
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# microsoft/phi-4
PHI4 = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
# google/gemma-2-*-it: no system role; the assistant is "model".
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
# mistralai/Mistral-7B-Instruct-v0.3: one BOS; a system message goes before the last user turn.
MISTRAL_V0_3 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# family -> (chat template, tokenizer_config.json special tokens / class)
_HF = {
    "qwen2_5": (QWEN2_5, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "qwen3": (QWEN3, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "phi4": (PHI4, {"eos_token": "<|im_end|>", "pad_token": "<|dummy_85|>"}),
    "gemma": (GEMMA2, {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
                       "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": False}),
    "mistral": (MISTRAL_V0_3, {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                               "unk_token": "<unk>", "add_bos_token": False, "legacy": False}),
}  # fmt: skip
_PATTERNS = {"qwen2_5": QWEN2_PATTERN, "qwen3": QWEN2_PATTERN, "phi4": CL100K_PATTERN}
HF_FAMILIES = tuple(_HF)


def _bpe_tokenizer_json(files: Path, family: str) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE.from_file(str(files / "vocab.json"), str(files / "merges.txt")))
    if family.startswith("qwen"):
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PATTERNS[family]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _added_tokens(files: Path) -> list[dict]:
    special = files / "special_tokens.json"
    return sorted(json.loads(special.read_text())["added_tokens"], key=lambda t: t["id"]) if special.exists() else []


def write_hf_tokenizer(files: str | Path, family: str) -> Path:
    """Write ``tokenizer_config.json`` (and ``tokenizer.json`` for BPE families) into ``files``, a directory of
    :func:`dpo_components.tiny.family_tokenizers.write_family_tokenizer`; returns it."""
    files = Path(files)
    template, config = _HF[family]
    added = _added_tokens(files)
    if family in _PATTERNS:
        tokenizer = _bpe_tokenizer_json(files, family)
        for token in added:
            tokenizer.add_special_tokens([AddedToken(token["content"], special=True, normalized=False)])
            if tokenizer.token_to_id(token["content"]) != token["id"]:
                raise ValueError(f"{token['content']} would get id {tokenizer.token_to_id(token['content'])}")
        tokenizer.save(str(files / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    decoder = {str(t["id"]): {"content": t["content"], "special": True, "normalized": False, "lstrip": False,
                              "rstrip": False, "single_word": False} for t in added}  # fmt: skip
    config = {**config, "chat_template": template, "added_tokens_decoder": decoder, "model_max_length": 4096}
    (files / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return files
