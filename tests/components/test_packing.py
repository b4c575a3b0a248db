"""packing: true leaves every number unchanged: per-pair log-probs and gradients equal the standard layout's for each
loss kind, no token sees another pair, and the recipe trains and resumes as unpacked."""

import shutil

import pytest
import torch
from helpers import logged
from helpers import run_lora_recipe as run
from safetensors.torch import load_file
from test_speedups import random_pairs

from dpo_components.data import collate_preference_batch
from dpo_components.data.collate import batch_positions
from dpo_components.data.packing import check_documents_fit, collate_packed, pack_rows
from dpo_components.data.segments import CHOSEN, PADDING, PROMPT, REJECTED
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.losses import DPOLoss, KTOLoss, SimPOLoss
from dpo_components.models.attention_masks import attention_mask
from dpo_components.models.document_attention import (
    Document,
    DocumentMask,
    attention_by_document,
    document_attention,
    supports_document_attention,
)
from dpo_components.tiny.model import tiny_llama


def test_packed_layout_by_hand():
    a = {"prompt_ids": [5, 6], "chosen_response_ids": [7], "chosen_labels": [7],
         "rejected_response_ids": [8, 9], "rejected_labels": [8, 9], "index": 10}  # fmt: skip
    b = {"prompt_ids": [3], "chosen_response_ids": [4], "chosen_labels": [4],
         "rejected_response_ids": [2], "rejected_labels": [-100], "index": 11}  # fmt: skip
    batch = collate_packed([a, b], padding_idx=0, share_prompt=True, row_tokens=9, pad_to_multiple_of=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 4, 2, 0]]  # both pairs in one row, 8 -> 9 tokens
    assert batch["input_pos"].tolist() == [[0, 1, 2, 2, 3, 0, 1, 1, 0]]  # positions restart per pair
    assert batch["segments"].tolist() == [[PROMPT, PROMPT, CHOSEN, REJECTED, REJECTED, PROMPT, CHOSEN, REJECTED,
                                           PADDING]]  # fmt: skip
    assert batch["documents"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, -1]]
    # a: 7 from 1, 8 from the last prompt token 1, 9 from 3; b: 4 from 5 (its rejected token is masked)
    assert batch["score_positions"].tolist() == [1, 1, 3, 5]
    assert batch["score_targets"].tolist() == [7, 8, 9, 4]
    assert batch["score_sequences"].tolist() == [0, 2, 2, 1]  # pair i: chosen i, rejected B + i
    assert batch["lengths"].tolist() == [3, 2, 4, 2] and batch["index"].tolist() == [10, 11]
    assert batch_positions(batch) == (8, 9)
    mask = attention_mask(batch["segments"], documents=batch["documents"])[0].int()
    assert mask[5].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0]  # b's prompt sees nothing of a
    assert mask[7].tolist() == [0, 0, 0, 0, 0, 1, 0, 1, 0]  # b's rejected: its prompt and itself
    assert mask[4].tolist() == [1, 1, 0, 1, 1, 0, 0, 0, 0]  # a's second rejected token: prompt and rejected
    unshared = collate_packed([a, b], share_prompt=False)  # 4 documents, rows of the longest (4 tokens)
    assert unshared["input_ids"].tolist() == [[5, 6, 8, 9], [5, 6, 7, 0], [3, 4, 3, 2]]
    assert unshared["input_pos"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    # the same row for attention one document at a time: a = [2 | 1 | 2] from 0, b = [1 | 1 | 1] from 5
    by_document = attention_mask(batch["segments"], documents=batch["documents"], by_document=True)
    assert by_document.documents == (Document(0, 0, 2, 1, 2), Document(0, 5, 1, 1, 1))
    assert by_document.second_masks[2, 2].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]  # = mask[3:5, [0,1,3,4]]
    unshared_documents = DocumentMask.from_segments(unshared["segments"], unshared["documents"]).documents
    assert unshared_documents == (Document(0, 0, 2, 2, 0), Document(1, 0, 2, 1, 0), Document(2, 0, 1, 1, 0),
                                  Document(2, 2, 1, 1, 0))  # fmt: skip


def test_document_mask_refuses_a_row_that_is_no_document():
    segments = torch.tensor([[PROMPT, CHOSEN, PROMPT, REJECTED]])  # without ``documents``: two documents, fine
    assert len(DocumentMask.from_segments(segments).documents) == 2
    with pytest.raises(ValueError, match=r"row 0 at 0 is not \[prompt \| response"):
        DocumentMask.from_segments(torch.tensor([[CHOSEN, REJECTED, PADDING]]))


