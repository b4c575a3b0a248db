"""Likelihood displacement (issue 44): the per-pair ``displacement/*`` metrics against their formulas, the warning
on a displacing and a healthy trajectory, and the data audit's CHES, edit distance and ranking."""

import json
import math

import pytest
import torch

from dpo_components.audit import ResponseHiddenSums, audit_pairs, ches, edit_distance
from dpo_components.data import make_collator, tokenize_rows
from dpo_components.logprobs import concatenated_logprobs
from dpo_components.losses import DPOLoss, IPOLoss, KTOLoss, SequenceLogProbs, SimPOLoss, WeightedSum
from dpo_components.metrics import DisplacementWatch, PreferenceMetrics
from dpo_components.reference import build_reference
from dpo_components.settings import RecipeSettings, ReferenceSettings
from dpo_components.tiny import synthetic
from dpo_components.tiny.model import tiny_llama
from dpo_components.tools.audit import audit

TOKENS = torch.tensor([4, 5, 2, 8])
REFERENCE = SequenceLogProbs(torch.tensor([-10.0, -10, -10, -10]), torch.tensor([-12.0, -12, -12, -12]), TOKENS, TOKENS)
POLICY = SequenceLogProbs(torch.tensor([-9.0, -11, -20, -10]), torch.tensor([-12.0, -15, -30, -100]), TOKENS, TOKENS)


def test_the_metrics_per_pair_follow_their_formulas():
    c = POLICY.chosen_logps - REFERENCE.chosen_logps  # +1, -1, -10, 0
    r = POLICY.rejected_logps - REFERENCE.rejected_logps  # 0, -3, -18, -88
    h = c - r
    for loss, gradient in (
        (DPOLoss(beta=0.1), lambda h: 2 * 0.1 * torch.sigmoid(-0.1 * h)),  # |dL/dpi_w| + |dL/dpi_l|
        (IPOLoss(beta=0.1, average_logprobs=False), lambda h: 4 * (h - 5.0).abs()),  # (h - 1/(2 beta))^2
        (IPOLoss(beta=0.1), lambda h: 4 * (h / TOKENS - 5.0).abs() / TOKENS),  # on per-token averages
    ):
        m = loss(POLICY, REFERENCE).metrics
        assert m["displacement/chosen_below_reference"].tolist() == (c < 0).float().tolist()
        assert m["displacement/both_below_reference"].tolist() == ((c < 0) & (r < 0)).float().tolist()
        torch.testing.assert_close(m["displacement/chosen_logp_change"], c / TOKENS)
        torch.testing.assert_close(m["displacement/rejected_logp_change"], r / TOKENS)
        saturated = gradient(h) < 0.01 * gradient(torch.zeros(4))
        assert m["displacement/saturated"].tolist() == saturated.float().tolist(), type(loss).__name__
    assert DPOLoss(beta=0.1)(POLICY, REFERENCE).metrics["displacement/saturated"].tolist() == [0, 0, 0, 1]  # 0.1*88
    # with the NLL term the preference loss is what counts: the same pairs saturated
    nll = DPOLoss(beta=0.1, nll_weight=1.0)(POLICY, REFERENCE).metrics["displacement/saturated"]
    assert nll.tolist() == [0, 0, 0, 1]
    assert not any(k.startswith("displacement/") for k in SimPOLoss()(POLICY, None).metrics)  # no reference
    # a sum of losses leaves a pair alone only where every term with a reference does
    dpo, ipo = DPOLoss(beta=0.1), IPOLoss(beta=0.1, average_logprobs=False)
    both = WeightedSum([{"loss": ipo}, {"weight": 0.5, "loss": dpo}])(POLICY, REFERENCE).metrics
    expected = dpo(POLICY, REFERENCE).metrics["displacement/saturated"] * ipo(POLICY, REFERENCE).metrics[
        "displacement/saturated"]  # fmt: skip
    assert both["displacement/saturated"].tolist() == expected.tolist()
    # IPO reaches its target margin 1/(2 beta) = 5 and stops pulling: saturated there, on sums or per-token averages
    four = torch.tensor([4])
    for loss, h, expected in ((IPOLoss(beta=0.1, average_logprobs=False), 5.0, 1.0), (IPOLoss(beta=0.1), 5.0, 0.0),
                              (IPOLoss(beta=0.1), 20.0, 1.0)):  # fmt: skip
        policy = SequenceLogProbs(torch.tensor([-10.0 + h]), torch.tensor([-12.0]), four, four)
        reference = SequenceLogProbs(torch.tensor([-10.0]), torch.tensor([-12.0]), four, four)
        assert loss(policy, reference).metrics["displacement/saturated"].item() == expected, (h, loss)


