"""Rewards that score sampled responses (online DPO's ``reward_fn``): a Python function, or a Hugging Face reward model.

    reward_fn:                                  # any Python function f(response) or f(prompt, response) -> float
      _component_: dpo_components.online.rewards.text_reward
      function: dpo_components.tiny.synthetic.sentiment_reward

    reward_fn:                                  # a sequence-classification reward model, through transformers
      _component_: dpo_components.online.rewards.HFRewardModel
      path: /models/Skywork-Reward-V2-Llama-3.1-8B   # a local directory (or a hub id where the hub is reachable)
      device: cuda
      dtype: bf16
      batch_size: 16

A reward is called on a batch, ``reward(prompts, responses) -> list[float]``: each prompt a list of
``{"role", "content"}`` messages, each response a string. :func:`score` calls it and checks the answer: a reward
that raises, returns another number of scores, or a NaN or infinite score stops with a :class:`RewardError` naming
the reward, the prompt and the response.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torchtune.config._utils import _get_component_from_path

Messages = list[dict[str, str]]


class RewardError(RuntimeError):
    """A reward that failed or returned a score that is not a finite number, with the prompt and response."""


class Reward(Protocol):
    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]: ...


def prompt_text(messages: Messages) -> str:
    """The text a plain function is given as the prompt: the turns' contents, separated by blank lines (a
    single-turn prompt is its user message)."""
    return "\n\n".join(m["content"] for m in messages)


def _shown(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class TextReward:
    """A Python function as a reward: ``f(response)`` or ``f(prompt, response)`` (chosen by how many parameters
    it takes), returning a number. ``function`` is the function or its dotted path."""

    def __init__(self, function: Callable[..., float] | str) -> None:
        self.name = function if isinstance(function, str) else f"{function.__module__}.{function.__qualname__}"
        self.function = _get_component_from_path(function) if isinstance(function, str) else function
        if not callable(self.function):
            raise TypeError(f"reward function {self.name} is not callable")
        parameters = [p for p in inspect.signature(self.function).parameters.values()
                      if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]  # fmt: skip
        if len(parameters) not in (1, 2):
            raise TypeError(f"reward function {self.name} must take (response) or (prompt, response), it takes "
                            f"{len(parameters)} required arguments")  # fmt: skip
        self.takes_prompt = len(parameters) == 2

    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        scores = []
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            try:
                args = (prompt_text(prompt), response) if self.takes_prompt else (response,)
                scores.append(self.function(*args))
            except Exception as error:
                raise RewardError(f"reward {self.name} raised {type(error).__name__}: {error} on response {i} "
                                  f"{_shown(response)} to prompt {_shown(prompt_text(prompt))}") from error  # fmt: skip
        return scores

    def __repr__(self) -> str:
        return f"TextReward({self.name})"


def text_reward(function: str) -> TextReward:
    """The YAML component for a Python function reward (``function``: its dotted path)."""
    return TextReward(function)


class HFRewardModel:
    """A Hugging Face ``AutoModelForSequenceClassification`` reward model (one output: the score), e.g. Skywork-Reward,
    ArmoRM's score head, a TRL ``RewardTrainer`` output.

    Each (prompt, response) is rendered with the reward model's own chat template (prompt turns + an assistant
    turn), or as ``prompt_text + "\\n\\n" + response`` when its tokenizer has none, tokenized without adding
    special tokens a second time, right-padded in batches of ``batch_size`` and cut at ``max_length`` tokens.
    """

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        dtype: str = "fp32",
        batch_size: int = 8,
        max_length: int | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if dtype not in dtypes:
            raise ValueError(f"HFRewardModel dtype must be one of {sorted(dtypes)}, got {dtype!r}")
        self.name, self.device, self.batch_size, self.max_length = path, torch.device(device), batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, torch_dtype=dtypes[dtype], trust_remote_code=trust_remote_code
        ).to(self.device).eval()  # fmt: skip
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path} has {self.model.config.num_labels} outputs (num_labels); a reward "
                             "model has one, the score")  # fmt: skip
        if self.tokenizer.pad_token is None:  # batches need one; the model finds each row's last token by it
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"

    def render(self, prompt: Messages, response: str) -> str:
        if self.tokenizer.chat_template:
            messages = [*prompt, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt_text(prompt) + "\n\n" + response

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        texts = [self.render(p, r) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=self.max_length is not None, max_length=self.max_length,
                                   add_special_tokens=False).to(self.device)  # fmt: skip
            scores += self.model(**batch).logits[:, 0].float().cpu().tolist()
        return scores

    def __repr__(self) -> str:
        return f"HFRewardModel({self.name})"


def score(reward: Reward, prompts: Sequence[Messages], responses: Sequence[str], where: str) -> list[float]:
    """``reward(prompts, responses)``, checked: one finite float per response, else a :class:`RewardError` that
    names ``where`` (e.g. "round 3"), the reward and the response."""
    try:
        scores = reward(prompts, responses)
    except RewardError as error:
        raise RewardError(f"{where}: {error}") from error
    except Exception as error:
        raise RewardError(f"{where}: reward {reward!r} raised {type(error).__name__}: {error}") from error
    scores = list(scores)
    if len(scores) != len(responses):
        raise RewardError(f"{where}: reward {reward!r} returned {len(scores)} scores for {len(responses)} responses")
    for i, value in enumerate(scores):
        try:
            finite = math.isfinite(float(value))
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise RewardError(f"{where}: reward {reward!r} scored response {i} {_shown(responses[i])} (prompt "
                              f"{_shown(prompt_text(prompts[i]))}) as {value!r}, not a finite number")  # fmt: skip
    return [float(v) for v in scores]