def test_attention_by_document_equals_sdpa_with_the_dense_mask():
    """q, k, v of two packed rows (shared and unshared documents, padding): every non-padding position's output
    equals dense-mask SDPA's, and padding positions are zero."""
    for share_prompt in (True, False):
        batch = collate_packed(random_pairs(6), share_prompt=share_prompt, row_tokens=64 if share_prompt else 40)
        segments, documents = batch["segments"], batch["documents"]
        n, length = segments.shape
        assert n >= 2 and documents.max() >= 1
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(n, 2, length, 16, generator=g) for _ in range(3))
        dense = attention_mask(segments, documents=documents)[:, None]
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        out = attention_by_document(q, k, v, DocumentMask.from_segments(segments, documents))
        real = (segments != PADDING)[:, None, :, None].expand_as(q)
        torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-6)
        assert torch.equal(out[~real], torch.zeros_like(out[~real]))


def test_pack_rows_by_hand():
    # 36 tokens in 3 rows of 12 exactly (LPT alone needs a fourth row here; the swaps even it out)
    assert pack_rows([5, 9, 3, 7, 2, 2, 8], 12) == [[4, 5, 6], [2, 1], [3, 0]]
    assert pack_rows([6, 6, 6], 12) == [[0, 2], [1]]
    with pytest.raises(ValueError, match="a document of 13 tokens does not fit a row of 12"):
        pack_rows([13, 2], 12)


def test_pack_rows_uses_as_few_rows_as_the_total_needs_filled_evenly():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(40, 200, (32,), generator=g).tolist()  # 32 documents, 3390 tokens
    rows = pack_rows(lengths, budget=512)
    fills = [sum(lengths[i] for i in row) for row in rows]
    assert sorted(i for row in rows for i in row) == list(range(32))
    assert len(rows) == -(-sum(lengths) // 512) == 7 and max(fills) <= 512
    assert 1 - sum(lengths) / (len(rows) * max(fills)) < 0.02  # under 2% padding: the rows are even


LOSSES = {
    "dpo": (lambda: DPOLoss(beta=0.5), False),  # reference-based, summed log-probs
    "simpo": (lambda: SimPOLoss(beta=2.0, gamma=0.5), False),  # reference-free, length-normalised
    "kto": (lambda: KTOLoss(beta=0.5), True),  # unpaired rows: completion + KL completion
}


@pytest.mark.parametrize("attention", ["dense", "by_document"])
@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_packed_losses_and_gradients_equal_the_standard_layout(kind, share_prompt, attention):
    """dense: SDPA with the [R, L, L] mask (a model as torchtune builds it); by_document: the recipes' model
    (``apply_model_fixes``), attention one document at a time."""
    make_loss, unpaired = LOSSES[kind]
    torch.manual_seed(0)
    model = tiny_llama() if attention == "dense" else document_attention(tiny_llama())
    assert supports_document_attention(model) == (attention == "by_document")
    pairs = random_pairs(7)
    if unpaired:
        for i, pair in enumerate(pairs):
            pair["desirable"] = i % 3 != 0
    with torch.no_grad():  # the reference: here the same model, scored once in the standard layout
        reference = concatenated_logprobs(model, collate_preference_batch(pairs)) if kind != "simpo" else None

    def loss_and_grads(batch):
        model.zero_grad()
        policy = concatenated_logprobs(model, batch, chunk_size=5)
        out = make_loss()(policy, reference)
        out.losses.mean().backward()
        return policy, out.losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    standard_batch = collate_preference_batch(pairs)
    packed_batch = collate_packed(pairs, share_prompt=share_prompt)
    assert packed_batch["input_ids"].shape[0] < (7 if share_prompt else 14)  # several pairs share a row
    assert batch_positions(packed_batch)[1] < batch_positions(standard_batch)[1]  # less padding computed
    standard, standard_losses, standard_grads = loss_and_grads(standard_batch)
    packed, packed_losses, packed_grads = loss_and_grads(packed_batch)
    for name in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(packed, name), getattr(standard, name), rtol=1e-5, atol=1e-4)
    assert torch.equal(packed.chosen_tokens, standard.chosen_tokens)
    torch.testing.assert_close(packed_losses, standard_losses, rtol=1e-5, atol=1e-6)
    for name, grad in standard_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("attention", ["dense", "by_document"])
