"""dpo_components.distributed (and the collectives of run.py and metrics.py) on a real 2-process gloo group: each
rank's slice of a global batch, eval batches, as many micro-batches on every rank, metrics averaged over ranks,
rank 0's result and rank 0's error on every rank. One spawn of two processes, a few seconds."""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dpo_components.distributed import agree_micro_batches, from_rank_zero, rank_slice
from dpo_components.losses import PreferenceLossOutput, SequenceLogProbs
from dpo_components.metrics import PreferenceMetrics, all_reduce_metrics
from dpo_components.run import eval_batch_starts


def refuse_on_rank_zero() -> None:
    raise ValueError("bad row 7")


def checks(rank: int) -> dict:
    found = {}
    found["slice"] = rank_slice(list(range(20)), batch_size=3)  # global batches of 6, 3 whole ones (18 pairs)
    found["eval"] = eval_batch_starts(num_items=10, batch_size=3)  # 4 batches over 2 ranks
    mine = [[0, 1], [2, 3]] if rank == 0 else [[0, 1, 2, 3]]  # uneven plans: rank 1 splits to match rank 0
    found["micro"] = agree_micro_batches(mine, torch.device("cpu"))
    metrics = PreferenceMetrics()
    losses = torch.tensor([1.0, 2.0]) if rank == 0 else torch.tensor([6.0])
    margins = torch.tensor([1.0, -1.0]) if rank == 0 else torch.tensor([2.0])
    ones = torch.ones_like(losses)
    metrics.update(PreferenceLossOutput(losses, margins, torch.zeros_like(margins)),
                   SequenceLogProbs(ones, ones, ones, ones))  # fmt: skip
    found["metrics"] = all_reduce_metrics(metrics, torch.device("cpu"))
    found["from_rank_zero"] = from_rank_zero(lambda: f"made on rank {dist.get_rank()}")
    try:
        from_rank_zero(refuse_on_rank_zero)
    except ValueError as error:
        found["error"] = str(error)
    return found


def worker(rank: int, world_size: int, init_file: str, results: dict) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        results[rank] = checks(rank)
        dist.destroy_process_group()
    except Exception:
        results[rank] = traceback.format_exc()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = mp.Manager().dict()
    init_file = str(tmp_path_factory.mktemp("pg") / "init")
    mp.spawn(worker, args=(2, init_file, results), nprocs=2, join=True)
    for rank in (0, 1):
        assert isinstance(results[rank], dict), results[rank]
    return dict(results)


def test_each_rank_takes_its_slice_of_every_global_batch(two_ranks):
    assert two_ranks[0]["slice"] == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert two_ranks[1]["slice"] == [3, 4, 5, 9, 10, 11, 15, 16, 17]


def test_eval_batches_alternate_and_every_rank_runs_as_many(two_ranks):
    assert two_ranks[0]["eval"] == [(0, True), (6, True)]
    assert two_ranks[1]["eval"] == [(3, True), (9, True)]


def test_every_rank_runs_as_many_micro_batches(two_ranks):
    assert two_ranks[0]["micro"] == [[0, 1], [2, 3]]
    assert sorted(map(len, two_ranks[1]["micro"])) == [2, 2]
    assert sorted(sum(two_ranks[1]["micro"], [])) == [0, 1, 2, 3]


def test_metrics_are_averaged_over_the_pairs_of_all_ranks(two_ranks):
    for rank in (0, 1):
        metrics = two_ranks[rank]["metrics"]
        assert metrics["loss"] == pytest.approx((1 + 2 + 6) / 3)
        assert metrics["rewards/accuracies"] == pytest.approx(2 / 3)


def test_rank_zeros_result_and_error_reach_every_rank(two_ranks):
    assert two_ranks[0]["from_rank_zero"] == two_ranks[1]["from_rank_zero"] == "made on rank 0"
    assert two_ranks[0]["error"] == two_ranks[1]["error"] == "bad row 7"


def test_a_recipe_started_without_torchrun_is_a_group_of_one(tmp_path):
    """``python recipes/full_dpo_distributed.py --config ...`` (no RANK in the environment): process_group makes a
    one-process group, in which rank 0's work still reaches the caller and the run ends at its barrier."""
    import subprocess
    import sys

    code = ("import torch.distributed as dist\n"
            "from dpo_components.distributed import from_rank_zero, process_group\n"
            "with process_group('cpu'):\n"
            "    print(dist.get_world_size(), dist.get_rank(), from_rank_zero(lambda: 'made'))\n")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0", "made"]
