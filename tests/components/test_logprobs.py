"""The chunked log-prob path equals the naive full-logits computation (values and gradients) to fp32 precision."""

import pytest
import torch
from torchtune.rlhf import get_batch_log_probs

from dpo_components.logprobs import IGNORE_INDEX, full_logits_sequence_logprobs, scored_logprobs, sequence_logprobs
from dpo_components.tiny.model import TINY_LLAMA_ARGS, lora_tiny_llama, tiny_llama


def batch(seed=0, n=4, length=24, vocab=512):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (n, length), generator=g)
    labels = input_ids.clone()
    labels[:, :7] = IGNORE_INDEX  # prompt
    labels[1, 15:] = IGNORE_INDEX  # right padding
    labels[3, 9:] = IGNORE_INDEX
    return input_ids, labels


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_llama()


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_chunked_equals_torchtune_full_logits(model, chunk_size):
    input_ids, labels = batch()
    sums, counts = sequence_logprobs(model, input_ids, labels, chunk_size=chunk_size)
    with torch.no_grad():
        logits = model(input_ids)
    expected = get_batch_log_probs(logits, labels)  # torchtune's own implementation
    torch.testing.assert_close(sums.detach(), expected, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == [17, 8, 17, 2]
    naive_sums, naive_counts = full_logits_sequence_logprobs(logits, labels)
    torch.testing.assert_close(naive_sums, expected)
    assert naive_counts.tolist() == counts.tolist()


def test_chunked_gradients_equal_full_logits(model):
    input_ids, labels = batch(seed=1)
    model.zero_grad()
    sums, _ = sequence_logprobs(model, input_ids, labels, chunk_size=7)
    (sums * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    naive, _ = full_logits_sequence_logprobs(model(input_ids), labels)
    (naive * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(chunked[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)
    model.zero_grad()


def test_lora_and_nf4_models(model):
    input_ids, labels = batch(seed=2)
    for quantize_base in (False, True):
        lora = lora_tiny_llama(["q_proj", "v_proj"], apply_lora_to_mlp=True, quantize_base=quantize_base)
        lora.load_state_dict(model.state_dict(), strict=False)
        for name, param in lora.named_parameters():
            param.requires_grad_("lora_" in name)
        sums, _ = sequence_logprobs(lora, input_ids, labels, chunk_size=4)
        naive, _ = full_logits_sequence_logprobs(lora(input_ids), labels)
        torch.testing.assert_close(sums, naive, rtol=1e-5, atol=1e-4)
        sums.sum().backward()
        assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)


def test_no_grad_path_and_unembed_restored(model):
    input_ids, labels = batch(seed=3)
    with torch.no_grad():
        sums, _ = sequence_logprobs(model, input_ids, labels, chunk_size=3)
    assert not sums.requires_grad
    assert "unembed" not in model.__dict__
    with pytest.raises(ValueError, match="differ in shape"):
        sequence_logprobs(model, input_ids, labels[:, :5])
    with pytest.raises(IndexError):  # a position past the end fails inside the forward
        scored_logprobs(model, input_ids, torch.tensor([10_000]), torch.tensor([1]), torch.tensor([0]), 1)
    assert "unembed" not in model.__dict__
    assert model(input_ids).shape == (4, 24, TINY_LLAMA_ARGS["vocab_size"])  # the model is its normal self again


def test_fully_masked_row_gives_zero_count():
    torch.manual_seed(0)
    model = tiny_llama()
    input_ids, labels = batch(seed=4)
    labels[2] = IGNORE_INDEX
    sums, counts = sequence_logprobs(model, input_ids, labels)
    assert counts[2] == 0 and sums[2] == 0  # the loss module then refuses the pair (tested there)