def test_no_token_sees_another_pair(attention):
    """Change every token of the other pairs in a row: this pair's log-probs stay exactly as they were. The same
    check on a dense mask without the document test (a leak) fails, so the test can catch one."""
    torch.manual_seed(0)
    model = tiny_llama().eval() if attention == "dense" else document_attention(tiny_llama().eval())
    pairs = random_pairs(6)
    batch = collate_packed(pairs, share_prompt=True, row_tokens=128)
    assert batch["input_ids"].shape[0] == 1  # all six pairs in one row
    changed = [dict(p) for p in pairs]
    for p in changed[1:]:
        p["prompt_ids"] = [(t + 1) % 500 for t in p["prompt_ids"]]
        p["chosen_response_ids"] = [(t + 7) % 500 for t in p["chosen_response_ids"]]
    other = collate_packed(changed, share_prompt=True, row_tokens=128)
    assert torch.equal(batch["documents"], other["documents"])  # the same placement, other tokens

    def pair0(b, leak=False):
        with torch.no_grad():
            if leak:
                b = {k: v for k, v in b.items() if k != "documents"}  # the shared-row mask alone: a leak
            logps = concatenated_logprobs(model, b)
        return logps.chosen_logps[0], logps.rejected_logps[0]

    assert pair0(batch) == pair0(other)
    if attention == "dense":
        assert pair0(batch, leak=True) != pair0(other, leak=True)


def test_check_documents_fit_names_the_pair_and_the_budget():
    class Data(list):
        source, row_numbers = "train.jsonl", list(range(2, 10))

    pairs = Data(random_pairs(4))
    longest = max(len(p["prompt_ids"]) + len(p["chosen_response_ids"]) + len(p["rejected_response_ids"])
                  for p in pairs)  # fmt: skip
    check_documents_fit(512, True, longest, dataset=pairs)
    with pytest.raises(ValueError, match=rf"pair \d of dataset \(train.jsonl row \d\) needs {longest} tokens .*"
                                         rf"packing_row_tokens {longest - 1}"):  # fmt: skip
        check_documents_fit(512, True, longest - 1, dataset=pairs)
    with pytest.raises(ValueError, match="packing_row_tokens must be in"):
        check_documents_fit(64, True, 65, dataset=pairs)


@pytest.mark.recipe
def test_recipe_packing_with_the_reference_cache_leaves_losses_unchanged_and_resumes_exactly(recipe_cfg, tmp_path):
    common = {"max_steps_per_epoch": 4, "batch_size": 8, "optimizer.lr": 3e-3, "eval_dataset": None}
    base = recipe_cfg(**common, output_dir=str(tmp_path / "base"))
    cache = {"reference.mode": "precomputed", "reference.cache_dir": str(tmp_path / "cache")}  # packed as well
    packed = recipe_cfg(**common, output_dir=str(tmp_path / "packed"), packing=True, prefix_sharing=True,
                        save_every_n_steps=2, **cache)  # fmt: skip
    run(base)
    run(packed)
    base_rows, packed_rows = logged(base), logged(packed)
    assert sorted(base_rows) == sorted(packed_rows) == [1, 2, 3, 4]
    for step in base_rows:
        for name in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert packed_rows[step][name] == pytest.approx(base_rows[step][name], rel=1e-4, abs=1e-5), (step, name)
        assert packed_rows[step]["padding_fraction"] < base_rows[step]["padding_fraction"]
    # a run killed after its step-2 checkpoint resumes to the same step-4 weights, bit for bit
    shutil.copytree(tmp_path / "packed" / "step_2", tmp_path / "resumed" / "step_2")
    resumed = recipe_cfg(**common, output_dir=str(tmp_path / "resumed"), packing=True, prefix_sharing=True,
                         save_every_n_steps=2, resume_from_checkpoint=True, **cache)  # fmt: skip
    run(resumed)
    assert sorted(logged(resumed)) == [3, 4]
    first = load_file(tmp_path / "packed/step_4/adapter/adapter_model.safetensors")
    again = load_file(tmp_path / "resumed/step_4/adapter/adapter_model.safetensors")
    assert first.keys() == again.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), key


@pytest.mark.recipe
def test_packing_leaves_the_fsdp2_and_ipo_recipes_losses_unchanged(tiny_setup, tmp_path):
    """The same switch in the other three recipes (FSDP2 in-process with 1 rank): packed == unpacked per step."""
    from conftest import recipe_config, run_distributed_in_process
    from helpers import IPO_CONFIG
    from helpers import run_ipo_recipe as run_ipo

    from recipes.full_dpo_distributed import FullDPORecipeDistributed
    from recipes.lora_dpo_distributed import LoRADPORecipeDistributed

    def args(out, packed):
        return [f"output_dir={out}", f"checkpointer.checkpoint_dir={tiny_setup / 'sft_model'}",
                f"dataset.data_files={tiny_setup / 'data/train.jsonl'}", "eval_dataset=null", "batch_size=8",
                "max_steps_per_epoch=2", "log_every_n_steps=1", "eval_every_n_steps=null", "save_every_n_steps=null",
                "eval_samples=0", "prepare=null", f"packing={packed}", f"prefix_sharing={packed}"]  # fmt: skip

    recipes = ((FullDPORecipeDistributed, "recipe_configs/tiny/full_dpo_distributed.yaml"),
               (LoRADPORecipeDistributed, "recipe_configs/tiny/lora_dpo_distributed.yaml"))
    for recipe_class, config in recipes:
        rows = {}
        for packed in (False, True):
            out = tmp_path / f"{recipe_class.__name__}_{packed}"
            cfg = recipe_config(config, args(out, packed))
            run_distributed_in_process(recipe_class, cfg, tmp_path / f"pg_{out.name}")
            rows[packed] = logged(type("Cfg", (), {"output_dir": str(out)}))
        for step in (1, 2):
            for name in ("loss", "logps/chosen", "logps/rejected"):
                assert rows[True][step][name] == pytest.approx(rows[False][step][name], rel=1e-4, abs=1e-5), (
                    recipe_class.__name__, step, name)
    rows = {}
    for packed in (False, True):
        cfg = recipe_config(IPO_CONFIG, args(tmp_path / f"ipo_{packed}", packed))
        run_ipo(cfg)
        rows[packed] = logged(cfg)
    for step in (1, 2):
        assert rows[True][step]["loss"] == pytest.approx(rows[False][step]["loss"], rel=1e-4, abs=1e-5)