def test_the_metrics_leave_the_steps_gradient_alone_and_average_per_pair():
    policy = SequenceLogProbs(POLICY.chosen_logps.clone().requires_grad_(), POLICY.rejected_logps.clone()
                              .requires_grad_(), TOKENS, TOKENS)  # fmt: skip
    DPOLoss(beta=0.1)(policy, REFERENCE).losses.sum().backward()
    expected = -0.1 * torch.sigmoid(-0.1 * (policy.chosen_logps - REFERENCE.chosen_logps
                                            - policy.rejected_logps + REFERENCE.rejected_logps)).detach()  # fmt: skip
    torch.testing.assert_close(policy.chosen_logps.grad, expected)  # the loss's own gradient, nothing added
    metrics = PreferenceMetrics()
    for half in (slice(0, 1), slice(1, 4)):  # two micro-batches of 1 and 3 pairs: averaged over the 4 pairs
        policy_part, reference_part = (_part(s, half) for s in (POLICY, REFERENCE))
        metrics.update(DPOLoss(beta=0.1)(policy_part, reference_part), policy_part)
    assert metrics.compute()["displacement/chosen_below_reference"] == 0.5
    kto = KTOLoss()(SequenceLogProbs(POLICY.chosen_logps, POLICY.rejected_logps, TOKENS, TOKENS,
                                     desirable=torch.tensor([1, 0, 1, 0])), REFERENCE)  # fmt: skip
    assert not any(k.startswith("displacement/") for k in kto.metrics)  # unpaired rows: no pairs to compare


def _part(logps, rows):
    return SequenceLogProbs(*(t[rows] for t in (logps.chosen_logps, logps.rejected_logps, logps.chosen_tokens,
                                                logps.rejected_tokens)))  # fmt: skip


def _trajectory(steps, chosen, margin, below):
    return [(s, {"displacement/chosen_logp_change": chosen(s), "rewards/margins": margin(s),
                 "displacement/chosen_below_reference": below(s)}) for s in steps]  # fmt: skip


def test_the_warning_fires_once_on_displacement_and_never_on_a_healthy_run(caplog):
    watch = DisplacementWatch()
    fired = [s for s, row in _trajectory(range(1, 63), lambda s: -0.02 * s, lambda s: 0.2 * s, lambda s: 0.9)
             if watch.update(s, row)]  # fmt: skip
    assert fired == [20]  # not before min_step, once
    assert "fell below the reference's in 90% of pairs over steps 1-20 (-0.40 nats per token" in caplog.text
    assert "loss.nll_weight=1.0" in caplog.text and "DPOPLoss" in caplog.text
    healthy = DisplacementWatch()  # a dip below the reference that recovers while the margin grows (the demo's)
    dip = lambda s: -0.05 * math.sin(math.pi * s / 62)  # noqa: E731
    assert not [s for s, row in _trajectory(range(1, 63), dip, lambda s: 0.2 * s, lambda s: 0.6) if
                healthy.update(s, row)]  # fmt: skip
    sparse = DisplacementWatch()  # logged every 25 steps: the last 3 lines are watched
    fired = [s for s, row in _trajectory(range(25, 201, 25), lambda s: -0.02 * s, lambda s: 0.2 * s, lambda s: 0.9)
             if sparse.update(s, row)]  # fmt: skip
    assert fired == [50]  # the lines of steps 25 and 50 show it
    flat = DisplacementWatch()  # both falling, the margin flat: not this warning (the loss has nothing to gain)
    assert not [s for s, row in _trajectory(range(1, 63), lambda s: -0.02 * s, lambda s: 1.0, lambda s: 0.9)
                if flat.update(s, row)]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_llama().eval()


def test_ches_is_the_papers_formula_on_the_hidden_states_that_predict_the_response(model, tokenizer):
    rows = synthetic.preference_pairs(4, seed=0)
    pairs = tokenize_rows(rows, tokenizer, source="rows", max_length=96)
    batch = make_collator(tokenizer.pad_id, model.max_seq_len, datasets={"d": pairs})([pairs[i] for i in range(4)])
    captured = {}
    hook = model.norm.register_forward_hook(lambda module, args, output: captured.setdefault("h", output))
    with torch.no_grad():
        model(batch["input_ids"])
    hook.remove()
    sink = ResponseHiddenSums()
    with torch.no_grad():
        concatenated_logprobs(model, batch, hidden_sink=sink)
    sums, counts = sink.sums, sink.counts
    for n in range(8):  # position t - 1 predicts the label at t: the last prompt token .. second-to-last response
        positions = (batch["labels"][n, 1:] != -100).nonzero().squeeze(-1)
        expected = captured["h"][n, positions].float()
        torch.testing.assert_close(sums[n], expected.sum(0), rtol=1e-5, atol=1e-5)
        assert counts[n] == len(positions)
    plus, minus = sums[:4] / counts[:4, None], sums[4:] / counts[4:, None]
    direct = torch.stack([plus[i] @ minus[i] - plus[i] @ plus[i] for i in range(4)])
    torch.testing.assert_close(ches(sums[:4], sums[4:], counts[:4], counts[4:]), direct, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sink.pair_ches(), direct, rtol=1e-4, atol=1e-4)
    shared = make_collator(tokenizer.pad_id, model.max_seq_len, prefix_sharing=True, datasets={"d": pairs})
    sink_shared = ResponseHiddenSums()  # the prefix-shared layout scores the same positions: the same CHES
    with torch.no_grad():
        concatenated_logprobs(model, shared([pairs[i] for i in range(4)]), hidden_sink=sink_shared)
    torch.testing.assert_close(sink_shared.pair_ches(), direct, rtol=1e-4, atol=1e-4)


