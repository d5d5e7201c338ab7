"""The training step's metrics: accumulated on the device without a host sync, reduced
across ranks in one collective on the training device (no Ray: a 2-process gloo group)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mint_ray.training.worker import REDUCE_DTYPE, accumulate_metrics, gather_per_rank, mean_across_ranks

WORLD = 2
ACCUM = 3
# Every collective a reduction could use; each call is counted in the child.
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "gather", "scatter")


def _micro_metrics(rank: int, a: int) -> dict[str, torch.Tensor]:
    # As the losses give them: fp32 scalars, the loss with a graph.
    loss = torch.tensor(float(rank * 10 + a), requires_grad=True) * 1.0
    return {"loss": loss, "reward_accuracy": torch.tensor(0.5 * rank), "valid_pairs": torch.tensor(3.0)}


def _child(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    calls: Counter[str] = Counter()
    seen: list[tuple[str, str]] = []  # (device, dtype) of each tensor a collective got

    def counting(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            if args and torch.is_tensor(args[0]):
                seen.append((str(args[0].device), str(args[0].dtype)))
            return original(*args, **kwargs)
        return wrapper

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, counting(name, getattr(dist, name)))
    device = torch.device("cpu")
    step: dict[str, torch.Tensor] = {}
    for a in range(ACCUM):
        step = accumulate_metrics(step, _micro_metrics(rank, a), 1 / ACCUM)
    assert not calls, "accumulating must not communicate"
    means = mean_across_ranks(step, {"tokens": 100 * (rank + 1), "step_seconds": 2.0 + rank}, device)
    step_calls = dict(calls)
    calls.clear()
    per_rank = gather_per_rank({"peak_rss_gb": 1.5 + rank, "param_shard_fraction": 1 / (rank + 1)}, device)
    Path(out_dir, f"{rank}.json").write_text(json.dumps({
        "means": means, "step_calls": step_calls, "gather_calls": dict(calls), "seen": seen,
        "per_rank": per_rank}))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("collectives")
    mp.start_processes(_child, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, start_method="spawn")
    return [json.loads((tmp / f"{r}.json").read_text()) for r in range(WORLD)]


def test_step_metrics_are_the_mean_over_ranks_and_micro_steps(results: list[dict]) -> None:
    # loss: rank r's micro-steps give 10r, 10r+1, 10r+2 -> mean 10r+1; over ranks (1 + 11)/2.
    expected = {"loss": 6.0, "reward_accuracy": 0.25, "valid_pairs": 3.0, "tokens": 150.0,
                "step_seconds": 2.5}
    for r in results:
        assert r["means"] == pytest.approx(expected)


def test_one_all_reduce_per_step_on_the_training_device(results: list[dict]) -> None:
    for r in results:
        assert r["step_calls"] == {"all_reduce": 1}
        assert r["gather_calls"] == {"all_reduce": 1}
        # The tensors reduced are on the device given, in the explicit dtype.
        assert r["seen"] == [["cpu", str(REDUCE_DTYPE)]] * 2


def test_per_rank_figures_come_back_rank_by_rank(results: list[dict]) -> None:
    for r in results:
        assert r["per_rank"]["peak_rss_gb"] == pytest.approx([1.5, 2.5])
        assert r["per_rank"]["param_shard_fraction"] == pytest.approx([1.0, 0.5])


def test_accumulation_reads_no_value_from_the_device() -> None:
    """Meta tensors have no values: any ``float()``/``.item()`` per micro-step raises here,
    as it would stall a GPU step on the host."""
    step: dict[str, torch.Tensor] = {}
    for _ in range(ACCUM):
        loss = torch.empty((), device="meta", requires_grad=True) * 2.0
        step = accumulate_metrics(step, {"loss": loss, "valid_pairs": torch.empty((), device="meta")}, 1 / ACCUM)
    assert set(step) == {"loss", "valid_pairs"}
    for v in step.values():
        assert v.device.type == "meta" and v.dtype == REDUCE_DTYPE and not v.requires_grad