def test_the_flex_attention_mask_of_packed_rows_equals_the_dense_one():
    """The CUDA path's BlockMask (the same mask function), checked on CPU: flex_attention's forward with it equals
    SDPA with the dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from dpo_components.models.attention_masks import _allowed

    batch = collate_packed(random_pairs(6), share_prompt=True, row_tokens=64)
    segments, documents = batch["segments"], batch["documents"]
    n, length = segments.shape
    assert n == 2 and documents.max() >= 2  # rows of several pairs
    block_mask = create_block_mask(lambda b, h, q, k: _allowed(segments, documents, b, q, k), n, None, length,
                                   length, device="cpu", BLOCK_SIZE=16)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 2, length, 16, generator=g) for _ in range(3))
    dense = attention_mask(segments, documents=documents)[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask), expected, rtol=1e-5, atol=1e-5)


def test_block_masks_run_through_one_dynamic_compile_per_model_without_touching_torchtune(monkeypatch):
    """``apply_model_fixes`` routes a BlockMask through our dynamic flex_attention per model instance (the CUDA
    path, checked on CPU with eager flex_attention standing in for the compiled one); torchtune's module global is
    left alone; a failing compile sends the whole model back to torchtune's call, with one warning."""
    import torchtune.modules.attention_utils as attention_utils
    from torch._dynamo.exc import TorchDynamoException
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from dpo_components.models import apply_model_fixes, attention_masks

    torchtunes_own = getattr(attention_utils, "flex_attention_compiled", None)  # CPU: torchtune defines none
    calls = []

    def eager_flex(q, k, v, block_mask):
        calls.append(q.shape)
        return flex_attention(q, k, v, block_mask=block_mask)

    monkeypatch.setattr(attention_masks, "_SUPPORTS_FLEX_ATTENTION", True)
    monkeypatch.setattr(attention_masks, "dynamic_flex_attention", lambda: eager_flex)
    model = apply_model_fixes(tiny_llama())
    assert getattr(attention_utils, "flex_attention_compiled", None) is torchtunes_own
    modules = [m for m in model.modules() if hasattr(m, "_attention_call")]
    batch = collate_packed(random_pairs(4), share_prompt=True, row_tokens=64)
    segments, documents = batch["segments"], batch["documents"]
    n, length = segments.shape
    block_mask = create_block_mask(lambda b, h, q, k: attention_masks._allowed(segments, documents, b, q, k), n, None,
                                   length, length, device="cpu", BLOCK_SIZE=16)  # fmt: skip
    q, k, v = (torch.randn(n, 2, length, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    out = modules[0]._attention_call(q, k, v, block_mask, 0.0, False)
    dense = attention_mask(segments, documents=documents)[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1 and supports_document_attention(model)  # the document wrapper is still outermost

    def failing(q, k, v, block_mask):
        calls.append("failed")
        raise TorchDynamoException("no compiler here")

    monkeypatch.setattr(attention_masks, "dynamic_flex_attention", lambda: failing)
    torchtunes_calls = []
    torchtunes_call = lambda q, k, v, mask, dropout_p, is_causal: torchtunes_calls.append(1) or q  # noqa: E731
    fallback = attention_masks._Fallback()  # what flex_attention_any_length shares among a model's modules
    first, second = (attention_masks._any_length(torchtunes_call, fallback) for _ in range(2))
    assert first(q, k, v, block_mask, 0.0, False) is q and second(q, k, v, block_mask, 0.0, False) is q
    assert calls.count("failed") == 1 and len(torchtunes_calls) == 2  # one failed compile for the whole model