def test_a_precomputed_reference_pass_writes_the_audit_the_command_computes(model, tokenizer, tmp_path, caplog):
    """The reference pass collects CHES in its own forward, keeps it in the cache, and the setup writes
    data_audit.json (computed and reused alike) with the standalone pass's values."""
    pairs = tokenize_rows(synthetic.near_duplicate_pairs(6, seed=0) + synthetic.preference_pairs(6, seed=0),
                          tokenizer, source="rows", max_length=96)  # fmt: skip
    collate = make_collator(tokenizer.pad_id, model.max_seq_len, datasets={"d": pairs})
    expected = audit_pairs(model, pairs, collate, 5, torch.device("cpu"))
    settings = RecipeSettings(device=torch.device("cpu"), dtype=torch.float32, output_dir=tmp_path, seed=0,
                              batch_size=4, gradient_accumulation_steps=1, epochs=1,
                              reference=ReferenceSettings(mode="precomputed", cache_dir=tmp_path / "cache",
                                                          batch_size=5))  # fmt: skip
    for reused in (False, True):
        (tmp_path / "data_audit.json").unlink(missing_ok=True)
        with caplog.at_level("INFO"):
            reference = build_reference(settings, DPOLoss(), model, has_adapters=False,
                                        frozen_copy=lambda checkpointer: model, datasets={"train": pairs},
                                        collate_fn=collate, fingerprint={"base_checkpoint": "d"}, tokenizer=tokenizer)
        assert reference.kind == "precomputed" and ("reused" in caplog.text) == reused  # fmt: skip
        report = json.loads((tmp_path / "data_audit.json").read_text())
        torch.testing.assert_close(torch.tensor([p["ches"] for p in report["per_pair"]]), torch.tensor(expected),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        top = report["most_similar"][0]
        assert top["ches"] == max(expected) and top["edit_distance"] is not None and "chosen" in top
        assert "data audit: 12 pairs" in caplog.text


def _levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[:], i
        for j, y in enumerate(b, 1):
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (x != y))
    return row[-1]


def test_edit_distance_equals_the_textbook_one():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        a = torch.randint(0, 4, (int(torch.randint(0, 9, (1,), generator=generator)),), generator=generator).tolist()
        b = torch.randint(0, 4, (int(torch.randint(0, 9, (1,), generator=generator)),), generator=generator).tolist()
        assert edit_distance(a, b) == _levenshtein(a, b), (a, b)


def test_the_audit_scores_one_word_edits_as_alike_and_lists_the_most_similar_pairs(recipe_cfg, tmp_path):
    """On the SFT model, pairs whose responses differ in one word score a higher CHES than pairs of two independent
    samples (measured: median -0.02 against -0.72 over 200 pairs each; near-duplicates sit at 0, where
    <h+, h-> = ||h+||^2), with edit distance 1; the report lists the highest-CHES pairs with their text and rows."""
    mixed = synthetic.near_duplicate_pairs(24, seed=0) + synthetic.preference_pairs(24, seed=0)
    order = torch.randperm(48, generator=torch.Generator().manual_seed(0)).tolist()
    path = synthetic.write_jsonl([mixed[i] for i in order], tmp_path / "mixed.jsonl")
    report = audit(recipe_cfg(**{"dataset.data_files": str(path)}), top=10, out=tmp_path / "audit.json")
    assert report["pairs"] == 48 and json.loads((tmp_path / "audit.json").read_text())["pairs"] == 48
    near = [order[p["row"]] < 24 for p in report["per_pair"]]  # file row k holds mixed[order[k]]
    scores = torch.tensor([p["ches"] for p in report["per_pair"]])
    near_mask = torch.tensor(near)
    assert scores[near_mask].median() > scores[~near_mask].median() + 0.2
    assert all(p["edit_distance"] == 1 for p, is_near in zip(report["per_pair"], near) if is_near)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    top = report["most_similar"]
    assert [p["ches"] for p in top] == sorted(scores.tolist(), reverse=True)[:10]
    for p in top:
        assert rows[p["row"]]["chosen"] in p["chosen"] and rows[p["row"]]["rejected"] in p["rejected"]
